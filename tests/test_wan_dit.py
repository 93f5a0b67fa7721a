"""WanDiT against diffusers' WanTransformer3DModel: same weights, same inputs, same outputs.

A tiny diffusers model (2 layers, 2 heads of 32 channels: RoPE split 12/10/10) gets random
weights from a seeded generator (norm weights included, so a wrong name mapping shows), is saved
with its own ``save_pretrained`` and loaded by ``WanDiT.from_checkpoint`` in the diffusers
naming and, converted, in the official Wan naming.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from smartdiff.io.checkpoints import CheckpointError, read_state_dict, write_sharded
from smartdiff.models.wan_dit import (
    WanDiT,
    WanDiTConfig,
    convert_state_dict,
    detect_naming,
    to_diffusers_naming,
)

TINY = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 4,
    "out_channels": 6,
    "text_dim": 24,
    "freq_dim": 32,
    "ffn_dim": 96,
    "num_layers": 2,
}
TEXT_LEN = 7


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                fan_in = math.prod(param.shape[1:]) if param.ndim > 1 else param.shape[0]
                param.copy_(noise / math.sqrt(fan_in))


def _reference(patch_size: tuple[int, int, int] = (1, 2, 2)) -> WanTransformer3DModel:
    model = WanTransformer3DModel(**{**TINY, "patch_size": patch_size}).eval()
    _randomize(model, seed=0)
    return model


def _inputs(
    batch: int, frames: int, height: int, width: int, timesteps: list[float], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, TINY["in_channels"], frames, height, width, generator=generator)
    context = torch.randn(batch, TEXT_LEN, TINY["text_dim"], generator=generator)
    return latents, torch.tensor(timesteps), context


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[WanTransformer3DModel, Path]:
    reference = _reference()
    directory = tmp_path_factory.mktemp("diffusers_wan")
    reference.save_pretrained(directory)
    return reference, directory


def _config(directory: Path) -> WanDiTConfig:
    return WanDiTConfig.from_diffusers_config(json.loads((directory / "config.json").read_text()))


# (batch, frames, height, width, timesteps): non-square, 1/3/5 latent frames, batch 2.
SHAPES = [
    (1, 1, 4, 6, [999.0]),
    (2, 3, 6, 4, [937.25, 12.5]),
    (1, 5, 2, 8, [500.0]),
    (2, 2, 8, 2, [1.0, 640.0]),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_matches_diffusers_with_diffusers_naming(
    saved: tuple[WanTransformer3DModel, Path], shape: tuple
) -> None:
    reference, directory = saved
    ours = WanDiT.from_checkpoint(directory, _config(directory), dtype=torch.float32)
    latents, timestep, context = _inputs(*shape, seed=1)
    with torch.no_grad():
        expected = reference(latents, timestep, context).sample
        actual = ours(latents, timestep, context)
    assert actual.shape == expected.shape == (shape[0], TINY["out_channels"], *shape[1:4])
    assert _relative_error(actual, expected) <= 1e-5


def _official_keys(num_layers: int) -> set[str]:
    """The parameter names of the official Wan2.1 WanModel (wan/modules/model.py), by hand."""
    keys = {
        "patch_embedding.weight",
        "patch_embedding.bias",
        "head.head.weight",
        "head.head.bias",
        "head.modulation",
    }
    for layer in (
        "text_embedding.0",
        "text_embedding.2",
        "time_embedding.0",
        "time_embedding.2",
        "time_projection.1",
    ):
        keys |= {f"{layer}.weight", f"{layer}.bias"}
    for n in range(num_layers):
        block = f"blocks.{n}"
        keys |= {f"{block}.modulation", f"{block}.norm3.weight", f"{block}.norm3.bias"}
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                keys |= {f"{block}.{attn}.{proj}.weight", f"{block}.{attn}.{proj}.bias"}
            keys |= {f"{block}.{attn}.norm_q.weight", f"{block}.{attn}.norm_k.weight"}
        for layer in ("ffn.0", "ffn.2"):
            keys |= {f"{block}.{layer}.weight", f"{block}.{layer}.bias"}
    return keys


def test_official_naming_round_trip_and_sharded_load(
    saved: tuple[WanTransformer3DModel, Path], tmp_path: Path
) -> None:
    reference, directory = saved
    diffusers_sd = read_state_dict(directory)
    assert detect_naming(diffusers_sd) == "diffusers"
    official_sd = convert_state_dict(diffusers_sd)
    assert set(official_sd) == _official_keys(TINY["num_layers"])
    assert detect_naming(official_sd) == "official"
    assert convert_state_dict(official_sd).keys() == official_sd.keys()
    back = to_diffusers_naming(official_sd)
    assert back.keys() == diffusers_sd.keys()
    assert all(back[key] is diffusers_sd[key] for key in diffusers_sd)

    index = write_sharded(official_sd, tmp_path / "official", max_shard_bytes=40_000)
    assert index.name.endswith(".safetensors.index.json")
    ours = WanDiT.from_checkpoint(tmp_path / "official", _config(directory), dtype=torch.float32)
    latents, timestep, context = _inputs(2, 3, 4, 6, [800.0, 40.0], seed=2)
    with torch.no_grad():
        expected = reference(latents, timestep, context).sample
        actual = ours(latents, timestep, context)
    assert _relative_error(actual, expected) <= 1e-5


def test_temporal_patch_matches_diffusers(tmp_path: Path) -> None:
    reference = _reference(patch_size=(2, 2, 2))
    reference.save_pretrained(tmp_path)
    ours = WanDiT.from_checkpoint(tmp_path, _config(tmp_path), dtype=torch.float32)
    latents, timestep, context = _inputs(1, 4, 4, 6, [321.0], seed=3)
    with torch.no_grad():
        expected = reference(latents, timestep, context).sample
        actual = ours(latents, timestep, context)
    assert _relative_error(actual, expected) <= 1e-5


def test_bf16_error_within_control(saved: tuple[WanTransformer3DModel, Path]) -> None:
    """bf16 against the fp32 reference: at most 1.5x diffusers' own bf16 error."""
    reference, directory = saved
    ours = WanDiT.from_checkpoint(directory, _config(directory), dtype=torch.bfloat16)
    fp32_kept = {name for name, p in ours.named_parameters() if p.dtype == torch.float32}
    assert fp32_kept == {
        name
        for name, _ in ours.named_parameters()
        if any(
            part in ("time_embedding", "time_projection", "modulation", "norm3")
            for part in name.split(".")
        )
    }
    assert ours.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    control = _reference().to(torch.bfloat16)  # as from_pretrained(torch_dtype=bf16) makes it
    for name, param in control.named_parameters():
        if any(part in WanTransformer3DModel._keep_in_fp32_modules for part in name.split(".")):
            param.data = param.data.float()
    latents, timestep, context = _inputs(2, 3, 6, 4, [900.0, 100.0], seed=4)
    with torch.no_grad():
        expected = reference(latents, timestep, context).sample
        control_out = control(latents.bfloat16(), timestep, context.bfloat16()).sample
        actual = ours(latents.bfloat16(), timestep, context.bfloat16())
    assert actual.dtype == torch.bfloat16
    control_error = _relative_error(control_out, expected)
    assert _relative_error(actual, expected) <= 1.5 * control_error + 1e-3


def test_attention_is_pluggable(saved: tuple[WanTransformer3DModel, Path]) -> None:
    _, directory = saved
    ours = WanDiT.from_checkpoint(directory, _config(directory), dtype=torch.float32)
    latents, timestep, context = _inputs(1, 2, 4, 4, [10.0], seed=5)
    with torch.no_grad():
        baseline = ours(latents, timestep, context)
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def manual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(q.shape), tuple(k.shape)))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return weights @ v

    ours.attention = manual
    ours.cross_attention = manual
    with torch.no_grad():
        replaced = ours(latents, timestep, context)
    tokens = 2 * 2 * 2
    assert seen[:2] == [
        ((1, 2, tokens, 32), (1, 2, tokens, 32)),
        ((1, 2, tokens, 32), (1, 2, TEXT_LEN, 32)),
    ]
    assert len(seen) == 2 * TINY["num_layers"]
    assert _relative_error(replaced, baseline) <= 1e-5


def test_config_presets_and_rope_split() -> None:
    small, large = WanDiTConfig.wan21_t2v_1_3b(), WanDiTConfig.wan21_t2v_14b()
    assert (small.dim, small.ffn_dim, small.num_heads, small.num_layers) == (1536, 8960, 12, 30)
    assert (large.dim, large.ffn_dim, large.num_heads, large.num_layers) == (5120, 13824, 40, 40)
    assert small.head_dim == large.head_dim == 128
    assert small.rope_dims == (44, 42, 42)
    assert WanDiTConfig(dim=64, ffn_dim=8, num_heads=2, num_layers=1).rope_dims == (12, 10, 10)
    assert WanDiTConfig(dim=128, ffn_dim=8, num_heads=2, num_layers=1).rope_dims == (24, 20, 20)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dim": 100, "num_heads": 3}, "divisible by num_heads"),
        ({"dim": 18, "num_heads": 2}, "must be even"),
        ({"num_layers": 0}, "num_layers"),
        ({"patch_size": (1, 2)}, "patch_size"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_config_rejects_bad_values(fields: dict, message: str) -> None:
    base = {"dim": 64, "ffn_dim": 8, "num_heads": 2, "num_layers": 1}
    with pytest.raises(ValueError, match=message):
        WanDiTConfig(**{**base, **fields})


def test_unknown_naming_is_reported() -> None:
    with pytest.raises(CheckpointError, match="neither official nor diffusers.*encoder.w"):
        convert_state_dict({"encoder.w": torch.zeros(1)})
    mixed = {"blocks.0.attn1.to_q.weight": torch.zeros(1), "head.head.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="both official and diffusers"):
        convert_state_dict(mixed)


def test_unexpected_tensor_in_checkpoint_is_named(
    saved: tuple[WanTransformer3DModel, Path], tmp_path: Path
) -> None:
    _, directory = saved
    state_dict = read_state_dict(directory)
    state_dict["blocks.0.attn2.add_k_proj.weight"] = torch.zeros(64, 8)
    del state_dict["blocks.1.attn1.norm_k.weight"]
    write_sharded(state_dict, tmp_path, max_shard_bytes=1 << 30)
    with pytest.raises(CheckpointError) as caught:
        WanDiT.from_checkpoint(tmp_path, _config(directory), dtype=torch.float32)
    assert "blocks.0.attn2.add_k_proj.weight" in str(caught.value)
    assert "blocks.1.self_attn.norm_k.weight" in str(caught.value)


def test_grid_beyond_rope_table_is_rejected(saved: tuple[WanTransformer3DModel, Path]) -> None:
    _, directory = saved
    config = WanDiTConfig.from_diffusers_config(
        {**json.loads((directory / "config.json").read_text()), "rope_max_seq_len": 2}
    )
    ours = WanDiT.from_checkpoint(directory, config, dtype=torch.float32)
    latents, timestep, context = _inputs(1, 3, 2, 2, [1.0], seed=6)
    with pytest.raises(ValueError, match="rope_max_seq_len 2"):
        ours(latents, timestep, context)
