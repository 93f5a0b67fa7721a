"""Builds the step cache a request asks for: policy name + threshold -> a fresh cache.

The policy names are those of ``smartdiff.api.params.CachePolicy`` (``none``, ``teacache``,
``pab``, ``fbcache``); the threshold is the request's, or each policy's default when unset:

- ``teacache``: the accumulated rescaled distance (default 0.08 for Wan2.1 1.3B, 0.2 for 14B),
  retention-steps variant, published coefficients chosen by the DiT's size (a DiT of another
  size, such as the tiny test model, uses the 1.3B ones);
- ``pab``: the self-attention broadcast range in steps (default 2; cross-attention 3x);
- ``fbcache``: the first block's relative residual change (default 0.08).

A new cache is built for every task, so no state crosses requests. Takes plain values (no
pydantic), so benchmarks and tests can call it directly.

Talks to: :mod:`.teacache`, :mod:`.pab`, :mod:`.fbcache`; the DiT config for TeaCache's size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from smartdiff.cache.base import ReduceFn, StepCache
from smartdiff.cache.fbcache import DEFAULT_THRESHOLD as FBCACHE_DEFAULT
from smartdiff.cache.fbcache import FirstBlockCache, FirstBlockCacheConfig
from smartdiff.cache.pab import DEFAULT_SELF_RANGE, PabConfig, PyramidAttentionBroadcast
from smartdiff.cache.teacache import DEFAULT_THRESHOLDS, ModelSize, TeaCache, TeaCacheConfig

if TYPE_CHECKING:
    from smartdiff.models.wan_dit import WanDiTConfig

POLICIES: Final = ("none", "teacache", "pab", "fbcache")
LARGE_DIM: Final = 5120  # Wan2.1 14B's hidden size


def model_size(dit: WanDiTConfig) -> ModelSize:
    """Which published TeaCache calibration fits ``dit``."""
    return "14b" if dit.dim >= LARGE_DIM else "1.3b"


def default_threshold(policy: str, dit: WanDiTConfig) -> float | None:
    """The threshold ``policy`` uses when the request leaves it unset (``None`` for none)."""
    check_policy(policy)
    return {
        "none": None,
        "teacache": DEFAULT_THRESHOLDS[model_size(dit)],
        "pab": float(DEFAULT_SELF_RANGE),
        "fbcache": FBCACHE_DEFAULT,
    }[policy]


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"cache.policy={policy!r} is not allowed: one of {', '.join(POLICIES)}")


def make_step_cache(
    policy: str,
    threshold: float | None,
    dit: WanDiTConfig,
    *,
    reduce: ReduceFn | None = None,
    retention_steps: bool = True,
) -> StepCache[Any] | None:
    """A fresh cache for one task, or ``None`` for ``policy="none"``.

    Args:
        policy: ``none``, ``teacache``, ``pab`` or ``fbcache``.
        threshold: the request's threshold (>= 0), or ``None`` for the policy's default.
        dit: the DiT's architecture (TeaCache picks its coefficients by size).
        reduce: sum over the ranks sharing a CFG branch (context parallelism), else ``None``.
        retention_steps: TeaCache's retention-steps variant (default) or the plain one.
    """
    check_policy(policy)
    if threshold is not None and not threshold >= 0:
        raise ValueError(f"cache.threshold={threshold!r} is not allowed: a number >= 0")
    cache: StepCache[Any] | None
    if policy == "none":
        cache = None
    elif policy == "teacache":
        config = TeaCacheConfig.published(model_size(dit), threshold, retention_steps)
        cache = TeaCache(config, reduce)
    elif policy == "pab":
        cache = PyramidAttentionBroadcast(PabConfig.from_threshold(threshold), reduce)
    else:
        value = FBCACHE_DEFAULT if threshold is None else threshold
        cache = FirstBlockCache(FirstBlockCacheConfig(value), reduce)
    return cache
