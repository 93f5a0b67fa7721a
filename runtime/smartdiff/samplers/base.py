"""Shared pieces of the flow-matching samplers: the shifted sigma grid and the step loop.

Role: the noise-schedule helpers every solver builds its grid from, and
``FlowSampler``, the base class that owns one request's schedule (``timesteps``
for the DiT, ``sigmas`` for the update) and checks and converts what ``step``
receives before the solver-specific update runs.

Flow matching (rectified flow), as Wan2.1 is trained: a latent at noise level
``sigma`` in [0, 1] is ``x = (1 - sigma) * x0 + sigma * noise``; the DiT, called with
timestep ``sigma * T`` (``T = num_train_timesteps``), predicts the velocity
``v = noise - x0``, so the data prediction is ``x0 = x - sigma * v``. Sampling walks
a decreasing grid ``sigma_0 > ... > sigma_{N-1} > sigma_N = 0``. The grid is a
uniform one bent by the timestep shift ``s``: ``t -> s * t / (1 + (s - 1) * t)``
(Wan's official ``shift``; with ``mu = log(s)`` it is also diffusers' "exponential"
time shift). For the exponential-integrator solvers (UniPC, DPM++) the natural
time is the half log-SNR ``lambda = log(alpha) - log(sigma)`` with ``alpha = 1 - sigma``.

Numerics follow diffusers 0.42: the grid is computed in numpy, the per-step scalar
coefficients in float32 0-d tensors, the update on the latent in float32 (float64
inputs stay float64), and the result is returned in the sample's dtype.

Talks to: ``config`` (``SamplerConfig``); used by ``unipc``, ``dpm`` and ``euler``.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np
import torch

from smartdiff.samplers.config import SamplerConfig


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Bend a sigma grid by the flow-matching shift: ``s * t / (1 + (s - 1) * t)``.

    Computed in the array's own dtype (float64 for UniPC and DPM++, float32 for
    Euler, as diffusers does). ``shift=1`` is the identity; ``t=0`` and ``t=1`` are
    fixed points.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def truncated_timesteps(sigmas: np.ndarray, num_train_timesteps: int) -> torch.Tensor:
    """Model timesteps ``trunc(sigma * T)`` as float32, from a float64 sigma grid.

    UniPC and DPM++ in diffusers (and Wan's official solvers) hand the DiT integer
    timesteps, the product cast to int64 (truncation toward zero).
    """
    return torch.from_numpy((sigmas * num_train_timesteps).astype(np.int64)).to(torch.float32)


def with_final_zero(sigmas: np.ndarray) -> torch.Tensor:
    """The float32 sigma tensor with the terminal ``sigma_N = 0`` appended."""
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """``lambda = log(alpha) - log(sigma)`` with ``alpha = 1 - sigma`` (flow matching)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class FlowSampler(abc.ABC):
    """One request's flow-matching sampler: its schedule and its step history.

    Call ``step(model_output, sample, i)`` once for ``i = 0, 1, ..., num_steps - 1``,
    in order, with the DiT output for ``timesteps[i]``; it returns the sample at
    ``sigmas[i + 1]`` (the last step returns the clean latent). The multistep
    solvers remember earlier data predictions, so a sampler serves one request:
    build a new one per request, or call ``reset()`` to start over. Updates are
    elementwise, so a sampler may step a shard of the latent as long as every
    rank steps its shard with the same schedule.

    Subclasses set ``name``, build the grid in ``_schedule`` and the update in
    ``_advance``.
    """

    name: ClassVar[str]

    def __init__(self, config: SamplerConfig) -> None:
        if not isinstance(config, SamplerConfig):
            raise TypeError(
                f"config={config!r} is not allowed: expected a SamplerConfig, "
                f"got {type(config).__name__}"
            )
        self._config = config
        sigmas, timesteps = self._schedule(config)
        if sigmas.shape != (config.num_steps + 1,) or timesteps.shape != (config.num_steps,):
            raise AssertionError(
                f"{type(self).__name__}._schedule returned sigmas of shape "
                f"{tuple(sigmas.shape)} and timesteps of shape {tuple(timesteps.shape)} "
                f"for num_steps={config.num_steps}"
            )
        self._sigmas = sigmas
        self._timesteps = timesteps
        self._next_index = 0
        self.reset()

    @classmethod
    @abc.abstractmethod
    def _schedule(cls, config: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas, timesteps)``: float32 CPU tensors of N + 1 and N entries."""

    @abc.abstractmethod
    def _clear_history(self) -> None:
        """Forget every earlier step (the multistep solvers' memory)."""

    @abc.abstractmethod
    def _advance(self, velocity: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        """The sample at ``sigmas[index + 1]``, from inputs in the compute dtype."""

    @property
    def config(self) -> SamplerConfig:
        """The configuration this sampler was built from."""
        return self._config

    @property
    def num_steps(self) -> int:
        """Number of ``step`` calls (model evaluations) in one run."""
        return self._config.num_steps

    @property
    def timesteps(self) -> torch.Tensor:
        """Model timesteps, float32 on CPU, shape ``(num_steps,)``: what the DiT gets."""
        return self._timesteps.clone()

    @property
    def sigmas(self) -> torch.Tensor:
        """Noise levels, float32 on CPU, shape ``(num_steps + 1,)``, the last one 0."""
        return self._sigmas.clone()

    @property
    def next_step_index(self) -> int:
        """The ``step_index`` the next ``step`` call must pass."""
        return self._next_index

    def reset(self) -> None:
        """Start over from step 0, forgetting every earlier step."""
        self._next_index = 0
        self._clear_history()

    def sigma(self, index: int) -> float:
        """``sigmas[index]`` as a Python float (exactly the float32 value)."""
        return float(self._sigmas[index].item())

    def step(
        self, model_output: torch.Tensor, sample: torch.Tensor, step_index: int
    ) -> torch.Tensor:
        """Advance ``sample`` from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``.

        Args:
            model_output: The DiT's velocity prediction at ``timesteps[step_index]``
                (after classifier-free guidance), same shape as ``sample``.
            sample: The current latent, any floating dtype and device.
            step_index: Position in the schedule; must equal ``next_step_index``.

        Returns:
            The next latent, in ``sample``'s dtype, on its device. The sampler keeps
            references to tensors it derived from the inputs; do not modify the
            returned tensor in place before the next step.
        """
        if isinstance(step_index, bool) or not isinstance(step_index, int):
            raise TypeError(f"step_index={step_index!r} is not allowed: expected an int")
        if step_index != self._next_index or step_index >= self.num_steps:
            if self._next_index >= self.num_steps:
                allowed = f"all {self.num_steps} steps are done; call reset() to start over"
            else:
                allowed = f"steps run in order; the next one is {self._next_index}"
            raise ValueError(f"step_index={step_index} is not allowed: {allowed}")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output.shape={tuple(model_output.shape)} is not allowed: "
                f"must equal sample.shape={tuple(sample.shape)}"
            )
        for name, tensor in (("sample", sample), ("model_output", model_output)):
            if not tensor.is_floating_point():
                raise TypeError(
                    f"{name}.dtype={tensor.dtype} is not allowed: expected a floating dtype"
                )
        compute_dtype = torch.promote_types(
            torch.promote_types(sample.dtype, model_output.dtype), torch.float32
        )
        result = self._advance(model_output.to(compute_dtype), sample.to(compute_dtype), step_index)
        self._next_index += 1
        return result.to(sample.dtype)
