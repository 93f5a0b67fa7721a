"""The ``sd-int8-wgmma`` kernel's schedule switches, measured side by side at the Wan shapes.

:mod:`smartdiff.attention.int8_wgmma` (read its docstring) has six shipped compile-time switches
and one launch switch: the shared-memory ring depth ``stages``, ``pingpong`` (the two consumer
warpgroups take turns issuing their matrix products), ``overlap_qk`` (PV of the previous tile is
issued before waiting for this tile's scores), ``unroll`` (key tiles per loop iteration),
``fold`` (the softmax's scales and row maximum in one multiply-add per score), ``q_regs`` (the
query tile in registers, QK^T's A operand) and ``bounded`` (query blocks whose scores cannot run
away from tile 0's maximum skip the row maxima: a second build, a second launch), and three
experimental ones: ``sum_mma``, ``p_smem`` and ``pv8`` (INT8 PV). This script times a set of
combinations next to cuDNN SDPA and the plain-Triton ``sd-int8`` on the same inputs, checks each
against an fp32 reference on a sample of query rows, and checks that the schedule switches
change nothing in the output (``fold``, ``sum_mma``, ``pv8`` and ``bounded`` change the
arithmetic; ``bounded`` only where a row maximum moves past the lazy threshold after tile 0).
The layout is a switch too: ``consumers`` (warpgroups of 64 query rows per CTA) and
``block_n`` (keys per tile and K scale). The backend ships three consumers on 64-key tiles,
``stages=4``, ``unroll=2``, ``overlap_qk``, ``fold``, ``q_regs`` and ``bounded`` on; the
switches written for two consumers (``pingpong``, ``sum_mma``, ``p_smem``, ``pv8``) run on the
two-consumer, 128-key layout, the default until 2026-11-29.

History: the first Gluon prototype (one consumer warpgroup of 64 rows, 64-key tiles, per-key
scales) reached 412-504 TFLOP/s (``attention_wgmma_single_partition_h200.json``,
``attention_wgmma_ws_h200.txt``), slower than ``sd-int8``.

    python benchmarks/attention_wgmma.py                     # 1.3B and 14B shapes, random
    python benchmarks/attention_wgmma.py --shapes 14b --inputs smooth
    python benchmarks/attention_wgmma.py --pv8-only      # the INT8-PV variants only
    python benchmarks/attention_wgmma.py --schedules-only  # the shipped arithmetic only

Needs an sm_90 GPU, torch and Triton >= 3.6 (Gluon). Writes JSON to ``--out`` (default
``benchmarks/results/attention_wgmma_<gpu>.json``), rewritten after every shape.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))
sys.path.insert(0, str(REPO / "benchmarks"))

from attention import SHAPES, environment, make_inputs, reference_rows, timed  # noqa: E402

from smartdiff.attention.int8_triton import int8_attention_lse  # noqa: E402
from smartdiff.attention.int8_wgmma import run_wgmma_attention  # noqa: E402

THREE: list[dict[str, Any]] = [  # three consumers on 64-key tiles: the default, then variants
    {"consumers": 3, "block_n": 64, "stages": stages, "unroll": unroll, "bounded": bounded}
    for stages, unroll, bounded in ((4, 2, True), (4, 2, False), (6, 2, True), (4, 1, True))
]
SWITCHES: list[dict[str, Any]] = [
    {
        "consumers": 2,
        "block_n": 128,
        "stages": stages,
        "pingpong": pingpong,
        "overlap_qk": overlap,
        "fold": fold,
        "sum_mma": sum_mma,
        "pv8": pv8,
        "unroll": unroll,
        "p_smem": p_smem,
        "q_regs": q_regs,
        "bounded": True,
    }
    for fold, sum_mma, pv8, stages, pingpong, overlap, unroll, p_smem, q_regs in (
        (True, False, False, 3, False, True, 2, False, True),  # the default until 2026-11-29
        (True, False, False, 3, False, True, 2, False, False),  # before q_regs (2026-11-29)
        (True, False, False, 2, True, True, 1, True, True),
        (True, False, False, 2, False, True, 1, True, True),
        (True, False, False, 3, False, True, 1, True, True),
        (True, False, False, 3, True, True, 1, True, True),
        (True, False, False, 3, False, True, 2, True, True),
        (True, False, False, 2, False, True, 2, True, True),
        (True, False, False, 4, False, True, 2, False, True),
        (True, False, False, 3, True, True, 2, False, True),
        (True, False, False, 2, True, True, 1, False, False),  # the default until 2026-11-28
        (False, False, False, 2, True, True, 1, False, False),
        (False, False, False, 3, True, False, 1, False, False),
        (True, True, False, 3, False, True, 2, False, True),
        (True, False, True, 2, True, True, 1, False, False),
        (True, False, True, 2, False, True, 1, False, False),
    )
]
SWITCHES.insert(1, {**SWITCHES[0], "bounded": False})  # the default until session 9, 2026-11-29
SWITCHES[:0] = THREE


def measure(shape: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda", 0)
    heads, grid, dim = SHAPES[shape]
    q, k, v = make_inputs(heads, grid, dim, kind, device, torch.bfloat16, args.seed)
    seq = q.shape[2]
    flops = 4 * seq * seq * dim * heads
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    rows = torch.randint(0, seq, (args.ref_rows,), device=device, generator=generator)
    reference = reference_rows(q, k, v, rows)

    def error(out: torch.Tensor) -> float:
        return float((out[:, :, rows].float() - reference).norm() / reference.norm())

    def median(fn: Any) -> float:
        times = sorted(timed(fn, device, args.warmup, args.iters))
        return times[len(times) // 2]

    def cudnn() -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    base = median(cudnn)

    def figures(seconds: float) -> dict[str, float]:
        return {
            "tflops": round(flops / seconds / 1e12, 1),
            "speedup_vs_sdpa_cudnn": round(base / seconds, 3),
        }

    entry: dict[str, Any] = {"shape": shape, "inputs": kind, "heads": heads, "tokens": seq}
    entry["sdpa-cudnn"] = {**figures(base), "rel_error": error(cudnn())}
    shipped = median(lambda: int8_attention_lse(q, k, v))
    entry["sd-int8"] = {**figures(shipped), "rel_error": error(int8_attention_lse(q, k, v)[0])}
    print(f"{shape}/{kind}: cuDNN {flops / base / 1e12:.0f} TFLOP/s, sd-int8 "
          f"{flops / shipped / 1e12:.0f}", flush=True)  # fmt: skip
    firsts: dict[tuple[int | bool, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    entry["sd-int8-wgmma"] = []
    for switches in SWITCHES:
        if args.pv8_only and not switches.get("pv8"):
            continue
        if args.schedules_only and (
            switches.get("pv8") or switches.get("sum_mma") or not switches.get("fold", True)
        ):
            continue
        out, lse = run_wgmma_attention(q, k, v, **switches)
        fold, sum_mma, pv8 = (
            bool(switches.get(n, n == "fold")) for n in ("fold", "sum_mma", "pv8")
        )
        arithmetic = (
            switches["block_n"],
            fold,
            sum_mma,
            pv8,
            bool(switches["bounded"]) and fold and not (pv8 or sum_mma),
        )
        first, first_lse = firsts.setdefault(arithmetic, (out, lse))
        seconds = median(lambda s=switches: run_wgmma_attention(q, k, v, **s))
        result = {
            **switches,
            **figures(seconds),
            "speedup_vs_sd_int8": round(shipped / seconds, 3),
            "rel_error": error(out),
            # the schedule switches reorder issue only: bit-equal to the first of its arithmetic
            "same_output_as_first_with_this_arithmetic": bool(
                torch.equal(out, first) and torch.equal(lse, first_lse)
            ),
        }
        entry["sd-int8-wgmma"].append(result)
        print(f"  {result}", flush=True)
    # cuDNN again after the sweep: a drift in clocks over the run shows as a difference here
    after = median(cudnn)
    entry["sdpa-cudnn-after-sweep"] = {"tflops": round(flops / after / 1e12, 1)}
    print(f"{shape}/{kind}: cuDNN after the sweep {flops / after / 1e12:.0f} TFLOP/s", flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=["1.3b", "14b"], default=["1.3b", "14b"])
    parser.add_argument("--inputs", nargs="+", choices=["random", "smooth"], default=["random"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ref-rows", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pv8-only", action="store_true", help="only the INT8-PV variants")
    parser.add_argument(
        "--schedules-only", action="store_true", help="only the shipped arithmetic's schedules"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(0) != (9, 0):
        parser.error("needs an sm_90 GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", 0)
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **environment(device),
        "flops_formula": "4 * S^2 * D * H",
        "results": [],
        "complete": False,
    }
    slug = str(report["gpu"]).lower().replace("nvidia ", "").replace(" ", "-")
    out = args.out or REPO / "benchmarks" / "results" / f"attention_wgmma_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        for kind in args.inputs:
            report["results"].append(measure(shape, kind, args))
            out.write_text(json.dumps(report, indent=2) + "\n")
    report["complete"] = True
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
