"""The Triton kernels of our INT8 attention (see :mod:`.int8_triton` for the whole method).

- :func:`quantize_kernel`: one pass over Q or K: INT8 values, per-token fp32 scales (the scale
  of the token's block), optionally the K-smoothing shift of each query row and the pooled
  block statistics of the sparse variant;
- :func:`key_sums_kernel` and :func:`quantize_keys_kernel`: ``sd-int8-wgmma``'s keys: the mean
  of K in two passes (partial column sums, then added in the quantizing pass), K quantized
  with one scale per key tile, and the maxima of the bounded launch (``max |k_j|``, ``max |v|``);
- :func:`bound_flags_kernel`: the bounded launch's flag per query block (two-launch path);
- :func:`quantize_v_kernel`: V smoothed and scaled to e4m3 (or int8, for ``sd-int8-wgmma``'s
  INT8 PV), stored with the tokens contiguous;
- :func:`attention_kernel`: the attention itself, dense or over a tile list, with its
  autotuned launchers :data:`DENSE_KERNEL` and :data:`SPARSE_KERNEL`.

With ``TRITON_INTERPRET=1`` set before import, the kernels run on the CPU through Triton's
interpreter (one small tile configuration; 16-bit float dot products done in fp32, which the
interpreter gets wrong).

Talks to: Triton only; launched by :mod:`.int8_triton`.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Final

import triton
import triton.language as tl

from smartdiff.attention.quantization import P_SHIFT_FP8
from smartdiff.attention.sparsity import SPARSE_K_BLOCK, SPARSE_Q_BLOCK

INTERPRETED: Final = os.environ.get("TRITON_INTERPRET") == "1"
P_SHIFT: tl.constexpr = tl.constexpr(P_SHIFT_FP8)  # FP8 PV: P scaled by 2^P_SHIFT (quantization)


@triton.jit
def int8_scale(amax):
    """The INT8 scale of values whose largest magnitude is ``amax``: ``amax / 127`` (floored at
    1e-20, so an all-zero block quantizes to zeros) cut to 21 significant bits, so that the
    attention kernels' ``-1.5 * 2**23 * scale`` is exact (``quantization.short_mantissa``)."""
    scale = tl.maximum(amax, 1e-20) / 127.0
    return (scale.to(tl.int32, bitcast=True) & -8).to(tl.float32, bitcast=True)


@triton.jit
def round_int8(y):
    """``y`` (within [-127.5, 127.5)) rounded half away from zero to int8."""
    return (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8)


@triton.jit
def quantize_kernel(
    x_ptr,
    mean_ptr,
    out_ptr,
    scale_ptr,
    pooled_ptr,
    sim_ptr,
    dot_ptr,
    seq_len,
    heads,
    stride_b,
    stride_h,
    stride_s,
    pre_scale,
    ROWS: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SUBTRACT_MEAN: tl.constexpr,
    POOL: tl.constexpr,
    DOT_MEAN: tl.constexpr,
):
    """INT8 values ``[BH, S, D]`` and per-token scales ``[BH, S]`` of ``ROWS`` rows; pooled
    block statistics when ``POOL``; ``pre_scale * x . mean`` per row when ``DOT_MEAN`` (the
    score shift of K smoothing, for the LSE)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    rows = pid_s * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HEAD_DIM)
    valid = rows < seq_len
    src = x_ptr + b * stride_b + h * stride_h + rows.to(tl.int64)[:, None] * stride_s
    x = tl.load(src + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    if SUBTRACT_MEAN:
        mean = tl.load(mean_ptr + pid_bh * HEAD_DIM + cols)
        x = tl.where(valid[:, None], x - mean[None, :], 0.0)
    if POOL:
        count = tl.minimum(seq_len - pid_s * ROWS, ROWS).to(tl.float32)
        blocks = tl.cdiv(seq_len, ROWS)
        slot = pid_bh * blocks + pid_s
        tl.store(pooled_ptr + slot * HEAD_DIM + cols, tl.sum(x, axis=0) / count)
        norms = tl.sqrt(tl.sum(x * x, axis=1))
        direction = tl.sum(x / tl.maximum(norms, 1e-12)[:, None], axis=0)
        tl.store(sim_ptr + slot, tl.sum(direction * direction, axis=0) / (count * count))
    x = x * pre_scale
    if DOT_MEAN:
        mean = tl.load(mean_ptr + pid_bh * HEAD_DIM + cols)
        tl.store(
            dot_ptr + pid_bh.to(tl.int64) * seq_len + rows, tl.sum(x * mean[None, :], 1), mask=valid
        )
    amax = tl.max(tl.reshape(tl.abs(x), (ROWS // SCALE_ROWS, SCALE_ROWS * HEAD_DIM)), axis=1)
    scale = int8_scale(amax)
    row_scale = tl.reshape(
        tl.broadcast_to(scale[:, None], (ROWS // SCALE_ROWS, SCALE_ROWS)), (ROWS,)
    )
    quantized = round_int8(x / row_scale[:, None])
    dst = out_ptr + pid_bh.to(tl.int64) * seq_len * HEAD_DIM + rows[:, None] * HEAD_DIM
    tl.store(dst + cols[None, :], quantized, mask=valid[:, None])
    tl.store(scale_ptr + pid_bh.to(tl.int64) * seq_len + rows, row_scale, mask=valid)


@triton.jit
def pv8_position(token):
    """Where INT8 V stores ``token`` inside its group of 16 keys (see :func:`quantize_v_kernel`).

    Key ``16 i + 8 h + 2 t + b`` goes to column ``16 i + 4 t + 2 h + b``: the order in which a
    thread of a Hopper wgmma holds its scores (two adjacent keys, then the two 8 keys on) is
    then the order of an INT8 A operand (four adjacent k), so P needs no data movement."""
    return (token & -16) | (((token >> 1) & 3) << 2) | (((token >> 3) & 1) << 1) | (token & 1)


@triton.jit
def quantize_v_kernel(
    v_ptr,
    mean_ptr,
    scale_ptr,
    out_ptr,
    seq_len,
    padded_len,
    heads,
    stride_b,
    stride_h,
    stride_s,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INT8: tl.constexpr = False,
    sums_ptr=None,
):
    """``(v - mean) / scale`` into ``[BH, D, padded_len]`` (tokens contiguous): e4m3, or with
    ``INT8`` rounded to int8 with the tokens of each 16 reordered by :func:`pv8_position` and
    the padding written as zeros (the grid then covers ``padded_len``), and for each ``ROWS``
    tokens and channel ``0x4B400000 + 127 * (sum of the int8 values)`` into ``sums_ptr [BH,
    tiles, D]`` int32: the float-bits addend with which the attention kernel turns its INT8 PV
    (P stored minus 127) into fp32."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    rows = pid_s * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HEAD_DIM)
    valid = rows < seq_len
    src = v_ptr + b * stride_b + h * stride_h + rows.to(tl.int64)[:, None] * stride_s
    v = tl.load(src + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + pid_bh * HEAD_DIM + cols)
    scale = tl.load(scale_ptr + pid_bh * HEAD_DIM + cols)
    dst = out_ptr + pid_bh.to(tl.int64) * HEAD_DIM * padded_len
    if INT8:
        y = tl.minimum(tl.maximum((v - mean[None, :]) / scale[None, :], -127.0), 127.0)
        quantized = round_int8(tl.where(valid[:, None], y, 0.0))
        where = cols[None, :] * padded_len + pv8_position(rows)[:, None]
        tl.store(dst + where, quantized, mask=(rows < padded_len)[:, None])
        sums = tl.sum(quantized.to(tl.int32), axis=0) * 127 + 0x4B400000
        tl.store(sums_ptr + (pid_bh * tl.num_programs(0) + pid_s) * HEAD_DIM + cols, sums)
    else:
        y = tl.minimum(tl.maximum((v - mean[None, :]) / scale[None, :], -448.0), 448.0)
        y = tl.where(valid[:, None], y, 0.0)
        tl.store(
            dst + cols[None, :] * padded_len + rows[:, None],
            y.to(tl.float8e4nv),
            mask=valid[:, None],
        )


@triton.jit
def _int8_rows(x_ptr, scale_ptr, seq, start, ROWS: tl.constexpr, D: tl.constexpr):
    """Rows ``start ... start + ROWS - 1`` of one (batch, head; program id 1) of an int8
    ``[B * H, seq, D]`` tensor and its per-token scales, as fp32 ``(values, scales, row indices,
    in range)``; rows past ``seq`` read as zeros with scale 0."""
    bh = tl.program_id(1)
    rows = start + tl.arange(0, ROWS)
    ok = rows < seq
    x = tl.load(x_ptr + (bh * seq + rows)[:, None] * D + tl.arange(0, D)[None, :],
                mask=ok[:, None], other=0).to(tl.float32)  # fmt: skip
    return x, tl.load(scale_ptr + bh * seq + rows, mask=ok, other=0.0), rows, ok


@triton.jit
def key_sums_kernel(k_ptr, out_ptr, seq_k, heads, stride_b, stride_h, stride_s, chunk,
                    ROWS: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """``out[bh, split]``: fp32 column sums of keys ``split * chunk ... (split + 1) * chunk - 1``
    of one (batch, head) (grid: splits x B * H; ``chunk`` a multiple of ``ROWS``), the first
    half of ``mean(K)`` (:func:`quantize_keys_kernel` adds the splits in a fixed order)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    base = k_ptr + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    cols = tl.arange(0, D)
    acc = tl.zeros([ROWS, D], tl.float32)
    end = tl.minimum(split * chunk + chunk, seq_k)
    for start in range(split * chunk, end, ROWS):
        rows = start + tl.arange(0, ROWS)
        acc += tl.load(base + rows.to(tl.int64)[:, None] * stride_s + cols[None, :],
                       mask=(rows < end)[:, None], other=0.0).to(tl.float32)  # fmt: skip
    tl.store(out_ptr + (bh * tl.num_programs(0) + split) * D + cols, tl.sum(acc, axis=0))


@triton.jit
def quantize_keys_kernel(k_ptr, v_ptr, partial_ptr, mean_ptr, out_ptr, scale_ptr, kv_max_ptr,
                         seq_k, heads, splits, stride_kb, stride_kh, stride_ks, stride_vb,
                         stride_vh, stride_vs, ROWS: tl.constexpr, D: tl.constexpr,
                         SPLITS: tl.constexpr):  # fmt: skip
    """K smoothed by its mean (the sum of :func:`key_sums_kernel`'s ``splits`` partial sums
    over ``seq_k``, read as one ``[SPLITS, D]`` tile, ``SPLITS`` a power of two >= ``splits``;
    program 0 of each (batch, head) stores it into ``mean_ptr [BH, D]``) and quantized as
    :func:`quantize_kernel` does with one scale per ``ROWS`` keys, into ``out_ptr
    [BH, S, D]`` int8 and ``scale_ptr [BH, S]``; and the two maxima of the bounded launch,
    ``max_j |k_j|`` (the int8 values dequantized) and ``max |v_jd|``, atomically into
    ``kv_max_ptr [BH, 2]`` (zeros). V is read here, in the same pass over the keys, so no
    kernel reads the int8 K back."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    cols = tl.arange(0, D)
    parts = tl.arange(0, SPLITS)
    partial = tl.load(partial_ptr + (bh * splits + parts)[:, None] * D + cols[None, :],
                      mask=(parts < splits)[:, None], other=0.0)  # fmt: skip
    mean = tl.sum(partial, axis=0) / seq_k
    if pid == 0:
        tl.store(mean_ptr + bh * D + cols, mean)
    rows = pid * ROWS + tl.arange(0, ROWS)
    ok = rows < seq_k
    src = k_ptr + b * stride_kb + h * stride_kh + rows.to(tl.int64)[:, None] * stride_ks
    x = tl.load(src + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    x = tl.where(ok[:, None], x - mean[None, :], 0.0)
    scale = int8_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    quantized = round_int8(x / scale)
    dst = out_ptr + bh.to(tl.int64) * seq_k * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(dst, quantized, mask=ok[:, None])
    tl.store(scale_ptr + bh.to(tl.int64) * seq_k + rows, tl.zeros([ROWS], tl.float32) + scale,
             mask=ok)  # fmt: skip
    values = quantized.to(tl.float32)
    norm = tl.max(tl.sqrt(tl.sum(values * values, axis=1)), axis=0) * scale
    tl.atomic_max(kv_max_ptr + 2 * bh, norm)
    v_src = v_ptr + b * stride_vb + h * stride_vh + rows.to(tl.int64)[:, None] * stride_vs
    v = tl.load(v_src + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    tl.atomic_max(kv_max_ptr + 2 * bh + 1, tl.max(tl.max(tl.abs(v), axis=1), axis=0))


@triton.jit
def bound_flags_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, kv_max_ptr, out_ptr, seq_q, seq_k, limit,
                       PART: tl.constexpr, PARTS: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """One flag per block of ``PARTS x PART`` queries (``PART`` a power of two, so 192 = 3 x
    64 can be a block): 1 when for every row ``|q_i| max_j |k_j| - q_i . k_0`` (log2 units, the
    int8 values dequantized) is at most ``limit - log2(max(max |v|, 1))``."""
    bh = tl.program_id(1)
    k0 = tl.load(k_ptr + bh * seq_k * D + tl.arange(0, D)).to(tl.float32)
    k0_scale = tl.load(ks_ptr + bh * seq_k)
    k_max = tl.load(kv_max_ptr + 2 * bh)
    worst = float("-inf")
    for part in tl.static_range(PARTS):
        start = (tl.program_id(0) * PARTS + part) * PART
        x, q_scale, rows, ok = _int8_rows(q_ptr, qs_ptr, seq_q, start, PART, D)
        first = tl.sum(x * k0[None, :], axis=1) * q_scale * k0_scale
        top = tl.sqrt(tl.sum(x * x, axis=1)) * q_scale * k_max
        worst = tl.maximum(worst, tl.max(tl.where(ok, top - first, float("-inf")), axis=0))
    allowed = limit - tl.log2(tl.maximum(tl.load(kv_max_ptr + 2 * bh + 1), 1.0))
    tl.store(out_ptr + bh * tl.num_programs(0) + tl.program_id(0), (worst <= allowed).to(tl.int32))


@triton.jit
def attend_tile(
    acc,
    l_i,
    m_i,
    q,
    q_scale,
    k_base,
    ks_base,
    v_base,
    start_n,
    seq_k,
    stride_vs,
    stride_vd,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PV_FP8: tl.constexpr,
    MASKED: tl.constexpr,
    EMULATED_DOT: tl.constexpr,
):
    """One key tile ``[start_n, start_n + BLOCK_N)`` into the running softmax state."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    if MASKED:
        valid = offs_n < seq_k
        k = tl.load(k_ptrs, mask=valid[:, None], other=0)
        k_scale = tl.load(ks_base + offs_n, mask=valid, other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        k_scale = tl.load(ks_base + offs_n)
        v = tl.load(v_ptrs)
    # int32 -> fp32 without the quarter-rate I2F instruction: |dot| <= 127^2 * 128 < 2^22, so
    # adding the bits of 1.5 * 2^23 gives a float equal to 1.5 * 2^23 + dot, exactly. The
    # offset comes off in the key scale's multiply-add: k_scale has 21 significant bits
    # (quantize_kernel), so -1.5 * 2^23 * k_scale is exact and t is dot * k_scale rounded once.
    dot = tl.dot(q, tl.trans(k)) + 0x4B400000
    t = tl.fma(dot.to(tl.float32, bitcast=True), k_scale[None, :], (k_scale * -12582912.0)[None, :])
    if MASKED:
        t = tl.where(valid[None, :], t, float("-inf"))
    # The scores are t * q_scale (q_scale > 0): scale the row max, not every score, and let
    # the scaling fuse into the exponent's multiply-add. With FP8 PV the probabilities are
    # made 2^P_SHIFT times larger in the same multiply-add (their sum too: it cancels).
    m_new = tl.maximum(m_i, tl.max(t, axis=1) * q_scale)
    if PV_FP8:
        p = tl.math.exp2(t * q_scale[:, None] - (m_new - P_SHIFT)[:, None])
    else:
        p = tl.math.exp2(t * q_scale[:, None] - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        acc += tl.dot(p.to(tl.float8e4nv), v)
    elif EMULATED_DOT:  # Triton's interpreter gets 16-bit float dots wrong: same math in fp32
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def attention_kernel(
    q_ptr,
    qs_ptr,
    k_ptr,
    ks_ptr,
    v_ptr,
    v_scale_ptr,
    v_mean_ptr,
    shift_ptr,
    out_ptr,
    lse_ptr,
    index_ptr,
    count_ptr,
    seq_q,
    seq_k,
    heads,
    q_blocks,
    k_blocks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_os,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PV_FP8: tl.constexpr,
    SPARSE: tl.constexpr,
    SMOOTH_K: tl.constexpr,
    EMULATED_DOT: tl.constexpr,
):
    """One query tile of one (batch, head) against all (or the listed) key tiles."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    b = bh // heads
    h = bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    q = tl.load(
        q_ptr + bh * seq_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        mask=row_ok[:, None],
        other=0,
    )
    q_scale = tl.load(qs_ptr + bh * seq_q + offs_m, mask=row_ok, other=1.0)
    k_base = k_ptr + bh * seq_k * HEAD_DIM
    ks_base = ks_ptr + bh * seq_k
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if SPARSE:
        slot = bh * q_blocks + pid_m
        count = tl.load(count_ptr + slot)
        for j in range(0, count):
            start_n = tl.load(index_ptr + slot * k_blocks + j) * BLOCK_N
            acc, l_i, m_i = attend_tile(
                acc,
                l_i,
                m_i,
                q,
                q_scale,
                k_base,
                ks_base,
                v_base,
                start_n,
                seq_k,
                stride_vs,
                stride_vd,
                BLOCK_N,
                HEAD_DIM,
                PV_FP8,
                True,
                EMULATED_DOT,
            )
    else:
        full = (seq_k // BLOCK_N) * BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            acc, l_i, m_i = attend_tile(
                acc,
                l_i,
                m_i,
                q,
                q_scale,
                k_base,
                ks_base,
                v_base,
                start_n,
                seq_k,
                stride_vs,
                stride_vd,
                BLOCK_N,
                HEAD_DIM,
                PV_FP8,
                False,
                EMULATED_DOT,
            )
        if full < seq_k:
            acc, l_i, m_i = attend_tile(
                acc,
                l_i,
                m_i,
                q,
                q_scale,
                k_base,
                ks_base,
                v_base,
                full,
                seq_k,
                stride_vs,
                stride_vd,
                BLOCK_N,
                HEAD_DIM,
                PV_FP8,
                True,
                EMULATED_DOT,
            )
    total = tl.where(l_i > 0, l_i, 1.0)
    if PV_FP8:  # acc and total both carry the factor 2^P_SHIFT
        v_scale = tl.load(v_scale_ptr + bh * HEAD_DIM + offs_d)
        v_mean = tl.load(v_mean_ptr + bh * HEAD_DIM + offs_d)
        out = acc * v_scale[None, :] / total[:, None] + v_mean[None, :]
    else:
        out = acc / total[:, None]
    dst = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    lse2 = m_i + tl.math.log2(total)
    if PV_FP8:
        lse2 -= P_SHIFT
    if SMOOTH_K:  # the scores were shifted by q . mean(K): shift the LSE back
        lse2 += tl.load(shift_ptr + bh * seq_q + offs_m, mask=row_ok, other=0.0)
    tl.store(lse_ptr + bh * seq_q + offs_m, lse2 * 0.6931471805599453, mask=row_ok)


# (BLOCK_M, BLOCK_N, warps, stages) tried by the autotuner (first call of each sequence length);
# a short list: each one is a compilation.
TileConfig = tuple[int, int, int, int]
DENSE_CONFIGS: Final[tuple[TileConfig, ...]] = (
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2),
    (128, 128, 8, 3), (128, 128, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3),
)  # fmt: skip
SPARSE_CONFIGS: Final[tuple[TileConfig, ...]] = tuple(
    (SPARSE_Q_BLOCK, SPARSE_K_BLOCK, warps, stages)
    for warps, stages in ((4, 3), (8, 3), (4, 4), (8, 2))
)
INTERPRETER_CONFIG: Final[TileConfig] = (64, 32, 4, 1)  # the interpreter runs programs in numpy


def autotuned(configs: tuple[TileConfig, ...]) -> Any:
    options: dict[str, Any] = {"key": ["seq_q", "seq_k", "HEAD_DIM", "PV_FP8"]}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True  # keep tuned configs in Triton's cache across runs
    tried = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in configs
    ]
    return triton.autotune(configs=tried, **options)(attention_kernel)


DENSE_KERNEL: Final = autotuned((INTERPRETER_CONFIG,) if INTERPRETED else DENSE_CONFIGS)
SPARSE_KERNEL: Final = autotuned(
    ((SPARSE_Q_BLOCK, SPARSE_K_BLOCK, 4, 1),) if INTERPRETED else SPARSE_CONFIGS
)
