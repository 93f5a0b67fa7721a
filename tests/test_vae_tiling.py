"""Tiled VAE decoding (``smartdiff.models.vae_tiling``, memory level 1) against the untiled one.

Small Wan2.1 and Wan2.2 VAEs with seeded random weights (every parameter random, as in
``test_wan_vae.py``), built by diffusers' ``AutoencoderKLWan`` and loaded into ours. The tiled
decode must equal our untiled decode and diffusers' ``decode`` within a relative 1e-5 (fp32,
CPU): frame by frame alone, and with a grid of several spatial tiles (exact halos, blended
overlaps, uneven spans, batch of 2). Controls: the same tiles without halos differ by more
than a hundred times the tolerance (so the comparison can fail), and blending the overlaps
makes that approximate decode closer than butting tiles without overlap.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import AutoencoderKLWan

from smartdiff.models import wan22_vae, wan_vae
from smartdiff.models.vae_tiling import VAETiling, blend_ramps, tile_spans
from smartdiff.models.wan22_vae import Wan22VAE, Wan22VAEConfig
from smartdiff.models.wan_vae import WanVAE, WanVAEConfig

TOLERANCE = 1e-5

WAN21: dict[str, Any] = dict(
    base_dim=4,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
)
WAN22: dict[str, Any] = dict(
    base_dim=4,
    decoder_base_dim=6,
    z_dim=6,
    dim_mult=[1, 1, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    latents_mean=[0.0] * 6,
    latents_std=[1.0] * 6,
)


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)


@pytest.fixture(scope="module")
def wan21() -> tuple[AutoencoderKLWan, WanVAE]:
    reference = AutoencoderKLWan(**WAN21).eval()
    _randomize(reference, 0)
    ours = WanVAE(WanVAEConfig.from_diffusers_config(WAN21)).eval()
    ours.load_state_dict(wan_vae.convert_state_dict(reference.state_dict()), strict=True)
    return reference, ours


@pytest.fixture(scope="module")
def wan22() -> tuple[AutoencoderKLWan, Wan22VAE]:
    reference = AutoencoderKLWan(**WAN22).eval()
    _randomize(reference, 1)
    ours = Wan22VAE(Wan22VAEConfig.from_diffusers_config(WAN22)).eval()
    ours.load_state_dict(wan22_vae.convert_state_dict(reference.state_dict()), strict=True)
    return reference, ours


def _latents(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_frame_by_frame_alone_is_exact(wan21: tuple[AutoencoderKLWan, WanVAE]) -> None:
    reference, ours = wan21
    latents = _latents((1, 4, 3, 5, 7), 0)
    untiled = ours.decode(latents)
    tiled = ours.decode(latents, VAETiling(tile_size=4096, overlap=0))
    assert _relative_error(tiled, untiled) <= 1e-6
    with torch.no_grad():
        expected = reference.decode(latents).sample
    assert _relative_error(tiled, expected) <= TOLERANCE


@pytest.mark.parametrize("stage_frames", [1, 2, 0])
def test_tiled_wan21_equals_untiled_and_diffusers(
    wan21: tuple[AutoencoderKLWan, WanVAE], stage_frames: int
) -> None:
    reference, ours = wan21
    latents = _latents((2, 4, 3, 14, 27), 1)  # 112x216 pixels: 2 x 4 tiles, uneven spans
    tiling = VAETiling(tile_size=64, overlap=16, stage_frames=stage_frames)
    tile, overlap = tiling.latent_tile(8)
    assert len(tile_spans(14, tile, overlap)) >= 2 and len(tile_spans(27, tile, overlap)) >= 4
    untiled = ours.decode(latents)
    tiled = ours.decode(latents, tiling)
    with torch.no_grad():
        expected = reference.decode(latents).sample
    assert (expected.abs() >= 1.0).float().mean() < 0.25  # signal, not a saturated clamp
    assert _relative_error(tiled, untiled) <= TOLERANCE
    assert _relative_error(tiled, expected) <= TOLERANCE


def test_tiled_wan22_equals_untiled_and_diffusers(
    wan22: tuple[AutoencoderKLWan, Wan22VAE],
) -> None:
    reference, ours = wan22
    latents = _latents((1, 6, 3, 7, 11), 2)  # 112x176 pixels at 16x compression
    tiling = VAETiling(tile_size=64, overlap=16)
    untiled = ours.decode(latents)
    tiled = ours.decode(latents, tiling)
    with torch.no_grad():
        expected = reference.decode(latents).sample
    assert _relative_error(untiled, expected) <= TOLERANCE
    assert _relative_error(tiled, untiled) <= TOLERANCE
    assert _relative_error(tiled, expected) <= TOLERANCE


def test_tiles_without_halo_differ_and_blending_helps(
    wan21: tuple[AutoencoderKLWan, WanVAE],
) -> None:
    """Controls: without halos the seams are wrong (the test above can fail); blending the
    overlaps is closer to the untiled decode than butting tiles edge to edge."""
    _, ours = wan21
    latents = _latents((1, 4, 2, 12, 24), 3)
    untiled = ours.decode(latents)
    blended = ours.decode(latents, VAETiling(tile_size=96, overlap=32, exact=False))
    butted = ours.decode(latents, VAETiling(tile_size=96, overlap=0, exact=False))
    blended_error = _relative_error(blended, untiled)
    assert blended_error > 100 * TOLERANCE
    assert blended_error < _relative_error(butted, untiled)


def test_tiled_decode_is_the_default_when_set_on_the_model(
    wan21: tuple[AutoencoderKLWan, WanVAE],
) -> None:
    _, ours = wan21
    latents = _latents((1, 4, 2, 6, 20), 4)
    ours.tiling = VAETiling(tile_size=48, overlap=16, exact=False)
    try:
        from_attribute = ours.decode(latents)
    finally:
        ours.tiling = None
    explicit = ours.decode(latents, VAETiling(tile_size=48, overlap=16, exact=False))
    assert torch.equal(from_attribute, explicit)
    assert _relative_error(from_attribute, ours.decode(latents)) > 100 * TOLERANCE


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(27, 8, 2), (90, 96, 4), (160, 96, 4), (10, 3, 1), (45, 12, 0)]
)
def test_spans_cover_and_ramps_sum_to_one(length: int, tile: int, overlap: int) -> None:
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(stop - start <= tile for start, stop in spans)
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        assert stop - start >= max(0, overlap - 1)  # shared positions (rounding: -1)
    total = torch.zeros(4 * length)
    for (start, stop), ramp in zip(spans, blend_ramps(spans, 4), strict=True):
        total[4 * start : 4 * stop] += ramp
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tile_size": 8}, "tile_size"),
        ({"overlap": -1}, "overlap"),
        ({"tile_size": 64, "overlap": 32}, "overlap"),
        ({"exact": 1}, "exact"),
        ({"stage_frames": -1}, "stage_frames"),
        ({"stage_frames": True}, "stage_frames"),
    ],
)
def test_tiling_rejects_bad_settings_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"VAETiling.{field}"):
        VAETiling(**kwargs)


@pytest.mark.parametrize("model", ["wan21", "wan22"])
def test_fused_norm_silu_is_closer_to_fp32_and_tiles_equally(
    model: str, request: pytest.FixtureRequest
) -> None:
    """The compiled norm + SiLU (on by default on CUDA): in fp32 the same decode as the op-by-op
    path; in bf16 at least as close to the fp32 decode (one rounding instead of three), and the
    tiled decode with it equals the untiled one as closely as without it."""
    import copy

    _, fp32 = request.getfixturevalue(model)
    vae = copy.deepcopy(fp32)
    latents = _latents((1, vae.config.z_dim, 3, 6, 9), 7)
    reference = fp32.decode(latents)
    wan_vae.fuse_norm_silu(vae)
    assert sum(norm.fused_silu is not None for norm in vae.modules() if hasattr(norm, "gamma"))
    assert _relative_error(vae.decode(latents), reference) <= TOLERANCE
    vae.to(torch.bfloat16)
    fused = vae.decode(latents.bfloat16())
    fused_tiled = vae.decode(latents.bfloat16(), VAETiling(tile_size=64, overlap=16))
    wan_vae.fuse_norm_silu(vae, enabled=False)
    eager = vae.decode(latents.bfloat16())
    assert _relative_error(fused, reference) <= _relative_error(eager, reference)
    assert _relative_error(fused_tiled, fused) <= 2e-2  # bf16 convolutions over other shapes
    assert _relative_error(fused, eager) > 0  # the fused path did run
