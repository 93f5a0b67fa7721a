"""Whole release folders, as published, in both layouts: detection, errors, and equal outputs.

One set of tiny random weights (sizes of ``configs/models/wan-tiny-random.yaml``) is written

- in the official Wan2.1 layout: ``config.json``, the DiT as one safetensors file or as shards
  with an index, ``Wan2.1_VAE.pth`` and ``models_t5_umt5-xxl-enc-bf16.pth`` (torch pickles in the
  official naming) and a ``google/umt5-xxl`` tokenizer folder;
- in the diffusers layout, by diffusers' own ``WanPipeline.save_pretrained``.

The official DiT tensors are made in the official naming and turned into a diffusers model by
diffusers' own converter (``convert_wan_transformer_to_diffusers``), so that side does not
depend on our converters. diffusers' VAE converter only fits the full Wan2.1 VAE shape, so the
tiny VAE goes the other way: a diffusers ``AutoencoderKLWan`` renamed to the official naming by
``smartdiff.models.wan_vae.convert_state_dict`` (itself checked against diffusers' converter in
test_wan_vae.py); a wrong name would still show as a decode different from diffusers'. No
converter for the official T5 exists in diffusers: the T5 naming is judged by an independent
forward pass written here from the official ``wan/modules/t5.py`` semantics, run directly on the
official-named tensors.

The backend then loads every folder, and the DiT forward, the VAE decode and the prompt
embeddings must equal each other across layouts and match the diffusers models (relative error
<= 1e-5, fp32 on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_wan_transformer_to_diffusers,
)

from smartdiff.api.params import SystemParams  # noqa: E402
from smartdiff.engine.backend import Backend  # noqa: E402
from smartdiff.io.checkpoints import CheckpointError, write_sharded  # noqa: E402
from smartdiff.io.release import (  # noqa: E402
    OFFICIAL_T5,
    OFFICIAL_VAE,
    ReleaseLayoutError,
    check_release_architecture,
    detect_release,
)
from smartdiff.models.registry import ModelConfig, load_model_config  # noqa: E402
from smartdiff.models.text_encoder import (  # noqa: E402
    TextEncoder,
    official_t5_to_transformers,
    read_torch_state_dict,
    transformers_t5_to_official,
)
from smartdiff.models.wan_dit import WanDiT  # noqa: E402
from smartdiff.models.wan_vae import convert_state_dict as vae_to_official  # noqa: E402

TOLERANCE = 1e-5
PROMPTS = ["a lighthouse at dusk, waves &amp; spray", "x"]
FP32 = SystemParams(device="cpu", dtype="float32")


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def tiny_config() -> ModelConfig:
    """wan-tiny-random, with its tokenizer read from the release folder."""
    config = load_model_config("wan-tiny-random")
    return dataclasses.replace(
        config, text_encoder=dataclasses.replace(config.text_encoder, tokenizer="pretrained")
    )


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales around 1), so a wrong name mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                param.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") or "modulation" in name:
                param.copy_(0.1 * noise)
            else:
                fan_in = math.prod(param.shape[1:]) if param.ndim > 1 else param.shape[0]
                param.copy_(noise / math.sqrt(fan_in))


def official_dit_config_json(config: ModelConfig) -> dict[str, Any]:
    """The official ``config.json`` (Wan2.1's fields; text_dim and patch_size stated too)."""
    dit = config.dit
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": "t2v",
        "dim": dit.dim,
        "ffn_dim": dit.ffn_dim,
        "freq_dim": dit.freq_dim,
        "in_dim": dit.in_dim,
        "out_dim": dit.out_dim,
        "num_heads": dit.num_heads,
        "num_layers": dit.num_layers,
        "eps": dit.eps,
        "text_len": 512,
        "text_dim": dit.text_dim,
        "patch_size": list(dit.patch_size),
    }


@dataclasses.dataclass
class Release:
    config: ModelConfig
    official: Path
    official_sharded: Path
    diffusers: Path
    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan
    t5_official: dict[str, torch.Tensor]
    tokenizer: Any


def write_official(
    root: Path,
    config: ModelConfig,
    dit_sd: dict[str, torch.Tensor],
    vae_sd: dict[str, torch.Tensor],
    t5_sd: dict[str, torch.Tensor],
    tokenizer: Any,
    *,
    max_shard_bytes: int,
) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(official_dit_config_json(config)))
    write_sharded(dit_sd, root, max_shard_bytes=max_shard_bytes)
    torch.save(vae_sd, root / OFFICIAL_VAE)
    torch.save(t5_sd, root / OFFICIAL_T5)
    tokenizer.save_pretrained(root / "google" / "umt5-xxl")
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    config = tiny_config()
    torch.manual_seed(0)
    dit = WanDiT(config.dit)
    randomize(dit, seed=1)
    dit_sd = {k: v.clone() for k, v in dit.state_dict().items()}  # official naming
    dit_cfg = config.dit
    transformer = WanTransformer3DModel(
        patch_size=dit_cfg.patch_size,
        num_attention_heads=dit_cfg.num_heads,
        attention_head_dim=dit_cfg.head_dim,
        in_channels=dit_cfg.in_dim,
        out_channels=dit_cfg.out_dim,
        text_dim=dit_cfg.text_dim,
        freq_dim=dit_cfg.freq_dim,
        ffn_dim=dit_cfg.ffn_dim,
        num_layers=dit_cfg.num_layers,
        cross_attn_norm=dit_cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=dit_cfg.eps,
    ).eval()
    transformer.load_state_dict(convert_wan_transformer_to_diffusers(dict(dit_sd)), strict=True)

    vae_cfg = config.vae
    vae = AutoencoderKLWan(
        base_dim=vae_cfg.base_dim,
        z_dim=vae_cfg.z_dim,
        dim_mult=list(vae_cfg.dim_mult),
        num_res_blocks=vae_cfg.num_res_blocks,
        temperal_downsample=list(vae_cfg.temperal_downsample),
    ).eval()
    randomize(vae, seed=2)
    vae_sd = {k: v.clone() for k, v in vae_to_official(vae.state_dict()).items()}

    byte_config = dataclasses.replace(config.text_encoder, tokenizer="byte-level")
    text = TextEncoder.random(byte_config, seed=3)
    with torch.no_grad():  # the official T5 ships in bf16: keep values bf16-exact on both sides
        for param in text.model.parameters():
            param.copy_(param.bfloat16().float())
    t5_official = {
        k: v.bfloat16() for k, v in transformers_t5_to_official(text.model.state_dict()).items()
    }

    base = tmp_path_factory.mktemp("releases")
    official = write_official(
        base / "official",
        config,
        dit_sd,
        vae_sd,
        t5_official,
        text.tokenizer,
        max_shard_bytes=1 << 30,
    )
    sharded = write_official(
        base / "official-sharded",
        config,
        dit_sd,
        vae_sd,
        t5_official,
        text.tokenizer,
        max_shard_bytes=20_000,
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    WanPipeline(
        tokenizer=text.tokenizer,
        text_encoder=text.model,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    ).save_pretrained(base / "diffusers")
    return Release(
        config, official, sharded, base / "diffusers", transformer, vae, t5_official, text.tokenizer
    )


# ------------------------------------------------------------------------- detection


def test_layouts_are_detected(release: Release) -> None:
    official = detect_release(release.official)
    assert official.layout == "official"
    assert official.dit.name == "diffusion_pytorch_model.safetensors"
    assert official.vae.name == OFFICIAL_VAE and official.text_encoder.name == OFFICIAL_T5
    assert official.tokenizer == release.official / "google" / "umt5-xxl"
    sharded = detect_release(release.official_sharded)
    assert sharded.dit.name == "diffusion_pytorch_model.safetensors.index.json"
    assert len(list(release.official_sharded.glob("diffusion_pytorch_model-*"))) > 1
    diffusers = detect_release(release.diffusers)
    assert diffusers.layout == "diffusers"
    assert (diffusers.dit.parent.name, diffusers.vae.name, diffusers.text_encoder.name) == (
        "transformer",
        "vae",
        "text_encoder",
    )
    assert (release.diffusers / "model_index.json").is_file()
    assert (release.diffusers / "scheduler").is_dir()
    for folder in (official, sharded, diffusers):
        check_release_architecture(folder, release.config)


def test_empty_folder_lists_both_layouts(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(ReleaseLayoutError) as caught:
        detect_release(tmp_path)
    message = str(caught.value)
    assert "is not a complete Wan2.1 release" in message
    assert "it holds: README.md" in message
    assert "official Wan2.1 layout lacks: config.json" in message
    assert "diffusers layout lacks: model_index.json; transformer/" in message


def test_incomplete_official_folder_lists_what_is_missing(release: Release, tmp_path: Path) -> None:
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "config.json").write_bytes((release.official / "config.json").read_bytes())
    (folder / OFFICIAL_VAE).write_bytes((release.official / OFFICIAL_VAE).read_bytes())
    with pytest.raises(ReleaseLayoutError) as caught:
        detect_release(folder)
    message = str(caught.value)
    assert f"it holds: {OFFICIAL_VAE}, config.json" in message
    assert "diffusion_pytorch_model.safetensors (or shards" in message
    assert OFFICIAL_T5 in message and "google/umt5-xxl/" in message
    assert "diffusers layout" not in message  # the folder is clearly an official one
    # without the tokenizer requirement the tokenizer is not reported
    with pytest.raises(ReleaseLayoutError) as caught:
        detect_release(folder, tokenizer_required=False)
    assert "google/umt5-xxl" not in str(caught.value)


def test_missing_shard_is_named(release: Release, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in release.official_sharded.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    (folder / "google").symlink_to(release.official_sharded / "google")
    shard = sorted(folder.glob("diffusion_pytorch_model-*"))[1]
    shard.unlink()
    with pytest.raises(ReleaseLayoutError, match=f"listed in .*index.json: {shard.name}"):
        detect_release(folder)


def test_incomplete_diffusers_folder(release: Release, tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    for name in ("model_index.json", "transformer", "text_encoder", "scheduler"):
        (folder / name).symlink_to(release.diffusers / name)
    with pytest.raises(ReleaseLayoutError) as caught:
        detect_release(folder)
    message = str(caught.value)
    assert "diffusers layout lacks: vae/ (the VAE: safetensors); tokenizer/" in message
    assert "official Wan2.1 layout" not in message


def test_architecture_mismatch_is_reported_before_loading(release: Release, tmp_path: Path) -> None:
    wrong = dataclasses.replace(
        release.config, dit=dataclasses.replace(release.config.dit, num_layers=3)
    )
    for folder in (release.official, release.diffusers):
        with pytest.raises(
            ReleaseLayoutError, match="num_layers: folder has 2, model config expects 3"
        ):
            Backend.from_params(wrong, FP32, weights_path=folder)
    folder = tmp_path / "i2v"
    folder.mkdir()
    for path in release.official.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(
        json.dumps({**official_dit_config_json(release.config), "model_type": "i2v"})
    )
    with pytest.raises(ReleaseLayoutError, match="model_type 'i2v' is not supported"):
        check_release_architecture(detect_release(folder), release.config)


# -------------------------------------------------------------------- the T5 naming


def official_t5_reference(
    sd: dict[str, torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    heads: int,
    buckets: int,
    max_distance: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The official Wan T5 encoder (``wan/modules/t5.py``, ``shared_pos=False``) on official
    names: RMS norms, unscaled attention with a per-block bidirectional bucketed position bias,
    ``fc2(fc1(x) * gelu_tanh(gate(x)))``, a final norm."""
    sd = {k: v.double() for k, v in sd.items()}

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    length = ids.shape[1]
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    half = buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    far = (
        exact
        + (
            torch.log(distance.double().clamp(min=1) / exact)
            / math.log(max_distance / exact)
            * (half - exact)
        ).long()
    )
    bucket = bucket + torch.where(distance < exact, distance, far.clamp(max=half - 1))
    blocked = (mask == 0)[:, None, None, :]
    x = sd["token_embedding.weight"][ids]
    n = 0
    while f"blocks.{n}.norm1.weight" in sd:
        p = f"blocks.{n}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (
            (h @ sd[f"{p}attn.{name}.weight"].T).unflatten(-1, (heads, -1)).transpose(1, 2)
            for name in "qkv"
        )
        bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]
        scores = (q @ k.transpose(-1, -2) + bias).masked_fill(blocked, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + attended @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gate) @ sd[p + "ffn.fc2.weight"].T
        n += 1
    assert n > 0
    return rms(x, sd["norm.weight"])


def test_official_t5_names_are_the_official_ones(release: Release) -> None:
    names = set(release.t5_official)
    block = {
        "norm1.weight",
        "attn.q.weight",
        "attn.k.weight",
        "attn.v.weight",
        "attn.o.weight",
        "norm2.weight",
        "ffn.gate.0.weight",
        "ffn.fc1.weight",
        "ffn.fc2.weight",
        "pos_embedding.embedding.weight",
    }
    layers = release.config.text_encoder.num_layers
    assert names == {"token_embedding.weight", "norm.weight"} | {
        f"blocks.{i}.{name}" for i in range(layers) for name in block
    }
    back = official_t5_to_transformers(release.t5_official)
    assert back["encoder.embed_tokens.weight"] is back["shared.weight"]


def test_official_t5_checkpoint_matches_the_official_forward(release: Release) -> None:
    path = release.official / OFFICIAL_T5
    encoder = TextEncoder.from_official_checkpoint(
        path,
        release.config.text_encoder,
        tokenizer_path=release.official / "google/umt5-xxl",
        dtype=torch.float32,
    )
    assert encoder.model.encoder.embed_tokens.weight is encoder.model.shared.weight
    ids, mask = encoder.tokenize(PROMPTS)
    ids, mask = ids[:, :40], mask[:, :40]
    with torch.no_grad():
        ours = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
    cfg = release.config.text_encoder
    reference = official_t5_reference(
        read_torch_state_dict(path),
        ids,
        mask,
        heads=cfg.num_heads,
        buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance,
    )
    keep = mask.bool()
    assert reference[keep].std() > 0.1
    assert relative_error(ours[keep], reference[keep].float()) <= TOLERANCE


def test_pth_is_read_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
            return (Path.touch, (marker,))

    path = tmp_path / OFFICIAL_T5
    torch.save({"token_embedding.weight": torch.zeros(2), "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read torch checkpoint"):
        read_torch_state_dict(path)
    assert not marker.exists()


# ---------------------------------------------------------------- loading and outputs


def dit_inputs(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, config.dit.in_dim, 2, 4, 6, generator=generator)
    context = torch.randn(1, 9, config.dit.text_dim, generator=generator)
    return latents, torch.tensor([700.0]), context


def outputs(backend: Backend) -> dict[str, torch.Tensor]:
    latents, timestep, context = dit_inputs(backend.model)
    z = torch.randn(1, backend.model.vae.z_dim, 2, 4, 6, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        return {
            "dit": backend.dit(latents, timestep, context),
            "vae": backend.vae.decode(z),
            "text": backend.text_encoder.encode(PROMPTS),
            "z": z,
        }


@pytest.fixture(scope="module")
def loaded(release: Release) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: outputs(Backend.from_params(release.config, FP32, weights_path=folder))
        for name, folder in (
            ("official", release.official),
            ("official-sharded", release.official_sharded),
            ("diffusers", release.diffusers),
        )
    }


def test_layouts_give_the_same_outputs(loaded: dict[str, dict[str, torch.Tensor]]) -> None:
    """Same weights, so the same outputs up to float rounding: CPU kernels may round
    differently for tensors memory-mapped at other offsets of other files (measured: 1e-7
    relative on the DiT; cloning the parameters makes the outputs bit-identical)."""
    reference = loaded["diffusers"]
    for name in ("official", "official-sharded"):
        for part in ("dit", "vae", "text"):
            error = relative_error(loaded[name][part], reference[part])
            assert error <= 1e-6, (name, part, error)


def test_outputs_match_diffusers(
    release: Release, loaded: dict[str, dict[str, torch.Tensor]]
) -> None:
    ours = loaded["official"]
    latents, timestep, context = dit_inputs(release.config)
    with torch.no_grad():
        expected_dit = release.transformer(latents, timestep, context, return_dict=False)[0]
        expected_vae = release.vae.decode(ours["z"], return_dict=False)[0].clamp(-1, 1)
    assert expected_dit.std() > 0.1 and expected_vae.std() > 1e-3  # able to fail
    assert relative_error(ours["dit"], expected_dit) <= TOLERANCE
    assert relative_error(ours["vae"], expected_vae) <= TOLERANCE


def test_text_embeddings_match_wan_pipeline(
    release: Release, loaded: dict[str, dict[str, torch.Tensor]]
) -> None:
    """diffusers' own prompt encoding with its own ``from_pretrained`` of the diffusers folder."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    text_encoder = UMT5EncoderModel.from_pretrained(release.diffusers / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(release.diffusers / "tokenizer")
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None, transformer=None
    )
    expected = pipe._get_t5_prompt_embeds(
        PROMPTS, max_sequence_length=512, device=torch.device("cpu")
    )
    assert expected.abs().max() > 0.1
    assert relative_error(loaded["official"]["text"], expected) <= TOLERANCE


def test_uri_forms_load_the_same_folder(
    release: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "claim").mkdir()
    (tmp_path / "claim" / "wan").symlink_to(release.official)
    monkeypatch.setenv("SMARTDIFF_WEIGHTS_ROOT", str(tmp_path))
    config = dataclasses.replace(
        release.config,
        text_encoder=dataclasses.replace(release.config.text_encoder, tokenizer="byte-level"),
    )
    for uri in (f"file://{release.official}", "pvc://claim/wan"):
        backend = Backend.from_params(config, FP32, weights_path=uri)
        assert backend.dit.config == config.dit
    with pytest.raises(FileNotFoundError, match="pvc://claim/nothing"):
        Backend.from_params(config, FP32, weights_path="pvc://claim/nothing")
