"""The Wan2.1 diffusion transformer (DiT): config, modules, checkpoint naming.

The engine's backend builds a :class:`WanDiT` from a :class:`WanDiTConfig` (``configs/models``)
and a safetensors checkpoint (:mod:`smartdiff.io.checkpoints`), in the official Wan naming or in
the diffusers naming; the samplers call it once per denoising step. Parameter names are the
official Wan2.1 ones (``blocks.N.self_attn.q``, ``head.modulation``, ...).

Shape flow (``p = patch_size = (pt, ph, pw)``, ``f, h, w = F/pt, H/ph, W/pw``, ``S = f*h*w``)::

    latents [B, in_dim, F, H, W] --Conv3d(kernel=stride=p)--> [B, dim, f, h, w] --> x [B, S, dim]
    timestep [B] --sinusoid(freq_dim)--> time_embedding --> e [B, dim]
                 --time_projection--> e0 [B, 6, dim]          (per-block modulation input)
    context [B, L, text_dim] --text_embedding--> [B, L, dim]
    RoPE: head_dim d split over (frames, height, width) as d - 4*(d//6), 2*(d//6), 2*(d//6)
    blocks x num_layers: x += gate1 * self_attn(mod(norm1(x)))
                         x += cross_attn(norm3(x), context)
                         x += gate2 * ffn(mod(norm2(x)))
    head: mod(norm(x)) with (head.modulation + e) --> Linear --> [B, S, pt*ph*pw*out_dim]
    unpatchify --> [B, out_dim, F, H, W]

fp32 islands (as diffusers' ``_keep_in_fp32_modules`` and the official autocast regions): the
sinusoid, ``time_embedding`` and ``time_projection`` (kept in fp32, as the official code runs
them under fp32 autocast), every modulation table and the modulation arithmetic, the three
LayerNorms (``norm3``'s affine weights are kept in fp32) and the residual additions, which are
computed in fp32 and stored back in the model dtype, as diffusers does. The RMSNorms over q and
k normalize in fp32; RoPE tables are built in float64 and applied in fp32. Everything else
(linear layers, attention) runs in the model dtype. The output has the model dtype.

Attention is pluggable: :attr:`WanDiT.attention` (self-attention over the video tokens) and
:attr:`WanDiT.cross_attention` (video tokens to text tokens) are plain callables, see
:class:`AttentionFn`.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from smartdiff.io.checkpoints import CheckpointError, load_strict, read_state_dict

ROPE_THETA = 10000.0
SINUSOID_BASE = 10000.0


class AttentionFn(Protocol):
    """Attention over one layout: ``q [B, heads, S, D]``, ``k, v [B, heads, L, D]`` -> ``[B, heads,
    S, D]``, no mask, softmax scale ``1/sqrt(D)``, output in the dtype of ``q``. The inputs may be
    non-contiguous views (transposes of ``[B, S, heads, D]``)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The default :class:`AttentionFn`: ``torch.nn.functional.scaled_dot_product_attention``."""
    return F.scaled_dot_product_attention(q, k, v)


class AttentionReuse(Protocol):
    """A step cache's hook into one block (PAB): called with ``"self"`` or ``"cross"`` and the
    function computing that attention sub-layer's output ``[B, S, dim]``; returns that output,
    computed now or kept from an earlier step."""

    def __call__(
        self, kind: Literal["self", "cross"], compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor: ...


class BlockRunner(Protocol):
    """A step cache (:mod:`smartdiff.cache`) attached as :attr:`WanDiT.step_cache`: runs, skips
    or partly reuses the blocks of one forward pass (see :meth:`WanDiT.run_blocks`)."""

    def run_blocks(
        self,
        model: WanDiT,
        x: torch.Tensor,
        inputs: WanDiTInputs,
        attention: AttentionFn,
        valid_tokens: int | None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True, kw_only=True)
class WanDiTConfig:
    """Architecture of a Wan2.1 DiT (the fields of the official ``config.json``).

    Args:
        dim: hidden size; ``num_heads * head_dim``.
        ffn_dim: inner size of the feed-forward network.
        num_heads: attention heads per layer.
        num_layers: transformer blocks.
        patch_size: (frames, height, width) patch of the Conv3d patch embedding.
        in_dim / out_dim: latent channels in and out.
        freq_dim: size of the sinusoidal timestep embedding.
        text_dim: size of the text encoder's embeddings (UMT5-XXL: 4096).
        eps: epsilon of every LayerNorm and RMSNorm.
        cross_attn_norm: LayerNorm with affine weights (``norm3``) before cross-attention.
        qk_norm: RMSNorm over q and k across all heads (``rms_norm_across_heads``).
        rope_max_seq_len: largest number of patches along frames, height or width.
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    eps: float = 1e-6
    cross_attn_norm: bool = True
    qk_norm: bool = True
    rope_max_seq_len: int = 1024

    def __post_init__(self) -> None:
        positive = (
            "dim",
            "ffn_dim",
            "num_heads",
            "num_layers",
            "in_dim",
            "out_dim",
            "freq_dim",
            "text_dim",
            "rope_max_seq_len",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"WanDiTConfig.{name} must be a positive int, got {value!r}")
        patch = tuple(self.patch_size)
        if len(patch) != 3 or any(
            isinstance(p, bool) or not isinstance(p, int) or p <= 0 for p in patch
        ):
            raise ValueError(
                "WanDiTConfig.patch_size must be three positive ints (frames, height, width), "
                f"got {self.patch_size!r}"
            )
        object.__setattr__(self, "patch_size", patch)
        if self.dim % self.num_heads:
            raise ValueError(
                f"WanDiTConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(
                f"WanDiTConfig: head dim dim/num_heads = {self.head_dim} must be even and >= 6 so "
                "that RoPE can split it over frames, height and width"
            )
        if self.freq_dim % 2:
            raise ValueError(f"WanDiTConfig.freq_dim must be even, got {self.freq_dim}")
        if not (isinstance(self.eps, float | int) and 0 < self.eps < 1):
            raise ValueError(f"WanDiTConfig.eps must be in (0, 1), got {self.eps!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Channels of each head rotated by frame, row and column position (Wan's split)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @classmethod
    def wan21_t2v_1_3b(cls) -> WanDiTConfig:
        return cls(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)

    @classmethod
    def wan21_t2v_14b(cls) -> WanDiTConfig:
        return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> WanDiTConfig:
        """Read a diffusers ``WanTransformer3DModel`` ``config.json`` (text-to-video only)."""
        unsupported = {
            k: config.get(k)
            for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
            if config.get(k)
        }
        qk_norm = config.get("qk_norm", "rms_norm_across_heads")
        if qk_norm not in ("rms_norm_across_heads", None):
            unsupported["qk_norm"] = qk_norm
        if unsupported:
            raise ValueError(
                f"diffusers Wan config has settings WanDiT does not support: {unsupported} "
                "(only text-to-video with qk_norm 'rms_norm_across_heads' or None)"
            )
        heads = int(config["num_attention_heads"])
        return cls(
            dim=heads * int(config["attention_head_dim"]),
            ffn_dim=int(config["ffn_dim"]),
            num_heads=heads,
            num_layers=int(config["num_layers"]),
            patch_size=tuple(config.get("patch_size", (1, 2, 2))),
            in_dim=int(config.get("in_channels", 16)),
            out_dim=int(config.get("out_channels") or config.get("in_channels", 16)),
            freq_dim=int(config.get("freq_dim", 256)),
            text_dim=int(config.get("text_dim", 4096)),
            eps=float(config.get("eps", 1e-6)),
            cross_attn_norm=bool(config.get("cross_attn_norm", True)),
            qk_norm=qk_norm is not None,
            rope_max_seq_len=int(config.get("rope_max_seq_len", 1024)),
        )


# --------------------------------------------------------------------------- helpers


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """``[B]`` timesteps -> ``[B, dim]`` fp32 ``[cos | sin]`` features, computed in float64."""
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float64, device=timestep.device) / half
    angles = timestep.to(torch.float64)[:, None] * SINUSOID_BASE ** -exponents[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


@dataclass(frozen=True)
class RotaryTable:
    """cos and sin of the RoPE angles of every token, ``[S, head_dim // 2]`` fp32 each."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_table(
    config: WanDiTConfig, grid: tuple[int, int, int], device: torch.device
) -> RotaryTable:
    """RoPE angles for a ``(f, h, w)`` patch grid, tokens in (frame, row, column) order."""
    if max(grid) > config.rope_max_seq_len:
        raise ValueError(
            f"patch grid (frames, height, width) = {grid} exceeds rope_max_seq_len "
            f"{config.rope_max_seq_len}"
        )
    bands = []
    for length, channels in zip(grid, config.rope_dims, strict=True):
        inv_freq = ROPE_THETA ** -(
            torch.arange(0, channels, 2, dtype=torch.float64, device=device) / channels
        )
        positions = torch.arange(length, dtype=torch.float64, device=device)
        bands.append(torch.outer(positions, inv_freq))
    f, h, w = grid
    angles = torch.cat(
        [
            bands[0][:, None, None, :].expand(f, h, w, -1),
            bands[1][None, :, None, :].expand(f, h, w, -1),
            bands[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, -1)
    return RotaryTable(cos=torch.cos(angles).float(), sin=torch.sin(angles).float())


def apply_rope(x: torch.Tensor, table: RotaryTable) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x [B, S, heads, D]``; computed in fp32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = table.cos[:, None, :], table.sin[:, None, :]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def layer_norm_fp32(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine weights over the last dim, in fp32 (returns fp32)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


class Fp32LayerNorm(nn.LayerNorm):
    """Affine LayerNorm computed in fp32 (its weights are kept in fp32), returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class RMSNormAcrossHeads(nn.Module):
    """RMSNorm over all heads at once (``[B, S, heads*D]``), normalized in fp32, then scaled."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = EAGER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


# ------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class ElementwiseOps:
    """The memory-bound pieces of a block, as plain functions of tensors.

    ``EAGER`` runs them op by op; :meth:`WanDiT.fuse_elementwise` swaps in
    versions compiled by ``torch.compile`` (one fused kernel each, shared by every
    block since they hold no module state). Same math, fp32 inside.
    """

    modulated_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    gated_residual: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _modulated_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` in fp32, returned in ``x``'s dtype."""
    return (layer_norm_fp32(x, eps) * (1 + scale) + shift).to(x.dtype)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` in fp32, returned in ``x``'s dtype."""
    return (x.float() + y.float() * gate).to(x.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return normed * weight.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rope(x, RotaryTable(cos=cos, sin=sin))


EAGER = ElementwiseOps(_modulated_norm, _gated_residual, _rms_norm, _rope)


@functools.cache
def compiled_elementwise_ops() -> ElementwiseOps:
    """The fused versions (compiled lazily, once per process, on first call)."""
    return ElementwiseOps(
        *(torch.compile(fn, dynamic=False, fullgraph=True) for fn in astuple_ops(EAGER))
    )


def astuple_ops(ops: ElementwiseOps) -> tuple[Callable[..., torch.Tensor], ...]:
    return (ops.modulated_norm, ops.gated_residual, ops.rms_norm, ops.rope)


class WanAttention(nn.Module):
    """Multi-head attention with q/k RMSNorm; self-attention (with RoPE) or cross-attention."""

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q: nn.Module = (
            RMSNormAcrossHeads(dim, config.eps) if config.qk_norm else nn.Identity()
        )
        self.norm_k: nn.Module = (
            RMSNormAcrossHeads(dim, config.eps) if config.qk_norm else nn.Identity()
        )
        self.ops = EAGER

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        rope: RotaryTable | None,
        attention: AttentionFn,
    ) -> torch.Tensor:
        """``x [B, S, dim]`` attends to ``context [B, L, dim]`` (to itself when ``None``)."""
        source = x if context is None else context
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(source)).unflatten(-1, (self.num_heads, -1))
        v = self.v(source).unflatten(-1, (self.num_heads, -1))
        if rope is not None:
            q, k = self.ops.rope(q, rope.cos, rope.sin), self.ops.rope(k, rope.cos, rope.sin)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        projected: torch.Tensor = self.o(out.transpose(1, 2).flatten(2).to(x.dtype))
        return projected


# ----------------------------------------------------------------------------- block


def modulation_terms(table: torch.Tensor, e: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``table [1, count, dim] + e`` split into ``count`` fp32 terms.

    ``e [B, count or 1, dim]`` (one timestep per sample) gives terms ``[B, 1, dim]``;
    per-token ``e [B, S, count or 1, dim]`` (Wan2.2 TI2V) gives ``[B, S, dim]``; both broadcast
    over ``x``. A size-1 ``count`` axis of ``e`` is shared by every term.
    """
    if e.ndim == 4:
        shared = e.shape[2] == 1
        return [table[:, i].float() + e[:, :, 0 if shared else i].float() for i in range(count)]
    return list((table.float() + e.float()).chunk(count, dim=1))


class WanBlock(nn.Module):
    """Self-attention, cross-attention to the text and an FFN, modulated by the timestep."""

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.self_attn = WanAttention(config)
        self.norm3: nn.Module = (
            Fp32LayerNorm(dim, eps=config.eps) if config.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = WanAttention(config)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.ffn_dim, dim),
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.ops = EAGER

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        rope: RotaryTable,
        attention: AttentionFn,
        cross_attention: AttentionFn,
        reuse: AttentionReuse | None = None,
    ) -> torch.Tensor:
        """``x [B, S, dim]``, ``e0 [B, 6, dim]`` or per token ``[B, S, 6, dim]`` (fp32),
        ``context [B, L, dim]`` -> like ``x``.

        ``reuse`` lets a step cache supply the attention sub-layers' outputs (PAB)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation_terms(self.modulation, e0, 6)
        ops = self.ops
        h = ops.modulated_norm(x, shift1, scale1, self.eps)
        if reuse is None:
            x = ops.gated_residual(x, self.self_attn(h, None, rope, attention), gate1)
            x = x + self.cross_attn(self.norm3(x), context, None, cross_attention)
        else:
            attended = reuse("self", lambda: self.self_attn(h, None, rope, attention))
            x = residual = ops.gated_residual(x, attended, gate1)
            x = x + reuse(
                "cross",
                lambda: self.cross_attn(self.norm3(residual), context, None, cross_attention),
            )
        h = ops.modulated_norm(x, shift2, scale2, self.eps)
        return ops.gated_residual(x, self.ffn(h), gate2)


class WanHead(nn.Module):
    """Output head: modulated LayerNorm and a linear map to ``prod(patch_size) * out_dim``."""

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.head = nn.Linear(dim, math.prod(config.patch_size) * config.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.ops = EAGER

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``x [B, S, dim]``, ``e [B, dim]`` or per token ``[B, S, dim]`` (fp32)."""
        shift, scale = modulation_terms(self.modulation, e.unsqueeze(-2), 2)
        out: torch.Tensor = self.head(self.ops.modulated_norm(x, shift, scale, self.eps))
        return out


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class WanDiTInputs:
    """Embedded inputs of one forward pass, shared by every block."""

    tokens: torch.Tensor  # [B, S, dim], model dtype
    grid: tuple[int, int, int]  # (f, h, w) patches
    # Time embedding (drives the head): [B, dim] fp32, or [B, S, dim] with per-token timesteps.
    e: torch.Tensor
    # Time projection (drives every block): [B, 6, dim] fp32, or [B, S, 6, dim] per token.
    e0: torch.Tensor
    context: torch.Tensor  # [B, L, dim], model dtype
    rope: RotaryTable = field(repr=False)


class WanDiT(nn.Module):
    """Wan2.1 text-to-video diffusion transformer.

    Args:
        config: the architecture.
        attention: self-attention over the video tokens (:class:`AttentionFn`); default SDPA.
        cross_attention: attention from video tokens to text tokens; default SDPA.

    Both attention callables are plain attributes and may be replaced at any time.
    """

    _keep_in_fp32 = ("time_embedding", "time_projection", "modulation", "norm3")

    def __init__(
        self,
        config: WanDiTConfig,
        *,
        attention: AttentionFn | None = None,
        cross_attention: AttentionFn | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.attention: AttentionFn = attention or sdpa_attention
        self.cross_attention: AttentionFn = cross_attention or sdpa_attention
        self.step_cache: BlockRunner | None = None  # set per request by the generator
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = WanHead(config)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the linear layers)."""
        return self.patch_embedding.weight.dtype

    def fuse_elementwise(self, enabled: bool = True) -> WanDiT:
        """Use fused (``torch.compile``-d) norms, modulation, gated residuals and RoPE.

        Worth it on CUDA, where these memory-bound steps are a sixth of a forward;
        compiled once per process and shape on the first forward.
        """
        ops = compiled_elementwise_ops() if enabled else EAGER
        for module in self.modules():
            if isinstance(module, WanBlock | WanAttention | WanHead | RMSNormAcrossHeads):
                module.ops = ops
        return self

    def is_kept_in_fp32(self, name: str) -> bool:
        """Whether the parameter ``name`` stays fp32 whatever the model dtype."""
        return any(part in self._keep_in_fp32 for part in name.split("."))

    def cast(self, dtype: torch.dtype) -> WanDiT:
        """Cast to ``dtype`` except the fp32 islands; works on the meta device too."""
        for name, param in self.named_parameters():
            param.data = param.data.to(torch.float32 if self.is_kept_in_fp32(name) else dtype)
        return self

    def embed(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
    ) -> WanDiTInputs:
        """Patchify the latents, embed the timestep and the text, build the RoPE table."""
        if latents.ndim != 5 or latents.shape[1] != self.config.in_dim:
            raise ValueError(
                f"latents must be [B, {self.config.in_dim}, F, H, W], got {tuple(latents.shape)}"
            )
        sizes = latents.shape[2:]
        if any(s % p for s, p in zip(sizes, self.config.patch_size, strict=True)):
            raise ValueError(
                f"latent (F, H, W) = {tuple(sizes)} must be divisible by "
                f"patch_size {self.config.patch_size}"
            )
        batch = latents.shape[0]
        num_tokens = math.prod(s // p for s, p in zip(sizes, self.config.patch_size, strict=True))
        if timestep.shape not in ((batch,), (batch, num_tokens)):
            raise ValueError(
                f"timestep must be [B] = [{batch}] or per token [B, S] = [{batch}, {num_tokens}], "
                f"got {tuple(timestep.shape)}"
            )
        if timestep.ndim == 2 and bool((timestep == timestep[:, :1]).all()):
            timestep = timestep[:, 0]  # one value per sample: the cheaper, identical path
        if (
            context.ndim != 3
            or context.shape[0] != batch
            or context.shape[2] != self.config.text_dim
        ):
            raise ValueError(
                f"context must be [{batch}, L, {self.config.text_dim}], got {tuple(context.shape)}"
            )
        patches = self.patch_embedding(latents.to(self.dtype))
        grid = (patches.shape[2], patches.shape[3], patches.shape[4])
        tokens = patches.flatten(2).transpose(1, 2)
        e = self.time_embedding(
            sinusoidal_embedding(timestep.flatten(), self.config.freq_dim).to(
                next(self.time_embedding.parameters()).dtype
            )
        ).float()
        e0 = self.time_projection(e.to(next(self.time_projection.parameters()).dtype)).float()
        if timestep.ndim == 2:  # per-token timesteps (Wan2.2 TI2V): [B*S, ...] -> [B, S, ...]
            e, e0 = e.unflatten(0, timestep.shape), e0.unflatten(0, timestep.shape)
        return WanDiTInputs(
            tokens=tokens,
            grid=grid,
            e=e,
            e0=e0.unflatten(-1, (6, self.config.dim)),
            context=self.text_embedding(context.to(self.dtype)),
            rope=rope_table(self.config, grid, latents.device),
        )

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, S, pt*ph*pw*out_dim]`` -> ``[B, out_dim, f*pt, h*ph, w*pw]``."""
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
            x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw
        )

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """``latents [B, in_dim, F, H, W]``, ``timestep [B]`` (float, 0..1000) or per token
        ``[B, S]`` (Wan2.2 TI2V, tokens in (frame, row, column) order), ``context
        [B, L, text_dim]`` (already padded by the caller, e.g. to 512 tokens) ->
        ``[B, out_dim, F, H, W]`` in the model dtype."""
        inputs = self.embed(latents, timestep, context)
        x = self.run_blocks(inputs.tokens, inputs)
        return self.unpatchify(self.head(x, inputs.e), inputs.grid)

    def run_blocks(
        self,
        x: torch.Tensor,
        inputs: WanDiTInputs,
        attention: AttentionFn | None = None,
        *,
        valid_tokens: int | None = None,
    ) -> torch.Tensor:
        """Every block on ``x [B, s, dim]`` -- through :attr:`step_cache` when one is attached.

        Args:
            x: the tokens (all of them, or this rank's shard; ``inputs.rope`` must match).
            inputs: the embedded inputs (``e``, ``e0``, ``context``, ``rope`` are used).
            attention: self-attention to use instead of :attr:`attention` (context parallel).
            valid_tokens: how many leading rows of ``x`` are real tokens (the rest padding),
                for caches that measure ``x``; ``None``: all.
        """
        attention = self.attention if attention is None else attention
        if self.step_cache is not None:
            return self.step_cache.run_blocks(self, x, inputs, attention, valid_tokens)
        for block in self.blocks:
            x = block(x, inputs.e0, inputs.context, inputs.rope, attention, self.cross_attention)
        return x

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        config: WanDiTConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        attention: AttentionFn | None = None,
    ) -> WanDiT:
        """Build on the meta device and load a safetensors checkpoint in either naming."""
        with torch.device("meta"):
            model = cls(config, attention=attention).cast(dtype)
        targets = model.state_dict(keep_vars=True)
        state_dict = convert_state_dict(read_state_dict(path, device="cpu"))
        for key in list(state_dict):  # move one by one: the host copy is freed as we go
            if key in targets and state_dict[key].shape == targets[key].shape:
                state_dict[key] = state_dict[key].to(device=device, dtype=targets[key].dtype)
        load_strict(model, state_dict, source=str(path))
        return model.eval().requires_grad_(False)


# -------------------------------------------------------------------- checkpoint naming

Naming = Literal["official", "diffusers"]

# (official, diffusers) name prefixes; a prefix without a trailing dot is a whole key.
_TOP_LEVEL_NAMES: tuple[tuple[str, str], ...] = (
    ("patch_embedding.", "patch_embedding."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
)
_BLOCK_NAMES: tuple[tuple[str, str], ...] = (
    *(
        (f"self_attn.{ours}.", f"attn1.{theirs}.")
        for ours, theirs in (
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("o", "to_out.0"),
            ("norm_q", "norm_q"),
            ("norm_k", "norm_k"),
        )
    ),
    *(
        (f"cross_attn.{ours}.", f"attn2.{theirs}.")
        for ours, theirs in (
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("o", "to_out.0"),
            ("norm_q", "norm_q"),
            ("norm_k", "norm_k"),
        )
    ),
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
)
_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.+)$")


def _rename(key: str, source: int) -> str:
    """Map one key from naming ``source`` (0 official, 1 diffusers) to the other, else keep it."""
    match = _BLOCK_KEY.match(key)
    prefix, rest, table = (
        (match[1], match[2], _BLOCK_NAMES) if match else ("", key, _TOP_LEVEL_NAMES)
    )
    for pair in table:
        old, new = pair[source], pair[1 - source]
        if (old.endswith(".") and rest.startswith(old)) or rest == old:
            return prefix + new + rest[len(old) :]
    return key


def detect_naming(keys: list[str] | Mapping[str, Any]) -> Naming:
    """Tell the official Wan naming from the diffusers naming, or raise CheckpointError."""
    names = list(keys)
    diffusers_marks = (
        "condition_embedder.",
        "proj_out.",
        "scale_shift_table",
        ".attn1.",
        ".attn2.",
        ".ffn.net.",
    )
    official_marks = (
        "time_embedding.",
        "time_projection.",
        "text_embedding.",
        "head.head.",
        ".self_attn.",
        ".cross_attn.",
        ".modulation",
    )
    is_diffusers = any(mark in name for name in names for mark in diffusers_marks)
    is_official = any(mark in name for name in names for mark in official_marks)
    if is_diffusers != is_official:
        return "diffusers" if is_diffusers else "official"
    sample = ", ".join(sorted(names)[:8]) or "no keys at all"
    verdict = "both official and diffusers" if is_diffusers else "neither official nor diffusers"
    raise CheckpointError(
        f"cannot tell the Wan DiT checkpoint naming: keys look like {verdict} names "
        f"(first keys: {sample}); expected official keys such as 'blocks.0.self_attn.q.weight' "
        "or diffusers keys such as 'blocks.0.attn1.to_q.weight'"
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the state dict in the official naming (diffusers names are mapped, official pass).

    Keys neither table knows keep their names, so :func:`load_strict` reports them.
    """
    if detect_naming(state_dict) == "official":
        return dict(state_dict)
    return {_rename(key, 1): tensor for key, tensor in state_dict.items()}


def to_diffusers_naming(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the state dict in the diffusers naming (the inverse of :func:`convert_state_dict`)."""
    if detect_naming(state_dict) == "diffusers":
        return dict(state_dict)
    return {_rename(key, 0): tensor for key, tensor in state_dict.items()}
