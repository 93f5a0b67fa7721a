"""The Wan2.2 video VAE (TI2V-5B): 48 latent channels, 4x16x16 compression.

Used by the ``wan2.2-ti2v`` model family: the generator decodes the denoised latents with
:meth:`Wan22VAE.decode` (after :meth:`Wan22VAE.denormalize_latents`) and, for image-to-video,
encodes the conditioning image with :meth:`Wan22VAE.encode`. Weights load from the official
``Wan2.2_VAE.pth`` (whose naming this module uses) or from diffusers' ``AutoencoderKLWan``
with ``is_residual=True`` (converted by :func:`convert_state_dict`).

Differences from the Wan2.1 VAE (:mod:`smartdiff.models.wan_vae`, whose building blocks and
causal cache are reused, so the chunked causal semantics are the same):

- pixels are patchified first: ``[B, 3, T, H, W]`` -> ``[B, 12, T, H/2, W/2]`` (channel
  ``c*4 + pw*2 + ph``), and the decoder's 12 output channels are unpatchified back;
- every encoder level is a :class:`DownResidualBlock`: residual blocks and a down-sampler plus
  a parameter-free shortcut that averages space-time neighbourhoods into channels
  (:class:`AvgDown3D`); every decoder level an :class:`UpResidualBlock` whose shortcut
  duplicates channels into space-time (:class:`DupUp3D`); the up-samplers keep the channels;
- the decoder has its own width (``decoder_base_dim``, 256 vs the encoder's 160).

Shapes (defaults): ``encode`` video ``[B, 3, 1 + 4k, H, W]`` (H, W multiples of 16) ->
latents ``[B, 48, 1 + k, H/16, W/16]``; ``decode`` the reverse, clamped to [-1, 1]. The tiled
decode of :mod:`smartdiff.models.vae_tiling` applies (memory level >= 1).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from smartdiff.io.checkpoints import CheckpointError
from smartdiff.models.wan_vae import (
    _FIXED_NAMES,
    _RESIDUAL_NAMES,
    CausalCache,
    CausalConv3d,
    LatentNormalization,
    Resample,
    ResidualBlock,
    _head,
    _middle,
    _read_weights,
    _run_head,
    _run_middle,
    _swap_prefix,
    check_vae_config,
    decode_chunks,
    load_vae_weights,
)

if TYPE_CHECKING:
    from smartdiff.models.vae_tiling import VAETiling

# The published latent statistics of the Wan2.2 VAE (official ``wan/modules/vae2_2.py``).
# fmt: off
WAN22_LATENTS_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
# fmt: on


@dataclass(frozen=True, kw_only=True)
class Wan22VAEConfig:
    """Architecture of a Wan2.2 VAE (diffusers' ``AutoencoderKLWan`` with ``is_residual``).

    Args:
        base_dim: encoder channels of the first level (level ``i``: ``base_dim * dim_mult[i]``).
        decoder_base_dim: the same for the decoder.
        z_dim: latent channels.
        dim_mult: channel multiplier of each resolution level.
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
        temperal_downsample: per level transition, whether the encoder also halves time.
        patch_size: pixel patch folded into channels before the encoder (2 -> 12 channels).
        dropout: dropout of the residual blocks (inactive in inference).
        latents_mean / latents_std: per-channel statistics used to (de)normalize latents.
    """

    base_dim: int = 160
    decoder_base_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN22_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN22_LATENTS_STD

    def __post_init__(self) -> None:
        check_vae_config(
            self,
            "Wan22VAEConfig",
            ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "patch_size"),
        )

    @property
    def patch_channels(self) -> int:
        """Channels of a patchified frame: ``3 * patch_size**2``."""
        return 3 * self.patch_size**2

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent position along H and W (16 for Wan2.2)."""
        return self.patch_size << (len(self.dim_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        """Video frames per latent frame after the first one (4 for Wan2.2)."""
        return 1 << sum(self.temperal_downsample)

    def num_video_frames(self, latent_frames: int) -> int:
        """Frames decoded from ``latent_frames`` latent frames: ``1 + r * (latent_frames - 1)``."""
        return 1 + self.temporal_compression * (latent_frames - 1)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> Wan22VAEConfig:
        """Read an ``AutoencoderKLWan`` ``config.json`` of a Wan2.2 VAE (``is_residual``)."""
        if not config.get("is_residual", False):
            raise ValueError("diffusers VAE config is_residual is not true: not a Wan2.2 VAE")
        patch = int(config.get("patch_size") or 1)
        for key in ("in_channels", "out_channels"):
            if config.get(key, 3 * patch * patch) != 3 * patch * patch:
                raise ValueError(
                    f"diffusers VAE config {key}={config[key]!r} must be 3 * patch_size**2 = "
                    f"{3 * patch * patch}"
                )
        values = {
            name: config[name]
            for name in (
                "base_dim",
                "z_dim",
                "dim_mult",
                "num_res_blocks",
                "temperal_downsample",
                "dropout",
                "latents_mean",
                "latents_std",
            )
            if name in config
        }
        values["decoder_base_dim"] = config.get("decoder_base_dim") or config.get("base_dim", 160)
        return cls(patch_size=patch, **values)


# ------------------------------------------------------------------------------- helpers


def patchify(video: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B, C*p*p, T, H/p, W/p]``, channel ``c*p*p + pw*p + ph``."""
    b, c, t, h, w = video.shape
    x = video.view(b, c, t, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * patch * patch, t, h // patch, w // patch)


def unpatchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    b, cp, t, h, w = x.shape
    c = cp // (patch * patch)
    x = x.view(b, c, patch, patch, t, h, w)  # (c, pw, ph, ...)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c, t, h * patch, w * patch)


class AvgDown3D(nn.Module):
    """Shortcut of a down level: space-time blocks ``ft x fs x fs`` folded into channels and
    averaged in groups down to ``out_dim`` channels (time zero-padded on the left)."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if in_dim * factor % out_dim:
            raise ValueError(
                f"AvgDown3D: in_dim*{factor}={in_dim * factor} is not a multiple "
                f"of out_dim={out_dim}"
            )
        self.group = in_dim * factor // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Shortcut of an up level: channels repeated and unfolded into ``ft x fs x fs`` space-time
    blocks; on the first chunk the first ``ft - 1`` frames are dropped (one frame stays one)."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if out_dim * factor % in_dim:
            raise ValueError(
                f"DupUp3D: out_dim*{factor}={out_dim * factor} is not a multiple of in_dim={in_dim}"
            )
        self.repeats = out_dim * factor // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk else x


# -------------------------------------------------------------------------------- blocks


class DownResidualBlock(nn.Module):
    """One encoder level: residual blocks and a down-sampler, plus an :class:`AvgDown3D`
    shortcut (official names ``downsamples.N``, ``avg_shortcut``)."""

    def __init__(
        self, in_dim: int, out_dim: int, config: Wan22VAEConfig, *, time: bool, down: bool
    ) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if time else 1, 2 if down else 1)
        blocks: list[nn.Module] = []
        for _ in range(config.num_res_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
            in_dim = out_dim
        if down:
            blocks.append(Resample(out_dim, "downsample3d" if time else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for block in self.downsamples:
            x = block(x, cache)
        return x + shortcut


class UpResidualBlock(nn.Module):
    """One decoder level: residual blocks and an up-sampler keeping the channels, plus a
    :class:`DupUp3D` shortcut (official names ``upsamples.N``, ``avg_shortcut``)."""

    def __init__(
        self, in_dim: int, out_dim: int, config: Wan22VAEConfig, *, time: bool, up: bool
    ) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if time else 1, 2) if up else None
        blocks: list[nn.Module] = []
        for _ in range(config.num_res_blocks + 1):
            blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
            in_dim = out_dim
        if up:
            blocks.append(Resample(out_dim, "upsample3d" if time else "upsample2d", out_dim))
        self.upsamples = nn.ModuleList(blocks)
        self.time = time
        self.up = up

    def forward(self, x: torch.Tensor, cache: CausalCache, first_chunk: bool) -> torch.Tensor:
        shortcut = x
        for block in self.upsamples:
            x = block(x, cache)
        if self.avg_shortcut is not None:
            x = x + self.avg_shortcut(shortcut, first_chunk)
        return x


class Encoder3d(nn.Module):
    """Patchified video chunk ``[B, 12, t, H/2, W/2]`` -> ``[B, 2*z_dim, t', H/16, W/16]``."""

    def __init__(self, config: Wan22VAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(config.patch_channels, dims[0], 3, padding=1)
        last = len(config.dim_mult) - 1
        self.downsamples = nn.ModuleList(
            DownResidualBlock(
                in_dim,
                out_dim,
                config,
                time=level != last and config.temperal_downsample[level],
                down=level != last,
            )
            for level, (in_dim, out_dim) in enumerate(pairwise(dims))
        )
        self.middle = _middle(dims[-1], config.dropout)
        self.head = _head(dims[-1], 2 * config.z_dim)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        return _run_head(self.head, _run_middle(self.middle, x, cache), cache)


class Decoder3d(nn.Module):
    """Latent chunk ``[B, z_dim, t, h, w]`` -> patchified frames ``[B, 12, t', 8h, 8w]``.

    Also a :class:`~smartdiff.models.vae_tiling.StagedDecoder`: trunk (``conv1``, middle),
    then stages cut after every level that up-samples time (the last one with the head).
    """

    def __init__(self, config: Wan22VAEConfig) -> None:
        super().__init__()
        mults = config.dim_mult
        dims = [config.decoder_base_dim * m for m in (mults[-1], *reversed(mults))]
        temporal_upsample = tuple(reversed(config.temperal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], config.dropout)
        last = len(mults) - 1
        self.upsamples = nn.ModuleList(
            UpResidualBlock(
                in_dim,
                out_dim,
                config,
                time=level != last and temporal_upsample[level],
                up=level != last,
            )
            for level, (in_dim, out_dim) in enumerate(pairwise(dims))
        )
        self.head = _head(dims[-1], config.patch_channels)
        cuts = [i + 1 for i, block in enumerate(self.upsamples) if block.time]
        self._stages = tuple(pairwise([0, *cuts, len(self.upsamples)]))
        self.stage_scales, self.stage_radii = self._stage_geometry(config)

    def _stage_geometry(self, config: Wan22VAEConfig) -> tuple[tuple[int, ...], tuple[float, ...]]:
        scales, radii = [], []
        factor = 1
        for index, (start, stop) in enumerate(self._stages):
            radius = 0.0
            for level in range(start, stop):
                radius += 2.0 * (config.num_res_blocks + 1) / factor
                if self.upsamples[level].up:
                    radius += 1.0 / factor  # nearest-neighbour rounding
                    factor *= 2
                    radius += 1.0 / factor
            if index == len(self._stages) - 1:
                radius += 1.0 / factor
            scales.append(factor)
            radii.append(radius)
        return tuple(scales), tuple(radii)

    def forward(self, x: torch.Tensor, cache: CausalCache, first_chunk: bool) -> torch.Tensor:
        x = self.trunk(x, cache)
        for block in self.upsamples:
            x = block(x, cache, first_chunk)
        return _run_head(self.head, x, cache)

    def trunk(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return _run_middle(self.middle, self.conv1(x, cache), cache)

    @property
    def num_stages(self) -> int:
        return len(self._stages)

    def run_stage(
        self, index: int, x: torch.Tensor, cache: CausalCache, first_chunk: bool
    ) -> torch.Tensor:
        start, stop = self._stages[index]
        for block in self.upsamples[start:stop]:
            x = block(x, cache, first_chunk)
        if index == len(self._stages) - 1:
            x = _run_head(self.head, x, cache)
        return x


# --------------------------------------------------------------------------------- model


class Wan22VAE(LatentNormalization, nn.Module):
    """The Wan2.2 VAE; same interface as :class:`~smartdiff.models.wan_vae.WanVAE`."""

    config: Wan22VAEConfig

    def __init__(self, config: Wan22VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self.tiling: VAETiling | None = None  # set by the backend at memory level >= 1

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Posterior mean ``[B, z, 1 + k, H/16, W/16]`` of ``video [B, 3, 1 + 4k, H, W]``."""
        r, s = self.config.temporal_compression, self.config.spatial_compression
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(
                f"Wan22VAE.encode expects video [B, 3, T, H, W], got {tuple(video.shape)}"
            )
        frames, height, width = video.shape[2:]
        if (frames - 1) % r or height % s or width % s:
            raise ValueError(
                f"Wan22VAE.encode: video of {frames} frames of {height}x{width}; "
                f"allowed: 1 + {r}*k frames, height and width multiples of {s}"
            )
        x = patchify(video.to(device=self.device, dtype=self.dtype), self.config.patch_size)
        cache = CausalCache()
        chunks = []
        for start in range(0, frames, r):
            cache.start_chunk()
            chunk = x[:, :, :1] if start == 0 else x[:, :, start - r + 1 : start + 1]
            chunks.append(self.encoder(chunk, cache))
        moments = torch.cat(chunks, dim=2)
        z = self.config.z_dim
        bias = self.conv1.bias
        return F.conv3d(moments, self.conv1.weight[:z], None if bias is None else bias[:z])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiling: VAETiling | None = None) -> torch.Tensor:
        """Video ``[B, 3, 1 + 4(T-1), 16h, 16w]`` in [-1, 1] from raw ``latents [B, z, T, h, w]``
        (tiled with ``tiling``, or :attr:`tiling` when ``None``)."""
        tiling = self.tiling if tiling is None else tiling
        if latents.dim() != 5 or latents.shape[1] != self.config.z_dim:
            raise ValueError(
                f"Wan22VAE.decode expects latents [B, {self.config.z_dim}, T, h, w], "
                f"got {tuple(latents.shape)}"
            )
        b, _, t, h, w = latents.shape
        s, p = self.config.spatial_compression, self.config.patch_size
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

            return decode_tiled(
                self.decoder,
                x,
                video,
                scale=s,
                tiling=tiling,
                finish=lambda frames: unpatchify(frames, p),
            )
        return decode_chunks(
            lambda chunk, cache, i: unpatchify(self.decoder(chunk, cache, i == 0), p), x, video
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        config: Wan22VAEConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Wan22VAE:
        """Build on the meta device and load ``Wan2.2_VAE.pth`` (official naming) or a
        diffusers ``vae/`` folder / safetensors file (diffusers naming)."""
        with torch.device("meta"):
            model = cls(config).to(dtype)
        return load_vae_weights(model, convert_state_dict(_read_weights(Path(path))), path, device)


# -------------------------------------------------------------------- checkpoint naming

_DIFFUSERS_BLOCK = re.compile(
    r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets\.(\d+)|downsampler|upsampler)"
    r"\.(.*)$"
)
_OFFICIAL_BLOCK = re.compile(
    r"^(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.\2\.(\d+)\.(.*)$"
)
_OFFICIAL_MIDDLE = re.compile(r"^((?:encoder|decoder)\.middle\.\d+\.)(.*)$")


def detect_naming(keys: Mapping[str, Any] | list[str]) -> str:
    """``"official"`` (``Wan2.2_VAE.pth``) or ``"diffusers"``; :class:`CheckpointError` else."""
    names = list(keys)
    diffusers = any(
        k.startswith(("quant_conv.", "post_quant_conv.")) or ".up_blocks." in k for k in names
    )
    official = any(k.startswith(("conv1.", "conv2.")) or _OFFICIAL_BLOCK.match(k) for k in names)
    if diffusers != official:
        return "diffusers" if diffusers else "official"
    sample = ", ".join(repr(k) for k in sorted(names)[:5]) or "no keys at all"
    raise CheckpointError(
        "not a Wan2.2 VAE checkpoint in one naming: expected the official naming "
        "('decoder.upsamples.N.upsamples.M...', 'conv1.weight') or the diffusers naming "
        f"('decoder.up_blocks.N.resnets.M...', 'quant_conv.weight'); got {sample}"
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported naming -> the official naming used by :class:`Wan22VAE` (same tensors)."""
    if detect_naming(state_dict) == "official":
        return dict(state_dict)
    resnets: dict[tuple[str, int], int] = {}
    for key in state_dict:
        match = _DIFFUSERS_BLOCK.match(key)
        if match and match.group(5) is not None:
            where = (match.group(1), int(match.group(3)))
            resnets[where] = max(resnets.get(where, 0), int(match.group(5)) + 1)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _DIFFUSERS_BLOCK.match(key)
        if match:
            part, level, rest = match.group(1), int(match.group(3)), match.group(6)
            group = "downsamples" if part == "encoder" else "upsamples"
            if match.group(5) is not None:
                index = int(match.group(5))
                rest = _swap_prefix(rest, _RESIDUAL_NAMES, to_official=True)
            else:
                index = resnets.get((part, level), 0)
            converted[f"{part}.{group}.{level}.{group}.{index}.{rest}"] = tensor
        else:
            converted[
                _middle_names(_swap_prefix(key, _FIXED_NAMES, to_official=True), to_official=True)
            ] = tensor
    return converted


def to_diffusers_naming(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official naming -> diffusers' ``AutoencoderKLWan`` naming (inverse of conversion)."""
    if detect_naming(state_dict) == "diffusers":
        return dict(state_dict)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _OFFICIAL_BLOCK.match(key)
        if match:
            part, level, index, rest = match.group(1), match.group(3), match.group(4), match[5]
            blocks = "down_blocks" if part == "encoder" else "up_blocks"
            if rest.startswith(("resample.", "time_conv.")):
                sampler = "downsampler" if part == "encoder" else "upsampler"
                converted[f"{part}.{blocks}.{level}.{sampler}.{rest}"] = tensor
            else:
                rest = _swap_prefix(rest, _RESIDUAL_NAMES, to_official=False)
                converted[f"{part}.{blocks}.{level}.resnets.{index}.{rest}"] = tensor
        else:
            key = _middle_names(key, to_official=False)
            converted[_swap_prefix(key, _FIXED_NAMES, to_official=False)] = tensor
    return converted


def _middle_names(key: str, *, to_official: bool) -> str:
    """Rename the residual-block parts of an official ``{encoder,decoder}.middle.N.`` key."""
    match = _OFFICIAL_MIDDLE.match(key)
    if not match:
        return key
    return match.group(1) + _swap_prefix(match.group(2), _RESIDUAL_NAMES, to_official=to_official)
