"""Which DiT expert and which guidance scale each denoising step uses (Wan2.2 A14B).

The Wan2.2 A14B models hold two DiTs of the Wan2.1-14B shape: a high-noise expert for the
early steps and a low-noise expert for the late ones. As diffusers' ``WanPipeline`` with
``transformer_2`` and ``boundary_ratio`` (and the official ``WanT2V`` of Wan2.2) do, a step at
timestep ``t`` runs the high-noise expert (index 0) with ``guidance_scale`` when
``t >= boundary_ratio * num_train_timesteps`` and the low-noise expert (index 1) with
``guidance_scale_2`` otherwise; without a boundary every step runs expert 0 with
``guidance_scale``. Whether classifier-free guidance runs at all is decided by
``guidance_scale > 1`` alone, as diffusers does.

The generator asks :meth:`ExpertSchedule.plan` for the whole schedule up front, so that the
offloader (:mod:`smartdiff.engine.offload`) knows when the switch comes. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertStep:
    """One step: the expert index (0 high-noise, 1 low-noise) and its guidance scale."""

    expert: int
    guidance_scale: float


@dataclass(frozen=True, kw_only=True)
class ExpertSchedule:
    """The switching rule of a one- or two-expert model.

    Args:
        boundary_ratio: fraction of ``num_train_timesteps`` where the low-noise expert takes
            over, in (0, 1); ``None`` for a single-expert model.
        guidance_scale: guidance of expert 0 (and of the only expert).
        guidance_scale_2: guidance of expert 1; ``None`` means ``guidance_scale``.
        num_train_timesteps: the training schedule's length (1000 for Wan).
    """

    boundary_ratio: float | None
    guidance_scale: float
    guidance_scale_2: float | None = None
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.boundary_ratio is not None and not 0.0 < self.boundary_ratio < 1.0:
            raise ValueError(
                f"ExpertSchedule.boundary_ratio must be in (0, 1) or None, got "
                f"{self.boundary_ratio!r}"
            )
        if self.boundary_ratio is None and self.guidance_scale_2 is not None:
            raise ValueError(
                f"ExpertSchedule.guidance_scale_2={self.guidance_scale_2!r} needs a two-expert "
                "model (boundary_ratio set); allowed for one expert: None"
            )
        for name in ("guidance_scale", "guidance_scale_2"):
            value = getattr(self, name)
            if value is not None and not value >= 0.0:
                raise ValueError(f"ExpertSchedule.{name} must be >= 0, got {value!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(
                f"ExpertSchedule.num_train_timesteps must be >= 1, got {self.num_train_timesteps}"
            )

    @property
    def num_experts(self) -> int:
        return 1 if self.boundary_ratio is None else 2

    @property
    def boundary_timestep(self) -> float | None:
        """``boundary_ratio * num_train_timesteps``, or ``None`` for one expert."""
        if self.boundary_ratio is None:
            return None
        return self.boundary_ratio * self.num_train_timesteps

    @property
    def do_cfg(self) -> bool:
        """Whether classifier-free guidance runs (``guidance_scale > 1``, both experts)."""
        return self.guidance_scale > 1.0

    def step(self, timestep: float) -> ExpertStep:
        """The expert and guidance of the step at ``timestep``."""
        boundary = self.boundary_timestep
        if boundary is None or timestep >= boundary:
            return ExpertStep(0, self.guidance_scale)
        second = self.guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2
        return ExpertStep(1, second)

    def plan(self, timesteps: Sequence[float]) -> list[ExpertStep]:
        """:meth:`step` for every timestep of a sampler schedule, in order."""
        return [self.step(float(t)) for t in timesteps]
