"""Our quantized attention for Hopper in Triton: INT8 QK^T, BF16 or FP8 PV, dense or sparse.

The math is that of :mod:`smartdiff.attention.quantization` (read it first); the tile choice
of the sparse variant is :mod:`smartdiff.attention.sparsity`. One call does:

1. ``mean(K)`` over the tokens (torch, fp32) and, for FP8 PV, V's per-channel mean and scale;
2. ``quantize_kernel`` on Q and on K: one pass over each, writing INT8 values and one fp32
   scale per token (the scale of the token's block), and -- for the sparse variant -- each
   block's mean and self-similarity, so prediction costs no extra pass;
3. for FP8 PV, ``quantize_v_kernel``: V smoothed, scaled and stored as e4m3 with the tokens
   contiguous (the layout Hopper's FP8 tensor cores need for the second operand);
4. ``attention_kernel``: one program per (128- or 64-row query tile, batch x head); INT8 dot
   products in int32 (turned into fp32 with an integer add on the float's bits instead of
   the quarter-rate conversion instruction), online softmax in base 2, PV in BF16 (P rounded
   to V's dtype, accumulated in the MMA) or FP8 (a fresh fp32 product per tile, added to the
   accumulator); the sparse variant loops over the tile list of its query block only. The
   output is written
   as ``[B, S, H, D]`` (returned as a ``[B, H, S, D]`` view, so the DiT's
   ``transpose(1, 2).flatten(2)`` is free), with the natural-log LSE ``[B, H, S]``.

For ``sd-int8-wgmma`` (:mod:`.int8_wgmma`) it also prepares the keys in two passes
(:func:`quantize_keys`: K's mean from fixed-order partial sums, K quantized with one scale per
key tile, ``max |k|`` and ``max |v|`` for its bound) and, where that kernel does not quantize
the query itself, the query against them (:func:`quantize_query`, :func:`bound_flags`).

Both variants are one ``torch.library.custom_op`` (``smartdiff::int8_attention``) with a
``register_fake`` twin, so ``torch.compile`` can trace a model that uses them. Tile sizes and
pipelining are autotuned per sequence length (one-time cost on the first call of a shape).

Inputs: ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]`` in bf16 or fp16 on CUDA, any strides with
the channels contiguous (the DiT's transposed views are used as they are), ``D`` 64 or 128.
Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on the CPU through
Triton's interpreter (slow; tests only).

Talks to: the kernels in :mod:`.int8_kernels`, torch; :mod:`.quantization`,
:mod:`.sparsity`. Chosen through
:mod:`smartdiff.attention.registry` (names ``sd-int8``, ``sd-int8-fp8``, ``sparge``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Final

import torch
import triton

from smartdiff.attention.int8_kernels import (
    DENSE_KERNEL,
    INTERPRETED,
    SPARSE_KERNEL,
    bound_flags_kernel,
    key_sums_kernel,
    quantize_kernel,
    quantize_keys_kernel,
    quantize_v_kernel,
)
from smartdiff.attention.quantization import (
    FP8_MAX,
    INT8_MAX,
    K_BLOCK,
    LOG2E,
    Q_BLOCK,
    SCALE_FLOOR,
)
from smartdiff.attention.sparsity import (
    SPARSE_K_BLOCK,
    SPARSE_Q_BLOCK,
    PooledBlocks,
    SparsityConfig,
    block_lists,
    predict_block_mask,
)

HEAD_DIMS: Final = (64, 128)
Q_ROWS: Final = SPARSE_Q_BLOCK  # query rows per quantization program (and pooled block)
K_ROWS: Final = SPARSE_K_BLOCK  # key rows per quantization program (and pooled block)
BOUND_LOG2: Final = 126.0  # bound_flags keeps the bounded launch's sums below 2**this
# quantize_keys: partial sums of K per (batch, head) for its mean, 16 to 32: enough programs
# for ~4 per SM of an H200 (KEY_PROGRAMS); reading 32 instead of 16 cost the quantizing pass
# nothing measurable (85.9 vs 86.5 us at the 1.3B shape, attention_wgmma_keys32_h200.json)
KEY_SPLITS: Final = (16, 32)
KEY_PROGRAMS: Final = 512
KEY_SUM_ROWS: Final = 64  # ... each taken over tiles of this many keys
KEY_WARPS: Final = 4  # per quantize_keys program (8 measured 5-39% slower on the H200)
V_ROWS: Final = 64
V8_TILE: Final = 128  # INT8 V: tokens per column sum (one key tile of sd-int8-wgmma)
FP8_PAD: Final = 16  # FP8 V rows are padded to a multiple of this (16-byte aligned strides)
PREPROCESS_WARPS: Final = 8  # a 128 x 128 fp32 tile per quantization program
OP_NAME: Final = "smartdiff::int8_attention"


# --------------------------------------------------------------------- preprocessing


def _quantize(
    x: torch.Tensor,
    rows: int,
    scale_rows: int,
    pre_scale: float,
    mean: torch.Tensor | None,
    pool: bool,
    dot_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, PooledBlocks | None, torch.Tensor]:
    """``(int8 values, per-token scales, pooled blocks or None, pre_scale * x . dot_mean)``;
    ``mean`` is subtracted first (K smoothing)."""
    batch, heads, tokens, dim = x.shape
    values = torch.empty((batch, heads, tokens, dim), dtype=torch.int8, device=x.device)
    scales = torch.empty((batch, heads, tokens), dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(tokens, rows)
    pooled = torch.empty(
        (batch, heads, blocks, dim) if pool else (1,), dtype=torch.float32, device=x.device
    )
    similarity = torch.empty(
        (batch, heads, blocks) if pool else (1,), dtype=torch.float32, device=x.device
    )
    dots = torch.empty(
        (batch, heads, tokens) if dot_mean is not None else (1,),
        dtype=torch.float32,
        device=x.device,
    )
    if mean is not None and dot_mean is not None:
        raise ValueError("_quantize: subtracting a mean and dotting with one are exclusive")
    quantize_kernel[(blocks, batch * heads)](
        x,
        mean if mean is not None else dot_mean if dot_mean is not None else scales,
        values,
        scales,
        pooled,
        similarity,
        dots,
        tokens,
        heads,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        pre_scale,
        ROWS=rows,
        SCALE_ROWS=scale_rows,
        HEAD_DIM=dim,
        SUBTRACT_MEAN=mean is not None,
        POOL=pool,
        DOT_MEAN=dot_mean is not None,
        num_warps=PREPROCESS_WARPS,
    )
    return values, scales, PooledBlocks(pooled, similarity) if pool else None, dots


def quantize_v(
    v: torch.Tensor, int8: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """V smoothed by its per-channel mean and quantized per channel, tokens contiguous:
    ``(values [B, H, D, padded], scale, mean [B, H, D] fp32, sums)`` with ``v ~ values * scale
    + mean``. e4m3 (the FP8 PV of ``sd-int8-fp8``; ``sums`` is None), or with ``int8`` INT8
    whose tokens are reordered within each 16 by :func:`.int8_kernels.pv8_position`, padded
    with zeros to whole tiles of :data:`V8_TILE` tokens, and ``sums [B, H, tiles, D]`` int32
    (:func:`.int8_kernels.quantize_v_kernel`; the INT8 PV of ``sd-int8-wgmma``)."""
    batch, heads, tokens, dim = v.shape
    mean = v.mean(dim=2, dtype=torch.float32)
    spread = torch.maximum(v.amax(dim=2).float() - mean, mean - v.amin(dim=2).float())
    top = INT8_MAX if int8 else FP8_MAX
    scale = (spread.clamp_min(SCALE_FLOOR) / top).contiguous()
    rows = V8_TILE if int8 else V_ROWS  # per program; INT8 sums over each program's tokens
    pad = V8_TILE if int8 else FP8_PAD
    padded = triton.cdiv(tokens, pad) * pad
    out = torch.empty(
        (batch, heads, dim, padded),
        dtype=torch.int8 if int8 else torch.float8_e4m3fn,
        device=v.device,
    )
    sums = (
        torch.empty((batch, heads, padded // rows, dim), dtype=torch.int32, device=v.device)
        if int8
        else None
    )
    quantize_v_kernel[(triton.cdiv(padded if int8 else tokens, rows), batch * heads)](
        v,
        mean,
        scale,
        out,
        tokens,
        padded,
        heads,
        v.stride(0),
        v.stride(1),
        v.stride(2),
        ROWS=rows,
        HEAD_DIM=dim,
        INT8=int8,
        sums_ptr=sums,
        num_warps=PREPROCESS_WARPS,
    )
    return out, scale, mean, sums


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_block: int, k_block: int
) -> None:
    if (
        q.ndim != 4
        or k.ndim != 4
        or v.ndim != 4
        or k.shape != v.shape
        or q.shape[:2] != k.shape[:2]
        or q.shape[3] != k.shape[3]
    ):
        raise ValueError(
            f"int8 attention needs q [B, H, Sq, D] and k, v [B, H, Sk, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(
            f"int8 attention: head dim {q.shape[3]} is not supported "
            f"(allowed: {', '.join(map(str, HEAD_DIMS))})"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"int8 attention needs q, k, v all bfloat16 or all float16, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    for name, block, rows in (("q_block", q_block, Q_ROWS), ("k_block", k_block, K_ROWS)):
        if block < 1 or rows % block:
            raise ValueError(
                f"int8 attention: {name}={block} must divide {rows} (1, 2, 4, ... rows per scale)"
            )


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dimension is contiguous, else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclasses.dataclass(frozen=True)
class QuantizedQK:
    """Q and K as the attention kernels read them (steps 1-2 of the module docstring): INT8
    values ``[B, H, S, D]``, fp32 per-token scales ``[B, H, S]`` (Q's pre-multiplied by
    ``log2(e) / sqrt(D)``), the K-smoothing score shift ``q . mean(K)`` per query row, and the
    pooled blocks of the sparse variant (``None`` unless asked for)."""

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    shift: torch.Tensor
    pooled_q: PooledBlocks | None
    pooled_k: PooledBlocks | None


def quantize_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    q_block: int = Q_BLOCK,
    k_block: int = K_BLOCK,
    pool: bool = False,
    k_rows: int = K_ROWS,
) -> QuantizedQK:
    """Smooth K by its mean over the tokens and quantize Q and K (one pass over each);
    ``q, k [B, H, S, D]`` with the channels contiguous. ``k_block`` keys share one scale
    (stored per token all the same); it must divide ``k_rows``, the keys per quantization
    program (a power of two; more than 128 does not fit its registers)."""
    if k_rows not in (16, 32, 64, 128) or k_block < 1 or k_rows % k_block:
        raise ValueError(
            f"quantize_qk: k_rows={k_rows} must be 16, 32, 64 or 128 and k_block={k_block} "
            f"must divide it"
        )
    if pool and k_rows != K_ROWS:
        raise ValueError(f"quantize_qk: pooling needs k_rows={K_ROWS}, got {k_rows}")
    dim = q.shape[3]
    k_mean = k.mean(dim=2, dtype=torch.float32).contiguous()
    q8, q_scale, pooled_q, shift = _quantize(
        q, Q_ROWS, q_block, LOG2E / math.sqrt(dim), None, pool, dot_mean=k_mean
    )
    k8, k_scale, pooled_k, _ = _quantize(k, k_rows, k_block, 1.0, k_mean, pool)
    return QuantizedQK(q8, q_scale, k8, k_scale, shift, pooled_q, pooled_k)


@dataclasses.dataclass(frozen=True)
class QuantizedKeys:
    """K as ``sd-int8-wgmma`` reads it: smoothed by its mean over the tokens and quantized with
    one scale per ``rows`` keys (a key tile): int8 ``values [B, H, S, D]``, fp32 per-token
    ``scales [B, H, S]`` (all the same within a tile), the fp32 ``mean [B * H, D]``, and for
    the bounded launch ``kv_max [B * H, 2]``: ``max_j |k_j|`` (the int8 values dequantized)
    and ``max |v_jd|``."""

    values: torch.Tensor
    scales: torch.Tensor
    mean: torch.Tensor
    kv_max: torch.Tensor


def quantize_keys(k: torch.Tensor, v: torch.Tensor, rows: int) -> QuantizedKeys:
    """K's mean in two small passes (:func:`.int8_kernels.key_sums_kernel`: fixed-order fp32
    partial sums, so the result does not depend on scheduling), then one pass that quantizes K
    and reads V for the maxima (:func:`.int8_kernels.quantize_keys_kernel`); ``k, v [B, H, S,
    D]`` with the channels contiguous, ``rows`` 64 or 128. 16 to 32 partial sums per (batch,
    head), enough for ~:data:`KEY_PROGRAMS` programs. Faster than a torch mean,
    :func:`quantize_qk`'s quantization of K and a separate pass for the maxima that re-reads
    the int8 K (H200: 36 + 86 = 122 against 149 us at the 1.3B Wan shape, 0.87-0.89 against
    0.94 ms at 14B); the larger saving is the query's, quantized inside ``sd-int8-wgmma``."""
    if rows not in (64, 128):
        raise ValueError(f"quantize_keys: rows={rows} must be 64 or 128 (one key tile)")
    batch, heads, tokens, dim = k.shape
    pairs = batch * heads
    splits = min(max(KEY_SPLITS[0], triton.cdiv(KEY_PROGRAMS, pairs)), KEY_SPLITS[1])
    splits = max(1, min(splits, triton.cdiv(tokens, KEY_SUM_ROWS)))
    chunk = triton.cdiv(triton.cdiv(tokens, splits), KEY_SUM_ROWS) * KEY_SUM_ROWS
    splits = triton.cdiv(tokens, chunk)  # none empty
    partial = torch.empty((pairs, splits, dim), dtype=torch.float32, device=k.device)
    key_sums_kernel[(splits, pairs)](
        k, partial, tokens, heads, k.stride(0), k.stride(1), k.stride(2), chunk, KEY_SUM_ROWS,
        dim, num_warps=4,
    )  # fmt: skip
    keys = QuantizedKeys(
        values=torch.empty((batch, heads, tokens, dim), dtype=torch.int8, device=k.device),
        scales=torch.empty((batch, heads, tokens), dtype=torch.float32, device=k.device),
        mean=torch.empty((pairs, dim), dtype=torch.float32, device=k.device),
        kv_max=torch.zeros((pairs, 2), dtype=torch.float32, device=k.device),
    )
    quantize_keys_kernel[(triton.cdiv(tokens, rows), pairs)](
        k, v, partial, keys.mean, keys.values, keys.scales, keys.kv_max, tokens, heads, splits,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), rows, dim,
        triton.next_power_of_2(splits), num_warps=KEY_WARPS,
    )  # fmt: skip
    return keys


def quantize_query(
    q: torch.Tensor, keys: QuantizedKeys
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(int8 values, per-token scales, q . mean(K) shifts)`` of ``q [B, H, S, D]`` (channels
    contiguous) as :func:`quantize_qk` makes them, against ``keys``' mean: what
    ``sd-int8-wgmma`` otherwise does inside its kernel."""
    values, scales, _, shift = _quantize(
        q, Q_ROWS, 1, LOG2E / math.sqrt(q.shape[3]), None, False, dot_mean=keys.mean
    )
    return values, scales, shift


def bound_limit(seq_k: int) -> float:
    """The most B (log2 units, :func:`bound_flags`) may be, before ``log2 max(max |v|, 1)`` is
    taken off, for ``seq_k`` keys: ``BOUND_LOG2 - log2 seq_k``."""
    return BOUND_LOG2 - math.log2(seq_k)


def bound_flags(
    q8: torch.Tensor, q_scale: torch.Tensor, keys: QuantizedKeys, rows: int
) -> torch.Tensor:
    """int32 ``[B * H, ceil(Sq / rows)]``: 1 for the blocks of ``rows`` queries that can take
    ``sd-int8-wgmma``'s bounded launch (no row maxima after tile 0); ``q8, q_scale`` from
    :func:`quantize_query`. The kernel decides the same thing per warpgroup of 64 rows from
    its own quantized queries; this is the two-launch path's (a query quantized apart).

    For a row i every score is at most ``|q_i| max_j |k_j|`` (Cauchy-Schwarz on the int8
    values, dequantized, log2 units) and a reference taken as a maximum over tile 0 is at least
    the score with key 0; call the difference B. With the reference fixed, every probability is
    at most 2**B, the row's sum at most ``N 2**B`` and each output channel's accumulator at most
    ``N 2**B max |v|`` (N keys): a block is flagged when ``B <= BOUND_LOG2 - log2 N - log2
    max(max |v|, 1)`` for all its rows, so that neither can pass 2**126 (fp32 overflows at
    2**128). Any ``rows`` (192 with three consumers): the kernel reads a block as ``rows /
    part`` tiles of ``part``, the largest power of two dividing ``rows``."""
    if rows < 1:
        raise ValueError(f"bound_flags: rows={rows} must be >= 1")
    part = rows & -rows
    batch, heads, seq_q, dim = q8.shape
    seq_k = keys.values.shape[2]
    pairs = batch * heads
    flags = torch.empty((pairs, triton.cdiv(seq_q, rows)), dtype=torch.int32, device=q8.device)
    bound_flags_kernel[(flags.shape[1], pairs)](
        q8, q_scale, keys.values, keys.scales, keys.kv_max, flags, seq_q, seq_k,
        bound_limit(seq_k), part, rows // part, dim,
    )  # fmt: skip
    return flags


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pv_fp8: bool,
    q_block: int,
    k_block: int,
    sparse: bool,
    cdf_threshold: float,
    sim_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole computation (module docstring); returns ``(out, lse)``."""
    _check_inputs(q, k, v, q_block, k_block)
    q, k, v = channels_last(q), channels_last(k), channels_last(v)
    batch, heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    qk = quantize_qk(q, k, q_block, k_block, pool=sparse)
    q8, q_scale, k8, k_scale, shift = qk.q, qk.q_scale, qk.k, qk.k_scale, qk.shift
    pooled_q, pooled_k = qk.pooled_q, qk.pooled_k
    if pv_fp8:
        v_in, v_scale, v_mean, _ = quantize_v(v)
        v_strides = (v_in.stride(0), v_in.stride(1), v_in.stride(3), v_in.stride(2))
    else:
        v_in, v_scale, v_mean = v, shift, shift  # the scale/mean pointers go unused
        v_strides = (v.stride(0), v.stride(1), v.stride(2), v.stride(3))
    out = torch.empty((batch, seq_q, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    q_blocks, k_blocks = triton.cdiv(seq_q, SPARSE_Q_BLOCK), triton.cdiv(seq_k, SPARSE_K_BLOCK)
    if sparse:
        assert pooled_q is not None and pooled_k is not None
        config = SparsityConfig(cdf_threshold=cdf_threshold, sim_threshold=sim_threshold)
        index, count = block_lists(predict_block_mask(pooled_q, pooled_k, config))
        kernel = SPARSE_KERNEL
    else:
        index = count = lse  # unused
        kernel = DENSE_KERNEL

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads

    kernel[grid](
        q8,
        q_scale,
        k8,
        k_scale,
        v_in,
        v_scale,
        v_mean,
        shift,
        out,
        lse,
        index,
        count,
        seq_q,
        seq_k,
        heads,
        q_blocks,
        k_blocks,
        *v_strides,
        out.stride(0),
        out.stride(2),
        out.stride(1),
        HEAD_DIM=dim,
        PV_FP8=pv_fp8,
        SPARSE=sparse,
        SMOOTH_K=True,
        EMULATED_DOT=INTERPRETED,
    )
    return out.transpose(1, 2), lse


# ------------------------------------------------------------------------ custom op


@torch.library.custom_op(OP_NAME, mutates_args=(), device_types="cuda")
def int8_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pv_fp8: bool,
    q_block: int,
    k_block: int,
    sparse: bool,
    cdf_threshold: float,
    sim_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Sq, D], lse [B, H, Sq] fp32)``; see the module docstring."""
    return _forward(q, k, v, pv_fp8, q_block, k_block, sparse, cdf_threshold, sim_threshold)


@int8_attention_op.register_fake
def _int8_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pv_fp8: bool,
    q_block: int,
    k_block: int,
    sparse: bool,
    cdf_threshold: float,
    sim_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seq_q, dim = q.shape
    out = q.new_empty((batch, seq_q, heads, dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, seq_q), dtype=torch.float32)


# ------------------------------------------------------------------------ public API


def int8_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pv_fp8: bool = False,
    q_block: int = Q_BLOCK,
    k_block: int = K_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense INT8 attention: ``(out [B, H, Sq, D], lse [B, H, Sq])`` (natural log, fp32)."""
    return int8_attention_op(q, k, v, pv_fp8, q_block, k_block, False, 1.0, -1.0)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense INT8 QK^T, BF16 PV (the ``sd-int8`` backend)."""
    return int8_attention_op(q, k, v, False, Q_BLOCK, K_BLOCK, False, 1.0, -1.0)[0]


def int8_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense INT8 QK^T, FP8 PV (the ``sd-int8-fp8`` backend)."""
    return int8_attention_op(q, k, v, True, Q_BLOCK, K_BLOCK, False, 1.0, -1.0)[0]


def int8_fp8_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return int8_attention_lse(q, k, v, pv_fp8=True)


def sparse_int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: SparsityConfig | None = None,
    pv_fp8: bool = False,
) -> torch.Tensor:
    """Block-sparse INT8 attention (the ``sparge`` backend): tiles predicted negligible by
    :mod:`.sparsity` are skipped."""
    config = config or SparsityConfig()
    return int8_attention_op(
        q, k, v, pv_fp8, Q_BLOCK, K_BLOCK, True, config.cdf_threshold, config.sim_threshold
    )[0]


def run_int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pv_fp8: bool = False,
    q_block: int = Q_BLOCK,
    k_block: int = K_BLOCK,
    sparse: bool = False,
    config: SparsityConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels called directly, without the CUDA-only op wrapper: every option, and
    ``TRITON_INTERPRET=1`` on the CPU. Returns ``(out, lse)``."""
    config = config or SparsityConfig()
    return _forward(
        q, k, v, pv_fp8, q_block, k_block, sparse, config.cdf_threshold, config.sim_threshold
    )


# ---------------------------------------------------------------- registry factories


def make_int8(device: torch.device) -> Any:
    del device
    return int8_attention


def make_int8_lse(device: torch.device) -> Any:
    del device
    return int8_attention_lse


def make_int8_fp8(device: torch.device) -> Any:
    del device
    return int8_fp8_attention


def make_int8_fp8_lse(device: torch.device) -> Any:
    del device
    return int8_fp8_attention_lse


def make_sparse(device: torch.device) -> Any:
    del device
    return sparse_int8_attention
