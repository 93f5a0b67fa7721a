"""Our engine end to end against diffusers' ``WanPipeline`` with the same tiny components.

diffusers' ``WanTransformer3DModel`` and ``AutoencoderKLWan`` (seeded random weights, shaped as
``configs/models/wan-tiny-random.yaml``) and a tiny random UMT5 are saved with
``save_pretrained`` in the diffusers folder layout; our ``Engine`` loads its DiT, VAE and text
encoder from those files. Both sides then generate from the same prompt, negative prompt, seed
and UniPC flow schedule (shift 3), and the final latents and the decoded frames must agree within
a relative 1e-4 (fp32 on CPU; measured: about 1e-6 on the latents and the frames).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

from smartdiff.api.params import SystemParams, UserParams  # noqa: E402
from smartdiff.engine.engine import Engine  # noqa: E402
from smartdiff.engine.generator import GeneratorOptions  # noqa: E402
from smartdiff.engine.task import TaskStatus  # noqa: E402
from smartdiff.models.registry import ModelConfig, load_model_config  # noqa: E402
from smartdiff.models.text_encoder import TextEncoder  # noqa: E402

MODEL = "wan-tiny-random"
PROMPT = "A red fox runs through fresh snow, cinematic lighting"
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH, FRAMES, STEPS, GUIDANCE, SHIFT, SEED = 32, 48, 5, 4, 5.0, 3.0, 1234
RTOL = 1e-4


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    return float((ours - reference).abs().max() / reference.abs().max())


def unipc_flow_scheduler(shift: float) -> UniPCMultistepScheduler:
    """The scheduler of the published Wan2.1 diffusers checkpoints, with ``flow_shift``."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
        predict_x0=True,
    )


def diffusers_components(config: ModelConfig) -> dict[str, object]:
    """Reference modules shaped as our tiny config, with seeded random weights."""
    dit, vae = config.dit, config.vae
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=dit.patch_size,
        num_attention_heads=dit.num_heads,
        attention_head_dim=dit.head_dim,
        in_channels=dit.in_dim,
        out_channels=dit.out_dim,
        text_dim=dit.text_dim,
        freq_dim=dit.freq_dim,
        ffn_dim=dit.ffn_dim,
        num_layers=dit.num_layers,
        cross_attn_norm=dit.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=dit.eps,
        rope_max_seq_len=dit.rope_max_seq_len,
    ).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every table non-trivial
        transformer.scale_shift_table.normal_(0.0, 0.5)
        for block in transformer.blocks:
            block.scale_shift_table.normal_(0.0, 0.5)
    torch.manual_seed(1)
    autoencoder = AutoencoderKLWan(
        base_dim=vae.base_dim,
        z_dim=vae.z_dim,
        dim_mult=list(vae.dim_mult),
        num_res_blocks=vae.num_res_blocks,
        temperal_downsample=list(vae.temperal_downsample),
    ).eval()
    text = TextEncoder.random(config.text_encoder, seed=2)
    return {
        "transformer": transformer,
        "vae": autoencoder,
        "text_encoder": text.model,
        "tokenizer": text.tokenizer,
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    config = load_model_config(MODEL)
    components = diffusers_components(config)
    root = tmp_path_factory.mktemp("wan-tiny-diffusers")
    for name, component in components.items():
        component.save_pretrained(root / name)  # type: ignore[attr-defined]
    return root, components


@pytest.fixture(scope="module")
def reference(saved: tuple[Path, dict[str, object]]) -> dict[str, torch.Tensor]:
    """diffusers' final latents and frames ([1, T, 3, H, W] in [0, 1])."""
    _, components = saved
    pipe = WanPipeline(scheduler=unipc_flow_scheduler(SHIFT), **components)  # type: ignore[arg-type]
    pipe.set_progress_bar_config(disable=True)
    captured: dict[str, torch.Tensor] = {}

    def keep_latents(_pipe: object, step: int, _t: object, kwargs: dict) -> dict:
        captured["latents"] = kwargs["latents"].clone()
        return kwargs

    frames = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pt",
        callback_on_step_end=keep_latents,
        max_sequence_length=512,
    ).frames
    return {"latents": captured["latents"], "frames": frames}


def params(seed: int = SEED) -> UserParams:
    return UserParams(
        model=MODEL,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=WIDTH,
        height=HEIGHT,
        frames=FRAMES,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        shift=SHIFT,
        seed=seed,
        solver="unipc",
    )


def run_ours(root: Path, cfg_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    engine = Engine.from_params(
        MODEL,
        SystemParams(device="cpu", dtype="float32"),
        weights_path=root,
        options=GeneratorOptions(cfg_mode=cfg_mode),
    )
    task = engine.submit(params())
    engine.run_until_idle()
    assert task.status is TaskStatus.SUCCEEDED, task.error
    frames = (task.video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # as diffusers' "pt"
    return task.buffers.latents, frames


@pytest.mark.parametrize("cfg_mode", ["sequential", "batched"])
def test_engine_matches_wan_pipeline(
    saved: tuple[Path, dict[str, object]], reference: dict[str, torch.Tensor], cfg_mode: str
) -> None:
    latents, frames = run_ours(saved[0], cfg_mode)
    assert latents.shape == reference["latents"].shape == (1, 16, 2, HEIGHT // 8, WIDTH // 8)
    assert frames.shape == reference["frames"].shape == (1, FRAMES, 3, HEIGHT, WIDTH)
    # the comparison must be able to fail: outputs vary, not saturated constants
    assert reference["latents"].std() > 0.1
    assert reference["frames"].std() > 1e-3
    assert relative_error(latents, reference["latents"]) < RTOL
    assert relative_error(frames, reference["frames"]) < RTOL


def test_different_seed_gives_different_video(
    saved: tuple[Path, dict[str, object]], reference: dict[str, torch.Tensor]
) -> None:
    """Control: the tolerance above is far below what a change of seed does."""
    engine = Engine.from_params(
        MODEL, SystemParams(device="cpu", dtype="float32"), weights_path=saved[0]
    )
    task = engine.submit(params(seed=SEED + 1))
    engine.run_until_idle()
    assert relative_error(task.buffers.latents, reference["latents"]) > 100 * RTOL
