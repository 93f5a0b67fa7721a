"""Which attention tiles the block-sparse backend skips: prediction from pooled q and k.

In the spirit of SpargeAttn (written from its description): video attention maps are
dominated by a few key blocks per query block, and a block's mean vector predicts its
tokens well when they point the same way. For every (query block, key block) tile:

1. pool: the mean of each block of ``q_block`` query rows and of ``k_block`` key rows
   (K smoothed as in :mod:`.quantization`, which moves a row's scores together and changes
   nothing), and each block's *self-similarity*, the mean pairwise cosine of its rows
   ``|sum_i q_i / |q_i||^2 / n^2``;
2. score: ``softmax(pooled_q . pooled_k^T / sqrt(D))`` over the key blocks of each query block;
3. keep the most probable key blocks until their probability reaches ``cdf_threshold``;
4. keep every tile of a query block or key block whose self-similarity is below
   ``sim_threshold`` (its mean does not represent it, so the prediction is not trusted).

Random inputs have no structure: their blocks are dissimilar, step 4 keeps everything, and the
sparse backend degrades to the dense one rather than dropping mass it cannot predict.

The GPU path pools inside the quantization kernel (:mod:`.int8_triton`) and calls
:func:`predict_block_mask` and :func:`block_lists` on the pooled tensors; :func:`pool_blocks`
is the same pooling in plain torch (reference and tests).

Talks to: torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import torch

SPARSE_Q_BLOCK: Final = 128  # query rows per tile of the sparse kernel (and per pooled block)
SPARSE_K_BLOCK: Final = 64  # key rows per tile
NORM_FLOOR: Final = 1e-12


@dataclass(frozen=True)
class SparsityConfig:
    """How eagerly tiles are skipped.

    Args:
        cdf_threshold: probability mass of the predicted block attention to keep, in (0, 1];
            1 keeps every tile.
        sim_threshold: blocks whose mean pairwise cosine is below this are always computed,
            in [-1, 1]; -1 trusts every block's mean.
    """

    cdf_threshold: float = 0.98
    sim_threshold: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 < self.cdf_threshold <= 1.0:
            raise ValueError(
                f"SparsityConfig.cdf_threshold must be in (0, 1], got {self.cdf_threshold!r}"
            )
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise ValueError(
                f"SparsityConfig.sim_threshold must be in [-1, 1], got {self.sim_threshold!r}"
            )


@dataclass(frozen=True)
class PooledBlocks:
    """Per-block means ``[B, H, n, D]`` (fp32) and self-similarities ``[B, H, n]``."""

    mean: torch.Tensor
    similarity: torch.Tensor


def pool_blocks(x: torch.Tensor, block: int, subtract: torch.Tensor | None = None) -> PooledBlocks:
    """Mean and self-similarity of every block of ``block`` rows of ``x [B, H, S, D]``.

    ``subtract [B, H, D]`` is removed from every row first (K smoothing). The last block may be
    shorter; its statistics use its real rows only.
    """
    values = x.float()
    if subtract is not None:
        values = values - subtract.float()[:, :, None, :]
    batch, heads, tokens, dim = values.shape
    blocks = math.ceil(tokens / block)
    padding = blocks * block - tokens
    padded = torch.nn.functional.pad(values, (0, 0, 0, padding)).view(
        batch, heads, blocks, block, dim
    )
    counts = torch.full((blocks,), float(block), device=x.device)
    counts[-1] = block - padding
    mean = padded.sum(dim=3) / counts[:, None]
    units = padded / padded.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    similarity = units.sum(dim=3).square().sum(dim=-1) / counts.square()
    return PooledBlocks(mean=mean, similarity=similarity)


def predict_block_mask(
    pooled_q: PooledBlocks, pooled_k: PooledBlocks, config: SparsityConfig
) -> torch.Tensor:
    """``[B, H, query blocks, key blocks]`` bool: the tiles to compute (module docstring)."""
    dim = pooled_q.mean.shape[-1]
    scores = torch.matmul(pooled_q.mean, pooled_k.mean.transpose(-1, -2)) / math.sqrt(dim)
    probs = torch.softmax(scores, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < config.cdf_threshold  # the first block is always kept
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    keep |= (pooled_q.similarity < config.sim_threshold)[..., :, None]
    keep |= (pooled_k.similarity < config.sim_threshold)[..., None, :]
    return keep


def block_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept key blocks of every query block, for the kernel's loop.

    Returns ``index [B*H, nq, nk]`` int32 (the kept key-block numbers in ascending order, then
    padding) and ``count [B*H, nq]`` int32.
    """
    batch, heads, nq, nk = mask.shape
    flat = mask.reshape(batch * heads, nq, nk)
    # A stable sort of "not kept" puts kept blocks first, in ascending order.
    index = torch.argsort((~flat).to(torch.int8), dim=-1, stable=True)
    return index.to(torch.int32).contiguous(), flat.sum(dim=-1).to(torch.int32).contiguous()


def density(mask: torch.Tensor) -> float:
    """The fraction of tiles computed."""
    return float(mask.float().mean())
