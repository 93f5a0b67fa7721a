"""The pieces of ``sd-int8-wgmma``'s consumer warpgroups that its BF16-PV and INT8-PV paths
share (:mod:`.int8_wgmma`, :mod:`.int8_wgmma_pv8`): the constants of the int32 -> fp32 bits
trick, the query operand, a key tile's scale, QK^T issued and tile 0's scores, and the
ping-pong turn barriers.

Talks to: Triton's Gluon only.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

WG_ROWS = gl.constexpr(64)  # query rows per consumer warpgroup (one wgmma M)
# the bits of 1.5 * 2**23: added to an int32 |s| < 2**22 they make the float s + 1.5 * 2**23
INT_TO_FLOAT_BITS = gl.constexpr(0x4B400000)
INT_TO_FLOAT_OFFSET = gl.constexpr(-12582912.0)  # -1.5 * 2**23
LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _key_scale(ks_ptr, key0):
    """The tile's key scale and the addend that removes the int->float offset."""
    scale = gl.load(ks_ptr + key0)
    return scale, scale * INT_TO_FLOAT_OFFSET


@gluon.jit
def _take_turn(turn, WG: gl.constexpr, count, PINGPONG: gl.constexpr):
    """Wait until the other consumer has issued its products (warpgroup 0 goes first)."""
    if PINGPONG:
        mbarrier.wait(turn.index(WG), (count & 1) ^ (1 - WG))


@gluon.jit
def _give_turn(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))


@gluon.jit
def _query_operand(q_smem, WG: gl.constexpr, s_layout: gl.constexpr, Q_REGS: gl.constexpr):
    """This warpgroup's INT8 query tile as QK^T's A operand: loaded into registers once (16
    per thread) with ``Q_REGS``, else the shared-memory view that every QK^T reads again."""
    q_view = q_smem.index(WG).reshape([WG_ROWS, q_smem.shape[-1]])
    if Q_REGS:
        q_view = q_view.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=4))
    return q_view


@gluon.jit
def _scores(q_view, k_smem, stage, s_zero):
    """Issue QK^T of the key tile in ring ``stage`` (async; int32)."""
    k_tile = k_smem.index(stage).reshape([s_zero.shape[1], q_view.shape[1]]).permute((1, 0))
    return warpgroup_mma(q_view, k_tile, s_zero, use_acc=False, is_async=True)


@gluon.jit
def _first_scores(q_view, k_smem, k_full, k_empty, turn, ks_ptr, s_zero, WG: gl.constexpr,
                  PINGPONG: gl.constexpr):  # fmt: skip
    """Tile 0's int32 scores (waited for; its K stage released) and its key scale."""
    scale, offset = _key_scale(ks_ptr, 0)
    mbarrier.wait(k_full.index(0), 0)
    _take_turn(turn, WG, 0, PINGPONG)
    s_tok = _scores(q_view, k_smem, 0, s_zero)
    _give_turn(turn, WG, PINGPONG)
    s = warpgroup_mma_wait(0, deps=(s_tok,))
    mbarrier.arrive(k_empty.index(0))
    return s, scale, offset
