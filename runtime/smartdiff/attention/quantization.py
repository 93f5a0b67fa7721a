"""The quantization math of our INT8 attention, in plain PyTorch (any device, CPU included).

The Triton kernels of :mod:`smartdiff.attention.int8_triton` implement exactly these steps;
this module states them once, readably, and serves as their reference: CI has no GPU, so the
tests check this emulation against SDPA with the same error bound the kernels must meet, and
(where Triton's interpreter is available) the kernels against this emulation.

The method (in the spirit of SageAttention, written from the paper's description):

1. **K smoothing**: subtract the per-head mean of K over the tokens. Every score of a query
   row moves by the same ``q . mean(K)``, so the softmax is unchanged, but the channel
   outliers shared by all keys leave K and INT8 keeps more resolution.
2. **Per-block INT8 for Q and K**: each block of ``q_block`` query rows (``k_block`` key rows)
   of one head gets one scale ``max|x| / 127``; ``round(x / scale)`` (half away from zero) is
   exact in INT8. The softmax scale and ``log2(e)`` are folded into Q's scale, so
   ``int32(Qi . Ki) * scale_q * scale_k`` is the score in base 2.
3. **Online softmax** in fp32 with ``exp2``.
4. **PV** in BF16 (P rounded to the value dtype), or in **FP8 e4m3**: V smoothed (its per-head
   mean over the tokens subtracted, then added back to the output: the rows of P sum to one),
   one scale per channel (``max_tokens |v| / 448``); P scaled by ``2^8.78`` (just under
   e4m3's largest value, 448; P <= 1); products accumulated in fp32 and rescaled at the end.

Scales are stored per token (each row carries its block's scale), so a kernel's tile size and
the quantization block size are independent, and a finer block costs the kernel nothing: the
default block is one token (``Q_BLOCK = K_BLOCK = 1``), which on random Wan-shaped inputs gives
about 0.72x the error of SageAttention's 128/64-row blocks (emulated: 0.97e-2 vs 1.35e-2
relative L2 with BF16 PV). FP8 PV rounds every probability to 3 mantissa bits: about 4e-2
relative error on random inputs, whatever the block sizes.

The log-sum-exp returned is the natural-log LSE of the *unsmoothed* scores (the smoothing shift
``q . mean(K)`` is added back), so ring attention can merge partial results exactly.

Talks to: nothing but torch; used by ``int8_triton`` (preprocessing shapes, constants), by
``sparsity`` (smoothed K) and by the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import torch

INT8_MAX: Final = 127.0
FP8_MAX: Final = 448.0  # largest finite float8_e4m3fn
Q_BLOCK: Final = 1  # query rows sharing one INT8 scale (default: per token)
K_BLOCK: Final = 1  # key rows sharing one INT8 scale
LOG2E: Final = 1.4426950408889634
LN2: Final = 0.6931471805599453
PV_INT8_TILE: Final = 128  # keys per INT8 P tile (sd-int8-wgmma's key tile)
SCALE_FLOOR: Final = 1e-20  # an all-zero block quantizes to zeros with this scale
# FP8 PV: P (<= 1) is scaled by 2^8.78 = 439.4 before its e4m3 cast, just under e4m3's largest
# value, so the kernel can fold the scaling into its exp2 (whose last-bit error must not
# overflow 448).
P_SHIFT_FP8: Final = 8.78
P_SCALE_FP8: Final = 2.0**P_SHIFT_FP8


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer-valued values and the per-token scale that maps them back.

    Attributes:
        values: ``[B, H, S, D]``, integers in ``[-127, 127]`` (stored as float32 here).
        scale: ``[B, H, S]`` fp32; ``values * scale[..., None]`` approximates the input.
    """

    values: torch.Tensor
    scale: torch.Tensor


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, halves away from zero (what ``int(y + copysign(.5, y))``
    gives in the kernels)."""
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def quantize_per_block(
    x: torch.Tensor, block: int, pre_scale: float = 1.0, mean: torch.Tensor | None = None
) -> QuantizedTensor:
    """INT8 per-block quantization of ``x [B, H, S, D]`` along the tokens.

    Args:
        x: the tensor (any float dtype); computed in fp32.
        block: rows per scale; the last block may be shorter.
        pre_scale: multiplies ``x`` before quantizing (Q: softmax scale times ``log2(e)``).
        mean: ``[B, H, D]`` subtracted from every row first (K smoothing), or ``None``.
    """
    if x.ndim != 4:
        raise ValueError(f"quantize_per_block needs x [B, H, S, D], got {tuple(x.shape)}")
    if block < 1:
        raise ValueError(f"quantize_per_block: block must be >= 1, got {block}")
    values = x.float()
    if mean is not None:
        values = values - mean.float()[:, :, None, :]
    values = values * pre_scale
    batch, heads, tokens, dim = values.shape
    blocks = math.ceil(tokens / block)
    padded = torch.nn.functional.pad(values, (0, 0, 0, blocks * block - tokens))
    amax = padded.reshape(batch, heads, blocks, block * dim).abs().amax(dim=-1)
    scale = short_mantissa(amax.clamp_min(SCALE_FLOOR) / INT8_MAX)  # [B, H, blocks]
    per_token = scale.repeat_interleave(block, dim=-1)[..., :tokens]
    quantized = round_half_away(values / per_token[..., None]).clamp(-INT8_MAX, INT8_MAX)
    return QuantizedTensor(values=quantized, scale=per_token)


def short_mantissa(scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``scale`` with its 3 lowest mantissa bits cleared (21 significant bits).

    The kernel turns the integer dot product ``d`` into a score as
    ``fma(float(C + d), scale, -C * scale)`` with ``C = 1.5 * 2^23`` (see ``int8_kernels``);
    ``-C * scale`` is exact in fp32 only when ``scale`` has at most 21 significant bits, and then
    the score is ``d * scale`` rounded once. The relative change of the scale (< 2^-20) is far
    below INT8's resolution."""
    return (scale.float().view(torch.int32) & -8).view(torch.float32)


def value_scale_fp8(v: torch.Tensor) -> torch.Tensor:
    """Per-channel FP8 scale of ``v [B, H, S, D]``: ``max over tokens |v| / 448``, ``[B, H, D]``
    fp32."""
    return v.float().abs().amax(dim=2).clamp_min(SCALE_FLOOR) / FP8_MAX


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to float8 e4m3 (round to nearest even) and back to fp32."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def int8_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pv_fp8: bool,
    pv_int8: bool = False,
    smooth_k: bool = True,
    q_block: int = Q_BLOCK,
    k_block: int = K_BLOCK,
    block_mask: torch.Tensor | None = None,
    mask_blocks: tuple[int, int] = (128, 64),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our INT8 attention emulated in fp32: ``(out [B, H, Sq, D] in q's dtype, lse [B, H, Sq])``.

    ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]``; no mask, softmax scale ``1/sqrt(D)``.
    ``block_mask [B, H, ceil(Sq/mq), ceil(Sk/mk)]`` (bool, ``(mq, mk) = mask_blocks``, the
    sparse kernel's tiles) keeps only the marked query-block x key-block tiles (the
    block-sparse variant); every query block must keep at least one key block. Dense scores
    are materialized: for small shapes (tests, probes).

    ``pv_int8`` emulates ``sd-int8-wgmma``'s INT8 PV (``k_block`` must be 128, the tile):
    V centered per channel and rounded to INT8 with one scale per channel; in each tile of
    128 keys P is ``254 * exp2(score - the row's maximum in the tile) - 127`` rounded to an
    integer, its product with V taken exactly, 127 x the tile's column sums of V added back,
    and the tile weighed by ``exp2(its maximum - the row's maximum)``.
    """
    check_qkv(q, k, v)
    if pv_int8 and (pv_fp8 or k_block != PV_INT8_TILE):
        raise ValueError(
            f"int8_attention_reference: pv_int8 needs pv_fp8=False and k_block="
            f"{PV_INT8_TILE}, got pv_fp8={pv_fp8}, k_block={k_block}"
        )
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    k_mean = k.float().mean(dim=2) if smooth_k else None
    qq = quantize_per_block(q, q_block, pre_scale=sm_scale * LOG2E)
    kq = quantize_per_block(k, k_block, mean=k_mean)
    scores = torch.matmul(qq.values, kq.values.transpose(-1, -2))  # exact: |sum| < 2**24
    scores = scores * qq.scale[..., :, None] * kq.scale[..., None, :]  # base-2 logits
    if block_mask is not None:
        keep = block_mask.repeat_interleave(mask_blocks[0], dim=-2)[..., : q.shape[2], :]
        keep = keep.repeat_interleave(mask_blocks[1], dim=-1)[..., : k.shape[2]]
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    probs = torch.exp2(scores - row_max)
    total = probs.sum(dim=-1)
    if pv_int8:
        out, total = _pv_int8(scores, row_max, v)
    elif pv_fp8:
        v_mean = v.float().mean(dim=2, keepdim=True)  # [B, H, 1, D]
        v_centered = v.float() - v_mean
        v_scale = value_scale_fp8(v_centered)  # [B, H, D]
        v8 = to_fp8(v_centered / v_scale[:, :, None, :])
        out = torch.matmul(to_fp8(probs * P_SCALE_FP8), v8)
        out = out / (P_SCALE_FP8 * total[..., None]) * v_scale[:, :, None, :] + v_mean
    else:
        out = torch.matmul(probs.to(v.dtype).float(), v.float()) / total[..., None]
    lse2 = row_max[..., 0] + torch.log2(total)
    if k_mean is not None:  # undo the smoothing shift q . mean(K) (base 2, from the exact q)
        lse2 = lse2 + torch.einsum("bhsd,bhd->bhs", q.float() * (sm_scale * LOG2E), k_mean)
    return out.to(q.dtype), lse2 * LN2


def _pv_int8(
    scores: torch.Tensor, row_max: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 PV of ``sd-int8-wgmma`` (see ``int8_attention_reference``): ``(out, total)``."""
    tile = PV_INT8_TILE
    batch, heads, rows, keys = scores.shape
    tiles = math.ceil(keys / tile)
    pad = tiles * tile - keys
    v_mean = v.float().mean(dim=2, keepdim=True)
    centered = v.float() - v_mean
    v_scale = centered.abs().amax(dim=2, keepdim=True).clamp_min(SCALE_FLOOR) / INT8_MAX
    v8 = round_half_away(centered / v_scale).clamp(-INT8_MAX, INT8_MAX)
    v8 = torch.nn.functional.pad(v8, (0, 0, 0, pad)).reshape(batch, heads, tiles, tile, -1)
    s = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    s = s.reshape(batch, heads, rows, tiles, tile)
    tile_max = s.amax(dim=-1, keepdim=True)
    p = 254.0 * torch.exp2(s - tile_max)
    p8 = torch.round(p - 127.0)  # the kernel rounds by a float add: to nearest, ties to even
    products = torch.einsum("bhrtk,bhtkd->bhrtd", p8 + 127.0, v8)  # exact in fp32: < 2**22
    weight = torch.exp2(tile_max - row_max[..., None])  # [B, H, rows, tiles, 1]
    total = (weight[..., 0] * p.sum(dim=-1)).sum(dim=-1)
    out = (weight * products).sum(dim=-2) / total[..., None] * v_scale + v_mean
    return out, total / 254.0


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``q [B, H, Sq, D]`` and ``k, v [B, H, Sk, D]``."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention needs q, k, v [B, H, S, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention shapes do not match: q {tuple(q.shape)}, k "
            f"{tuple(k.shape)}, v {tuple(v.shape)} (need q [B, H, Sq, D] and "
            "k, v [B, H, Sk, D])"
        )
