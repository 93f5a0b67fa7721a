"""INT8 PV for ``sd-int8-wgmma`` (``run_wgmma_attention(..., pv8=True)``; experiments only:
over the 2e-2 bound and slower than BF16 PV as built, docs/sd_int8_wgmma.md): the consumer
warpgroup of that path, its softmax (P as int8 in the A-operand order of INT8 PV) and its
accumulation into fp32 (V's column sums added back). Emulated by
``quantization.int8_attention_reference(..., pv_int8=True)``.

Talks to: :mod:`.int8_wgmma_parts`, Triton's Gluon; launched by :mod:`.int8_wgmma`.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from smartdiff.attention.int8_wgmma_parts import (
    INT_TO_FLOAT_BITS,
    INT_TO_FLOAT_OFFSET,
    LN2,
    WG_ROWS,
    _first_scores,
    _give_turn,
    _key_scale,
    _query_operand,
    _scores,
    _take_turn,
)

LOG2_P_MAX = gl.constexpr(7.988684686772166)  # log2(254): INT8 P is 254 * exp2(s - max) - 127
P_ROUNDING = gl.constexpr(12582912.0 - 127.0)  # 1.5 * 2**23 - 127


@gluon.jit
def _softmax8(s, scale, offset, q_scale, m_i, l_i, key0, seq_k, MASK: gl.constexpr):
    """``_softmax`` (folded) for INT8 PV: P relative to each row's maximum in this tile, times
    254, minus 127 and rounded to int8 (the whole signed range; PV adds 127 x V's column sums
    back), its columns reordered to the INT8 A-operand order
    (:func:`.int8_kernels.pv8_position`), and ``beta``, the tile's weight against the running
    maximum (``alpha`` rescales what was accumulated before)."""
    u = (s + INT_TO_FLOAT_BITS).to(gl.float32, bitcast=True)
    if MASK:
        cols = key0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        valid = (cols < seq_k)[None, :]
        s_max = gl.max(gl.where(valid, s, -2147483647), axis=1)
    else:
        s_max = gl.max(s, axis=1)
    row_scale = q_scale * scale
    t_max = s_max.to(gl.float32) * row_scale
    m_new = gl.maximum(m_i, t_max)
    x = gl.fma(u, row_scale[:, None], (q_scale * offset - t_max + LOG2_P_MAX)[:, None])
    if MASK:
        x = gl.where(valid, x, float("-inf"))
    p = gl.exp2(x)  # 254 * exp2(score - the row's tile maximum), in [0, 254]
    alpha = gl.exp2(m_i - m_new)
    beta = gl.exp2(t_max - m_new)
    l_i = l_i * alpha + beta * gl.sum(p, axis=1)
    # p - 127 + 1.5 * 2**23 rounds p - 127 to an integer, which the float's low byte holds
    p8 = (p + P_ROUNDING).to(gl.int32, bitcast=True).to(gl.int8)
    rows: gl.constexpr = s.shape[0]
    groups: gl.constexpr = s.shape[1] // 16
    p8 = gl.reshape(gl.permute(gl.reshape(p8, [rows, groups, 2, 4, 2]), (0, 1, 3, 2, 4)),
                    [rows, s.shape[1]])  # fmt: skip
    return p8, alpha, beta, m_new, l_i


@gluon.jit
def _accumulate8(acc, pv, alpha, beta, sums_ptr):
    """``acc * alpha + beta * sum (P + 127) V``: the int32 PV turned into fp32 by the bits
    trick, its per-channel addend (``0x4B400000 + 127 x`` the tile's column sums of V) read
    from ``sums_ptr`` (:func:`.int8_kernels.quantize_v_kernel`); the float offset goes in with
    the rescale (its rounding is below 1e-4 of a tile's sum)."""
    cols = gl.arange(0, pv.shape[1], layout=gl.SliceLayout(0, pv.type.layout))
    f = (pv + gl.load(sums_ptr + cols)[None, :]).to(gl.float32, bitcast=True)
    rescaled = gl.fma(acc, alpha[:, None], (beta * INT_TO_FLOAT_OFFSET)[:, None])
    return gl.fma(f, beta[:, None], rescaled)


@gluon.jit
def _values8(p, v_smem, stage, s_zero):
    """Issue P V of the (channel-major INT8) value tile in ring ``stage`` (async; int32)."""
    head_dim: gl.constexpr = s_zero.shape[1]
    v_tile = v_smem.index(stage).reshape([head_dim, p.shape[1]]).permute((1, 0))
    return warpgroup_mma(p, v_tile, s_zero, use_acc=False, is_async=True)


@gluon.jit
def _step8(q_view, k_smem, v_smem, k_full, k_empty, v_full, v_empty, turn, ks_ptr, sums_ptr,
           seq_k, n, acc, p, alpha, beta, m_i, l_i, q_scale, s_zero,
           WG: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
           MASK: gl.constexpr):  # fmt: skip
    """Key tile n with INT8 PV: PV of tile n - 1 into the fp32 accumulator, then QK^T of tile
    n and its softmax, one product in flight at a time per warpgroup (the other warpgroup's
    fill the tensor cores meanwhile). With both in flight -- PV's and QK^T's int32
    accumulators, the fp32 one and P's int8 values (one register each until the wgmma packs
    them) -- ptxas spills 580 bytes (Triton 3.6)."""
    block_n: gl.constexpr = s_zero.shape[1]
    ks = n % STAGES
    vs = (n - 1) % STAGES
    scale, offset = _key_scale(ks_ptr, n * block_n)
    mbarrier.wait(v_full.index(vs), ((n - 1) // STAGES) & 1)
    _take_turn(turn, WG, n, PINGPONG)
    pv_tok = _values8(p, v_smem, vs, s_zero)
    # (P is not among the dependencies: the wait cannot carry an 8-bit operand, and the next
    # P is written only after this wait)
    pv = warpgroup_mma_wait(0, deps=(pv_tok,))
    mbarrier.arrive(v_empty.index(vs))
    acc = _accumulate8(acc, pv, alpha, beta, sums_ptr + (n - 1) * acc.shape[1])
    mbarrier.wait(k_full.index(ks), (n // STAGES) & 1)
    s_tok = _scores(q_view, k_smem, ks, s_zero)
    _give_turn(turn, WG, PINGPONG)
    s = warpgroup_mma_wait(0, deps=(s_tok,))
    mbarrier.arrive(k_empty.index(ks))
    p8, alpha, beta, m_i, l_i = _softmax8(s, scale, offset, q_scale, m_i, l_i, n * block_n,
                                          seq_k, MASK)  # fmt: skip
    return acc, gl.convert_layout(p8, p.type.layout), alpha, beta, m_i, l_i


@gluon.jit
def _consumer8(q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty, turn,
               qs_ptr, ks_ptr, shift_ptr, vs_ptr, vm_ptr, sums_ptr, out_ptr, lse_ptr, seq_q,
               seq_k, n_tiles, b, h, bh, off_m, stride_ob, stride_oh, stride_os,
               WG: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
               STAGES: gl.constexpr, PINGPONG: gl.constexpr):  # fmt: skip
    """``_consumer`` with INT8 PV: scores and values share one int32 accumulator layout."""
    BLOCK_M: gl.constexpr = WG_ROWS
    gl.static_assert(BLOCK_N == HEAD_DIM)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=4)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row0 = off_m + WG * BLOCK_M
    offs_m = row0 + gl.arange(0, BLOCK_M, layout=row_s)
    row_ok = offs_m < seq_q
    q_scale = gl.load(qs_ptr + bh * seq_q + offs_m, mask=row_ok, other=1.0)
    ks_base = ks_ptr + bh * seq_k
    sums_base = sums_ptr + bh * n_tiles * HEAD_DIM
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, s_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)

    mbarrier.wait(q_bar, 0)
    q_view = _query_operand(q_smem, WG, s_layout, False)
    s, scale, offset = _first_scores(q_view, k_smem, k_full, k_empty, turn, ks_base, s_zero, WG,
                                     PINGPONG)  # fmt: skip
    p8, alpha, beta, m_i, l_i = _softmax8(s, scale, offset, q_scale, m_i, l_i, 0, seq_k, True)
    p = gl.convert_layout(p8, p_layout)
    for n in range(1, n_tiles - 1):
        acc, p, alpha, beta, m_i, l_i = _step8(
            q_view, k_smem, v_smem, k_full, k_empty, v_full, v_empty, turn, ks_base, sums_base,
            seq_k, n, acc, p, alpha, beta, m_i, l_i, q_scale, s_zero, WG, STAGES, PINGPONG,
            False,
        )  # fmt: skip
    if n_tiles > 1:
        acc, p, alpha, beta, m_i, l_i = _step8(
            q_view, k_smem, v_smem, k_full, k_empty, v_full, v_empty, turn, ks_base, sums_base,
            seq_k, n_tiles - 1, acc, p, alpha, beta, m_i, l_i, q_scale, s_zero, WG, STAGES,
            PINGPONG, True,
        )  # fmt: skip
    last = n_tiles - 1
    mbarrier.wait(v_full.index(last % STAGES), (last // STAGES) & 1)
    pv = warpgroup_mma_wait(0, deps=(_values8(p, v_smem, last % STAGES, s_zero),))
    mbarrier.arrive(v_empty.index(last % STAGES))
    acc = _accumulate8(acc, pv, alpha, beta, sums_base + last * HEAD_DIM)

    total = gl.where(l_i > 0, l_i, 1.0)
    cols = gl.arange(0, HEAD_DIM, layout=col_s)
    v_scale = gl.load(vs_ptr + bh * HEAD_DIM + cols)
    v_mean = gl.load(vm_ptr + bh * HEAD_DIM + cols)
    out = gl.fma(acc / total[:, None], v_scale[None, :], v_mean[None, :])
    rows = row0 + gl.arange(0, BLOCK_M, layout=row_s)
    dst = out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + cols[None, :]
    gl.store(dst, out.to(gl.bfloat16), mask=(rows < seq_q)[:, None])
    shift = gl.load(shift_ptr + bh * seq_q + offs_m, mask=row_ok, other=0.0)
    lse2 = m_i + gl.log2(total) - LOG2_P_MAX + shift
    gl.store(lse_ptr + bh * seq_q + offs_m, lse2 * LN2, mask=row_ok)
