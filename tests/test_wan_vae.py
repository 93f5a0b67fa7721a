"""Reference equivalence of the Wan2.1 VAE (``smartdiff.models.wan_vae``) with diffusers.

Tiny ``AutoencoderKLWan`` models with seeded random weights are saved with ``save_pretrained``,
loaded by :meth:`WanVAE.from_checkpoint` (diffusers naming, converted), and must decode and
encode like diffusers (relative error <= 1e-5, fp32 on CPU). The official naming is checked
against diffusers' own official-to-diffusers converter, and the latent (de)normalization against
the formulas of diffusers' Wan pipelines on the published statistics.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import load_file, save_file

from smartdiff.io.checkpoints import CheckpointError
from smartdiff.models.wan_vae import (
    WanVAE,
    WanVAEConfig,
    convert_state_dict,
    detect_naming,
    to_diffusers_naming,
)

TOLERANCE = 1e-5

# The real Wan2.1 layout, shrunk: dim_mult (1, 2, 4, 4), 2 residual blocks, time (F, T, T).
WAN21_SHAPED: dict[str, Any] = dict(
    base_dim=4,
    z_dim=4,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 0.5, 2.0, 1.0],
)
# diffusers' own tiny test config: odd channels (3, halved to 1 by the upsamplers), z_dim 16
# with the published statistics.
DIFFUSERS_TINY: dict[str, Any] = dict(
    base_dim=3,
    z_dim=16,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)
# Temporal downsampling on other levels than Wan2.1's.
TIME_FIRST: dict[str, Any] = dict(
    base_dim=4,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[True, True, False],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
)
CONFIGS = {"wan21_shaped": WAN21_SHAPED, "diffusers_tiny": DIFFUSERS_TINY, "time_first": TIME_FIRST}


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def _reference(config: dict[str, Any], seed: int = 0) -> AutoencoderKLWan:
    """A diffusers VAE with every parameter random (variance-preserving scale, random gammas)."""
    model = AutoencoderKLWan(**config).eval()
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
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[AutoencoderKLWan, Path]]:
    """Each config: the diffusers model and the directory it was saved to."""
    out = {}
    for name, config in CONFIGS.items():
        reference = _reference(config)
        directory = tmp_path_factory.mktemp(name)
        reference.save_pretrained(directory, safe_serialization=True)
        out[name] = (reference, directory)
    return out


def _load_ours(directory: Path) -> WanVAE:
    config = WanVAEConfig.from_diffusers_config(json.loads((directory / "config.json").read_text()))
    return WanVAE.from_checkpoint(directory, config, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_matches_diffusers(
    saved: dict[str, tuple[AutoencoderKLWan, Path]], name: str
) -> None:
    reference, directory = saved[name]
    ours = _load_ours(directory)
    generator = torch.Generator().manual_seed(1)
    z_dim = reference.config.z_dim
    for frames, height, width, batch in ((1, 3, 5, 1), (2, 4, 3, 2), (3, 3, 5, 1), (4, 2, 3, 1)):
        latents = torch.randn(batch, z_dim, frames, height, width, generator=generator)
        with torch.no_grad():
            expected = reference.decode(latents).sample
        video = ours.decode(latents)
        assert video.shape == (batch, 3, 1 + 4 * (frames - 1), 8 * height, 8 * width)
        assert video.dtype == torch.float32
        # The comparison must see signal, not a video saturated at +-1 by the clamp.
        assert (expected.abs() >= 1.0).float().mean() < 0.25
        error = _relative_error(video, expected)
        assert error <= TOLERANCE, (name, frames, error)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_matches_diffusers(
    saved: dict[str, tuple[AutoencoderKLWan, Path]], name: str
) -> None:
    reference, directory = saved[name]
    ours = _load_ours(directory)
    generator = torch.Generator().manual_seed(2)
    for frames, batch in ((1, 1), (5, 2), (9, 1)):
        video = torch.rand(batch, 3, frames, 16, 24, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = reference.encode(video).latent_dist.mode()
        latents = ours.encode(video)
        assert latents.shape == (batch, reference.config.z_dim, 1 + (frames - 1) // 4, 2, 3)
        error = _relative_error(latents, expected)
        assert error <= TOLERANCE, (name, frames, error)


def test_decode_is_causal_across_chunks(saved: dict[str, tuple[AutoencoderKLWan, Path]]) -> None:
    """A later latent frame never changes earlier video frames; an earlier one changes later."""
    ours = _load_ours(saved["wan21_shaped"][1])
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 3, 2, 3, generator=generator)
    base = ours.decode(latents)
    later = latents.clone()
    later[:, :, 2] += 1.0
    assert torch.equal(ours.decode(later)[:, :, :5], base[:, :, :5])
    earlier = latents.clone()
    earlier[:, :, 0] += 1.0
    assert _relative_error(ours.decode(earlier)[:, :, 5:], base[:, :, 5:]) > 1e-3


def test_default_statistics_are_the_published_ones() -> None:
    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
    config = WanVAEConfig()
    assert list(config.latents_mean) == defaults["latents_mean"].default
    assert list(config.latents_std) == defaults["latents_std"].default
    assert config.latents_mean[:2] == (-0.7571, -0.7089)  # official wan/modules/vae.py
    assert config.latents_std[-2:] == (2.8251, 1.9160)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_normalization_matches_wan_pipelines(dtype: torch.dtype) -> None:
    """``WanPipeline`` (decode) and ``WanImageToVideoPipeline`` (condition encode) formulas."""
    with torch.device("meta"):
        vae = WanVAE(WanVAEConfig())
    latents = torch.randn(2, 16, 3, 4, 5, generator=torch.Generator().manual_seed(4)).to(dtype)
    shape = (1, 16, 1, 1, 1)
    mean = torch.tensor(WanVAEConfig().latents_mean).view(shape).to(latents.device, dtype)
    inv_std = 1.0 / torch.tensor(WanVAEConfig().latents_std).view(shape).to(latents.device, dtype)
    assert torch.equal(vae.denormalize_latents(latents), latents / inv_std + mean)
    assert torch.equal(vae.normalize_latents(latents), (latents - mean) * inv_std)
    round_trip = vae.normalize_latents(vae.denormalize_latents(latents.float()))
    assert torch.allclose(round_trip, latents.float(), atol=1e-5)


def test_official_naming_is_what_diffusers_converts_from(
    saved: dict[str, tuple[AutoencoderKLWan, Path]], tmp_path: Path
) -> None:
    """Our parameter names are the official ones: diffusers' single-file converter (official ->
    diffusers) maps them onto ``AutoencoderKLWan`` exactly, as does our inverse mapping; a
    checkpoint in the official naming (safetensors or ``.pth``) decodes like diffusers."""
    reference, directory = saved["wan21_shaped"]
    ours = _load_ours(directory)
    official = {k: v.clone() for k, v in ours.state_dict().items()}
    assert detect_naming(official) == "official"
    assert "decoder.upsamples.3.time_conv.weight" in official  # the Wan2.1_VAE.pth layout
    assert "encoder.downsamples.0.residual.0.gamma" in official
    reference_sd = reference.state_dict()
    by_diffusers = convert_wan_vae_to_diffusers(official)
    assert set(by_diffusers) == set(reference_sd)
    assert all(torch.equal(by_diffusers[k], reference_sd[k]) for k in reference_sd)
    mine = to_diffusers_naming(official)
    assert set(mine) == set(reference_sd)
    assert all(torch.equal(mine[k], reference_sd[k]) for k in reference_sd)
    back = convert_state_dict(mine)
    assert set(back) == set(official)
    assert all(torch.equal(back[k], official[k]) for k in official)

    config = WanVAEConfig.from_diffusers_config(reference.config)
    save_file(official, str(tmp_path / "wan_vae_official.safetensors"))
    torch.save(official, tmp_path / "Wan2.1_VAE.pth")
    latents = torch.randn(1, 4, 2, 3, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference.decode(latents).sample
    for path in (tmp_path / "wan_vae_official.safetensors", tmp_path / "Wan2.1_VAE.pth"):
        loaded = WanVAE.from_checkpoint(path, config, device="cpu", dtype=torch.float32)
        assert _relative_error(loaded.decode(latents), expected) <= TOLERANCE, path


def test_wrong_shaped_tensor_is_named(
    saved: dict[str, tuple[AutoencoderKLWan, Path]], tmp_path: Path
) -> None:
    reference, directory = saved["time_first"]
    state_dict = load_file(str(directory / "diffusion_pytorch_model.safetensors"))
    state_dict["decoder.up_blocks.1.upsamplers.0.time_conv.weight"] = torch.zeros(8, 8, 3, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(state_dict, str(path))
    config = WanVAEConfig.from_diffusers_config(reference.config)
    with pytest.raises(CheckpointError, match=r"decoder\.upsamples\.\d+\.time_conv\.weight"):
        WanVAE.from_checkpoint(path, config)


def test_unknown_or_mixed_naming_is_refused() -> None:
    tensor = torch.zeros(1)
    with pytest.raises(CheckpointError, match="not a Wan VAE checkpoint"):
        convert_state_dict({"blocks.0.self_attn.q.weight": tensor})
    with pytest.raises(CheckpointError, match="mixes"):
        convert_state_dict({"quant_conv.weight": tensor, "encoder.downsamples.0.x": tensor})


def test_config_and_input_validation() -> None:
    with pytest.raises(ValueError, match="latents_std must hold z_dim=16"):
        WanVAEConfig(latents_std=(1.0,) * 15)
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAEConfig(attn_scales=(1.0,))
    with pytest.raises(ValueError, match="temperal_downsample"):
        WanVAEConfig(temperal_downsample=(True, True))
    with pytest.raises(ValueError, match="is_residual"):
        WanVAEConfig.from_diffusers_config({"is_residual": True})
    assert WanVAEConfig(dim_mult=[1, 2, 4, 4]).dim_mult == (1, 2, 4, 4)
    vae = WanVAE(
        WanVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TIME_FIRST.items()})
    )
    with pytest.raises(ValueError, match=r"allowed: 1 \+ 4\*k frames"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="expects latents"):
        vae.decode(torch.zeros(1, 5, 1, 2, 2))
