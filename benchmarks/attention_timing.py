"""Two ways of timing one attention call, side by side: how much of a call is host overhead.

``benchmarks/attention.py`` and ``benchmarks/attention_wgmma.py`` synchronize the device before
every timed call, so a call's time includes whatever the host does before its first kernel
starts and between its kernels (Python, descriptor set-up, launches). In a model the host runs
ahead of the device and that time hides behind the previous kernels. At the 1.3B shape a
profile put ``sd-int8-wgmma``'s GPU work at 8.0 ms per call where the synchronized sweep timed
8.9 ms (``results/attention_wgmma_kernel_times_h200.txt``); this script separates the two
readings. For cuDNN SDPA and ``sd-int8-wgmma`` (default schedule), in interleaved rounds:

- ``synchronized``: CUDA events around each call, the device synchronized before it (the
  sweeps' method), median over ``--iters``;
- ``queued``: ``--iters`` calls back to back between two events, one synchronization at the
  end, divided by the count (the host runs ahead: launch overhead is hidden while the queue is
  non-empty);
- ``host``: the host's wall time per call during the queued run, before the final
  synchronization (what the host spends per call, overlapped or not).

``nvidia-smi`` clocks, power and temperature are read before and after each shape. Writes JSON
(command, GPU, versions, every round) to ``--out`` (default
``benchmarks/results/attention_timing_<gpu>.json``).

    python benchmarks/attention_timing.py                  # 1.3B and 14B shapes, 3 rounds

Needs a CUDA GPU; ``sd-int8-wgmma`` needs sm_90 and Triton >= 3.6 (Gluon).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))
sys.path.insert(0, str(REPO / "benchmarks"))

from attention import SHAPES, environment, make_inputs, timed  # noqa: E402

from smartdiff.attention.int8_wgmma import run_wgmma_attention  # noqa: E402


def synchronized(fn: Callable[[], Any], iters: int) -> float:
    """Median ms of one call, the device synchronized before each (:func:`attention.timed`)."""
    return statistics.median(timed(fn, torch.device("cuda", 0), 0, iters)) * 1e3


def queued(fn: Callable[[], Any], iters: int) -> tuple[float, float]:
    """``(device ms per call, host ms per call)`` over ``iters`` calls back to back."""
    fn()  # the queue starts with work in it, as in a model
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - begin) * 1e3 / iters
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, host


def gpu_state() -> str:
    query = "clocks.sm,clocks.max.sm,power.draw,temperature.gpu"
    result = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or result.stderr.strip()


def measure(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda", 0)
    heads, grid, dim = SHAPES[shape]
    q, k, v = make_inputs(heads, grid, dim, "random", device, torch.bfloat16, args.seed)
    flops = 4 * q.shape[2] ** 2 * dim * heads

    def cudnn() -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def ours() -> torch.Tensor:
        return run_wgmma_attention(q, k, v)[0]

    backends = {"sdpa-cudnn": cudnn, "sd-int8-wgmma": ours}
    for fn in backends.values():  # compile, load, warm up
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    entry: dict[str, Any] = {"shape": shape, "heads": heads, "tokens": q.shape[2]}
    entry["gpu_before"] = gpu_state()
    rounds = []
    for index in range(args.rounds):
        for name, fn in backends.items():
            sync_ms = synchronized(fn, args.iters)
            queued_ms, host_ms = queued(fn, args.iters)
            row = {
                "round": index,
                "backend": name,
                "synchronized_ms": round(sync_ms, 4),
                "queued_ms": round(queued_ms, 4),
                "host_ms": round(host_ms, 4),
                "synchronized_tflops": round(flops / sync_ms / 1e9, 1),
                "queued_tflops": round(flops / queued_ms / 1e9, 1),
            }
            rounds.append(row)
            print(f"{shape} {row}", flush=True)
    entry["gpu_after"] = gpu_state()
    entry["rounds"] = rounds
    for method in ("synchronized", "queued"):
        medians = {
            name: statistics.median(r[f"{method}_ms"] for r in rounds if r["backend"] == name)
            for name in backends
        }
        entry[f"speedup_vs_sdpa_cudnn_{method}"] = round(
            medians["sdpa-cudnn"] / medians["sd-int8-wgmma"], 3
        )
    print(
        f"{shape}: sd-int8-wgmma vs cuDNN, synchronized "
        f"{entry['speedup_vs_sdpa_cudnn_synchronized']}x, queued "
        f"{entry['speedup_vs_sdpa_cudnn_queued']}x",
        flush=True,
    )
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=["1.3b", "14b"], default=["1.3b", "14b"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_timing.py needs a CUDA GPU")
    device = torch.device("cuda", 0)
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **environment(device),
        "results": [],
    }
    slug = str(report["gpu"]).lower().replace("nvidia ", "").replace(" ", "-")
    out = args.out or REPO / "benchmarks" / "results" / f"attention_timing_{slug}.json"
    for shape in args.shapes:
        report["results"].append(measure(shape, args))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
