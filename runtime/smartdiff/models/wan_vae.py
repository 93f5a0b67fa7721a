"""The Wan2.1 video VAE (3D causal VAE): config, modules, chunked causal encode/decode, naming.

The generator calls :meth:`WanVAE.decode` once per request to turn the denoised latents into
video (after :meth:`WanVAE.denormalize_latents`), and image-to-video calls :meth:`WanVAE.encode`
(then :meth:`WanVAE.normalize_latents`) for the conditioning frames. Weights come from a
checkpoint through :mod:`smartdiff.io.checkpoints`, in the official Wan naming (``Wan2.1_VAE``:
``encoder.downsamples.N...``, ``decoder.upsamples.N...``, ``conv1``/``conv2``), which is the
naming of this module, or in the diffusers naming (``AutoencoderKLWan``), converted by
:func:`convert_state_dict`.

Shape flow (defaults: base_dim 96, z_dim 16, dim_mult (1, 2, 4, 4); ``s = 2**(levels - 1) = 8``
spatial and ``r = 2**sum(temperal_downsample) = 4`` temporal compression)::

    encode: video [B, 3, 1 + r*k, H, W] in [-1, 1], fed in chunks of 1, r, r, ... frames
      Encoder3d: conv1 (3 -> 96) -> downsamples: per level num_res_blocks ResidualBlocks
        (96, 192, 384, 384 channels), then a Resample halving H and W (and T on levels with
        temperal_downsample) -> middle (ResidualBlock, AttentionBlock, ResidualBlock)
        -> head (RMS norm, SiLU, conv 384 -> 2*z_dim)      one latent frame per chunk
      conv1 (1x1x1) -> the first z_dim channels, the posterior mean [B, z, 1 + k, H/s, W/s]
    decode: z [B, z, T, h, w] (raw, i.e. denormalized) -> conv2 (1x1x1), fed one latent frame
      at a time
      Decoder3d: conv1 (z -> 384) -> middle -> upsamples: per level num_res_blocks + 1
        ResidualBlocks (384, 384, 192, 96 channels), then a Resample doubling H and W (and T on
        levels with temporal upsampling, the reverse of temperal_downsample) which also halves
        the channels -> head (RMS norm, SiLU, conv -> 3)
      the first latent frame gives 1 frame, each later one r frames:
      video [B, 3, 1 + r*(T - 1), s*h, s*w], clamped to [-1, 1], in the model dtype.

Cache semantics (identical to the reference ``feat_cache``, one :class:`CausalCache` per call):
every temporal operation keeps, from one chunk to the next, the trailing input frames it needs.
A causal convolution with a temporal kernel of 3 sees ``[2 cached frames | chunk]``, the cache
holding the last 2 frames of its (zero left-padded) input so far; on the first chunk the missing
history is zeros. Hence the chunked result equals one causal convolution over the whole sequence
(zero padding on the left only). The temporal upsampler skips the first chunk (the first latent
frame becomes a single frame) and from then on runs its causal convolution over the later frames
as if they started the sequence; each input frame becomes two, interleaved. The temporal
downsampler passes the first chunk through (the first frame stays one frame) and from then on
convolves ``[last frame of the previous chunk | chunk]`` with stride 2. Only those tails (2 or
1 frames per operation) are kept, never whole chunks; the decoded frames are written into one
preallocated output.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from smartdiff.io.checkpoints import CheckpointError, load_strict, read_state_dict

if TYPE_CHECKING:
    from smartdiff.models.vae_tiling import VAETiling

# The published latent statistics of the Wan2.1 VAE (official ``wan/modules/vae.py``, equal to
# the defaults of diffusers' ``AutoencoderKLWan``).
# fmt: off
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# fmt: on

ResampleMode = Literal["upsample2d", "upsample3d", "downsample2d", "downsample3d"]


def check_vae_config(
    config: Any,
    kind: str,
    positive_ints: tuple[str, ...],
    extra_tuples: tuple[str, ...] = (),
) -> None:
    """Validate the fields the Wan VAE configs share (errors name ``kind.field`` and the value).

    Lists (from YAML or JSON) are stored as tuples; ``positive_ints`` must be integers >= 1;
    ``dim_mult`` positive integers; ``temperal_downsample`` one bool per down stage;
    ``dropout`` in [0, 1); ``latents_mean``/``latents_std`` ``z_dim`` numbers, std > 0.
    """
    tuples = ("dim_mult", *extra_tuples, "temperal_downsample", "latents_mean", "latents_std")
    for name in tuples:
        object.__setattr__(config, name, tuple(getattr(config, name)))
    for name in positive_ints:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{kind}.{name} must be a positive integer, got {value!r}")
    dim_mult = config.dim_mult
    if not dim_mult or any(
        isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in dim_mult
    ):
        raise ValueError(
            f"{kind}.dim_mult must be a non-empty sequence of positive integers, got {dim_mult!r}"
        )
    downsample = config.temperal_downsample
    if len(downsample) != len(dim_mult) - 1 or not all(isinstance(f, bool) for f in downsample):
        raise ValueError(
            f"{kind}.temperal_downsample must hold len(dim_mult) - 1 = {len(dim_mult) - 1} "
            f"booleans, got {downsample!r}"
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"{kind}.dropout must be in [0, 1), got {config.dropout!r}")
    for name in ("latents_mean", "latents_std"):
        values = getattr(config, name)
        if len(values) != config.z_dim:
            raise ValueError(
                f"{kind}.{name} must hold z_dim={config.z_dim} numbers, got {len(values)}: "
                f"{values!r}"
            )
    if any(not std > 0.0 for std in config.latents_std):
        raise ValueError(
            f"{kind}.latents_std must be positive everywhere, got {config.latents_std!r}"
        )


@dataclass(frozen=True, kw_only=True)
class WanVAEConfig:
    """Architecture of a Wan2.1 VAE (the arguments of the official ``WanVAE_``).

    Args:
        base_dim: channels of the first level; level ``i`` has ``base_dim * dim_mult[i]``.
        z_dim: latent channels.
        dim_mult: channel multiplier of each resolution level.
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
        attn_scales: resolutions with extra attention blocks; the published VAE has none and
            diffusers' decoder cannot hold them, so only ``()`` is accepted.
        temperal_downsample: per level transition (``len(dim_mult) - 1``), whether the encoder
            also halves time there (spelled as upstream spells it).
        dropout: dropout of the residual blocks (inactive in inference).
        latents_mean / latents_std: per-channel statistics used to (de)normalize latents.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self) -> None:
        check_vae_config(
            self, "WanVAEConfig", ("base_dim", "z_dim", "num_res_blocks"), ("attn_scales",)
        )
        if self.attn_scales:
            raise ValueError(
                f"WanVAEConfig.attn_scales={self.attn_scales!r} is not supported: the published "
                "Wan2.1 VAE has no attention outside the middle blocks (allowed: ())"
            )

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent position along H and W (8 for Wan2.1)."""
        return 1 << (len(self.dim_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        """Video frames per latent frame after the first one (4 for Wan2.1)."""
        return 1 << sum(self.temperal_downsample)

    def num_video_frames(self, latent_frames: int) -> int:
        """Frames decoded from ``latent_frames`` latent frames: ``1 + r * (latent_frames - 1)``."""
        return 1 + self.temporal_compression * (latent_frames - 1)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> WanVAEConfig:
        """Read an ``AutoencoderKLWan`` ``config.json``; refuses Wan2.2 and other variants."""
        variants = {"is_residual": False, "patch_size": None, "in_channels": 3, "out_channels": 3}
        for key, allowed in variants.items():
            if config.get(key, allowed) != allowed:
                raise ValueError(
                    f"diffusers VAE config {key}={config[key]!r} is not a Wan2.1 VAE "
                    f"(allowed: {allowed!r})"
                )
        decoder_base_dim = config.get("decoder_base_dim")
        if decoder_base_dim is not None and decoder_base_dim != config.get("base_dim", 96):
            raise ValueError(
                f"diffusers VAE config decoder_base_dim={decoder_base_dim!r} differs "
                f"from base_dim={config.get('base_dim', 96)!r}; not a Wan2.1 VAE"
            )
        names = (
            "base_dim",
            "z_dim",
            "dim_mult",
            "num_res_blocks",
            "attn_scales",
            "temperal_downsample",
            "dropout",
            "latents_mean",
            "latents_std",
        )
        return cls(**{name: config[name] for name in names if name in config})


# ------------------------------------------------------------------------------- helpers


class CausalCache:
    """What each temporal operation of one encoder or decoder call remembers between chunks.

    Operations run in the same order for every chunk; each calls :meth:`read` once then
    :meth:`write` once. During the first chunk :meth:`read` returns ``None``.
    """

    def __init__(self) -> None:
        self._entries: list[torch.Tensor] = []
        self._cursor = 0

    def start_chunk(self) -> None:
        """Rewind to the first operation; every operation must have written once per chunk."""
        if self._cursor != len(self._entries):
            raise RuntimeError(
                f"causal cache: {self._cursor} operations ran in the last chunk, "
                f"{len(self._entries)} in the first"
            )
        self._cursor = 0

    def read(self) -> torch.Tensor | None:
        """The tail the next operation stored during the previous chunk, if any."""
        return self._entries[self._cursor] if self._cursor < len(self._entries) else None

    def write(self, tail: torch.Tensor) -> None:
        """Store the next operation's tail and move on to the following operation."""
        if self._cursor < len(self._entries):
            self._entries[self._cursor] = tail
        else:
            self._entries.append(tail)
        self._cursor += 1


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded on the left only in time: output frame ``t`` sees input frames ``<= t``.

    ``padding=(pt, ph, pw)`` means ``2 * pt`` zero frames before the sequence (none after) and
    ``ph``/``pw`` on both sides in space. With a :class:`CausalCache` the zero frames are
    replaced by the previous chunk's last input frames.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        self.time_padding = 2 * pt

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        history = cache.read() if cache is not None else None
        x = self._with_history(x, history)
        if cache is not None:
            cache.write(x[:, :, x.shape[2] - self.time_padding :].clone())
        return super().forward(x)

    def _with_history(self, x: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """``[zeros | history | x]`` with exactly ``time_padding`` frames before ``x``."""
        known = 0 if history is None else history.shape[2]
        pieces = []
        if self.time_padding > known:
            b, c, _, h, w = x.shape
            pieces.append(x.new_zeros(b, c, self.time_padding - known, h, w))
        if history is not None and known:
            pieces.append(history.to(x.device))
        return torch.cat([*pieces, x], dim=2) if pieces else x


class RMSNorm(nn.Module):
    """Wan's RMS norm over channels (dim 1): ``x / ||x|| * sqrt(dim) * gamma``.

    ``images=True`` is for per-frame 4D input (gamma ``[dim, 1, 1]``), otherwise 5D (gamma
    ``[dim, 1, 1, 1]``). Half-precision input is normalized in fp32, as diffusers does.
    """

    def __init__(self, dim: int, *, images: bool) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))
        # norm then SiLU in one kernel (WanVAE.fuse_elementwise), else None: op by op
        self.fused_silu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_precision = x.dtype in (torch.float16, torch.bfloat16)
        normed = F.normalize(x.float() if low_precision else x, dim=1).to(x.dtype)
        return normed.mul_(self.scale).mul_(self.gamma)


def _norm_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``SiLU(F.normalize(x) * weight)`` in fp32 (``weight``: the norm's ``gamma * sqrt(dim)``,
    fp32), returned in ``x``'s dtype: one rounding instead of the eager path's three; compiled
    into one kernel by :func:`compiled_norm_silu`."""
    return F.silu(F.normalize(x.float(), dim=1) * weight).to(x.dtype)


@functools.cache
def compiled_norm_silu() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The fused norm + SiLU (compiled lazily, once per process; any tile size)."""
    return torch.compile(_norm_silu, dynamic=True, fullgraph=True)


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``SiLU(norm(x))`` for an :class:`RMSNorm`: fused when it has a fused version, else op by
    op."""
    assert isinstance(norm, RMSNorm)
    if norm.fused_silu is not None:  # flattened: one compiled kernel for 1, 2 or 4 frames
        b, c = x.shape[:2]
        weight = (norm.gamma.float() * norm.scale).view(c, 1)
        return norm.fused_silu(x.reshape(b, c, -1), weight).view(x.shape)
    return F.silu(norm(x), inplace=True)


class FrameUpsample(nn.Module):
    """Nearest-neighbour 2x upsampling of H and W, frame by frame, on ``[B, C, T, H, W]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")


class FramePad(nn.Module):
    """One zero row below and one zero column right of every frame (before a stride-2 conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1, 0, 1))


class FrameConv2d(nn.Conv2d):
    """A Conv2d applied to every frame of ``[B, C, T, H, W]`` (a Conv3d with a 1-frame kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(
            x,
            self.weight.unsqueeze(2),
            self.bias,
            stride=(1, *self.stride),
            padding=(0, *self.padding),
        )


# -------------------------------------------------------------------------------- blocks


class ResidualBlock(nn.Module):
    """``shortcut(x) + conv(SiLU(norm(conv(SiLU(norm(x))))))`` with causal 3x3x3 convolutions."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        # Indices 0..6 are the official parameter names (residual.0.gamma, residual.2.weight...).
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(inplace=True),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(inplace=True),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, dropout, conv2 = self.residual
        h = conv1(norm_silu(norm1, x), cache)
        h = conv2(dropout(norm_silu(norm2, h)), cache)
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, plus the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # [b*t, h*w, 3c]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # one head: [b*t, 1, h*w, c]
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        out = self.proj(attended).view(b, t, c, h, w).transpose(1, 2)
        return out + x


class Resample(nn.Module):
    """2x spatial up/downsampling, plus 2x temporal up/downsampling in the ``*3d`` modes.

    Upsampling halves the channels (``dim -> dim // 2``) unless ``out_dim`` is given (the
    Wan2.2 VAE keeps them), downsampling keeps them.
    """

    def __init__(self, dim: int, mode: ResampleMode, out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            up_dim = dim // 2 if out_dim is None else out_dim
            self.resample = nn.Sequential(FrameUpsample(), FrameConv2d(dim, up_dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(FramePad(), FrameConv2d(dim, dim, 3, stride=2))
        self.time_conv: CausalConv3d | None = None
        if mode == "upsample3d":  # each frame -> 2 frames, stacked on the channel axis
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        x = self.resample(x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        assert self.time_conv is not None
        if cache.read() is None:  # first chunk: the first frame stays a single frame
            b, c, _, h, w = x.shape
            cache.write(x.new_empty(b, c, 0, h, w))  # "seen", no history: zeros next time
            return x
        b, c, t, h, w = x.shape
        doubled = self.time_conv(x, cache).view(b, 2, c, t, h, w)
        return doubled.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def _downsample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        assert self.time_conv is not None
        previous = cache.read()
        cache.write(x[:, :, -1:].clone())
        if previous is None:  # first chunk: the first frame stays a single frame
            return x
        return self.time_conv(torch.cat([previous.to(x.device), x], dim=2))


class Encoder3d(nn.Module):
    """Video ``[B, 3, t, H, W]`` chunk -> ``[B, 2*z_dim, t', H/s, W/s]`` (mean and log-variance)."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last_level = len(config.dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                in_dim = out_dim
            if level != last_level:
                time = config.temperal_downsample[level]
                blocks.append(Resample(out_dim, "downsample3d" if time else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(dims[-1], config.dropout)
        self.head = _head(dims[-1], 2 * config.z_dim)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        return _run_head(self.head, _run_middle(self.middle, x, cache), cache)


class Decoder3d(nn.Module):
    """Latent chunk ``[B, z_dim, t, h, w]`` -> video ``[B, 3, t', s*h, s*w]`` (not clamped)."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        mults = config.dim_mult
        dims = [config.base_dim * m for m in (mults[-1], *reversed(mults))]
        temporal_upsample = tuple(reversed(config.temperal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], config.dropout)
        blocks: list[nn.Module] = []
        last_level = len(mults) - 1
        for level, (in_dim, out_dim) in enumerate(pairwise(dims)):
            if level > 0:  # the previous Resample halved the channels
                in_dim //= 2
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                in_dim = out_dim
            if level != last_level:
                time = temporal_upsample[level]
                blocks.append(Resample(out_dim, "upsample3d" if time else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(dims[-1], 3)
        # Stages for the tiled decode (smartdiff.models.vae_tiling): cut after every temporal
        # up-sampler; the last stage ends with the head.
        cuts = [
            i + 1
            for i, block in enumerate(blocks)
            if isinstance(block, Resample) and block.mode == "upsample3d"
        ]
        bounds = [0, *cuts, len(blocks)]
        self._stages: tuple[tuple[int, int], ...] = tuple(pairwise(bounds))
        self.stage_scales, self.stage_radii = self._stage_geometry()

    def _stage_geometry(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """Per stage: output pixels per latent position, and the spatial receptive radius in
        latent positions (3x3 convolutions at their resolution, plus one coarse position per
        nearest-neighbour up-sampling for rounding)."""
        scales, radii = [], []
        factor = 1
        for index, (start, stop) in enumerate(self._stages):
            radius = 0.0
            for block in self.upsamples[start:stop]:
                if isinstance(block, ResidualBlock):
                    radius += 2.0 / factor
                elif isinstance(block, Resample) and block.mode.startswith("upsample"):
                    radius += 1.0 / factor
                    factor *= 2
                    radius += 1.0 / factor
            if index == len(self._stages) - 1:
                radius += 1.0 / factor  # the head's convolution
            scales.append(factor)
            radii.append(radius)
        return tuple(scales), tuple(radii)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = _run_middle(self.middle, self.conv1(x, cache), cache)
        for block in self.upsamples:
            x = block(x, cache)
        return _run_head(self.head, x, cache)

    # The StagedDecoder protocol of smartdiff.models.vae_tiling: trunk, then the stages.

    def trunk(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """``conv1`` and the middle block (with the only non-local operation, the attention)."""
        return _run_middle(self.middle, self.conv1(x, cache), cache)

    @property
    def num_stages(self) -> int:
        return len(self._stages)

    def run_stage(
        self, index: int, x: torch.Tensor, cache: CausalCache, first_chunk: bool
    ) -> torch.Tensor:
        """Up-sampling stage ``index`` (the last one includes the head)."""
        start, stop = self._stages[index]
        for block in self.upsamples[start:stop]:
            x = block(x, cache)
        if index == len(self._stages) - 1:
            x = _run_head(self.head, x, cache)
        return x


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout)
    )


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        RMSNorm(dim, images=False), nn.SiLU(inplace=True), CausalConv3d(dim, out_dim, 3, padding=1)
    )


def _run_middle(middle: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    res1, attention, res2 = middle
    return res2(attention(res1(x, cache)), cache)


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    norm, _, conv = head
    return conv(norm_silu(norm, x), cache)


def fuse_norm_silu(model: nn.Module, enabled: bool = True) -> None:
    """Make every 5D RMSNorm of ``model`` (each is followed by a SiLU) run fused with its SiLU:
    1.17x on the Wan2.1 decode at 1280x720x81 on an H200 (3.45 s vs 4.04 s, both measured in one
    run); same math in fp32,
    rounded once (bf16 outputs differ from the op-by-op path by bf16 rounding)."""
    fused = compiled_norm_silu() if enabled else None
    for module in model.modules():
        if isinstance(module, RMSNorm) and module.gamma.dim() == 4:
            module.fused_silu = fused


# --------------------------------------------------------------------------------- model


class LatentStatsConfig(Protocol):
    """What :class:`LatentNormalization` needs of a VAE config."""

    @property
    def z_dim(self) -> int: ...

    @property
    def latents_mean(self) -> tuple[float, ...]: ...

    @property
    def latents_std(self) -> tuple[float, ...]: ...


class LatentNormalization:
    """The published per-channel latent statistics, shared by the Wan2.1 and Wan2.2 VAEs:
    raw VAE latents <-> the normalized latents the DiT denoises."""

    config: LatentStatsConfig

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, 1 / std)`` shaped ``[1, z, 1, 1, 1]`` in the dtype and device of ``like``."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, 1.0 / std

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> DiT latents: ``(z - mean) * (1 / std)`` (official and diffusers)."""
        mean, inv_std = self._latent_stats(latents)
        return (latents - mean) * inv_std

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latents -> raw VAE latents: ``z / (1 / std) + mean``, as ``WanPipeline`` does."""
        mean, inv_std = self._latent_stats(latents)
        return latents / inv_std + mean


class WanVAE(LatentNormalization, nn.Module):
    """The Wan2.1 VAE; see the module docstring for shapes and the chunked causal cache.

    ``conv1`` maps the encoder output to the posterior moments, ``conv2`` is applied to latents
    before the decoder (diffusers: ``quant_conv`` and ``post_quant_conv``).
    """

    config: WanVAEConfig

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        # Set by the backend at memory level >= 1: decode tiled (smartdiff.models.vae_tiling).
        self.tiling: VAETiling | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Posterior mean of ``video [B, 3, 1 + r*k, H, W]`` in [-1, 1]; H, W multiples of ``s``.

        Returns the raw latent ``[B, z_dim, 1 + k, H/s, W/s]`` (diffusers:
        ``vae.encode(video).latent_dist.mode()``); apply :meth:`normalize_latents` for the DiT.
        """
        r, s = self.config.temporal_compression, self.config.spatial_compression
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(
                f"WanVAE.encode expects video [B, 3, T, H, W], got {tuple(video.shape)}"
            )
        frames, height, width = video.shape[2:]
        if (frames - 1) % r or height % s or width % s:
            raise ValueError(
                f"WanVAE.encode: video of {frames} frames of {height}x{width}; "
                f"allowed: 1 + {r}*k frames, height and width multiples of {s}"
            )
        video = video.to(device=self.device, dtype=self.dtype)
        cache = CausalCache()
        chunks = []
        for start in range(0, frames, r):
            cache.start_chunk()
            first = start == 0
            chunks.append(
                self.encoder(
                    video[:, :, :1] if first else video[:, :, start - r + 1 : start + 1], cache
                )
            )
        moments = torch.cat(chunks, dim=2)
        z = self.config.z_dim  # only the mean half of conv1
        bias = self.conv1.bias
        return F.conv3d(moments, self.conv1.weight[:z], None if bias is None else bias[:z])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiling: VAETiling | None = None) -> torch.Tensor:
        """Video ``[B, 3, 1 + r*(T-1), s*h, s*w]`` in [-1, 1] from raw ``latents [B, z, T, h, w]``.

        ``latents`` are raw (as diffusers' ``vae.decode`` takes them): the DiT's normalized
        latents go through :meth:`denormalize_latents` first. Decoded one latent frame at a time
        with the causal cache; the output has the model's dtype and device. With ``tiling`` (or
        :attr:`tiling` when ``None``) the decode is tiled (:mod:`smartdiff.models.vae_tiling`).
        """
        tiling = self.tiling if tiling is None else tiling
        if latents.dim() != 5 or latents.shape[1] != self.config.z_dim:
            raise ValueError(
                f"WanVAE.decode expects latents [B, {self.config.z_dim}, T, h, w], "
                f"got {tuple(latents.shape)}"
            )
        b, _, t, h, w = latents.shape
        s = self.config.spatial_compression
        x = self.conv2(latents.to(device=self.device, dtype=self.dtype))
        video = torch.empty(
            b,
            3,
            self.config.num_video_frames(t),
            s * h,
            s * w,
            dtype=self.dtype,
            device=self.device,
        )
        if tiling is not None:
            from smartdiff.models.vae_tiling import decode_tiled

            return decode_tiled(self.decoder, x, video, scale=s, tiling=tiling)
        return decode_chunks(lambda chunk, cache, _: self.decoder(chunk, cache), x, video)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        config: WanVAEConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> WanVAE:
        """Build on the meta device and load a checkpoint in either naming.

        ``path``: a safetensors file, sharded index or directory (diffusers' ``vae/``), or the
        official ``Wan2.1_VAE.pth`` (a plain state dict, read with ``weights_only=True``).
        """
        with torch.device("meta"):
            model = cls(config).to(dtype)
        return load_vae_weights(model, convert_state_dict(_read_weights(Path(path))), path, device)


def decode_chunks(
    step: Callable[[torch.Tensor, CausalCache, int], torch.Tensor],
    x: torch.Tensor,
    video: torch.Tensor,
) -> torch.Tensor:
    """The untiled decode: ``step(x[:, :, i : i + 1], cache, i)`` for every latent frame ``i``
    with one causal cache, its frames clamped to [-1, 1] and written in order into ``video``
    (preallocated, returned)."""
    cache = CausalCache()
    written = 0
    for i in range(x.shape[2]):
        cache.start_chunk()
        frames = step(x[:, :, i : i + 1], cache, i).clamp_(-1.0, 1.0)
        video[:, :, written : written + frames.shape[2]] = frames
        written += frames.shape[2]
    if written != video.shape[2]:
        raise RuntimeError(f"VAE decode produced {written} frames, expected {video.shape[2]}")
    return video


ModelT = TypeVar("ModelT", bound=nn.Module)


def load_vae_weights(
    model: ModelT,
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    device: str | torch.device,
) -> ModelT:
    """Load ``state_dict`` (our naming) strictly into ``model`` (built on the meta device),
    each tensor moved to ``device`` in the model's dtype one by one (the host copy is freed
    as we go); the model in eval mode without gradients."""
    targets = model.state_dict(keep_vars=True)
    for key in list(state_dict):
        if key in targets and state_dict[key].shape == targets[key].shape:
            state_dict[key] = state_dict[key].to(device=device, dtype=targets[key].dtype)
    load_strict(model, state_dict, source=str(path))
    return model.eval().requires_grad_(False)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_file() and path.suffix in (".pth", ".pt"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # pickle, zip and OS errors alike
            raise CheckpointError(f"cannot read torch checkpoint {str(path)!r}: {exc}") from exc
        if not isinstance(loaded, dict) or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()
        ):
            raise CheckpointError(
                f"torch checkpoint {str(path)!r} is not a plain state dict of tensors"
            )
        return loaded
    return read_state_dict(path, device="cpu")


# -------------------------------------------------------------------- checkpoint naming

Naming = Literal["official", "diffusers"]

# (official, diffusers) renames inside a residual block.
_RESIDUAL_NAMES: tuple[tuple[str, str], ...] = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
# (official, diffusers) renames of whole prefixes, for both encoder and decoder.
_FIXED_NAMES: tuple[tuple[str, str], ...] = (
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    *(
        (f"{part}.{ours}", f"{part}.{theirs}")
        for part in ("encoder", "decoder")
        for ours, theirs in (
            ("conv1.", "conv_in."),
            ("head.0.", "norm_out."),
            ("head.2.", "conv_out."),
            ("middle.0.", "mid_block.resnets.0."),
            ("middle.1.", "mid_block.attentions.0."),
            ("middle.2.", "mid_block.resnets.1."),
        )
    ),
)
_DIFFUSERS_MARKERS = re.compile(
    r"^(quant_conv\.|post_quant_conv\.|(encoder|decoder)\."
    r"(conv_in|down_blocks|up_blocks|mid_block|norm_out|conv_out)\.)"
)
_OFFICIAL_MARKERS = re.compile(
    r"^(conv1\.|conv2\.|(encoder|decoder)\.(conv1|downsamples|upsamples|middle|head)\.)"
)
_UP_BLOCK = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$")
_UPSAMPLES = re.compile(r"^decoder\.upsamples\.(\d+)\.(.*)$")


def detect_naming(keys: Mapping[str, Any] | list[str]) -> Naming:
    """``"official"`` or ``"diffusers"``; :class:`CheckpointError` for mixed or unknown keys."""
    names = list(keys)
    diffusers = [k for k in names if _DIFFUSERS_MARKERS.match(k)]
    official = [k for k in names if _OFFICIAL_MARKERS.match(k)]
    if diffusers and official:
        raise CheckpointError(
            "Wan VAE checkpoint mixes the diffusers naming (e.g. "
            f"{diffusers[0]!r}) and the official naming (e.g. {official[0]!r})"
        )
    if diffusers:
        return "diffusers"
    if official:
        return "official"
    sample = ", ".join(repr(k) for k in sorted(names)[:5]) or "no keys at all"
    raise CheckpointError(
        "not a Wan VAE checkpoint: expected the official naming ('encoder.downsamples.N...', "
        "'decoder.upsamples.N...', 'conv1.weight') or the diffusers naming "
        "('encoder.down_blocks.N...', 'decoder.up_blocks.N...', 'quant_conv.weight'); "
        f"got {sample}"
    )


def _swap_prefix(key: str, pairs: tuple[tuple[str, str], ...], *, to_official: bool) -> str:
    for official, diffusers in pairs:
        old, new = (diffusers, official) if to_official else (official, diffusers)
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _rename_block_part(rest: str, *, to_official: bool) -> str:
    return _swap_prefix(rest, _RESIDUAL_NAMES, to_official=to_official)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported naming -> the official naming used by :class:`WanVAE` (same tensors)."""
    if detect_naming(state_dict) == "official":
        return dict(state_dict)
    # Flat index of decoder.up_blocks.i.resnets.j / .upsamplers.0 in the official upsamples.
    up_layout: dict[int, tuple[int, bool]] = {}  # block -> (resnets, has upsampler)
    for key in state_dict:
        if match := _UP_BLOCK.match(key):
            block = int(match.group(1))
            resnets, upsampler = up_layout.get(block, (0, False))
            if match.group(3) is not None:
                resnets = max(resnets, int(match.group(3)) + 1)
            else:
                upsampler = True
            up_layout[block] = (resnets, upsampler)
    offsets: dict[int, int] = {}
    offset = 0
    for block in sorted(up_layout):
        offsets[block] = offset
        offset += up_layout[block][0] + int(up_layout[block][1])
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = _swap_prefix(key, _FIXED_NAMES, to_official=True)
        if match := _UP_BLOCK.match(key):
            block, resnet = int(match.group(1)), match.group(3)
            index = offsets[block] + (int(resnet) if resnet is not None else up_layout[block][0])
            new_key = f"decoder.upsamples.{index}.{match.group(4)}"
        elif key.startswith("encoder.down_blocks."):
            new_key = "encoder.downsamples." + key[len("encoder.down_blocks.") :]
        head, sep, rest = _split_block(new_key)
        if sep:
            new_key = head + sep + _rename_block_part(rest, to_official=True)
        converted[new_key] = tensor
    return converted


def to_diffusers_naming(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official naming -> diffusers' ``AutoencoderKLWan`` naming (the inverse of conversion)."""
    if detect_naming(state_dict) == "diffusers":
        return dict(state_dict)
    # Group decoder.upsamples.N into up blocks: each Resample closes a block.
    entries: dict[int, bool] = {}  # N -> is a Resample
    for key in state_dict:
        if match := _UPSAMPLES.match(key):
            index, rest = int(match.group(1)), match.group(2)
            is_resample = rest.startswith(("resample.", "time_conv."))
            entries[index] = entries.get(index, False) or is_resample
    places: dict[int, str] = {}
    block, resnet = 0, 0
    for index in sorted(entries):
        if entries[index]:
            places[index] = f"decoder.up_blocks.{block}.upsamplers.0."
            block, resnet = block + 1, 0
        else:
            places[index] = f"decoder.up_blocks.{block}.resnets.{resnet}."
            resnet += 1
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        head, sep, rest = _split_block(key)
        if sep:
            key = head + sep + _rename_block_part(rest, to_official=False)
        if match := _UPSAMPLES.match(key):
            key = places[int(match.group(1))] + match.group(2)
        elif key.startswith("encoder.downsamples."):
            key = "encoder.down_blocks." + key[len("encoder.downsamples.") :]
        converted[_swap_prefix(key, _FIXED_NAMES, to_official=False)] = tensor
    return converted


_BLOCK_KEY = re.compile(r"^((?:encoder|decoder)\.(?:downsamples|upsamples|middle)\.\d+)(\.)(.*)$")


def _split_block(key: str) -> tuple[str, str, str]:
    """``encoder.downsamples.3.residual.2.weight`` -> (``encoder.downsamples.3``, ``.``, rest);
    ``("", "", "")`` for keys outside the official block lists."""
    match = _BLOCK_KEY.match(key)
    return (match.group(1), match.group(2), match.group(3)) if match else ("", "", "")
