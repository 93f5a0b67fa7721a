"""Memory levels 0-3 and the tiled VAE decode: peak GPU memory and time, random weights.

Two parts (``--part levels vae``, both by default), one JSON file (command, GPU, versions):

- ``levels``: for each model (``--models 14b a14b``: Wan2.1-T2V-14B and Wan2.2-T2V-A14B, real
  shapes) and memory level (``--levels 0 1 2 3``), a backend with seeded RANDOM weights (DiT(s),
  Wan2.1 VAE, UMT5-XXL-shaped text encoder with a byte-level tokenizer) is built as the level
  places it, then one request runs through the real generator: 1280x720x81, CFG 5.0,
  ``--steps 2`` at shift 1 (timesteps 1000 and 500, so A14B runs one step per expert and level
  3 swaps experts once). Per stage (encode, denoise, decode): seconds and peak allocated GPU
  memory; plus the resident memory after loading.
- ``vae``: decode of random raw latents for 1280x720x81 (``--vae wan2.1``; ``wan2.2`` adds the
  TI2V-5B VAE at 1280x704x121): our untiled decode, our tiled decode (default
  ``VAETiling``: exact halos, 768-pixel tiles, 2 frames per stage call), the same with 1 frame
  per call, without halos, 1 frame per call without tiles, and diffusers'
  ``AutoencoderKLWan`` with the same weights untiled and tiled (skipped, and said so, when
  diffusers is not installed). Seconds (median of ``--iters`` after a warm-up),
  peak allocated memory and its increase over the resident weights and latents, and each
  output's relative error against our untiled decode. On CUDA our VAE runs with its fused
  norm + SiLU, as the backend builds it.

    python benchmarks/memory_levels.py --part vae --iters 3
    python benchmarks/memory_levels.py --part levels --models 14b a14b
    python benchmarks/memory_levels.py --tiny            # CPU smoke test, tiny configs
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

from smartdiff.models.vae_tiling import VAETiling  # noqa: E402
from smartdiff.models.wan22_vae import Wan22VAE, Wan22VAEConfig  # noqa: E402
from smartdiff.models.wan_vae import WanVAE, WanVAEConfig, fuse_norm_silu  # noqa: E402

GIB = float(1 << 30)
MODELS = {
    "14b": "wan2.1-t2v-14b",
    "a14b": "wan2.2-t2v-a14b",
    "tiny": "wan-tiny-random",
    "tiny-a14b": "wan22-a14b-tiny-random",
}
PROMPT = "A red fox runs through fresh snow at dawn, cinematic lighting, shallow depth of field"


def fill_random(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights in place, on the module's device: matrices and kernels
    ``N(0, 1/fan_in)``, modulation tables ``N(0, 1/dim)``, norm gains 1, biases 0."""
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("modulation"):
                param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
            elif param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return module.eval().requires_grad_(False)


def build_on(
    factory: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype | None, seed: int
) -> Any:
    """Build on the meta device, allocate on ``device``, fill with random weights."""
    with torch.device("meta"):
        module = factory()
        if dtype is not None:
            module = module.to(dtype)
    return fill_random(module.to_empty(device=device), seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_now(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"allocated_gib": None, "peak_gib": None}
    return {
        "allocated_gib": round(torch.cuda.memory_allocated(device) / GIB, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
    }


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------- memory levels


def build_backend(
    name: str, level: int, device: torch.device, dtype: torch.dtype, seed: int
) -> Any:
    from smartdiff.engine.backend import Backend, Placement
    from smartdiff.models.registry import load_model_config
    from smartdiff.models.text_encoder import TextEncoder, build_byte_tokenizer
    from smartdiff.models.wan_dit import WanDiT

    config = load_model_config(name)
    te_device = torch.device("cpu") if level >= 2 else device
    placement = Placement(
        device=device, dtype=dtype, text_encoder_device=te_device, memory_level=level
    )
    dit = build_on(lambda: WanDiT(config.dit).cast(dtype), device, None, seed)
    dit_2 = None
    if config.num_experts == 2:  # the offloader (level 3) moves it to the host
        dit_2 = build_on(lambda: WanDiT(config.dit).cast(dtype), device, None, seed + 3)
    if device.type == "cuda":
        dit.fuse_elementwise()
        if dit_2 is not None:
            dit_2.fuse_elementwise()
    vae_class = Wan22VAE if isinstance(config.vae, Wan22VAEConfig) else WanVAE
    vae = build_on(lambda: vae_class(config.vae), device, dtype, seed + 1)  # type: ignore[arg-type]
    if device.type == "cuda":
        fuse_norm_silu(vae)
    from transformers import UMT5EncoderModel

    encoder = build_on(
        lambda: UMT5EncoderModel(config.text_encoder.to_transformers()), device, dtype, seed + 2
    ).to(te_device)
    tokenizer = build_byte_tokenizer(config.text_encoder.max_length)  # ids fit any vocabulary
    text_encoder = TextEncoder(tokenizer, encoder, config.text_encoder)
    return Backend(config, placement, dit=dit, vae=vae, text_encoder=text_encoder, dit_2=dit_2)


def run_level(
    name: str, level: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    from smartdiff.api.params import UserParams
    from smartdiff.engine.generator import Generator
    from smartdiff.engine.task import Task

    start = time.perf_counter()
    backend = build_backend(name, level, device, dtype, args.seed)
    sync(device)
    build_seconds = time.perf_counter() - start
    reset_peak(device)
    resident = memory_now(device)["allocated_gib"]
    width, height, frames = args.size
    params = UserParams(
        model=name,
        prompt=PROMPT,
        negative_prompt="blurry, low quality",
        width=width,
        height=height,
        frames=frames,
        steps=args.steps,
        guidance_scale=5.0,
        shift=args.shift,
        seed=args.seed,
    )
    task = Task(params=params)
    task.start()
    generator = Generator(backend)
    stages: dict[str, Any] = {}
    for stage, run in (
        ("encode", generator.encode),
        ("denoise", generator.denoise),
        ("decode", generator.decode),
    ):
        reset_peak(device)
        run(task)
        sync(device)
        stages[stage] = {"seconds": round(task.timings[stage], 3), **memory_now(device)}
    plan = generator.expert_schedule(task).plan(
        [1000.0 * s for s in _sigmas(args.steps, args.shift)]
    )
    result = {
        "model": name,
        "memory_level": level,
        "build_seconds": round(build_seconds, 2),
        "resident_after_load_gib": resident,
        "stages": stages,
        "peak_gib": max((s["peak_gib"] or 0.0) for s in stages.values()) or None,
        "seconds_per_step": round(task.timings["denoise"] / args.steps, 3),
        "experts_per_step": [step.expert for step in plan],
        "vae_tiling": None if backend.vae.tiling is None else vars(backend.vae.tiling),
        "text_encoder_device": str(backend.text_encoder.device),
        "video_finite": bool(torch.isfinite(task.video).all()),
    }
    if backend.offloader is not None:
        backend.offloader.close()
    del backend, generator, task
    reset_peak(device)
    return result


def _sigmas(steps: int, shift: float) -> list[float]:
    """The UniPC flow schedule's sigmas (as ``smartdiff.samplers``), for the expert plan."""
    from smartdiff.samplers import SamplerConfig, make_sampler

    sampler = make_sampler("unipc", SamplerConfig(num_steps=steps, shift=shift))
    return [float(t) / 1000.0 for t in sampler.timesteps]


# ------------------------------------------------------------------------------- VAE part


def timed_runs(
    fn: Callable[[], torch.Tensor], device: torch.device, iters: int
) -> tuple[list[float], float | None, torch.Tensor]:
    """Warm-up, then ``iters`` timed runs; the peak allocated memory over them."""
    warm: torch.Tensor | None = fn()
    del warm
    reset_peak(device)
    times = []
    out: torch.Tensor | None = None
    for _ in range(iters):
        del out
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    assert out is not None
    return times, peak, out


def diffusers_vae(vae: WanVAE | Wan22VAE, dtype: torch.dtype) -> Any:
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as error:
        return f"diffusers not installed ({error})"
    from smartdiff.models import wan22_vae, wan_vae

    config = vae.config
    kwargs: dict[str, Any] = dict(
        base_dim=config.base_dim,
        z_dim=config.z_dim,
        dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks,
        temperal_downsample=list(config.temperal_downsample),
        latents_mean=list(config.latents_mean),
        latents_std=list(config.latents_std),
    )
    if isinstance(config, Wan22VAEConfig):
        kwargs.update(
            decoder_base_dim=config.decoder_base_dim,
            is_residual=True,
            in_channels=config.patch_channels,
            out_channels=config.patch_channels,
            patch_size=config.patch_size,
            scale_factor_spatial=config.spatial_compression,
        )
        state = wan22_vae.to_diffusers_naming(vae.state_dict())
    else:
        state = wan_vae.to_diffusers_naming(vae.state_dict())
    with torch.device("meta"):
        model: Any = AutoencoderKLWan(**kwargs)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def run_vae(
    kind: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    if args.tiny:
        from smartdiff.models.registry import load_model_config

        config: WanVAEConfig | Wan22VAEConfig = load_model_config(
            "wan-tiny-random" if kind == "wan2.1" else "wan22-ti2v-tiny-random"
        ).vae
        width, height, frames = (128, 96, 9)
    elif kind == "wan2.1":
        config, (width, height, frames) = WanVAEConfig(), (1280, 720, 81)
    else:
        config, (width, height, frames) = Wan22VAEConfig(), (1280, 704, 121)
    vae_class = Wan22VAE if isinstance(config, Wan22VAEConfig) else WanVAE
    vae: Any = build_on(lambda: vae_class(config), device, dtype, args.seed)  # type: ignore[arg-type]
    if device.type == "cuda":
        fuse_norm_silu(vae)  # as the backend does on CUDA
    s, r = config.spatial_compression, config.temporal_compression
    shape = (1, config.z_dim, (frames - 1) // r + 1, height // s, width // s)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    latents = torch.randn(shape, generator=generator, device=device).to(dtype)
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "ours_untiled": lambda: vae.decode(latents, None),
        "ours_tiled": lambda: vae.decode(latents, VAETiling()),
        "ours_tiled_stage_frames_1": lambda: vae.decode(latents, VAETiling(stage_frames=1)),
        "ours_tiled_no_halo": lambda: vae.decode(latents, VAETiling(exact=False)),
        "ours_stage_frames_1_only": lambda: vae.decode(
            latents, VAETiling(tile_size=1 << 16, overlap=0, stage_frames=1)
        ),
    }
    reference: Any = diffusers_vae(vae, dtype)
    note = reference if isinstance(reference, str) else None
    if not isinstance(reference, str):
        reference = reference.to(device)

        def diffusers_decode(tiled: bool) -> torch.Tensor:
            assert not isinstance(reference, str)
            if tiled:
                reference.enable_tiling()
            else:
                reference.disable_tiling()
            with torch.no_grad():
                return reference.decode(latents).sample

        variants["diffusers_untiled"] = lambda: diffusers_decode(False)
        variants["diffusers_tiled"] = lambda: diffusers_decode(True)
    reset_peak(device)
    base = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    results: dict[str, Any] = {}
    untiled: torch.Tensor | None = None
    for name, fn in variants.items():
        times, peak, out = timed_runs(fn, device, args.iters)
        entry: dict[str, Any] = {
            "seconds": [round(t, 3) for t in times],
            "median_seconds": round(statistics.median(times), 3),
            "peak_gib": None if peak is None else round(peak, 3),
            "peak_over_resident_gib": None
            if peak is None or base is None
            else round(peak - base, 3),
        }
        if untiled is None:
            untiled = out.cpu()
            entry["rel_error_vs_ours_untiled"] = 0.0
        else:
            diff = (out.float().cpu() - untiled.float()).norm() / untiled.float().norm()
            entry["rel_error_vs_ours_untiled"] = float(diff)
        results[name] = entry
        del out
        reset_peak(device)
    summary = _vae_summary(results)
    return {
        "vae": kind,
        "size": {"width": width, "height": height, "frames": frames},
        "latents": list(shape),
        "resident_gib": None if base is None else round(base, 3),
        "diffusers_note": note,
        "results": results,
        "summary": summary,
    }


def _vae_summary(results: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: str, b: str, key: str) -> float | None:
        if a not in results or b not in results or not results[b][key]:
            return None
        if results[a][key] is None:
            return None
        return round(results[a][key] / results[b][key], 3)

    return {
        "tiled_peak_over_untiled_peak": ratio("ours_tiled", "ours_untiled", "peak_gib"),
        "tiled_peak_over_diffusers_untiled_peak": ratio(
            "ours_tiled", "diffusers_untiled", "peak_gib"
        ),
        "tiled_seconds_over_diffusers_untiled": ratio(
            "ours_tiled", "diffusers_untiled", "median_seconds"
        ),
        "untiled_seconds_over_diffusers_untiled": ratio(
            "ours_untiled", "diffusers_untiled", "median_seconds"
        ),
    }


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs="+", choices=("levels", "vae"), default=["levels", "vae"])
    parser.add_argument("--models", nargs="+", choices=("14b", "a14b"), default=["14b", "a14b"])
    parser.add_argument("--levels", nargs="+", type=int, choices=(0, 1, 2, 3), default=[0, 1, 2, 3])
    parser.add_argument("--vae", nargs="+", choices=("wan2.1", "wan2.2"), default=["wan2.1"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument(
        "--size", type=int, nargs=3, default=(1280, 720, 81), metavar=("WIDTH", "HEIGHT", "FRAMES")
    )
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke test: tiny random models, small shapes, fp32"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.size, args.iters = (64, 48, 5), 1
        models = [MODELS["tiny"], MODELS["tiny-a14b"]]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --tiny for the CPU smoke test")
        device, dtype = torch.device("cuda:0"), torch.bfloat16
        models = [MODELS[m] for m in args.models]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    report: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "cudnn_benchmark": args.cudnn_benchmark,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        import diffusers

        report["diffusers"] = diffusers.__version__
    except ImportError:
        report["diffusers"] = None
    if "vae" in args.part:
        report["vae"] = []
        for kind in args.vae:
            report["vae"].append(run_vae(kind, args, device, dtype))
            print(json.dumps(report["vae"][-1]["summary"]), flush=True)
    if "levels" in args.part:
        report["levels"] = {
            "size": list(args.size),
            "steps": args.steps,
            "shift": args.shift,
            "runs": [],
        }
        for name in models:
            for level in args.levels:
                result = run_level(name, level, args, device, dtype)
                report["levels"]["runs"].append(result)
                print(
                    json.dumps(
                        {
                            k: result[k]
                            for k in ("model", "memory_level", "peak_gib", "seconds_per_step")
                        }
                    ),
                    flush=True,
                )
    tag = "tiny_cpu" if args.tiny else report["gpu"].split()[-1].lower()
    out = args.out or REPO / "benchmarks" / "results" / f"memory_levels_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
