"""Our INT8 attention for Hopper with explicitly scheduled wgmma (Gluon): ``sd-int8-wgmma``.

The math is that of :mod:`smartdiff.attention.quantization` with one fp32 scale per key tile
(64 keys, ``k_block=64``; K smoothed by its mean first, so the tokens of a tile have like norms) and
per-token Q scales: INT8 QK^T in int32, online softmax in base 2, BF16 PV. The keys are
prepared in two passes (:func:`.int8_triton.quantize_keys`: K's mean from partial sums, K
quantized, ``max |k|`` and ``max |v|`` for the bound); the query is quantized by the kernel
itself, each consumer its own 64 rows in registers, to the same values as ``sd-int8``'s pass
(:func:`_quantize_query`, :func:`.int8_triton.quantize_query`). What differs from ``sd-int8`` (plain
Triton, which waits for every wgmma right after issuing it) is the schedule, written out in
Gluon the way FlashAttention-3 lays it out:

- one CTA per 192 query rows of one (batch, head), one per SM (``maxnreg`` 128 at launch);
- a producer warpgroup (the default partition, 24 registers after ``setmaxnreg``) brings Q
  (bf16) once and then K and V tiles of 64 keys in by TMA, into 4-deep shared-memory rings with a
  "full" and an "empty" mbarrier per stage; the K and V tiles are shared by
- three consumer warpgroups (160 registers each), 64 query rows apiece: for tile n each issues
  QK^T of tile n and PV of tile n - 1 back to back (P from registers), waits for the scores,
  runs the softmax, then waits for PV. The loop takes two key tiles per iteration
  (``UNROLL``, 2), and the warpgroups run free of each other.

How it gets there, briefly (docs/sd_int8_wgmma.md has each choice with its measurements): the
softmax takes each tile's row maximum on the int32 scores and meets key scale, query scale and
maximum in one multiply-add per score (``FOLD``); each key scale is loaded a step ahead;
rescaling is lazy (a row's reference moves only past :data:`LAZY_THRESHOLD`, and a warp whose
rows did not move skips the multiplies, :func:`_rescale`); the row sums are kept as each
thread's share (:func:`_thread_row_sums`); the last key tile is peeled out of the loop. The
bounded launch: a row's scores are at most ``|q_i| max_j |k_j|`` and its reference, tile 0's
maximum, at least its score with key 0; where that gap B (log2 units) is small enough for a
warpgroup's 64 rows that neither the row sums (``N 2**B``) nor the accumulator (``N 2**B max
|v|``) can pass 2**126, the warpgroup runs a copy of the loop without row maxima or rescaling
(:func:`_softmax_bounded`), decided per warpgroup inside the kernel (:func:`_consumer16`). The
query quantized apart (``q_in=False``, and the switches that keep the query in shared memory)
takes the older path: :func:`.int8_triton.bound_flags` flags blocks of 192 (or 128) rows and
the kernel is launched twice (``RUN`` 1 and 2). On the H200 the kernel runs at the 700 W
power cap, so a call's time is its energy; the softmax, not the tensor cores, is what bounds
it. The other switches (``pingpong``, ``p_smem``, ``sum_mma``, ``pv8``, ``stages``,
``unroll``, ``overlap_qk``, ``q_regs``) are kept for the measurements that priced them; INT8
PV lives in :mod:`.int8_wgmma_pv8`.

Inputs: ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]``, bf16 on an sm_90 GPU, ``D = 128``, any
strides with the channels contiguous; output ``[B, H, Sq, D]`` (a view of ``[B, Sq, H, D]``)
and the natural-log LSE ``[B, H, Sq]``. Needs Triton >= 3.6 (Gluon). One
``torch.library.custom_op`` (``smartdiff::int8_wgmma_attention``) with a fake for tracing.

Talks to: :mod:`.int8_triton` (quantization), :mod:`.int8_wgmma_parts` and
:mod:`.int8_wgmma_pv8` (the consumers' shared pieces, INT8 PV), torch, Triton's Gluon; chosen
through :mod:`smartdiff.attention.registry`.
"""

from __future__ import annotations

import math
from typing import Any, Final

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from smartdiff.attention.int8_triton import (
    bound_flags,
    bound_limit,
    channels_last,
    quantize_keys,
    quantize_query,
    quantize_v,
)
from smartdiff.attention.int8_wgmma_parts import (
    INT_TO_FLOAT_BITS,
    LN2,
    WG_ROWS,
    _first_scores,
    _give_turn,
    _key_scale,
    _query_operand,
    _scores,
    _take_turn,
)
from smartdiff.attention.int8_wgmma_pv8 import _consumer8
from smartdiff.attention.quantization import LOG2E, check_qkv

OP_NAME: Final = "smartdiff::int8_wgmma_attention"
HEAD_DIM: Final = 128
BLOCK_N: Final = 64  # keys per tile (and per K scale), BF16 PV
CONSUMERS: Final = 3  # consumer warpgroups per CTA, BF16 PV
PV8_BLOCK_N: Final = 128  # INT8 PV: 128-key tiles, two consumers
# shared-memory ring depth by consumers (K + V: 24 KiB a stage at 64 keys, 48 KiB at 128)
STAGES: Final = {3: 4, 2: 3}
UNROLL: Final = 2  # key tiles per loop iteration (BF16 PV)
# registers per thread: at launch (one CTA per SM: 4 (consumers + 1) warps x 32 x this <= 64
# Ki) and after setmaxnreg in each consumer (the producer keeps 24)
LAUNCH_REGISTERS: Final = {2: 168, 3: 128}
CONSUMER_REGISTERS: Final = {2: 240, 3: 160}  # 24 + 2 x 240 = 3 x 168; 24 + 3 x 160 <= 4 x 128
SHARED_MEMORY: Final = 232448  # bytes a CTA may have on sm_90 (227 KiB)
WG0 = gl.constexpr(0)
WG1 = gl.constexpr(1)
WG2 = gl.constexpr(2)
# the query's pre-scale, log2(e) / sqrt(128), as quantize_query passes it (rounded to fp32)
Q_PRE_SCALE = gl.constexpr(LOG2E / math.sqrt(HEAD_DIM))
# lazy rescaling: a row's reference maximum moves only when a tile's maximum passes it by more
# than this (log2 units), so P stays below 2**8 and most steps keep their accumulator as is
LAZY_THRESHOLD = gl.constexpr(8.0)
_ACC = 64  # accumulator values per thread (64 rows x 128 channels over 128 threads)
RESCALE_PACK = gl.constexpr(_ACC)
# acc * alpha, one asm for a thread's 64 values (ties each output to its input): the warp votes
# whether any of its rows' alpha is not 1 (operands 128 and 130: rows r and r + 8 of the wgmma
# layout; the PTX shows the values going r, r, r + 8, r + 8 in every group of four) and branches
# over the 64 multiplies when none is
_RESCALE_ASM = gl.constexpr(
    "{ .reg .pred p, q; "
    f"setp.neu.f32 p, ${2 * _ACC}, 0f3F800000; "
    f"setp.neu.or.f32 p, ${2 * _ACC + 2}, 0f3F800000, p; "
    "vote.sync.any.pred q, p, 0xffffffff; @!q bra.uni SKIP; "
    + " ".join(f"mul.f32 ${i}, ${i}, ${2 * _ACC + i};" for i in range(_ACC))
    + " SKIP: }"
)
_RESCALE_CONSTRAINTS = gl.constexpr(
    ",".join(["=r"] * _ACC + [str(i) for i in range(_ACC)] + ["r"] * _ACC)
)
# the TMA load is ``async_copy_global_to_shared`` in Triton 3.6-3.x and ``async_load`` later
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _rescale(acc, alpha):
    """``acc * alpha[:, None]`` (``acc`` the [64, 128] wgmma accumulator), skipped by every warp
    none of whose rows has an ``alpha`` other than 1 -- with :data:`LAZY_THRESHOLD`, nearly all
    steps after the first few: FlashAttention-4's lazy rescaling. A branch Gluon cannot write
    (it has no warp-uniform scalar short of a reduction through shared memory), so it is PTX."""
    return gl.inline_asm_elementwise(_RESCALE_ASM, _RESCALE_CONSTRAINTS, [acc, alpha[:, None]],
                                     dtype=gl.float32, is_pure=True, pack=RESCALE_PACK)  # fmt: skip


@gluon.jit
def _softmax(s, scale, offset, q_scale, m_i, l_i, key0, seq_k, MASK: gl.constexpr,
             FOLD: gl.constexpr, SUM_MMA: gl.constexpr):  # fmt: skip
    """int32 scores of one tile -> fp32 probabilities (scores' layout) and the row state.

    With ``FOLD`` the row maximum is taken on the integer scores (exact, and the key scale is
    one per tile) and the key scale, query scale and maximum meet in one multiply-add per score;
    without, each score is scaled by the key scale first, then by the query scale."""
    u = (s + INT_TO_FLOAT_BITS).to(gl.float32, bitcast=True)  # s + 1.5 * 2**23, exactly
    if MASK:  # the last tile: the rows TMA zero-filled past the end get no weight
        cols = key0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        valid = (cols < seq_k)[None, :]
    if FOLD:
        if MASK:  # noqa: SIM108 (a compile-time branch; keep it a statement)
            s_max = gl.max(gl.where(valid, s, -2147483647), axis=1)
        else:
            s_max = gl.max(s, axis=1)
        row_scale = q_scale * scale
        t_max = s_max.to(gl.float32) * row_scale
        # lazy: the reference maximum moves only past the threshold (alpha stays exactly 1)
        m_new = gl.where(t_max > m_i + LAZY_THRESHOLD, t_max, m_i)
        x = gl.fma(u, row_scale[:, None], (q_scale * offset - m_new)[:, None])
    else:
        t = gl.fma(u, scale, offset)
        if MASK:
            t = gl.where(valid, t, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(t, axis=1) * q_scale)
        x = gl.fma(t, q_scale[:, None], -m_new[:, None])  # fused whatever fp-fusion says
    if FOLD and MASK:
        x = gl.where(valid, x, float("-inf"))
    p = gl.exp2(x)
    alpha = gl.exp2(m_i - m_new)
    if SUM_MMA:  # the row sums come from the tensor cores (_row_sums), with PV
        return p, alpha, m_new, l_i
    else:
        alpha_l = gl.convert_layout(alpha, gl.SliceLayout(1, l_i.type.layout))
        return p, alpha, m_new, l_i * alpha_l[:, None] + _thread_row_sums(p)


@gluon.jit
def _softmax_bounded(s, scale, offset, q_scale, m_i, l_i, key0, seq_k, MASK: gl.constexpr):
    """``_softmax`` (folded) without the row maximum, for a query block whose scores are known
    to stay close enough to each row's reference (tile 0's maximum) that nothing overflows
    (:func:`.int8_triton.bound_flags`): the reference never moves, so there is no maximum to
    take and nothing to rescale."""
    u = (s + INT_TO_FLOAT_BITS).to(gl.float32, bitcast=True)
    x = gl.fma(u, (q_scale * scale)[:, None], (q_scale * offset - m_i)[:, None])
    if MASK:
        cols = key0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        x = gl.where((cols < seq_k)[None, :], x, float("-inf"))
    p = gl.exp2(x)
    return p, l_i + _thread_row_sums(p)


@gluon.jit
def _thread_row_sums(p):
    """This thread's share of P's row sums, ``[rows, 4]``: column ``8 i + 2 t + c`` of a wgmma
    accumulator is held by the thread at position ``t`` of its quad, so a sum over ``i`` and
    ``c`` needs no shuffles; the four shares of a row are added once, after the last tile
    (:func:`_row_total`). The shuffles of a full row sum in every tile cost 4-6% at the 14B
    shape (diagnostics, section 24)."""
    parts = gl.reshape(p, [p.shape[0], p.shape[1] // 8, 4, 2])
    return gl.sum(gl.sum(parts, axis=3), axis=1)


@gluon.jit
def _row_total(l_i, layout: gl.constexpr):
    """The row sums from :func:`_thread_row_sums`' shares, in ``layout``."""
    return gl.convert_layout(gl.sum(l_i, axis=1), layout)


@gluon.jit
def _to_bf16(x):
    """fp32 -> bf16, two at a time into one register (``cvt.rn.bf16x2.f32``): the pair a
    thread holds side by side in the scores is the pair the A operand wants in one register;
    ``.to(gl.bfloat16)`` converts them one by one and ptxas then swaps the halves (a PRMT
    per pair)."""
    return gl.inline_asm_elementwise(
        "cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.bfloat16, is_pure=True, pack=2
    )


@gluon.jit
def _store_p(p_smem, index, p_f32):
    """P in bf16 into ``p_smem[index]``, made visible to the tensor cores (async proxy) and
    complete for the whole warpgroup before its next wgmma reads it."""
    p_smem.index(index).store(_to_bf16(p_f32))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _row_sums(p, ones, l_i, alpha):
    """Issue ``l_i * alpha + P @ ones`` (async): the row sums of the BF16 P that PV uses, on
    the tensor cores (one m64n8 product per 16 keys, 1/16 of PV's work) instead of one float
    add per probability; ``l_i`` is ``[rows, 8]``, every column the sum."""
    row_l: gl.constexpr = gl.SliceLayout(1, l_i.type.layout)
    l_i = l_i * gl.convert_layout(alpha, row_l)[:, None]
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_i.type.layout, k_width=2)
    return warpgroup_mma(gl.convert_layout(p, p_layout), ones.permute((1, 0)), l_i, is_async=True)


@gluon.jit
def _step(ctx, n, state, WG: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
          OVERLAP_QK: gl.constexpr, FOLD: gl.constexpr, MASK: gl.constexpr,
          SUM_MMA: gl.constexpr, P_SMEM: gl.constexpr, BOUNDED: gl.constexpr):  # fmt: skip
    """Key tile n: its scores, the softmax, and PV of tile n - 1 (module docstring); ``state``
    in, the next ``state`` out. The tile's key scale (``scale``, ``offset``) came with the
    previous step; the next tile's is loaded here and returned for the next step. ``BOUNDED``:
    no row maximum and no rescaling (:func:`_softmax_bounded`)."""
    (q_view, k_smem, v_smem, ones, p_smem, k_full, k_empty, v_full, v_empty, turn, ks_ptr, seq_k,
     q_scale, s_zero) = ctx  # fmt: skip
    acc, p, alpha, m_i, l_i, scale, offset = state
    block_n: gl.constexpr = s_zero.shape[1]
    row_o: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    ks = n % STAGES
    vs = (n - 1) % STAGES
    if MASK:  # the last tile: nothing after it
        next_scale, next_offset = scale, offset
    else:  # a step ahead of its use: a load right before the softmax stalled it (32% of stalls)
        next_scale, next_offset = _key_scale(ks_ptr, (n + 1) * block_n)
    if not BOUNDED:  # before the products are issued (nothing in flight: the branch does not
        acc = _rescale(acc, gl.convert_layout(alpha, row_o))  # stall a wgmma)
    mbarrier.wait(k_full.index(ks), (n // STAGES) & 1)
    _take_turn(turn, WG, n, PINGPONG)
    s_tok = _scores(q_view, k_smem, ks, s_zero)
    if not OVERLAP_QK:
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(ks))
    mbarrier.wait(v_full.index(vs), ((n - 1) // STAGES) & 1)
    v_tile = v_smem.index(vs).reshape([block_n, acc.shape[1]])
    if P_SMEM:
        acc_tok = warpgroup_mma(p_smem.index(WG * 2 + (n - 1) % 2), v_tile, acc, is_async=True)
    else:
        acc_tok = warpgroup_mma(p, v_tile, acc, is_async=True)
    if SUM_MMA:
        l_tok = _row_sums(p, ones, l_i, alpha)
    _give_turn(turn, WG, PINGPONG)
    if OVERLAP_QK:
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(ks))
    if BOUNDED:
        p_f32, l_i = _softmax_bounded(s, scale, offset, q_scale, m_i, l_i, n * block_n, seq_k,
                                      MASK)  # fmt: skip
    else:
        p_f32, alpha, m_i, l_i = _softmax(s, scale, offset, q_scale, m_i, l_i, n * block_n,
                                          seq_k, MASK, FOLD, SUM_MMA)  # fmt: skip
    if P_SMEM:  # this tile's P into the buffer PV of tile n - 2 read (waited for last step)
        _store_p(p_smem, WG * 2 + n % 2, p_f32)
        acc = warpgroup_mma_wait(0, deps=(acc_tok,))
    elif SUM_MMA:
        acc, l_i, p = warpgroup_mma_wait(0, deps=(acc_tok, l_tok, p))
    else:
        acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
    mbarrier.arrive(v_empty.index(vs))
    if not P_SMEM:
        # P is rounded only after the PV that reads the previous one is done: converting
        # earlier needs fresh registers while that PV is in flight
        p = gl.convert_layout(_to_bf16(p_f32), p.type.layout)
    return (acc, p, alpha, m_i, l_i, next_scale, next_offset)


@gluon.jit
def _consumer(args, WG: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP_QK: gl.constexpr,
              FOLD: gl.constexpr, PV8: gl.constexpr, SUM_MMA: gl.constexpr,
              UNROLL: gl.constexpr, P_SMEM: gl.constexpr, Q_REGS: gl.constexpr,
              BOUNDED: gl.constexpr, Q_IN: gl.constexpr):  # fmt: skip
    """One consumer warpgroup: 64 query rows against every key tile, then the output; ``args``
    is the kernel's tuple of the (non-constexpr) values both consumers take
    (:func:`wgmma_attention_kernel`; a constexpr inside a tuple stops being one)."""
    (q_smem, k_smem, v_smem, ones, p_smem, q_bar, k_full, k_empty, v_full, v_empty, turn, qs_ptr,
     ks_ptr, shift_ptr, vs_ptr, vm_ptr, sums_ptr, out_ptr, lse_ptr, seq_q, seq_k, n_tiles, b, h,
     bh, off_m, stride_ob, stride_oh, stride_os, mean_ptr, k8_ptr, kv_max_ptr,
     limit) = args  # fmt: skip
    if PV8:
        _consumer8(q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty, turn,
                   qs_ptr, ks_ptr, shift_ptr, vs_ptr, vm_ptr, sums_ptr, out_ptr, lse_ptr, seq_q,
                   seq_k, n_tiles, b, h, bh, off_m, stride_ob, stride_oh, stride_os,
                   WG, BLOCK_N, HEAD_DIM, STAGES, PINGPONG)  # fmt: skip
    else:
        _consumer16(q_smem, k_smem, v_smem, ones, p_smem, q_bar, k_full, k_empty, v_full, v_empty,
                    turn, qs_ptr, ks_ptr, shift_ptr, out_ptr, lse_ptr, seq_q, seq_k, n_tiles, b,
                    h, bh, off_m, stride_ob, stride_oh, stride_os, mean_ptr, k8_ptr, kv_max_ptr,
                    limit, WG, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, OVERLAP_QK, FOLD,
                    SUM_MMA, UNROLL, P_SMEM, Q_REGS, BOUNDED, Q_IN)  # fmt: skip


@gluon.jit
def _quantize_query(q_smem, WG: gl.constexpr, s_layout: gl.constexpr, mean_ptr, k8_ptr,
                    ks_ptr, kv_max_ptr, row0, seq_q, BOUNDED: gl.constexpr):  # fmt: skip
    """This warpgroup's 64 bf16 query rows (from shared memory) quantized exactly as
    :func:`.int8_triton.quantize_query` does (times log2(e) / sqrt(D), one scale per row,
    max |x| / 127 cut to 21 significant bits, rounded half away from zero), for one (batch,
    head) whose keys' mean, int8 values, scales and maxima start at the pointers:
    ``(the int8 A operand of QK^T in registers, the rows' scales, their shifts q . mean(K),
    the largest bound excess B of the rows in range)`` -- B as
    :func:`.int8_triton.bound_flags` takes it, ``|q_i| max_j |k_j| - q_i . k_0``; without
    ``BOUNDED`` a zero instead (an unused reduction breaks Triton 3.6's lowering)."""
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    cols = gl.arange(0, q_smem.shape[-1], layout=gl.SliceLayout(0, blocked))
    x = q_smem.index(WG).reshape([WG_ROWS, q_smem.shape[-1]]).load(blocked).to(gl.float32)
    x = x * Q_PRE_SCALE
    shift = gl.sum(x * gl.load(mean_ptr + cols)[None, :], axis=1)
    scale = gl.maximum(gl.max(gl.abs(x), axis=1), 1e-20) / 127.0
    scale = (scale.to(gl.int32, bitcast=True) & -8).to(gl.float32, bitcast=True)
    y = x / scale[:, None]
    q8 = (y + gl.where(y >= 0, 0.5, -0.5)).to(gl.int8)
    if BOUNDED:
        values = q8.to(gl.float32)
        first = gl.sum(values * gl.load(k8_ptr + cols).to(gl.float32)[None, :], axis=1)
        first = first * scale * gl.load(ks_ptr)
        top = gl.sqrt(gl.sum(values * values, axis=1)) * scale * gl.load(kv_max_ptr)
        rows = row0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, blocked))
        worst = gl.max(gl.where(rows < seq_q, top - first, float("-inf")), axis=0)
    else:
        worst = 0.0
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    q_view = gl.convert_layout(q8, gl.DotOperandLayout(operand_index=0, parent=s_layout,
                                                       k_width=4))  # fmt: skip
    return q_view, gl.convert_layout(scale, row_s), gl.convert_layout(shift, row_s), worst


@gluon.jit
def _consumer16(q_smem, k_smem, v_smem, ones, p_smem, q_bar, k_full, k_empty, v_full, v_empty, turn,
                qs_ptr, ks_ptr, shift_ptr, out_ptr, lse_ptr, seq_q, seq_k, n_tiles, b, h, bh,
                off_m, stride_ob, stride_oh, stride_os, mean_ptr, k8_ptr, kv_max_ptr, limit,
                WG: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                STAGES: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP_QK: gl.constexpr,
                FOLD: gl.constexpr, SUM_MMA: gl.constexpr,
                UNROLL: gl.constexpr, P_SMEM: gl.constexpr, Q_REGS: gl.constexpr,
                BOUNDED: gl.constexpr, Q_IN: gl.constexpr):  # fmt: skip
    """BF16 PV: the warpgroup's query rows, :func:`_consumer_body` over every key tile, then
    the LSE. ``Q_IN``: the query comes as bf16 and is quantized here (:func:`_quantize_query`),
    and with ``BOUNDED`` the warpgroup takes the body without row maxima when its own 64 rows
    pass the bound (one launch); else the int8 query, its scales and shifts come from
    :func:`.int8_triton.quantize_query` and ``BOUNDED`` is the launch's (the caller checked
    the block's flag)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row0 = off_m + WG * WG_ROWS
    offs_m = row0 + gl.arange(0, WG_ROWS, layout=row_s)
    row_ok = offs_m < seq_q
    mbarrier.wait(q_bar, 0)
    if Q_IN:
        q_view, q_scale, shift, worst = _quantize_query(
            q_smem, WG, s_layout, mean_ptr + bh * HEAD_DIM, k8_ptr + bh * seq_k * HEAD_DIM,
            ks_ptr + bh * seq_k, kv_max_ptr + 2 * bh, row0, seq_q, BOUNDED,
        )  # fmt: skip
        # (a run-time choice between the two bodies, each compiled with its constexpr; a flag
        # set to False without BOUNDED becomes a branch on a constant, which Triton 3.6 fails
        # to lower)
        if BOUNDED:
            v_max = gl.maximum(gl.load(kv_max_ptr + 2 * bh + 1), 1.0)
            if worst <= limit - gl.log2(v_max):
                lse2 = _consumer_body(q_view, q_scale, k_smem, v_smem, ones, p_smem, k_full,
                                      k_empty, v_full, v_empty, turn, ks_ptr, out_ptr, seq_q,
                                      seq_k, n_tiles, b, h, bh, row0, stride_ob, stride_oh,
                                      stride_os, WG, BLOCK_N, HEAD_DIM, STAGES, PINGPONG,
                                      OVERLAP_QK, FOLD, SUM_MMA, UNROLL, P_SMEM, True)  # fmt: skip
            else:
                lse2 = _consumer_body(q_view, q_scale, k_smem, v_smem, ones, p_smem, k_full,
                                      k_empty, v_full, v_empty, turn, ks_ptr, out_ptr, seq_q,
                                      seq_k, n_tiles, b, h, bh, row0, stride_ob, stride_oh,
                                      stride_os, WG, BLOCK_N, HEAD_DIM, STAGES, PINGPONG,
                                      OVERLAP_QK, FOLD, SUM_MMA, UNROLL, P_SMEM, False)  # fmt: skip
        else:
            lse2 = _consumer_body(q_view, q_scale, k_smem, v_smem, ones, p_smem, k_full,
                                  k_empty, v_full, v_empty, turn, ks_ptr, out_ptr, seq_q,
                                  seq_k, n_tiles, b, h, bh, row0, stride_ob, stride_oh,
                                  stride_os, WG, BLOCK_N, HEAD_DIM, STAGES, PINGPONG,
                                  OVERLAP_QK, FOLD, SUM_MMA, UNROLL, P_SMEM, False)  # fmt: skip
    else:
        q_scale = gl.load(qs_ptr + bh * seq_q + offs_m, mask=row_ok, other=1.0)
        q_view = _query_operand(q_smem, WG, s_layout, Q_REGS)
        lse2 = _consumer_body(q_view, q_scale, k_smem, v_smem, ones, p_smem, k_full, k_empty,
                              v_full, v_empty, turn, ks_ptr, out_ptr, seq_q, seq_k, n_tiles, b, h,
                              bh, row0, stride_ob, stride_oh, stride_os, WG, BLOCK_N, HEAD_DIM,
                              STAGES, PINGPONG, OVERLAP_QK, FOLD, SUM_MMA, UNROLL, P_SMEM,
                              BOUNDED)  # fmt: skip
        shift = gl.load(shift_ptr + bh * seq_q + offs_m, mask=row_ok, other=0.0)
    gl.store(lse_ptr + bh * seq_q + offs_m, (lse2 + shift) * LN2, mask=row_ok)


@gluon.jit
def _consumer_body(q_view, q_scale, k_smem, v_smem, ones, p_smem, k_full, k_empty, v_full,
                   v_empty, turn, ks_ptr, out_ptr, seq_q, seq_k, n_tiles, b, h, bh, row0,
                   stride_ob, stride_oh, stride_os,
                   WG: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                   STAGES: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP_QK: gl.constexpr,
                   FOLD: gl.constexpr, SUM_MMA: gl.constexpr, UNROLL: gl.constexpr,
                   P_SMEM: gl.constexpr, BOUNDED: gl.constexpr):  # fmt: skip
    """64 query rows (``q_view``, the QK^T operand) against every key tile; stores the output
    and returns the rows' log2-sum-exp2 before the K-smoothing shift. ``BOUNDED``: every tile
    after the first without row maxima (:func:`_softmax_bounded`; the caller checked the
    bound)."""
    BLOCK_M: gl.constexpr = WG_ROWS
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    ks_base = ks_ptr + bh * seq_k
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    if SUM_MMA:  # [rows, 8], every column the row sum (_row_sums)
        l_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 16]
        )
        l_i = gl.zeros([BLOCK_M, 8], gl.float32, l_layout)
    else:
        # zeros in the shares' layout (that of a reduction of the scores' layout, which Gluon
        # derives but does not let us spell): the reduction of a zero tile, once per block
        l_i = _thread_row_sums(gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)

    # tile 0: scores and softmax (masked: it may be the last tile too)
    s, scale0, offset0 = _first_scores(q_view, k_smem, k_full, k_empty, turn, ks_base, s_zero,
                                       WG, PINGPONG)  # fmt: skip
    scale, offset = _key_scale(ks_base, gl.minimum(n_tiles - 1, 1) * BLOCK_N)  # tile 1's
    p, alpha, m_i, l_i = _softmax(s, scale0, offset0, q_scale, m_i, l_i, 0, seq_k, True, FOLD,
                                  SUM_MMA)  # fmt: skip
    if P_SMEM:
        _store_p(p_smem, WG * 2, p)
    p = gl.convert_layout(_to_bf16(p), p_layout)
    if BOUNDED:  # the reference is tile 0's maximum for good (alpha 0 only met a zero acc)
        alpha = gl.full([BLOCK_M], 1.0, gl.float32, row_s)
    # what every step takes besides the running state (a constexpr cannot ride in the tuple)
    ctx = (q_view, k_smem, v_smem, ones, p_smem, k_full, k_empty, v_full, v_empty, turn, ks_base,
           seq_k, q_scale, s_zero)  # fmt: skip
    state = (acc, p, alpha, m_i, l_i, scale, offset)
    if UNROLL == 1:
        for n in range(1, n_tiles - 1):
            state = _step(ctx, n, state, WG, STAGES, PINGPONG, OVERLAP_QK, FOLD, False, SUM_MMA,
                          P_SMEM, BOUNDED)  # fmt: skip
    else:  # two tiles per iteration (module docstring), the odd one after the loop
        odd = (n_tiles - 2) % 2
        for n in range(1, n_tiles - 1 - odd, 2):
            state = _step(ctx, n, state, WG, STAGES, PINGPONG, OVERLAP_QK, FOLD, False, SUM_MMA,
                          P_SMEM, BOUNDED)  # fmt: skip
            state = _step(ctx, n + 1, state, WG, STAGES, PINGPONG, OVERLAP_QK, FOLD, False,
                          SUM_MMA, P_SMEM, BOUNDED)  # fmt: skip
        if odd == 1:
            state = _step(ctx, n_tiles - 2, state, WG, STAGES, PINGPONG, OVERLAP_QK, FOLD, False,
                          SUM_MMA, P_SMEM, BOUNDED)  # fmt: skip
    if n_tiles > 1:  # the last tile, masked, peeled out of the loop
        state = _step(ctx, n_tiles - 1, state, WG, STAGES, PINGPONG, OVERLAP_QK, FOLD, True,
                      SUM_MMA, P_SMEM, BOUNDED)  # fmt: skip
    acc, p, alpha, m_i, l_i, scale, offset = state
    last = n_tiles - 1
    if not BOUNDED:
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    mbarrier.wait(v_full.index(last % STAGES), (last // STAGES) & 1)
    v_tile = v_smem.index(last % STAGES).reshape([BLOCK_N, HEAD_DIM])
    if P_SMEM:
        acc_tok = warpgroup_mma(p_smem.index(WG * 2 + last % 2), v_tile, acc, is_async=True)
    else:
        acc_tok = warpgroup_mma(p, v_tile, acc, is_async=True)
    if SUM_MMA:
        acc, l_i = warpgroup_mma_wait(0, deps=(acc_tok, _row_sums(p, ones, l_i, alpha)))
        l_i = gl.convert_layout(gl.max(l_i, axis=1), row_s)
    else:
        acc = warpgroup_mma_wait(0, deps=(acc_tok,))
        l_i = _row_total(l_i, row_s)
    mbarrier.arrive(v_empty.index(last % STAGES))

    total = gl.where(l_i > 0, l_i, 1.0)
    out = acc / gl.convert_layout(total, row_o)[:, None]
    rows = row0 + gl.arange(0, BLOCK_M, layout=row_o)
    cols = gl.arange(0, HEAD_DIM, layout=col_o)
    dst = out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + cols[None, :]
    gl.store(dst, out.to(gl.bfloat16), mask=(rows < seq_q)[:, None])
    return m_i + gl.log2(total)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_full, k_empty,
              v_full, v_empty, b, h, off_m, n_tiles,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PV8: gl.constexpr,
              CONSUMERS: gl.constexpr):  # fmt: skip
    """Q once (every consumer's rows), then K tile t and V tile t - 1 at step t, in the order
    the consumers use them, each into its ring stage once every consumer released it."""
    mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
    for wg in gl.static_range(CONSUMERS):
        _tma_load(q_desc, [b, h, off_m + wg * WG_ROWS, 0], q_bar, q_smem.index(wg))
    for t in range(n_tiles + 1):
        if t < n_tiles:
            stage = t % STAGES
            # a fresh barrier counts as released: waiting on the other parity returns at once
            mbarrier.wait(k_empty.index(stage), ((t // STAGES) & 1) ^ 1)
            mbarrier.expect(k_full.index(stage), k_desc.block_type.nbytes)
            _tma_load(k_desc, [b, h, t * BLOCK_N, 0], k_full.index(stage), k_smem.index(stage))
        if t >= 1:
            tile = t - 1
            stage = tile % STAGES
            mbarrier.wait(v_empty.index(stage), ((tile // STAGES) & 1) ^ 1)
            mbarrier.expect(v_full.index(stage), v_desc.block_type.nbytes)
            if PV8:  # INT8 V is stored channel-major: [B, H, D, tokens]
                _tma_load(v_desc, [b, h, 0, tile * BLOCK_N], v_full.index(stage),
                          v_smem.index(stage))  # fmt: skip
            else:
                _tma_load(v_desc, [b, h, tile * BLOCK_N, 0], v_full.index(stage),
                          v_smem.index(stage))  # fmt: skip


@gluon.jit
def wgmma_attention_kernel(
    q_desc, k_desc, v_desc, qs_ptr, ks_ptr, shift_ptr, vs_ptr, vm_ptr, sums_ptr, out_ptr,
    lse_ptr, flags_ptr, mean_ptr, k8_ptr, kv_max_ptr,
    seq_q, seq_k, heads, stride_ob, stride_oh, stride_os, limit,
    BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
    PINGPONG: gl.constexpr, OVERLAP_QK: gl.constexpr, FOLD: gl.constexpr, PV8: gl.constexpr,
    SUM_MMA: gl.constexpr, UNROLL: gl.constexpr, P_SMEM: gl.constexpr, Q_REGS: gl.constexpr,
    RUN: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, Q_IN: gl.constexpr,
):  # fmt: skip
    """``CONSUMERS`` x 64 query rows of one (batch, head): shared memory, barriers, a producer
    and the consumers (``CONSUMER_REGS`` registers per thread each). ``Q_IN``: ``q_desc`` is
    the bf16 query, quantized by each consumer (``mean_ptr``, ``k8_ptr``, ``kv_max_ptr``: the
    keys' :class:`.int8_triton.QuantizedKeys`; ``limit`` the bound's ``BOUND_LOG2 - log2
    seq_k``), and ``RUN`` 1 lets each warpgroup whose rows pass the bound go without row
    maxima. Else ``q_desc`` is the int8 query and ``RUN`` 0: every block; 1: the blocks whose
    flag (:func:`.int8_triton.bound_flags`) is 1, without row maxima; 2: those whose flag is 0
    (the others return at once)."""
    bh = gl.program_id(1)
    if RUN != 0 and not Q_IN:  # a block that is not this launch's: nothing to do
        flag = gl.load(flags_ptr + bh * gl.num_programs(0) + gl.program_id(0))
        if flag != 2 - RUN:
            return
    b = bh // heads
    h = bh % heads
    off_m = gl.program_id(0) * (CONSUMERS * WG_ROWS)
    q_smem = gl.allocate_shared_memory(gl.bfloat16 if Q_IN else gl.int8,
                                       [CONSUMERS, 1, 1, WG_ROWS, HEAD_DIM],
                                       q_desc.layout)  # fmt: skip
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    if PV8:
        v_smem = gl.allocate_shared_memory(
            gl.int8, [STAGES, 1, 1, HEAD_DIM, BLOCK_N], v_desc.layout
        )
    else:
        v_smem = gl.allocate_shared_memory(
            gl.bfloat16, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout
        )
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    # a [8, BLOCK_N] tile of ones: B of the row-sum products (_row_sums)
    ones_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                     rank=2)  # fmt: skip
    ones = gl.allocate_shared_memory(
        gl.bfloat16, [8, BLOCK_N], ones_layout,
        gl.full([8, BLOCK_N], 1.0, gl.bfloat16, gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])),
    )  # fmt: skip
    if P_SMEM:  # two P buffers per consumer warpgroup (the A operand of PV)
        p_smem = gl.allocate_shared_memory(
            gl.bfloat16, [4, WG_ROWS, BLOCK_N],
            gl.NVMMASharedLayout.get_default_for([WG_ROWS, BLOCK_N], gl.bfloat16),
        )  # fmt: skip
    else:
        p_smem = ones  # unused
    fence_async_shared()
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)  # one arrival per consumer
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    n_tiles = gl.cdiv(seq_k, BLOCK_N)
    # what both consumers take: one tuple of values, then the constexprs (with the warpgroup)
    consumer_args = (
        q_smem, k_smem, v_smem, ones, p_smem, q_bar, k_full, k_empty, v_full, v_empty, turn,
        qs_ptr, ks_ptr, shift_ptr, vs_ptr, vm_ptr, sums_ptr, out_ptr, lse_ptr, seq_q, seq_k,
        n_tiles, b, h, bh, off_m, stride_ob, stride_oh, stride_os, mean_ptr, k8_ptr, kv_max_ptr,
        limit,
    )  # fmt: skip
    # one call per consumer count, spelled out: Gluon cannot hold a (function, arguments) pair
    # in a variable ("cannot convert JITFunction ... to tensor"), so the lists cannot be shared
    if CONSUMERS == 3:
        gl.warp_specialize(
            [
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_full,
                             k_empty, v_full, v_empty, b, h, off_m, n_tiles, BLOCK_N, STAGES,
                             PV8, CONSUMERS)),
                (_consumer, (consumer_args, WG0, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, OVERLAP_QK,
                             FOLD, PV8, SUM_MMA, UNROLL, P_SMEM, Q_REGS, RUN == 1, Q_IN)),
                (_consumer, (consumer_args, WG1, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, OVERLAP_QK,
                             FOLD, PV8, SUM_MMA, UNROLL, P_SMEM, Q_REGS, RUN == 1, Q_IN)),
                (_consumer, (consumer_args, WG2, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, OVERLAP_QK,
                             FOLD, PV8, SUM_MMA, UNROLL, P_SMEM, Q_REGS, RUN == 1, Q_IN)),
            ],
            [4, 4, 4],
            [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_full,
                             k_empty, v_full, v_empty, b, h, off_m, n_tiles, BLOCK_N, STAGES,
                             PV8, CONSUMERS)),
                (_consumer, (consumer_args, WG0, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, OVERLAP_QK,
                             FOLD, PV8, SUM_MMA, UNROLL, P_SMEM, Q_REGS, RUN == 1, Q_IN)),
                (_consumer, (consumer_args, WG1, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, OVERLAP_QK,
                             FOLD, PV8, SUM_MMA, UNROLL, P_SMEM, Q_REGS, RUN == 1, Q_IN)),
            ],
            [4, 4],
            [CONSUMER_REGS, CONSUMER_REGS],
        )  # fmt: skip


def _descriptor(
    x: torch.Tensor, rows: int, dtype: Any, cols: int | None = None
) -> TensorDescriptor:
    """A 4-D TMA descriptor over ``x [B, H, S, D]`` (any strides, the last dimension
    contiguous): tiles of ``rows`` x ``cols`` (default all of ``D``) of one head; reads past
    the end come back as zeros."""
    block = [1, 1, rows, cols or x.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block, layout)


def _q_in_shared_bytes(consumers: int, block_n: int, stages: int) -> int:
    """An upper estimate of the shared memory of the build that quantizes the query
    (``Q_IN``, BF16 PV, no P buffers): the bf16 query tiles, the int8 K and bf16 V ring, one
    int8 query tile per warpgroup for the layout conversion of the quantized query, the tile of
    ones and the barriers (Triton 3.6 compiled 147,536 to 245,904 bytes in six configurations,
    1.1-3.0 KB under this)."""
    query = consumers * WG_ROWS.value * HEAD_DIM * 2
    ring = stages * block_n * HEAD_DIM * 3
    converted = consumers * WG_ROWS.value * HEAD_DIM
    return query + ring + converted + 8 * block_n * 2 + 1024


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_qkv(q, k, v)
    if q.shape[3] != HEAD_DIM:
        raise ValueError(
            f"sd-int8-wgmma: head dim {q.shape[3]} is not supported (allowed: {HEAD_DIM})"
        )
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
        raise ValueError(
            f"sd-int8-wgmma needs q, k, v in bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape[2] < 1 or q.shape[2] < 1:
        raise ValueError(f"sd-int8-wgmma needs tokens, got Sq={q.shape[2]}, Sk={k.shape[2]}")


def run_wgmma_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    stages: int | None = None,
    pingpong: bool = False,
    overlap_qk: bool = True,
    fold: bool = True,
    pv8: bool = False,
    sum_mma: bool = False,
    unroll: int | None = None,
    p_smem: bool = False,
    q_regs: bool = True,
    bounded: bool = True,
    consumers: int | None = None,
    block_n: int | None = None,
    q_in: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel with its schedule switches (module docstring; each priced in
    docs/sd_int8_wgmma.md): ``(out, lse)``; ``unroll``
    defaults to 2 (1 with ``pv8``, which has no unrolled loop); ``p_smem`` (BF16 PV only)
    needs ``stages <= 3`` (shared memory); ``q_regs`` (BF16 PV only: with INT8 PV ptxas spills
    244 instead of 40 bytes) keeps the query tile in registers; ``q_in`` (with ``q_regs``, BF16
    PV, no ``p_smem``, and where the bf16 query fits in shared memory: not with two consumers
    and four stages of 128 keys) quantizes the query inside the kernel (:func:`_quantize_query`)
    instead of in a pass of its own (:func:`.int8_triton.quantize_query`; the same values bit
    for bit);
    ``bounded`` (BF16 PV, folded, without ``sum_mma``) runs the query rows whose scores are
    bounded without row maxima: per warpgroup of 64 rows in one launch with ``q_in``, else per
    block flagged by :func:`.int8_triton.bound_flags`, the others as before (two launches).
    ``consumers`` (warpgroups of 64
    query rows per CTA) and ``block_n`` (keys per tile and K scale) default to 3 and 64 with
    BF16 PV, to 2 and 128 with any of ``pv8``, ``p_smem``, ``pingpong``, ``sum_mma`` (written
    for two consumers; three take 64-key tiles, at 128 they spill); ``stages`` to 4 with three
    consumers, 3 with two."""
    _check_inputs(q, k, v)
    two_only = pv8 or p_smem or pingpong or sum_mma
    if consumers is None:
        consumers = 2 if two_only else CONSUMERS
    if block_n is None:
        block_n = PV8_BLOCK_N if two_only else BLOCK_N
    if consumers not in (2, 3) or block_n not in (64, 128):
        raise ValueError(
            f"sd-int8-wgmma: consumers={consumers} must be 2 or 3 and block_n={block_n} 64 or 128"
        )
    if stages is None:
        stages = STAGES[consumers]
    if stages < 2:
        raise ValueError(f"sd-int8-wgmma: stages={stages} must be >= 2")
    if consumers == 3 and (block_n != 64 or pv8 or p_smem or pingpong or sum_mma):
        raise ValueError(
            f"sd-int8-wgmma: consumers=3 takes block_n=64 and none of pv8, p_smem, pingpong, "
            f"sum_mma, got block_n={block_n}, pv8={pv8}, p_smem={p_smem}, pingpong={pingpong}, "
            f"sum_mma={sum_mma}"
        )
    if pv8 and block_n != PV8_BLOCK_N:
        raise ValueError(f"sd-int8-wgmma: pv8=True takes block_n={PV8_BLOCK_N}, got {block_n}")
    if unroll is None:
        unroll = 1 if pv8 else UNROLL
    if unroll not in (1, 2) or (pv8 and unroll != 1):
        raise ValueError(
            f"sd-int8-wgmma: unroll={unroll} must be 1 or 2 (2 with BF16 PV only; pv8={pv8})"
        )
    if p_smem and (pv8 or stages > 3):
        raise ValueError(
            f"sd-int8-wgmma: p_smem=True takes BF16 PV and stages <= 3 (P's 64 KiB of shared "
            f"memory), got pv8={pv8}, stages={stages}"
        )
    if pv8 and not fold:
        raise ValueError("sd-int8-wgmma: pv8=True needs fold=True (INT8 PV is folded only)")
    q, k, v = channels_last(q), channels_last(k), channels_last(v)
    batch, heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    keys = quantize_keys(k, v, block_n)
    q_in = (  # where it fits: the bf16 query takes twice the int8 one's shared memory
        q_in
        and q_regs
        and not (pv8 or p_smem)
        and _q_in_shared_bytes(consumers, block_n, stages) <= SHARED_MEMORY
    )
    bounded = bounded and fold and not (pv8 or sum_mma)
    cta_rows = consumers * WG_ROWS.value
    if q_in:  # quantized by the kernel, which checks the bound per warpgroup
        q_desc = _descriptor(q, WG_ROWS.value, gl.bfloat16)
        q_scale = shift = flags = keys.mean  # unused
        runs: tuple[int, ...] = (1,) if bounded else (0,)
    else:
        q8, q_scale, shift = quantize_query(q, keys)
        q_desc = _descriptor(q8, WG_ROWS.value, gl.int8)
        flags = bound_flags(q8, q_scale, keys, cta_rows) if bounded else q_scale  # (or unused)
        runs = (1, 2) if bounded else (0,)  # the blocks the bound lets go without maxima
    if pv8:
        v8, v_scale, v_mean, sums = quantize_v(v, int8=True)
        v_desc = _descriptor(v8, dim, gl.int8, cols=block_n)
    else:
        v_desc = _descriptor(v, block_n, gl.bfloat16)
        v_scale = v_mean = sums = keys.mean  # unused
    out = torch.empty((batch, seq_q, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    args = (
        q_desc, _descriptor(keys.values, block_n, gl.int8), v_desc,
        q_scale, keys.scales, shift, v_scale, v_mean, sums, out, lse, flags,
        keys.mean, keys.values, keys.kv_max,
        seq_q, seq_k, heads, out.stride(0), out.stride(2), out.stride(1),
        bound_limit(seq_k),
    )  # fmt: skip
    for run in runs:
        wgmma_attention_kernel[(triton.cdiv(seq_q, cta_rows), batch * heads)](
            *args,
            BLOCK_N=block_n,
            HEAD_DIM=dim,
            STAGES=stages,
            PINGPONG=pingpong,
            OVERLAP_QK=overlap_qk,
            FOLD=fold,
            PV8=pv8,
            SUM_MMA=sum_mma and not pv8,
            UNROLL=unroll,
            P_SMEM=p_smem,
            Q_REGS=q_regs and not pv8,
            RUN=run,
            CONSUMERS=consumers,
            CONSUMER_REGS=CONSUMER_REGISTERS[consumers],
            Q_IN=q_in,
            num_warps=4,
            maxnreg=LAUNCH_REGISTERS[consumers],
        )
    return out.transpose(1, 2), lse


@torch.library.custom_op(OP_NAME, mutates_args=(), device_types="cuda")
def wgmma_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Sq, D], lse [B, H, Sq] fp32)``; see the module docstring."""
    return run_wgmma_attention(q, k, v)


@wgmma_attention_op.register_fake
def _wgmma_attention_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seq_q, dim = q.shape
    out = q.new_empty((batch, seq_q, heads, dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, seq_q), dtype=torch.float32)


def wgmma_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` (natural log, fp32): the ``sd-int8-wgmma`` LSE variant (ring attention)."""
    return wgmma_attention_op(q, k, v)


def wgmma_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The ``sd-int8-wgmma`` backend."""
    return wgmma_attention_op(q, k, v)[0]


def make_int8_wgmma(device: torch.device) -> Any:
    del device
    return wgmma_attention


def make_int8_wgmma_lse(device: torch.device) -> Any:
    del device
    return wgmma_attention_lse
