"""TeaCache for Wan2.1: skip every block when the timestep embedding barely moved.

TeaCache (Liu et al., "Timestep Embedding Tells", 2024; the TeaCache4Wan2.1 sources) observes
that the change of a DiT's output between steps follows the change of its timestep-modulated
input, after a model-specific polynomial rescaling fitted offline. Per CFG branch:

1. ``d = mean|m_t - m_prev| / mean|m_prev|``, with ``m`` the time embedding ``e [B, dim]``, or
   -- in the *retention-steps* variant -- the time projection ``e0 [B, 6, dim]`` (per token:
   ``[B, S, dim]``, ``[B, S, 6, dim]``, the mean over every token);
2. ``acc += poly(d)`` (``numpy.poly1d`` order: highest power first);
3. if ``acc < threshold``, skip the blocks and add the residual ``blocks(x) - x`` kept from
   the last computed step; otherwise compute them, keep the new residual and reset ``acc``.

Steps always computed: the first one (no residual yet) and the last one in the plain variant;
the first ``RETENTION_STEPS`` (5) in the retention-steps variant, which the authors recommend
(better quality at a given speed). A threshold of 0 always computes (the retention
polynomials are negative near 0, so the published rule would otherwise skip at threshold 0).

The metric reads only ``e``/``e0``. With one timestep per sample every rank computes them from
the same timestep: all ranks of a context-parallel group take the same decisions with no
communication. With per-token timesteps (Wan2.2 TI2V: ``e [B, S, dim]``, ``e0 [B, S, 6, dim]``)
a rank holds only its token shard of them, so the distance is taken over the real rows of the
shard with both sums reduced over the ranks sharing the branch (``reduce``) -- the same value
as on one process; without ``reduce`` that combination is refused. The residual is per rank
(its token shard) and per branch.

Talks to: :mod:`.base`; the coefficients are the published ones for Wan2.1 T2V 1.3B and 14B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, Literal

import torch

from smartdiff.cache.base import ReduceFn, StepCache, StepPosition, run_blocks, valid_rows

if TYPE_CHECKING:
    from smartdiff.models.wan_dit import AttentionFn, WanDiT, WanDiTInputs

ModelSize = Literal["1.3b", "14b"]

# TeaCache4Wan2.1 (ali-vilab/TeaCache, teacache_generate.py): rescaling polynomials, highest
# power first, for the time embedding e (plain) and the time projection e0 (retention steps).
PUBLISHED_COEFFICIENTS: Final[dict[tuple[ModelSize, bool], tuple[float, ...]]] = {
    ("1.3b", False): (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
    ("1.3b", True): (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    ("14b", False): (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    ("14b", True): (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
}
RETENTION_STEPS: Final = 5
# Default thresholds (retention-steps variant): 0.08 is the 1.3B setting the TeaCache authors
# and FastVideo ship (about 2x on Wan2.1 1.3B); 0.2 is their "fast" 14B setting.
DEFAULT_THRESHOLDS: Final[dict[ModelSize, float]] = {"1.3b": 0.08, "14b": 0.2}


@dataclass(frozen=True)
class TeaCacheConfig:
    """Args:
    threshold: accumulated rescaled distance below which the blocks are skipped (>= 0).
    coefficients: the rescaling polynomial, highest power first.
    retention_steps: the retention-steps variant (``e0``, first 5 steps computed) instead
        of the plain one (``e``, first and last step computed).
    """

    threshold: float
    coefficients: tuple[float, ...]
    retention_steps: bool = True

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"TeaCacheConfig.threshold must be >= 0, got {self.threshold!r}")
        if not self.coefficients:
            raise ValueError("TeaCacheConfig.coefficients must not be empty")
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))

    @classmethod
    def published(
        cls, size: ModelSize, threshold: float | None = None, retention_steps: bool = True
    ) -> TeaCacheConfig:
        """The published coefficients of Wan2.1 ``size``; default threshold when ``None``."""
        return cls(
            threshold=DEFAULT_THRESHOLDS[size] if threshold is None else threshold,
            coefficients=PUBLISHED_COEFFICIENTS[(size, retention_steps)],
            retention_steps=retention_steps,
        )

    def rescale(self, distance: float) -> float:
        """The polynomial at ``distance`` (Horner)."""
        value = 0.0
        for coefficient in self.coefficients:
            value = value * distance + coefficient
        return value

    def always_computed(self, index: int, total: int) -> bool:
        """Whether step ``index`` of ``total`` is computed whatever the distance."""
        if self.retention_steps:
            return index < RETENTION_STEPS
        return index < 1 or index >= total - 1


@dataclass
class TeaCacheBranch:
    """One CFG branch: the previous modulated input, the accumulated distance, the residual."""

    previous: torch.Tensor | None = None
    accumulated: float = 0.0
    residual: torch.Tensor | None = None


def relative_l1(
    current: torch.Tensor, previous: torch.Tensor, reduce: ReduceFn | None = None
) -> float:
    """``mean|current - previous| / mean|previous|`` (fp32); with ``reduce``, the ratio of the
    two sums reduced over the ranks holding the other parts of the tensors."""
    current, previous = current.float(), previous.float()
    if reduce is None:
        return float((current - previous).abs().mean() / previous.abs().mean())
    sums = reduce(torch.stack([(current - previous).abs().sum(), previous.abs().sum()]))
    return float(sums[0] / sums[1])


def decide(
    config: TeaCacheConfig,
    state: TeaCacheBranch,
    index: int,
    total: int,
    modulated: torch.Tensor,
    reduce: ReduceFn | None = None,
) -> bool:
    """Whether to compute the blocks at step ``index``; updates ``state``'s distance and
    previous input (not the residual). ``reduce``: ``modulated`` is a rank's part of the whole
    (per-token timesteps under context parallelism), see :func:`relative_l1`."""
    if (
        config.threshold <= 0
        or state.previous is None
        or state.residual is None
        or config.always_computed(index, total)
    ):
        compute = True
        state.accumulated = 0.0
    else:
        state.accumulated += config.rescale(relative_l1(modulated, state.previous, reduce))
        compute = not state.accumulated < config.threshold
        if compute:
            state.accumulated = 0.0
    state.previous = modulated.detach().clone()
    return compute


class TeaCache(StepCache[TeaCacheBranch]):
    """TeaCache (module docstring)."""

    name: ClassVar[str] = "teacache"

    def __init__(self, config: TeaCacheConfig, reduce: ReduceFn | None = None) -> None:
        super().__init__(reduce)
        self.config = config

    def new_branch(self) -> TeaCacheBranch:
        return TeaCacheBranch()

    def forward(
        self,
        state: TeaCacheBranch,
        position: StepPosition,
        model: WanDiT,
        x: torch.Tensor,
        inputs: WanDiTInputs,
        attention: AttentionFn,
        valid_tokens: int | None,
    ) -> torch.Tensor:
        modulated = inputs.e0 if self.config.retention_steps else inputs.e
        reduce = None
        if inputs.e.ndim == 3 and valid_tokens is not None:  # a shard of per-token timesteps
            if self.reduce is None:
                raise ValueError(
                    "teacache with per-token timesteps (Wan2.2 TI2V, e0 of shape "
                    f"{tuple(inputs.e0.shape)}) on a context-parallel token shard needs "
                    "reduce= (the sum over the sequence group, "
                    "smartdiff.cache.base.sum_over_group): each rank holds only its tokens' "
                    "timestep embeddings, so the ranks would decide differently"
                )
            modulated, reduce = valid_rows(modulated, valid_tokens), self.reduce
        if not decide(self.config, state, position.index, position.total, modulated, reduce):
            assert state.residual is not None
            self.stats.skipped += 1
            return x + state.residual
        out = run_blocks(model, x, inputs, attention)
        state.residual = out - x
        return out
