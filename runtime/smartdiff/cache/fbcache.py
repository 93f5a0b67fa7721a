"""First-block cache: run block 0, and skip the others when its change barely moved.

The idea of ParaAttention's first-block cache (written from its description): the first
block's residual ``r = block0(x) - x`` is a cheap probe of how much this step differs from
the last one that ran every block. Per CFG branch:

1. run block 0: ``h = block0(x)``, ``r = h - x``;
2. ``d = sum|r - r_prev| / sum|r_prev|`` over the real tokens, with ``r_prev`` the first-block
   residual of the last fully computed step;
3. if ``d < threshold``: return ``h + R``, with ``R`` the residual of blocks ``1..N-1`` kept from
   that step; otherwise run blocks ``1..N-1``, keep ``r`` and ``R``.

The first step of a branch is always computed; a threshold of 0 never skips. With context
parallelism the two sums are reduced over the ranks sharing the branch before dividing (and
the padding rows of a shard are left out), so every rank takes the same decision.

Talks to: :mod:`.base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final

import torch

from smartdiff.cache.base import ReduceFn, StepCache, StepPosition, run_blocks, valid_rows

if TYPE_CHECKING:
    from smartdiff.models.wan_dit import AttentionFn, WanDiT, WanDiTInputs

DEFAULT_THRESHOLD: Final = 0.08


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """Args:
    threshold: relative change of the first block's residual below which the other
        blocks are skipped (>= 0; 0 never skips).
    """

    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(
                f"FirstBlockCacheConfig.threshold must be >= 0, got {self.threshold!r}"
            )


@dataclass
class FirstBlockBranch:
    """The last fully computed step's first-block residual and rest-of-blocks residual."""

    first_residual: torch.Tensor | None = None
    rest_residual: torch.Tensor | None = None


class FirstBlockCache(StepCache[FirstBlockBranch]):
    """First-block cache (module docstring)."""

    name: ClassVar[str] = "fbcache"

    def __init__(self, config: FirstBlockCacheConfig, reduce: ReduceFn | None = None) -> None:
        super().__init__(reduce)
        self.config = config

    def new_branch(self) -> FirstBlockBranch:
        return FirstBlockBranch()

    def relative_change(
        self, residual: torch.Tensor, previous: torch.Tensor, valid_tokens: int | None
    ) -> float:
        """``sum|residual - previous| / sum|previous|`` over the real tokens of all ranks."""
        current, before = valid_rows(residual, valid_tokens), valid_rows(previous, valid_tokens)
        sums = torch.stack(
            [(current.float() - before.float()).abs().sum(), before.float().abs().sum()]
        )
        if self.reduce is not None:
            sums = self.reduce(sums)
        return float(sums[0] / sums[1])

    def forward(
        self,
        state: FirstBlockBranch,
        position: StepPosition,
        model: WanDiT,
        x: torch.Tensor,
        inputs: WanDiTInputs,
        attention: AttentionFn,
        valid_tokens: int | None,
    ) -> torch.Tensor:
        h = run_blocks(model, x, inputs, attention, 0, 1)
        first_residual = h - x
        if (
            self.config.threshold > 0
            and state.first_residual is not None
            and state.rest_residual is not None
        ):
            change = self.relative_change(first_residual, state.first_residual, valid_tokens)
            if change < self.config.threshold:
                self.stats.skipped += 1
                return h + state.rest_residual
        out = run_blocks(model, h, inputs, attention, 1)
        state.first_residual, state.rest_residual = first_residual, out - h
        return out
