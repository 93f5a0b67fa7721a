"""Wan2.1 DiT forward: our WanDiT next to diffusers' WanTransformer3DModel, same weights.

For each model (1.3B at 832x480x81, 14B at 1280x720x81) it builds random
weights once (seeded, fp32, on the GPU), computes an fp32 reference output with
our model (TF32 off), then times one bf16 forward of each implementation with
the same weights and inputs, alternating them, after a warm-up, and reports each
one's relative error against the fp32 reference. Prints figures and writes JSON
(command, GPU, versions, timings, errors) under benchmarks/results/.

    python benchmarks/dit_forward.py --model 1.3b 14b --iters 3
    python benchmarks/dit_forward.py --attention sd-int8-wgmma   # also ours with that backend

``--attention NAME...`` adds a run of our model per registry backend (chosen through
:func:`select_attention`, as the engine does; it replaces the self-attention over the video
tokens, which is where the time goes).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

from smartdiff.attention.registry import select_attention  # noqa: E402
from smartdiff.models.wan_dit import WanDiT, WanDiTConfig, to_diffusers_naming  # noqa: E402

SHAPES = {  # model -> (config, (width, height, frames))
    "1.3b": (WanDiTConfig.wan21_t2v_1_3b, (832, 480, 81)),
    "14b": (WanDiTConfig.wan21_t2v_14b, (1280, 720, 81)),
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = out.float() - ref.float()
    return float(diff.norm() / ref.float().norm())


def diffusers_model(config: WanDiTConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=config.patch_size,
            num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim,
            in_channels=config.in_dim,
            out_channels=config.out_dim,
            text_dim=config.text_dim,
            freq_dim=config.freq_dim,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_layers,
            cross_attn_norm=config.cross_attn_norm,
            qk_norm="rms_norm_across_heads",
            eps=config.eps,
        )
    keep = WanTransformer3DModel._keep_in_fp32_modules or []
    converted = {}
    for name, tensor in to_diffusers_naming(state).items():
        fp32 = any(part in keep for part in name.split("."))
        converted[name] = tensor.to(torch.float32 if fp32 else torch.bfloat16)
    model.load_state_dict(converted, strict=True, assign=True)
    # Non-persistent buffers (the RoPE tables) are not in a state dict: rebuild them on the GPU.
    with torch.device("cuda"):
        model.rope = type(model.rope)(config.head_dim, config.patch_size, config.rope_max_seq_len)
    return model.eval().requires_grad_(False)


def timed(fn: Any, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


@torch.no_grad()
def bench(
    name: str, iters: int, profile: bool = False, attention: tuple[str, ...] = ()
) -> dict[str, Any]:
    make_config, (width, height, frames) = SHAPES[name]
    config = make_config()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    latent = (1, config.in_dim, (frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(latent, generator=gen, device=device)
    timestep = torch.tensor([500.0], device=device)
    context = torch.randn(1, 512, config.text_dim, generator=gen, device=device)
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        ours = WanDiT(config).eval().requires_grad_(False)
    build_s = time.perf_counter() - t0

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    reference = ours(latents, timestep, context).float()
    torch.cuda.synchronize()
    fp32_s = time.perf_counter() - t0

    state = {k: v for k, v in ours.state_dict().items()}
    theirs = diffusers_model(config, state)
    del state
    ours.cast(torch.bfloat16)
    gc.collect()
    torch.cuda.empty_cache()

    def run_ours() -> torch.Tensor:
        return ours(latents, timestep, context)

    def run_fused() -> torch.Tensor:
        ours.fuse_elementwise(True)
        try:
            return ours(latents, timestep, context)
        finally:
            ours.fuse_elementwise(False)

    def run_theirs() -> torch.Tensor:
        return theirs(
            hidden_states=latents.to(torch.bfloat16),
            timestep=timestep,
            encoder_hidden_states=context.to(torch.bfloat16),
            return_dict=False,
        )[0]

    runs = {"ours": run_ours, "ours_fused": run_fused, "diffusers": run_theirs}
    for backend_name in attention:
        backend = select_attention(
            backend_name, device=device, dtype=torch.bfloat16, head_dim=config.head_dim
        )

        def run_with(backend: Any = backend) -> torch.Tensor:
            default, ours.attention = ours.attention, backend
            try:
                return ours(latents, timestep, context)
            finally:
                ours.attention = default

        runs[f"ours[{backend_name}]"] = run_with
    errors = {k: rel_error(fn(), reference) for k, fn in runs.items()}  # also the warm-up
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        for k, fn in runs.items():
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            print(f"--- {name} {k}: top CUDA kernels")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(iters):  # alternate, so drift in clocks hits all alike
        for k, fn in runs.items():
            times[k] += timed(fn, 1)
    peak = torch.cuda.max_memory_allocated() / 2**30
    result = {
        "model": name,
        "size": {"width": width, "height": height, "frames": frames, "tokens": tokens},
        "build_seconds": round(build_s, 2),
        "fp32_reference_seconds": round(fp32_s, 2),
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "median_seconds": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "speedup_vs_diffusers": {
            k: round(statistics.median(times["diffusers"]) / statistics.median(v), 3)
            for k, v in times.items()
        },
        "rel_error_vs_fp32": errors,
        "error_ratio_vs_diffusers": {
            k: round(v / errors["diffusers"], 3) for k, v in errors.items()
        },
        "peak_gib": round(peak, 1),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(SHAPES), default=["1.3b"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels")
    parser.add_argument(
        "--attention", nargs="*", default=[], help="registry backends to run ours with as well"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/dit_forward.json")
    args = parser.parse_args()
    import diffusers

    meta = {
        "command": "python " + " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results = []
    for name in args.model:
        r = bench(name, args.iters, args.profile, tuple(args.attention))
        results.append(r)
        gc.collect()  # the models die with bench()'s frame
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for k, t in r["median_seconds"].items():
            print(
                f"{name} ({r['size']['tokens']} tokens) {k:>10}: {t:.3f} s  "
                f"x{r['speedup_vs_diffusers'][k]} vs diffusers  "
                f"rel err vs fp32 {r['rel_error_vs_fp32'][k]:.3e}",
                flush=True,
            )
        print(f"{name}: peak {r['peak_gib']} GiB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
