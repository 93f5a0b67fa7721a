"""Time of one denoising step (both CFG branches) of the Wan2.1 DiT: ours vs diffusers.

Run under torchrun, one process per GPU::

    torchrun --nproc-per-node 2 benchmarks/parallel_step.py --model 1.3b \
        --out benchmarks/results/parallel_step_1.3b_2gpu.json
    python benchmarks/parallel_step.py --tiny            # CPU smoke test (also under torchrun)

For each topology (``--topologies``; ``auto``: the planner's choice for the world size, plus
Ulysses over every rank when that differs) it builds ``ParallelGroups``, wraps our ``WanDiT``
(random bf16 weights built on the GPU, identical on every rank) in ``ParallelDiT`` and times
``guided_noise`` -- the conditional and unconditional predictions and their combination --
with CUDA events after warm-up; the figure is the slowest rank's. Then, in the same run and
when importable, diffusers' ``WanTransformer3DModel`` with the same shapes, cuDNN attention
and (on several ranks) its context parallelism (``ContextParallelConfig(ulysses_degree=N)``):
two forwards per step, as diffusers has no CFG parallel. ``--check`` compares each parallel
prediction with this rank's own single-GPU prediction. ``--vae`` also times the VAE decoded
once on rank 0 and broadcast (:func:`smartdiff.parallel.vae.decode_once`).

Rank 0 prints the figures and writes JSON (command, GPU name, torch/CUDA/diffusers versions,
per-step times) to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

from smartdiff.models.wan_dit import WanDiT, WanDiTConfig  # noqa: E402
from smartdiff.parallel.cfg import guided_noise  # noqa: E402
from smartdiff.parallel.dit import ParallelDiT  # noqa: E402
from smartdiff.parallel.groups import ParallelGroups  # noqa: E402
from smartdiff.parallel.launch import read_launch_env  # noqa: E402

TEXT_TOKENS = 512
GUIDANCE = 5.0
TIMESTEP = 999.0


@dataclass(frozen=True)
class Workload:
    """A model and a video size."""

    name: str
    config: WanDiTConfig
    width: int
    height: int
    frames: int
    text_tokens: int = TEXT_TOKENS

    @property
    def latent(self) -> tuple[int, int, int, int]:
        return (self.config.in_dim, (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8)

    @property
    def tokens(self) -> int:
        _, f, h, w = self.latent
        pt, ph, pw = self.config.patch_size
        return (f // pt) * (h // ph) * (w // pw)


def workload(name: str) -> Workload:
    if name == "1.3b":
        return Workload("wan2.1-t2v-1.3b", WanDiTConfig.wan21_t2v_1_3b(), 832, 480, 81)
    if name == "14b":
        return Workload("wan2.1-t2v-14b", WanDiTConfig.wan21_t2v_14b(), 1280, 720, 81)
    if name == "tiny":
        config = WanDiTConfig(
            dim=48, ffn_dim=96, num_heads=3, num_layers=2, text_dim=32, freq_dim=32
        )
        return Workload("tiny", config, 80, 48, 9, text_tokens=16)
    raise ValueError(f"--model {name!r} is not allowed: one of 1.3b, 14b (or --tiny)")


# ------------------------------------------------------------------------------ models


def random_wan_dit(config: WanDiTConfig, device: torch.device, dtype: torch.dtype) -> WanDiT:
    """Our DiT with random weights made on ``device`` (no host copy), identical on all ranks."""
    with torch.device("meta"):
        model = WanDiT(config).cast(dtype)
    model = model.to_empty(device=device)
    _fill_random(model, seed=0, modulation_std=config.dim**-0.5)
    return model.eval().requires_grad_(False)


def _fill_random(model: torch.nn.Module, seed: int, modulation_std: float) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1 or name.endswith("gamma"):
                param.fill_(1.0)
            elif "modulation" in name or "scale_shift_table" in name:
                param.normal_(0.0, modulation_std, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
            if dist.is_initialized():
                dist.broadcast(param.data, src=0)


def diffusers_wan(config: WanDiTConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """diffusers' ``WanTransformer3DModel`` with the same shapes, random weights, its fp32
    islands kept in fp32 (as ``from_pretrained(torch_dtype=...)`` does)."""
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model: Any = WanTransformer3DModel(
            patch_size=config.patch_size,
            num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim,
            in_channels=config.in_dim,
            out_channels=config.out_dim,
            text_dim=config.text_dim,
            freq_dim=config.freq_dim,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=config.eps,
            rope_max_seq_len=config.rope_max_seq_len,
        )
    keep = set(model._keep_in_fp32_modules or ())
    for name, param in model.named_parameters():
        fp32 = bool(keep & set(name.split(".")))
        param.data = param.data.to(torch.float32 if fp32 else dtype)
    _fill_random(model, seed=1, modulation_std=config.dim**-0.5)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def time_steps(
    step: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int
) -> list[float]:
    """Seconds of each timed call of ``step`` (the slowest rank's), after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000.0)
        else:
            begin = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - begin)
    if dist.is_initialized():
        worst = torch.tensor(seconds, dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        seconds = worst.tolist()
    return seconds


def summary(seconds: list[float]) -> dict[str, object]:
    return {"step_s": seconds, "median_s": statistics.median(seconds), "min_s": min(seconds)}


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# -------------------------------------------------------------------------- topologies


def parse_topology(label: str, world: int) -> tuple[int, int, int]:
    """``cfg2xu2`` / ``u4`` / ``r2xu2`` / ``single`` -> (cfg, ulysses, ring)."""
    degrees = {"cfg": 1, "u": 1, "r": 1}
    if label != "single":
        for part in label.split("x"):
            key = part.rstrip("0123456789")
            if key not in degrees or not part[len(key) :].isdigit():
                raise ValueError(
                    f"topology {label!r} is not allowed: parts like cfg2, u4, r2 "
                    "joined by 'x', or 'single'"
                )
            degrees[key] = int(part[len(key) :])
    cfg, ulysses, ring = degrees["cfg"], degrees["u"], degrees["r"]
    if cfg * ulysses * ring != world:
        raise ValueError(
            f"topology {label!r} has {cfg * ulysses * ring} ranks, the launch has {world}"
        )
    return cfg, ulysses, ring


def auto_topologies(world: int, work: Workload, per_node: int) -> list[str]:
    """The planner's topology for ``world`` ranks, then Ulysses over all ranks if different."""
    from_planner: str
    try:
        from smartdiff.api.topology import degrees_summary, plan_topology
    except ImportError:  # the planner's package needs pydantic; plan the same way here
        cfg = 2 if world % 2 == 0 else 1
        context = world // cfg
        ulysses = max(
            d
            for d in range(1, context + 1)
            if context % d == 0 and per_node % d == 0 and work.config.num_heads % d == 0
        )
        parts = [
            f"{k}{v}" for k, v in (("cfg", cfg), ("u", ulysses), ("r", context // ulysses)) if v > 1
        ]
        from_planner = "x".join(parts) or "single"
    else:
        plan = plan_topology(
            gpus=world,
            gpus_per_node=per_node,
            num_heads=work.config.num_heads,
            tokens=work.tokens,
            do_cfg=True,
        )
        from_planner = degrees_summary(plan.cfg, plan.ulysses, plan.ring)
    labels = [from_planner]
    if world > 1 and f"u{world}" != from_planner:
        labels.append(f"u{world}")
    return labels


# ------------------------------------------------------------------------------ runs


def run_ours(
    args: argparse.Namespace,
    work: Workload,
    device: torch.device,
    dtype: torch.dtype,
    labels: list[str],
    inputs: tuple[torch.Tensor, ...],
) -> list[dict[str, object]]:
    latents, timestep, cond, uncond = inputs
    model = random_wan_dit(work.config, device, dtype)
    fused = args.fuse and device.type == "cuda" and hasattr(model, "fuse_elementwise")
    if fused:
        model.fuse_elementwise()
    model.attention = make_attention(args.attention, device)
    results = []
    for label in labels:
        cfg, ulysses, ring = parse_topology(label, args.world)
        groups = ParallelGroups.initialize(cfg=cfg, ulysses=ulysses, ring=ring, device=device)
        dit = ParallelDiT(model, groups)
        reset_peak(device)

        def step(dit: ParallelDiT = dit, groups: ParallelGroups = groups) -> torch.Tensor:
            return guided_noise(dit, latents, timestep, cond, uncond, GUIDANCE, groups)

        seconds = time_steps(step, device, args.warmup, args.steps)
        entry: dict[str, object] = {
            "impl": "smartdiff",
            "topology": label,
            "cfg": cfg,
            "ulysses": ulysses,
            "ring": ring,
            "lse_attention": dit.lse_attention.name if ring > 1 else None,
            "fused_elementwise": fused,
            "peak_gib": peak_gib(device),
            **summary(seconds),
        }
        if args.check and groups.world_size > 1:
            single = ParallelGroups.single(device)
            reference = guided_noise(model, latents, timestep, cond, uncond, GUIDANCE, single)
            entry["check_rel_err"] = relative_error(step(), reference)
        results.append(entry)
        log(
            args,
            f"smartdiff {label:>10}: {entry['median_s']:.4f} s/step (median of "
            f"{args.steps}), peak {entry['peak_gib']} GiB, check "
            f"{entry.get('check_rel_err')}",
        )
    return results


def run_diffusers(
    args: argparse.Namespace,
    work: Workload,
    device: torch.device,
    dtype: torch.dtype,
    inputs: tuple[torch.Tensor, ...],
) -> dict[str, object]:
    try:
        import diffusers
        from diffusers import ContextParallelConfig
    except ImportError as error:
        return {"impl": "diffusers", "skipped": f"not importable: {error}"}
    if args.world > 1 and device.type != "cuda":
        return {"impl": "diffusers", "skipped": "diffusers context parallel needs an accelerator"}
    latents, timestep, cond, uncond = inputs
    model = diffusers_wan(work.config, device, dtype)
    backend = "_native_cudnn" if device.type == "cuda" and args.attention == "cudnn" else "native"
    model.set_attention_backend(backend)
    heads = work.config.num_heads
    if args.world > 1:
        uneven = heads % args.world != 0
        model.enable_parallelism(
            config=ContextParallelConfig(ulysses_degree=args.world, ulysses_anything=uneven)
        )
    x = latents.to(dtype)
    steps = timestep.expand(1)
    reset_peak(device)

    def step() -> torch.Tensor:
        c = model(hidden_states=x, timestep=steps, encoder_hidden_states=cond, return_dict=False)[
            0
        ].float()
        u = model(hidden_states=x, timestep=steps, encoder_hidden_states=uncond, return_dict=False)[
            0
        ].float()
        return u + GUIDANCE * (c - u)

    seconds = time_steps(step, device, args.warmup, args.steps)
    entry: dict[str, object] = {
        "impl": "diffusers",
        "version": diffusers.__version__,
        "attention_backend": backend,
        "ulysses": args.world,
        "peak_gib": peak_gib(device),
        **summary(seconds),
    }
    log(
        args,
        f"diffusers  u{args.world:<8}: {entry['median_s']:.4f} s/step (median of "
        f"{args.steps}), peak {entry['peak_gib']} GiB",
    )
    return entry


def run_vae(
    args: argparse.Namespace,
    work: Workload,
    device: torch.device,
    dtype: torch.dtype,
    groups: ParallelGroups,
) -> dict[str, object]:
    """Decode once on rank 0 and broadcast; time on the slowest rank, decode alone on rank 0."""
    from smartdiff.models.wan_vae import WanVAE, WanVAEConfig
    from smartdiff.parallel.vae import decode_once

    config = (
        WanVAEConfig()
        if not args.tiny
        else WanVAEConfig(base_dim=8, dim_mult=(1, 1, 1, 1), num_res_blocks=1)
    )
    with torch.device("meta"):
        vae = WanVAE(config)
    vae = vae.to_empty(device=device).to(dtype)
    _fill_random(vae, seed=2, modulation_std=0.02)
    vae.eval().requires_grad_(False)
    latents = torch.randn((1, *work.latent), generator=torch.Generator().manual_seed(3))
    latents = latents.to(device=device, dtype=dtype)
    reset_peak(device)
    decode_seconds: list[float] = []

    def decode(z: torch.Tensor) -> torch.Tensor:
        begin = time.perf_counter()
        video = vae.decode(vae.denormalize_latents(z))
        synchronize_local(device)
        decode_seconds.append(time.perf_counter() - begin)
        return video

    def step() -> torch.Tensor:
        video = decode_once(decode, latents, groups)
        return latents if video is None else video

    seconds = time_steps(step, device, 1, 1)
    entry = {
        "impl": "smartdiff-vae",
        "decode_once_broadcast_s": seconds[0],
        "decode_s_rank0": decode_seconds[-1] if decode_seconds else None,
        "peak_gib_rank0": peak_gib(device),
    }
    log(
        args,
        f"VAE decode once + broadcast: {seconds[0]:.3f} s (decode alone {entry['decode_s_rank0']})",
    )
    return entry


def synchronize_local(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_attention(name: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The local attention of our DiT: cuDNN SDPA on CUDA (as diffusers' ``_native_cudnn``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    if name == "sdpa" or device.type != "cuda":
        return scaled_dot_product_attention
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def cudnn_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(order, set_priority=True):
            return scaled_dot_product_attention(q, k, v)

    return cudnn_sdpa


def log(args: argparse.Namespace, message: str) -> None:
    if args.rank == 0:
        print(message, flush=True)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("1.3b", "14b"), default="1.3b")
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU by default (smoke)")
    parser.add_argument(
        "--topologies",
        default="auto",
        help="comma-separated: auto, single, cfg2, u2, r2, cfg2xu2, r2xu2, ...",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--attention", choices=("cudnn", "sdpa"), default="cudnn")
    parser.add_argument(
        "--no-fuse",
        dest="fuse",
        action="store_false",
        help="do not fuse our element-wise ops (torch.compile)",
    )
    parser.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    parser.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare with this rank's single-GPU prediction (default: on except for 14b)",
    )
    parser.add_argument("--vae", action="store_true", help="also time decode-once + broadcast")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (or folder)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    if args.check is None:
        args.check = args.tiny or args.model != "14b"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launch = read_launch_env()
    args.rank, args.world = launch.rank, launch.world_size
    work = workload("tiny" if args.tiny else args.model)
    device_name = args.device
    if device_name == "auto":
        device_name = "cpu" if args.tiny or not torch.cuda.is_available() else "auto"
    labels: list[str] = []
    for label in args.topologies.split(","):
        expanded = (
            auto_topologies(args.world, work, launch.local_world_size)
            if label == "auto"
            else [label]
        )
        labels += [item for item in expanded if item not in labels]
    for label in labels:
        parse_topology(label, args.world)
    first = parse_topology(labels[0], args.world)
    groups = ParallelGroups.initialize(
        cfg=first[0], ulysses=first[1], ring=first[2], device=device_name
    )
    device = groups.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log(
        args,
        f"{work.name}: {work.width}x{work.height}x{work.frames} -> latent {work.latent}, "
        f"{work.tokens} tokens; {args.world} rank(s) on {device}, {dtype}; "
        f"topologies {labels}",
    )
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn((1, *work.latent), generator=generator).to(device),
        torch.tensor(TIMESTEP, device=device),
        torch.randn((1, work.text_tokens, work.config.text_dim), generator=generator).to(
            device=device, dtype=dtype
        ),
        torch.randn((1, work.text_tokens, work.config.text_dim), generator=generator).to(
            device=device, dtype=dtype
        ),
    )
    results: list[dict[str, object]] = []
    with torch.no_grad():
        results += run_ours(args, work, device, dtype, labels, inputs)
        reset_peak(device)
        if args.diffusers:
            results.append(run_diffusers(args, work, device, dtype, inputs))
            reset_peak(device)
        if args.vae:
            results.append(run_vae(args, work, device, dtype, groups))
    if args.rank == 0:
        write_report(args, work, device, launch.local_world_size, results)
    groups.shutdown()


def write_report(
    args: argparse.Namespace,
    work: Workload,
    device: torch.device,
    per_node: int,
    results: list[dict[str, object]],
) -> None:
    try:
        import diffusers

        diffusers_version: str | None = diffusers.__version__
    except ImportError:
        diffusers_version = None
    path = Path(sys.argv[0]).resolve()
    shown = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else sys.argv[0]
    script = " ".join([shown, *sys.argv[1:]])
    nodes = max(1, args.world // per_node)
    launcher = "python"
    if "TORCHELASTIC_RUN_ID" in os.environ or args.world > 1:
        launcher = f"torchrun --nproc-per-node {per_node}"
        if nodes > 1:
            launcher = f"torchrun --nnodes {nodes} --nproc-per-node {per_node} (c10d rendezvous)"
    report = {
        "command": f"{launcher} {script}",
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": work.name,
        "video": [work.width, work.height, work.frames],
        "latent": list(work.latent),
        "tokens": work.tokens,
        "world_size": args.world,
        "device": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu"
        ),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "diffusers": diffusers_version,
        "steps": args.steps,
        "warmup": args.warmup,
        "note": "seconds per denoising step, both CFG branches, slowest rank; random weights",
        "results": results,
    }
    out = args.out or REPO / "benchmarks" / "results"
    if out.suffix != ".json":
        label = "tiny" if args.tiny else args.model
        out = out / f"parallel_step_{label}_{args.world}rank.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
