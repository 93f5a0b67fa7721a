"""Step caches end to end: forwards skipped, speed-up and fidelity against the exact run.

Runs the real generator (text embeddings -> 50 denoising steps with CFG -> VAE decode) of the
Wan2.1 1.3B pipeline at 832x480x81 with RANDOM weights (no checkpoint can be downloaded here),
once without a cache and once per cache (TeaCache, PAB, first-block cache) at its default
threshold (or ``--thresholds``), all with the same seed and prompt. For each it reports the
block passes skipped (of 2 x 50), attention outputs reused (PAB), the seconds of each stage,
the end-to-end and denoising speed-ups, and the fidelity of the decoded frames (uint8, as
written to MP4) against the exact run: PSNR (dB) and SSIM (mean over frames and channels,
11x11 Gaussian window, sigma 1.5), plus the relative L2 error of the final latents.

Fidelity is measured on RANDOM weights: the caches' thresholds were calibrated on trained
models, whose steps change differently; the figures say how this engine's caches behave on
this network, not how a trained Wan2.1 looks with them.

The text encoder is replaced by seeded random prompt embeddings (the UMT5-XXL forward is not
what is measured); the DiT and VAE are the real modules, built on the GPU from a seed, in
bf16, with the fused elementwise ops, as the engine's backend builds them. A short warm-up
run compiles everything first. Writes JSON to ``--out`` (default
``benchmarks/results/cache_e2e_<gpu>.json``).

    python benchmarks/cache_e2e.py                                # all caches, defaults
    python benchmarks/cache_e2e.py --policies teacache --thresholds teacache=0.15
    python benchmarks/cache_e2e.py --tiny                         # CPU smoke run, tiny model

Needs torch, pydantic, pyyaml, safetensors, numpy (the engine's imports); not diffusers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

from smartdiff.api.params import CachePolicy, SystemParams, UserParams  # noqa: E402
from smartdiff.cache.base import StepCache  # noqa: E402
from smartdiff.cache.factory import default_threshold  # noqa: E402
from smartdiff.engine.backend import Backend, Placement, resolve_attention  # noqa: E402
from smartdiff.engine.generator import Generator, to_uint8_frames  # noqa: E402
from smartdiff.engine.task import Task  # noqa: E402
from smartdiff.models.registry import ModelConfig, load_model_config  # noqa: E402
from smartdiff.models.wan_dit import WanDiT  # noqa: E402
from smartdiff.models.wan_vae import WanVAE  # noqa: E402

POLICIES = ("teacache", "pab", "fbcache")
PROMPT = "a lighthouse on a cliff at dusk, waves crashing, cinematic"


@dataclasses.dataclass(frozen=True)
class RandomPromptEmbeddings:
    """Stand-in text encoder: seeded N(0, 1) embeddings for the first ``tokens`` positions of
    each prompt (seed from the prompt's CRC32), zeros after, ``[n, length, dim]``."""

    dim: int
    length: int = 512
    tokens: int = 24

    def encode(
        self,
        prompts: str | list[str],
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        out = torch.zeros(len(prompts), self.length, self.dim)
        for index, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            out[index, : self.tokens] = torch.randn(self.tokens, self.dim, generator=generator)
        return out.to(device=device, dtype=dtype)


def random_backend(config: ModelConfig, attention_name: str, seed: int) -> Backend:
    """The 1.3B DiT and VAE with seeded random weights on the GPU (bf16), as the engine runs
    them; random prompt embeddings instead of UMT5-XXL."""
    device = torch.device("cuda", 0)
    placement = Placement(
        device=device, dtype=torch.bfloat16, text_encoder_device=device, memory_level=0
    )
    attention = resolve_attention(attention_name, placement, config.dit.head_dim)
    torch.manual_seed(seed)
    with torch.device(device):
        dit = WanDiT(config.dit, attention=attention)
        vae = WanVAE(config.vae)
    dit = dit.cast(torch.bfloat16).eval().requires_grad_(False).fuse_elementwise()
    vae = vae.to(dtype=torch.bfloat16).eval().requires_grad_(False)
    embeddings = RandomPromptEmbeddings(
        dim=config.text_encoder.d_model, length=config.text_encoder.max_length
    )
    return Backend(config, placement, dit=dit, vae=vae, text_encoder=embeddings)  # type: ignore[arg-type]


def run(backend: Backend, user: UserParams) -> dict[str, Any]:
    """One task through the generator; what its cache did, its timings, video and latents."""
    seen: dict[str, Any] = {}

    def on_step(task: Task, step: int, total: int) -> None:
        cache = backend.dit.step_cache
        if step == total and isinstance(cache, StepCache):
            seen["stats"] = dataclasses.asdict(cache.stats)

    task = Task(user)
    task.start()
    video = Generator(backend).generate(task, on_step)
    timings = dict(task.timings)
    timings["total"] = sum(timings.values())
    return {
        "stats": seen.get("stats"),
        "timings": timings,
        "video": video,
        "latents": task.buffers.latents.float().cpu(),
    }


def psnr(frames: torch.Tensor, reference: torch.Tensor) -> float | None:
    """PSNR in dB of uint8 frames; ``None`` when identical."""
    mse = float((frames.double() - reference.double()).square().mean())
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(frames: torch.Tensor, reference: torch.Tensor, device: torch.device) -> float:
    """Mean SSIM of uint8 frames ``[T, H, W, 3]`` (per channel, Gaussian 11x11, sigma 1.5,
    valid region), computed a few frames at a time."""
    size, sigma = 11, 1.5
    axis = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    gauss = torch.exp(-(axis**2) / (2 * sigma**2))
    gauss = gauss / gauss.sum()
    window = (gauss[:, None] * gauss[None, :]).expand(3, 1, size, size).contiguous()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    total, count = 0.0, 0
    for start in range(0, frames.shape[0], 8):
        x = frames[start : start + 8].to(device).permute(0, 3, 1, 2).double()
        y = reference[start : start + 8].to(device).permute(0, 3, 1, 2).double()

        def blur(t: torch.Tensor) -> torch.Tensor:
            return F.conv2d(t, window, groups=3)

        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        total += float(value.sum())
        count += value.numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument(
        "--thresholds",
        nargs="*",
        default=[],
        metavar="POLICY=VALUE",
        help="override a policy's default threshold, e.g. teacache=0.15",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--attention", default="sdpa", help="attention backend of every run (registry name or auto)"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run, tiny random model")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    overrides = {}
    for item in args.thresholds:
        policy, _, value = item.partition("=")
        if policy not in POLICIES or not value:
            parser.error(
                f"--thresholds {item!r}: expected POLICY=VALUE with POLICY in {', '.join(POLICIES)}"
            )
        overrides[policy] = float(value)

    if args.tiny:
        config = load_model_config("wan-tiny-random")
        backend = Backend.from_params(
            config, SystemParams(device="cpu", dtype="float32", attention=args.attention)
        )
        size = {"width": 64, "height": 48, "frames": 5}
        steps = min(args.steps, 10)
        gpu = None
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --tiny for the CPU smoke mode")
        config = load_model_config("wan2.1-t2v-1.3b")
        backend = random_backend(config, args.attention, args.seed)
        size = {"width": 832, "height": 480, "frames": 81}
        steps = args.steps
        gpu = torch.cuda.get_device_name(0)
    defaults = config.defaults

    def request(policy: str, threshold: float | None, request_steps: int) -> UserParams:
        fields: dict[str, Any] = dict(
            model=config.name,
            prompt=PROMPT,
            **size,
            steps=request_steps,
            guidance_scale=defaults.guidance_scale,
            shift=defaults.shift,
            solver=defaults.solver,
            seed=args.seed,
            cache=CachePolicy.model_validate({"policy": policy, "threshold": threshold}),
        )
        return UserParams(**fields)

    print("warm-up (compilation, autotuning) ...", flush=True)
    run(backend, request("none", None, 2))
    exact = run(backend, request("none", None, steps))
    exact_frames = to_uint8_frames(exact["video"])
    print(f"exact: {exact['timings']}", flush=True)
    results: list[dict[str, Any]] = [
        {
            "policy": "none",
            "threshold": None,
            "timings": exact["timings"],
        }
    ]
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "weights": "RANDOM (seeded); fidelity measured on random weights, not a trained model",
        "text_encoder": "model's own (tiny)"
        if args.tiny
        else "seeded random prompt embeddings (stand-in for UMT5-XXL)",
        "model": config.name,
        "request": {
            **size,
            "steps": steps,
            "guidance_scale": defaults.guidance_scale,
            "shift": defaults.shift,
            "solver": defaults.solver,
            "seed": args.seed,
            "attention": args.attention,
            "dtype": "float32" if args.tiny else "bfloat16",
            "cfg_mode": "sequential",
        },
        "results": results,
        "complete": False,
    }
    slug = "cpu-tiny" if args.tiny else str(gpu).lower().replace("nvidia ", "").replace(" ", "-")
    out = args.out or REPO / "benchmarks" / "results" / f"cache_e2e_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    write()
    device = backend.device
    reference_frames = torch.from_numpy(exact_frames)
    for policy in args.policies:
        threshold = overrides.get(policy, default_threshold(policy, config.dit))
        cached = run(backend, request(policy, threshold, steps))
        frames = torch.from_numpy(to_uint8_frames(cached["video"]))
        stats = cached["stats"] or {}
        latent_error = float(
            (cached["latents"] - exact["latents"]).norm() / exact["latents"].norm()
        )
        entry = {
            "policy": policy,
            "threshold": threshold,
            "block_passes": stats.get("forwards"),
            "block_passes_skipped": stats.get("skipped"),
            "attention_outputs_reused": stats.get("attention_reused"),
            "attention_outputs_computed": stats.get("attention_computed"),
            "timings": cached["timings"],
            "speedup_end_to_end": round(exact["timings"]["total"] / cached["timings"]["total"], 3),
            "speedup_denoise": round(exact["timings"]["denoise"] / cached["timings"]["denoise"], 3),
            "psnr_db": psnr(frames, reference_frames),
            "ssim": round(ssim(frames, reference_frames, device), 5),
            "latent_relative_error": float(f"{latent_error:.4g}"),
        }
        results.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "timings"}), flush=True)
        write()  # after every run: a run stopped early keeps its figures
    report["complete"] = True
    write()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
