"""Pyramid Attention Broadcast (PAB): reuse attention outputs across nearby steps.

PAB (Zhao et al., 2024; written from the paper's description) observes that attention outputs
change little in the middle of the denoising schedule, cross-attention least of all. Inside a
timestep window (default ``(100, 800)`` on the 0..1000 scale, leaving the first and last steps
exact), each block's self-attention output is recomputed every ``self_range`` steps and its
cross-attention output every ``cross_range`` steps; in between, the block uses the output kept
from the last computation (the "broadcast"), skipping the projections and the attention
kernel. The rest of the block (modulation, gates, FFN) always runs with the current step.

Wan has one self-attention over space and time, so PAB's separate spatial/temporal ranges
collapse into ``self_range``; the pyramid is ``cross_range = 3 x self_range`` (the paper's 2 : 6
spatial : cross ratio). The request threshold is the self-attention range in steps (its
integer part): 0 or 1 broadcasts nothing (bit-identical to no cache); the default is 2.

Decisions depend on the step only, so every rank and branch agrees with no communication;
outputs are kept per branch, per block and per rank (this rank's token shard). Memory: two
``[B, S, dim]`` tensors per block per branch (1.3B at 480p: ~12 GB for both CFG branches in
bf16; shard with context parallelism for larger models).

Talks to: :mod:`.base`, ``WanBlock``'s ``reuse`` hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Final, Literal

import torch

from smartdiff.cache.base import CacheStats, ReduceFn, StepCache, StepPosition, run_blocks

if TYPE_CHECKING:
    from smartdiff.models.wan_dit import AttentionFn, WanDiT, WanDiTInputs

Kind = Literal["self", "cross"]
KINDS: Final[tuple[Kind, ...]] = ("self", "cross")
DEFAULT_SELF_RANGE: Final = 2
CROSS_RATIO: Final = 3
DEFAULT_WINDOW: Final = (100.0, 800.0)


@dataclass(frozen=True)
class PabConfig:
    """Args:
    self_range: self-attention outputs are recomputed every this many steps in the window
        (1: always).
    cross_range: the same for cross-attention.
    window: ``(low, high)`` timesteps (0..1000) strictly inside which outputs are reused.
    """

    self_range: int = DEFAULT_SELF_RANGE
    cross_range: int = DEFAULT_SELF_RANGE * CROSS_RATIO
    window: tuple[float, float] = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        for name in ("self_range", "cross_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PabConfig.{name} must be an int >= 1, got {value!r}")
        low, high = self.window
        if not 0 <= low < high:
            raise ValueError(
                f"PabConfig.window must be (low, high) with 0 <= low < high, got {self.window!r}"
            )

    @classmethod
    def from_threshold(cls, threshold: float | None) -> PabConfig:
        """The request threshold is the self-attention range (module docstring)."""
        if threshold is None:
            return cls()
        self_range = max(1, int(threshold))
        cross_range = 1 if self_range == 1 else self_range * CROSS_RATIO
        return cls(self_range=self_range, cross_range=cross_range)

    def range_of(self, kind: Kind) -> int:
        return self.self_range if kind == "self" else self.cross_range


@dataclass
class PabBranch:
    """Kept outputs per block, and steps since each kind was last computed."""

    outputs: dict[Kind, dict[int, torch.Tensor]] = field(
        default_factory=lambda: {"self": {}, "cross": {}}
    )
    since_computed: dict[Kind, int] = field(default_factory=lambda: {"self": 0, "cross": 0})
    computing: dict[Kind, bool] = field(default_factory=lambda: {"self": True, "cross": True})
    keeping: bool = False


@dataclass(frozen=True)
class _BlockReuse:
    """The ``reuse`` hook of one block for one call."""

    branch: PabBranch
    block: int
    stats: CacheStats

    def __call__(self, kind: Kind, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        kept = self.branch.outputs[kind]
        if not self.branch.computing[kind] and self.block in kept:
            self.stats.attention_reused += 1
            return kept[self.block]
        out = compute()
        self.stats.attention_computed += 1
        if self.branch.keeping:
            kept[self.block] = out
        else:
            kept.pop(self.block, None)
        return out


class PyramidAttentionBroadcast(StepCache[PabBranch]):
    """PAB (module docstring)."""

    name: ClassVar[str] = "pab"

    def __init__(self, config: PabConfig, reduce: ReduceFn | None = None) -> None:
        super().__init__(reduce)
        self.config = config

    def new_branch(self) -> PabBranch:
        return PabBranch()

    def plan(self, state: PabBranch, position: StepPosition) -> None:
        """Decide, for this call, which kinds are computed and whether outputs are kept."""
        low, high = self.config.window
        inside = low < position.timestep < high
        state.keeping = inside
        for kind in KINDS:
            every = self.config.range_of(kind)
            due = state.since_computed[kind] + 1 >= every
            compute = not inside or every <= 1 or due or not state.outputs[kind]
            state.computing[kind] = compute
            state.since_computed[kind] = 0 if compute else state.since_computed[kind] + 1

    def forward(
        self,
        state: PabBranch,
        position: StepPosition,
        model: WanDiT,
        x: torch.Tensor,
        inputs: WanDiTInputs,
        attention: AttentionFn,
        valid_tokens: int | None,
    ) -> torch.Tensor:
        self.plan(state, position)
        return run_blocks(
            model, x, inputs, attention, reuse=lambda index: _BlockReuse(state, index, self.stats)
        )
