"""Attention backends at the Wan shapes: TFLOP/s and relative error against an fp32 reference.

For each shape -- Wan2.1 1.3B at 832x480x81 (12 heads x 32760 tokens) and 14B at 1280x720x81
(40 heads x 75600 tokens), head dim 128, batch 1, bf16 -- and each registered backend that runs
here, the backend is built through the registry (capability check and probe, as the engine
does), timed with CUDA events after a warm-up (the first calls of our Triton kernels include
their autotuning, excluded), and a sample of query rows is compared with an fp32 reference
computed by plain matmul and softmax with TF32 off: relative L2 error ``||out - ref|| /
||ref||`` and max abs error. FLOPs are ``4 * S^2 * D * H`` (dense, also for the sparse
backend, whose computed-tile density is reported next to it). Inputs are ``[B, S, H, D]``
tensors passed as transposed ``[B, H, S, D]`` views, as the DiT passes them.

``--inputs random`` (default) draws q, k, v from N(0, 1); ``--inputs smooth`` makes q and k
vary smoothly over the video's (frame, row, column) grid plus noise, the structure real video
attention has and random inputs lack (block-sparse prediction only pays off there).

Writes JSON (command, GPU, versions, per-backend results or the reason a backend was skipped)
to ``--out`` (default ``benchmarks/results/attention_<gpu>.json``).

    python benchmarks/attention.py                                 # every backend, both shapes
    python benchmarks/attention.py --shapes 1.3b --backends sdpa-cudnn sd-int8 sd-int8-fp8
    python benchmarks/attention.py --tiny                          # CPU smoke run, no GPU

Needs torch (and triton for our kernels); no pydantic, diffusers or transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

from smartdiff.attention import registry  # noqa: E402
from smartdiff.attention.quantization import int8_attention_reference  # noqa: E402
from smartdiff.attention.sparsity import (  # noqa: E402
    SparsityConfig,
    density,
    pool_blocks,
    predict_block_mask,
)

# name -> (heads, latent grid (frames, rows, columns) after 1x2x2 patches, head dim)
SHAPES: dict[str, tuple[int, tuple[int, int, int], int]] = {
    "1.3b": (12, (21, 30, 52), 128),
    "14b": (40, (21, 45, 80), 128),
    "tiny": (2, (2, 8, 16), 64),
}
ACCURACY_BOUND = 2e-2
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_inputs(
    heads: int,
    grid: tuple[int, int, int],
    dim: int,
    kind: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[1, H, S, D]`` (views of ``[1, S, H, D]``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = math.prod(grid)

    def noise() -> torch.Tensor:
        return torch.randn((1, tokens, heads, dim), generator=generator, device=device)

    if kind == "random":
        q, k, v = noise(), noise(), noise()
    else:  # smooth over the (frame, row, column) grid + noise: video-like structure
        coarse = tuple(max(2, n // 6) for n in grid)

        def field() -> torch.Tensor:
            low = torch.randn((1, heads * dim, *coarse), generator=generator, device=device)
            smooth = F.interpolate(low, size=grid, mode="trilinear", align_corners=True)
            return smooth.reshape(1, heads, dim, tokens).permute(0, 3, 1, 2)

        q, k, v = 2 * field() + 0.5 * noise(), 2 * field() + 0.5 * noise(), noise()
    return tuple(
        t.to(dtype).contiguous().transpose(1, 2)  # type: ignore[return-value]
        for t in (q, k, v)
    )


def reference_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """fp32 attention of the query ``rows`` against all keys, one head at a time."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = []
    for head in range(q.shape[1]):
        qh = q[:, head, rows].float()
        kh, vh = k[:, head].float(), v[:, head].float()
        probs = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
        out.append(torch.matmul(probs, vh))
    return torch.stack(out, dim=1)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return times


def candidates(
    names: list[str], device: torch.device, dtype: torch.dtype, dim: int
) -> list[tuple[str, Attention | None, str | None, float | None]]:
    """``(name, fn or None, reason skipped, probe error)`` for the registry backends, plus our
    kernel with SageAttention-style 128/64-row scale blocks and, on the CPU, its emulation."""
    found: list[tuple[str, Attention | None, str | None, float | None]] = []
    for name in names:
        try:
            backend = registry.select_attention(name, device=device, dtype=dtype, head_dim=dim)
        except (registry.AttentionUnavailableError, ValueError) as error:
            found.append((name, None, str(error), None))
            continue
        found.append((name, backend, None, backend.probe_error))
    if device.type == "cuda" and any(
        fn is not None and name == "sd-int8" for name, fn, _, _ in found
    ):
        from smartdiff.attention.int8_triton import int8_attention_lse

        def blocks_128_64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return int8_attention_lse(q, k, v, q_block=128, k_block=64)[0]

        found.append(("sd-int8[scales per 128/64 rows]", blocks_128_64, None, None))
    if device.type == "cpu":
        for fp8 in (False, True):
            found.append(
                (f"sd-int8 emulated ({'fp8' if fp8 else 'bf16'} PV)", _Emulated(fp8), None, None)
            )
    return found


@dataclasses.dataclass(frozen=True)
class _Emulated:
    """Our INT8 attention's PyTorch emulation (the ``--tiny`` CPU run has no Triton GPU)."""

    pv_fp8: bool

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return int8_attention_reference(q, k, v, pv_fp8=self.pv_fp8)[0]


def sparse_density(q: torch.Tensor, k: torch.Tensor) -> float:
    """Fraction of tiles the ``sparge`` backend computes on these inputs (its default config)."""
    k_mean = k.mean(dim=2, dtype=torch.float32)
    mask = predict_block_mask(
        pool_blocks(q, 128), pool_blocks(k, 64, subtract=k_mean), SparsityConfig()
    )
    return density(mask)


def bench_shape(shape: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    heads, grid, dim = SHAPES[shape]
    tokens = math.prod(grid)
    dtype = torch.bfloat16
    q, k, v = make_inputs(heads, grid, dim, args.inputs, device, dtype, args.seed)
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    rows = torch.randperm(tokens, generator=generator)[: min(args.ref_rows, tokens)].sort().values
    rows = rows.to(device)
    begin = time.perf_counter()
    reference = reference_rows(q, k, v, rows)
    reference_seconds = time.perf_counter() - begin
    flops = 4 * tokens * tokens * dim * heads
    results: list[dict[str, Any]] = []
    names = args.backends or list(registry.backend_names())
    for name, fn, reason, probe_error in candidates(names, device, dtype, dim):
        if fn is None:
            results.append({"backend": name, "available": False, "reason": reason})
            print(f"{shape:>5} {name:<32} skipped: {reason}", flush=True)
            continue
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start_memory = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            first = time.perf_counter()
            out = fn(q, k, v)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_call = time.perf_counter() - first
            times = timed(functools.partial(fn, q, k, v), device, args.warmup, args.iters)
        except Exception as failure:  # one failing backend must not end the run
            results.append(
                {
                    "backend": name,
                    "available": False,
                    "reason": f"{type(failure).__name__}: {str(failure).splitlines()[0]}",
                }
            )
            print(f"{shape:>5} {name:<32} failed: {failure}", flush=True)
            continue
        sample = out[:, :, rows].float()
        rel_error = float((sample - reference).norm() / reference.norm())
        median = statistics.median(times)
        entry: dict[str, Any] = {
            "backend": name,
            "available": True,
            "median_seconds": round(median, 6),
            "seconds": [round(t, 6) for t in times],
            "tflops": round(flops / median / 1e12, 1),
            "relative_error": float(f"{rel_error:.4g}"),
            "max_abs_error": float(f"{float((sample - reference).abs().max()):.4g}"),
            "within_bound": rel_error <= ACCURACY_BOUND,
            "probe_error": None if probe_error is None else float(f"{probe_error:.4g}"),
            "first_call_seconds": round(first_call, 3),
        }
        spec = getattr(fn, "spec", None)
        if spec is not None:
            entry["exact"] = spec.exact
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - start_memory
            entry["peak_extra_gib"] = round(peak / 2**30, 3)
        if name == "sparge":
            entry["tile_density"] = round(sparse_density(q, k), 4)
        results.append(entry)
        print(
            f"{shape:>5} {name:<32} {entry['tflops']:>7.1f} TFLOP/s  {median * 1e3:8.2f} ms  "
            f"rel.err {rel_error:.3e}",
            flush=True,
        )
        del out
    by_name: dict[str, dict[str, Any]] = {r["backend"]: r for r in results if r.get("available")}
    if "sdpa-cudnn" in by_name:
        base = float(by_name["sdpa-cudnn"]["median_seconds"])
        for measured in by_name.values():
            measured["speedup_vs_sdpa_cudnn"] = round(base / measured["median_seconds"], 3)
    return {
        "shape": shape,
        "heads": heads,
        "tokens": tokens,
        "head_dim": dim,
        "batch": 1,
        "grid": list(grid),
        "dtype": "bfloat16",
        "inputs": args.inputs,
        "flops": flops,
        "reference_rows": int(rows.numel()),
        "reference_seconds": round(reference_seconds, 2),
        "results": results,
    }


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=["1.3b", "14b"], default=["1.3b", "14b"])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="registry names (default: every registered backend)",
    )
    parser.add_argument("--inputs", choices=["random", "smooth"], default="random")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--ref-rows", type=int, default=2048, help="query rows compared with the fp32 reference"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny shape")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.tiny:
        device = torch.device("cpu")
        args.shapes, args.iters, args.warmup = ["tiny"], 2, 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --tiny for the CPU smoke mode")
        device = torch.device("cuda", 0)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    env = environment(device)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **env,
        "accuracy_bound": ACCURACY_BOUND,
        "flops_formula": "4 * S^2 * D * H (dense)",
        "shapes": [bench_shape(shape, args, device) for shape in args.shapes],
    }
    slug = (
        "cpu-tiny"
        if args.tiny
        else str(env["gpu"]).lower().replace("nvidia ", "").replace(" ", "-")
    )
    out = args.out or REPO / "benchmarks" / "results" / f"attention_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
