"""FlexCache's common part: per-request step caches that skip or reuse DiT block work.

A step cache lives for one task. The generator drives it::

    cache = make_step_cache(policy, threshold, dit_config)   # smartdiff.cache.factory
    with attached(dit, cache):                               # dit.step_cache = cache
        for index, t in enumerate(timesteps):
            cache.begin_step(index, len(timesteps), float(t))
            ... the DiT once per CFG branch ...
    # leaving the block detaches it, even on error: nothing crosses to the next request

:meth:`WanDiT.run_blocks <smartdiff.models.wan_dit.WanDiT.run_blocks>` hands every block
pass to :meth:`StepCache.run_blocks`, which picks the state of the *branch* -- the calls of
one step are numbered 0, 1, ... -- so sequential CFG keeps separate state for the
conditional and unconditional passes, while batched CFG (one call of batch 2) and a CFG-parallel
rank (one call per step) have one. Every process keeps its own cache; with context parallelism
each rank caches its token shard, and a decision that depends on rank-local tensors is taken
on sums reduced over the ranks sharing the branch (``reduce``, e.g. :func:`sum_over_group` of
the sequence group), so every rank of a sequence group decides alike and their collectives
stay matched. A threshold of 0 never reuses anything: the output is bit-identical to no cache.

Talks to: :class:`~smartdiff.models.wan_dit.WanDiT` (``blocks``, ``cross_attention``,
``step_cache``), ``torch.distributed`` (only in :func:`sum_over_group`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch

if TYPE_CHECKING:
    from smartdiff.models.wan_dit import AttentionFn, AttentionReuse, WanDiT, WanDiTInputs

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
"""Sums a small fp32 tensor over the ranks that share a branch (in place or not) and returns it."""
StateT = TypeVar("StateT")


@dataclass
class CacheStats:
    """What a cache did during one task.

    Attributes:
        forwards: block-stack passes requested (one per DiT call, per branch).
        skipped: passes whose blocks were skipped (all, or all but the first).
        attention_computed / attention_reused: attention sub-layer outputs computed or
            broadcast from an earlier step (PAB).
    """

    forwards: int = 0
    skipped: int = 0
    attention_computed: int = 0
    attention_reused: int = 0

    def describe(self) -> str:
        text = f"{self.skipped}/{self.forwards} block passes skipped"
        if self.attention_computed or self.attention_reused:
            text += (
                f", {self.attention_reused}/{self.attention_computed + self.attention_reused}"
                " attention outputs reused"
            )
        return text


@dataclass(frozen=True)
class StepPosition:
    """Where the denoising loop is: step ``index`` of ``total``, at ``timestep`` (0..1000)."""

    index: int
    total: int
    timestep: float


class StepCache(abc.ABC, Generic[StateT]):
    """One request's cache; subclasses keep a ``StateT`` per CFG branch (module docstring).

    Args:
        reduce: sums over the ranks sharing a branch; ``None`` on a single process.
    """

    name: ClassVar[str]

    def __init__(self, reduce: ReduceFn | None = None) -> None:
        self.reduce = reduce
        self.stats = CacheStats()
        self._position: StepPosition | None = None
        self._calls_this_step = 0
        self._branches: dict[int, StateT] = {}

    @property
    def position(self) -> StepPosition:
        if self._position is None:
            raise RuntimeError(
                f"{self.name} cache: run_blocks was called before begin_step; "
                "the denoising loop must call begin_step(index, total, t) first"
            )
        return self._position

    @property
    def branches(self) -> int:
        """How many CFG branches (calls per step) this cache has seen."""
        return len(self._branches)

    def begin_step(self, index: int, total: int, timestep: float) -> None:
        """Start step ``index`` (0-based) of ``total``; the next DiT call is branch 0."""
        if not 0 <= index < total:
            raise ValueError(f"{self.name} cache: step index {index} is outside [0, {total})")
        self._position = StepPosition(index, total, float(timestep))
        self._calls_this_step = 0

    def run_blocks(
        self,
        model: WanDiT,
        x: torch.Tensor,
        inputs: WanDiTInputs,
        attention: AttentionFn,
        valid_tokens: int | None,
    ) -> torch.Tensor:
        """Run (or skip, or partly reuse) the blocks of one DiT call."""
        position = self.position
        branch = self._calls_this_step
        self._calls_this_step += 1
        if branch not in self._branches:
            self._branches[branch] = self.new_branch()
        self.stats.forwards += 1
        return self.forward(
            self._branches[branch], position, model, x, inputs, attention, valid_tokens
        )

    def describe(self) -> str:
        return f"{self.name}: {self.stats.describe()}"

    @abc.abstractmethod
    def new_branch(self) -> StateT:
        """Fresh state for a branch seen for the first time."""

    @abc.abstractmethod
    def forward(
        self,
        state: StateT,
        position: StepPosition,
        model: WanDiT,
        x: torch.Tensor,
        inputs: WanDiTInputs,
        attention: AttentionFn,
        valid_tokens: int | None,
    ) -> torch.Tensor:
        """The blocks of one call of this branch; returns the last block's output."""


def run_blocks(
    model: WanDiT,
    x: torch.Tensor,
    inputs: WanDiTInputs,
    attention: AttentionFn,
    start: int = 0,
    stop: int | None = None,
    reuse: Callable[[int], AttentionReuse | None] | None = None,
) -> torch.Tensor:
    """Blocks ``start:stop`` of ``model`` on ``x``, exactly as the uncached model runs them;
    ``reuse(i)`` gives block ``i``'s attention hook (PAB)."""
    blocks = list(model.blocks)[start:stop]
    for offset, block in enumerate(blocks):
        hook = None if reuse is None else reuse(start + offset)
        x = block(x, inputs.e0, inputs.context, inputs.rope, attention, model.cross_attention, hook)
    return x


@contextmanager
def attached(model: WanDiT, cache: StepCache[Any] | None) -> Iterator[None]:
    """Attach ``cache`` to ``model`` for the block (``None``: nothing to attach)."""
    if cache is None:
        yield
        return
    if model.step_cache is not None:
        raise RuntimeError(
            f"the DiT already has a step cache attached "
            f"({type(model.step_cache).__name__}); one request at a time"
        )
    model.step_cache = cache
    try:
        yield
    finally:
        model.step_cache = None


def sum_over_group(group: Any) -> ReduceFn:
    """A :data:`ReduceFn` that all-reduces (sum) over the ``torch.distributed`` ``group``."""
    import torch.distributed as dist

    def reduce(values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
        return values

    return reduce


def valid_rows(x: torch.Tensor, valid_tokens: int | None) -> torch.Tensor:
    """The real-token rows of ``x [B, s, C]`` (drops context-parallel padding)."""
    return x if valid_tokens is None else x[:, :valid_tokens]
