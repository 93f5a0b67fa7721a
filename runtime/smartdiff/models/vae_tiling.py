"""Tiled, streamed decoding for the Wan VAEs (memory level 1): spatial tiles, frame by frame.

:class:`~smartdiff.models.wan_vae.WanVAE` and :class:`~smartdiff.models.wan22_vae.Wan22VAE`
call :func:`decode_tiled` from their ``decode`` when a :class:`VAETiling` is set (the backend
sets one at memory level >= 1). The untiled decode keeps, for every causal convolution, two
frames of its input at the layer's resolution (about 4.5 GB in bf16 for the Wan2.1 VAE at
1280x720) and runs the full-resolution layers on 4 frames at once; this module bounds both:

1. Trunk, untiled. The decoder's ``conv1`` and middle block (the only global operation, a
   per-frame attention) run on whole latent frames, one latent frame at a time with their own
   causal cache, exactly as in the untiled decode. Their output stays at latent resolution
   (small: ``[B, C, T, h, w]``).
2. Spatial tiles. The rest of the decoder (residual blocks, up-samplers, head) only mixes
   neighbouring positions, so it runs tile by tile on overlapping rectangles of the trunk's
   output, each tile with its own causal caches (freed before the next tile). Neighbouring
   tiles overlap by about ``overlap`` pixels and are blended there with complementary linear
   ramps (the weights of all tiles sum to one everywhere). A frame that fits in one tile is not
   split. With an overlap of at least twice the receptive field of those layers the result
   equals the untiled decode; with the default overlap it differs near tile seams only.
3. Few frames at a time (``stage_frames``). The decoder is cut into stages after every
   temporal up-sampler; each stage receives at most ``stage_frames`` frames per call with its
   own causal cache. A causal convolution over frames gives the same result whatever the
   chunking, and a stage's first call carries the first frame of the video (which the
   temporal up-samplers keep single, as on the first chunk of the untiled decode), so this
   part is exact.

A decoder takes part through the :class:`StagedDecoder` protocol (``trunk``, ``num_stages``,
``run_stage``). Output: written into a preallocated video, blended in the video's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from smartdiff.models.wan_vae import CausalCache


@dataclass(frozen=True, kw_only=True)
class VAETiling:
    """How a tiled decode splits the work.

    Args:
        tile_size: the largest tile side in output pixels, overlap included (halos are not); a
            frame whose side fits is not split along that side. Default 768: 1280x720 is cut
            into two tiles side by side.
        overlap: pixels shared by neighbouring tiles and blended with linear ramps; less than
            half of ``tile_size``; rounded down to whole latent positions.
        exact: give every tile a halo as wide as the receptive radius of the layers still to
            run (decoded, then cropped after each stage), so that tiles equal the untiled
            decode; ``False``: no halo, the seams are only blended (cheaper, approximate).
        stage_frames: frames per call of the layers after each temporal up-sampler (exact
            whatever the value): 2 (default) halves the working set of the full-resolution
            layers against the untiled decode's 4-frame chunks; 1 lowers it further but runs
            smaller, slower convolutions (1280x720x81 on an H200, two tiles: 4.47 s and
            4.4 GiB peak vs 3.90 s and 5.1 GiB, benchmarks/results/memory_levels_vae_h200.json);
            0 keeps the chunks as the up-samplers produce them.
    """

    tile_size: int = 768
    overlap: int = 32
    exact: bool = True
    stage_frames: int = 2

    def __post_init__(self) -> None:
        for name in ("tile_size", "overlap", "stage_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"VAETiling.{name} must be an int >= 0, got {value!r}")
        if self.tile_size < 16:
            raise ValueError(f"VAETiling.tile_size must be >= 16 pixels, got {self.tile_size}")
        if 2 * self.overlap >= self.tile_size:
            raise ValueError(
                f"VAETiling.overlap={self.overlap} must be less than half of "
                f"tile_size={self.tile_size}"
            )
        if not isinstance(self.exact, bool):
            raise ValueError(f"VAETiling.exact must be a bool, got {self.exact!r}")

    def latent_tile(self, scale: int) -> tuple[int, int]:
        """``(tile, overlap)`` in latent positions for a VAE of spatial compression ``scale``."""
        tile = max(1, self.tile_size // scale)
        overlap = min(self.overlap // scale, max(0, (tile - 1) // 2))
        return tile, overlap


class StagedDecoder(Protocol):
    """A VAE decoder cut into a trunk (global, run untiled) and spatially local stages.

    ``run_stage(i, ...)`` for ``i`` in ``range(num_stages)`` chained after ``trunk`` must be the
    decoder's forward; every stage but the last ends with a temporal up-sampler. Each call
    uses one :class:`CausalCache` per trunk or stage, in the same operation order every call;
    ``first_chunk`` is true on a stage's first call (the video's first frame).
    ``stage_scales[i]``: output positions of stage ``i`` per latent position;
    ``stage_radii[i]``: its spatial receptive radius in latent positions.
    """

    stage_scales: tuple[int, ...]
    stage_radii: tuple[float, ...]

    def trunk(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor: ...

    @property
    def num_stages(self) -> int: ...

    def run_stage(
        self, index: int, x: torch.Tensor, cache: CausalCache, first_chunk: bool
    ) -> torch.Tensor: ...


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Evenly spread ``[start, stop)`` spans of at most ``tile`` covering ``range(length)``,
    neighbours sharing at least about ``overlap`` positions; one span if ``length <= tile``."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)
    starts = [round(k * (length - size) / (count - 1)) for k in range(count)]
    return [(start, start + size) for start in starts]


def blend_ramps(spans: list[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """Per span, fp32 weights over its ``scale * (stop - start)`` pixels: 1 inside, linear
    ramps across each overlap with a neighbour, complementary so that weights sum to 1."""
    ramps = []
    for k, (start, stop) in enumerate(spans):
        weight = torch.ones(scale * (stop - start))
        if k > 0:
            shared = scale * max(0, spans[k - 1][1] - start)
            if shared:
                weight[:shared] *= (torch.arange(shared) + 0.5) / shared
        if k + 1 < len(spans):
            shared = scale * max(0, stop - spans[k + 1][0])
            if shared:
                weight[weight.numel() - shared :] *= 1.0 - (torch.arange(shared) + 0.5) / shared
        ramps.append(weight)
    return ramps


@dataclass(frozen=True)
class AxisPlan:
    """One tile along one axis: the trunk slice it reads, and after each stage the slice of
    that stage's output kept for the next stage (the last one: the tile's core)."""

    trunk: slice
    crops: tuple[slice, ...]


def plan_axis(span: tuple[int, int], length: int, decoder: StagedDecoder, exact: bool) -> AxisPlan:
    """Regions of a tile with core ``span`` (latent positions) along an axis of ``length``."""
    core_start, core_stop = span
    scales, radii = decoder.stage_scales, decoder.stage_radii

    def region(stage: int) -> tuple[int, int]:
        """Input region of ``stage`` in its own input resolution (halo included, clipped)."""
        factor = 1 if stage == 0 else scales[stage - 1]
        halo = math.ceil(sum(radii[stage:]) * factor) if exact else 0
        return max(0, core_start * factor - halo), min(length * factor, core_stop * factor + halo)

    regions = [region(stage) for stage in range(len(scales))]
    crops = []
    for stage, (low, _) in enumerate(regions):
        factor_in = 1 if stage == 0 else scales[stage - 1]
        produced_start = low * (scales[stage] // factor_in)
        if stage + 1 < len(regions):
            keep_start, keep_stop = regions[stage + 1]
        else:
            keep_start, keep_stop = core_start * scales[stage], core_stop * scales[stage]
        crops.append(slice(keep_start - produced_start, keep_stop - produced_start))
    return AxisPlan(trunk=slice(*regions[0]), crops=tuple(crops))


class _TileWriter:
    """Writes (or blends) one tile's decoded frames into the output video, in time order."""

    def __init__(
        self,
        out: torch.Tensor,
        rows: tuple[int, int],
        cols: tuple[int, int],
        weight: torch.Tensor | None,
        finish: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.out, self.rows, self.cols = out, rows, cols
        self.weight, self.finish = weight, finish
        self.frame = 0

    def write(self, frames: torch.Tensor) -> None:
        pixels = self.finish(frames)
        count = pixels.shape[2]
        target = self.out[
            :,
            :,
            self.frame : self.frame + count,
            self.rows[0] : self.rows[1],
            self.cols[0] : self.cols[1],
        ]
        if target.shape != pixels.shape:
            raise RuntimeError(
                f"tiled decode: a tile decoded to {tuple(pixels.shape)}, expected "
                f"{tuple(target.shape)}"
            )
        if self.weight is None:
            target.copy_(pixels.clamp_(-1.0, 1.0))
        else:
            target.add_(pixels.to(self.out.dtype) * self.weight)
        self.frame += count


class _StageRunner:
    """Feeds chunks through the stages of one tile, each stage with its own causal cache,
    cropping each stage's output to what the next stage needs."""

    def __init__(
        self,
        decoder: StagedDecoder,
        rows: AxisPlan,
        cols: AxisPlan,
        stage_frames: int,
        writer: _TileWriter,
    ) -> None:
        self.decoder = decoder
        self.crops = list(zip(rows.crops, cols.crops, strict=True))
        self.stage_frames = stage_frames
        self.writer = writer
        self.caches = [CausalCache() for _ in range(decoder.num_stages)]
        self.started = [False] * decoder.num_stages

    def feed(self, index: int, x: torch.Tensor) -> None:
        cache = self.caches[index]
        cache.start_chunk()
        y = self.decoder.run_stage(index, x, cache, not self.started[index])
        self.started[index] = True
        row_crop, col_crop = self.crops[index]
        y = y[:, :, :, row_crop, col_crop]
        if index + 1 == len(self.caches):
            self.writer.write(y)
        elif self.stage_frames:
            for start in range(0, y.shape[2], self.stage_frames):
                self.feed(index + 1, y[:, :, start : start + self.stage_frames].contiguous())
        else:
            self.feed(index + 1, y.contiguous())


def decode_tiled(
    decoder: StagedDecoder,
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: int,
    tiling: VAETiling,
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode ``x [B, z, T, h, w]`` (after the VAE's ``conv2``) into ``out``, see the module doc.

    Args:
        decoder: the decoder, cut into trunk and stages.
        x: the latents, already through the post-quantization convolution.
        out: the preallocated video ``[B, 3, F, scale*h, scale*w]``; filled and clamped to
            ``[-1, 1]`` in place, and returned.
        scale: video pixels per latent position (the VAE's spatial compression).
        tiling: tile size, overlap, halos, frames per stage call.
        finish: maps the decoder's output frames to video pixels (Wan2.2: unpatchify).
    """
    finish = finish or (lambda frames: frames)
    batch, _, frames, height, width = x.shape
    cache = CausalCache()
    trunk: torch.Tensor | None = None
    for i in range(frames):  # untiled, one latent frame at a time, as the untiled decode
        cache.start_chunk()
        y = decoder.trunk(x[:, :, i : i + 1], cache)
        if trunk is None:
            trunk = y.new_empty(batch, y.shape[1], frames, height, width)
        trunk[:, :, i : i + 1] = y
    del cache
    assert trunk is not None
    tile, overlap = tiling.latent_tile(scale)
    rows, cols = tile_spans(height, tile, overlap), tile_spans(width, tile, overlap)
    row_ramps, col_ramps = blend_ramps(rows, scale), blend_ramps(cols, scale)
    single = len(rows) == len(cols) == 1
    if not single:
        out.zero_()
    for row, row_ramp in zip(rows, row_ramps, strict=True):
        row_plan = plan_axis(row, height, decoder, tiling.exact)
        for col, col_ramp in zip(cols, col_ramps, strict=True):
            col_plan = plan_axis(col, width, decoder, tiling.exact)
            weight = None
            if not single:
                weight = (row_ramp[:, None] * col_ramp[None, :]).to(out.device, out.dtype)
            writer = _TileWriter(
                out,
                (scale * row[0], scale * row[1]),
                (scale * col[0], scale * col[1]),
                weight,
                finish,
            )
            runner = _StageRunner(decoder, row_plan, col_plan, tiling.stage_frames, writer)
            for i in range(frames):
                runner.feed(0, trunk[:, :, i : i + 1, row_plan.trunk, col_plan.trunk].contiguous())
            if writer.frame != out.shape[2]:
                raise RuntimeError(
                    f"tiled decode produced {writer.frame} frames, expected {out.shape[2]}"
                )
            del runner, writer
    if not single:
        out.clamp_(-1.0, 1.0)
    return out
