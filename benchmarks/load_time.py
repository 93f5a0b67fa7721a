"""Time to load the Wan2.1 DiT from local disk to the GPU: ours next to diffusers, same weights.

Random weights of the real size (14B by default; ``--tiny`` uses the DiT of
``configs/models/wan-tiny-random.yaml`` and runs on the CPU) are written once in the official
release layout (``config.json`` + ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` +
index, official names) and in the diffusers layout (``transformer/`` with diffusers names and
config). Both layouts hold the same values: each tensor is drawn from its own seed (its index
in the official naming), whatever the layout.

Then, in the same process, each loader is timed from the call to the model being on the device
(``torch.cuda.synchronize``), alternating loaders, ``--repeats`` times per page-cache state:

- ``ours``: ``WanDiT.from_checkpoint(<official index>, device, dtype)`` (what the backend uses);
- ``diffusers``: ``WanTransformer3DModel.from_pretrained(<transformer/>, torch_dtype=dtype)``
  then ``.to(device)``;
- ``diffusers_device_map``: the same with ``device_map=<device>`` (needs accelerate).

Page-cache states: ``cold`` (the files' cached pages dropped before each load: ``sync`` then
``posix_fadvise(DONTNEED)`` on each file; the JSON records the page cache size before each load)
and ``warm`` (the files read once just before). Each loaded model's checksum over a few
tensors must agree between loaders. Writes JSON (command, device, versions, sizes, timings)
under benchmarks/results/, rewritten after every load with ``"complete": false`` until the end,
so a run stopped early keeps what it measured.

Disk: each layout takes (parameters x stored dtype) bytes: 28.6 GB for the 14B in bf16, 57 GB
in fp32 (the release's dtype). When the work folder cannot hold both, layouts are written,
timed and deleted one after the other (``"mode": "sequential"``; alternation is then per
layout only).

    python benchmarks/load_time.py                        # 14B, bf16 files, on cuda:0
    python benchmarks/load_time.py --stored-dtype float32 --repeats 1
    python benchmarks/load_time.py --tiny --out /tmp/load_time_tiny.json    # CPU smoke run

diffusers needs accelerate to load in bf16 (its fp32-kept modules) and for ``device_map``; a
loader that cannot run is recorded with its error instead of timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

from smartdiff.models.registry import load_model_config  # noqa: E402
from smartdiff.models.wan_dit import WanDiT, WanDiTConfig, to_diffusers_naming  # noqa: E402

PREFIX = "diffusion_pytorch_model"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GB = 1e9


# ------------------------------------------------------------------------ writing


def tensor_specs(
    config: WanDiTConfig, dtype: torch.dtype
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Official names, shapes and stored dtypes (fp32 islands stay fp32, as in our model)."""
    with torch.device("meta"):
        model = WanDiT(config).cast(dtype)
    return [(name, tuple(t.shape), t.dtype) for name, t in model.state_dict().items()]


def diffusers_names(specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> dict[str, str]:
    meta = {name: torch.empty(shape, device="meta") for name, shape, _ in specs}
    return dict(zip(meta, to_diffusers_naming(meta), strict=True))


def shard_plan(
    specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int
) -> list[list[int]]:
    """Tensor indices per shard, packed in official-name order (a lone big tensor gets one)."""
    shards: list[list[int]] = [[]]
    size = 0
    for index, (_, shape, dtype) in enumerate(specs):
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(index)
        size += nbytes
    return shards


def random_tensor(
    index: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(1000 + index)
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return values.mul_(0.02).to(dtype).cpu()


def official_config_json(config: WanDiTConfig) -> dict[str, Any]:
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": "t2v",
        "dim": config.dim,
        "ffn_dim": config.ffn_dim,
        "freq_dim": config.freq_dim,
        "in_dim": config.in_dim,
        "out_dim": config.out_dim,
        "num_heads": config.num_heads,
        "num_layers": config.num_layers,
        "eps": config.eps,
        "text_len": 512,
        "text_dim": config.text_dim,
    }


def diffusers_config_json(config: WanDiTConfig) -> dict[str, Any]:
    return {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": "0.33.0",
        "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_dim,
        "out_channels": config.out_dim,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": config.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": config.rope_max_seq_len,
    }


def write_layout(
    layout: str,
    root: Path,
    config: WanDiTConfig,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    shards: list[list[int]],
    device: torch.device,
) -> tuple[Path, list[Path]]:
    """Write one layout; return (what its loader reads, every weight file)."""
    if layout == "official":
        folder, names = root, {name: name for name, _, _ in specs}
        config_json = official_config_json(config)
    else:
        folder, names = root / "transformer", diffusers_names(specs)
        config_json = diffusers_config_json(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    weight_map: dict[str, str] = {}
    files = []
    total = 0
    for number, indices in enumerate(shards, start=1):
        file_name = f"{PREFIX}-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for index in indices:
            name, shape, dtype = specs[index]
            tensors[names[name]] = random_tensor(index, shape, dtype, device)
            weight_map[names[name]] = file_name
            total += tensors[names[name]].nbytes
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        files.append(folder / file_name)
        del tensors
    index_path = folder / f"{PREFIX}.safetensors.index.json"
    index_path.write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    os.sync()
    return (index_path if layout == "official" else folder), files


# ------------------------------------------------------------------------ timing


def drop_page_cache(files: list[Path]) -> str:
    """Evict the files' pages from the page cache; returns the method used."""
    os.sync()  # dirty pages are not dropped: write them back first
    method = "sync + posix_fadvise(DONTNEED)"
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return method


def warm_page_cache(files: list[Path]) -> str:
    for path in files:
        with path.open("rb", buffering=0) as handle:
            while handle.read(64 << 20):
                pass
    return "read once"


def page_cache_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Cached:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return float("nan")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checksum(model: torch.nn.Module, keys: list[str]) -> list[float]:
    state = model.state_dict()
    return [float(state[key].double().sum()) for key in keys]


def loaders(
    config: WanDiTConfig,
    dtype: torch.dtype,
    device: torch.device,
    official: Path,
    diffusers_dir: Path,
    layout: str | None,
) -> dict[str, tuple[Callable[[], torch.nn.Module], list[str]]]:
    """name -> (load function, keys to checksum); ``layout`` restricts to one layout."""
    last = config.num_layers - 1
    ours_keys = ["blocks.0.self_attn.q.weight", f"blocks.{last}.ffn.2.weight", "head.head.weight"]
    theirs_keys = [
        "blocks.0.attn1.to_q.weight",
        f"blocks.{last}.ffn.net.2.weight",
        "proj_out.weight",
    ]

    def ours() -> torch.nn.Module:
        return WanDiT.from_checkpoint(official, config, device=device, dtype=dtype)

    def diffusers_then_to() -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_pretrained(diffusers_dir, torch_dtype=dtype).to(device)

    def diffusers_device_map() -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_pretrained(
            diffusers_dir, torch_dtype=dtype, device_map=str(device)
        )

    table = {
        "ours": (ours, ours_keys),
        "diffusers": (diffusers_then_to, theirs_keys),
        "diffusers_device_map": (diffusers_device_map, theirs_keys),
    }
    if layout == "official":
        return {"ours": table["ours"]}
    if layout == "diffusers":
        return {k: v for k, v in table.items() if k != "ours"}
    return table


def time_loaders(
    runs: dict[str, tuple[Callable[[], torch.nn.Module], list[str]]],
    files: dict[str, list[Path]],
    caches: list[str],
    repeats: int,
    device: torch.device,
    results: dict[str, Any],
    after_each: Callable[[], None] = lambda: None,
) -> None:
    """Alternate the loaders; append seconds, checksums and errors into ``results``;
    ``after_each`` runs after every load (the report is rewritten: a run stopped early keeps
    what it measured)."""
    for cache in caches:
        for _ in range(repeats):
            for name, (load, keys) in runs.items():
                entry = results.setdefault(name, {"seconds": {}, "checksum": None})
                if "error" in entry:
                    continue
                layout_files = files["official" if name == "ours" else "diffusers"]
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                method = (drop_page_cache if cache == "cold" else warm_page_cache)(layout_files)
                cached = page_cache_gib()
                start = time.perf_counter()
                try:
                    model = load()
                    synchronize(device)
                except Exception as error:  # e.g. device_map without accelerate
                    entry["error"] = f"{type(error).__name__}: {error}"[:500]
                    print(f"{name}: unavailable ({entry['error']})", flush=True)
                    continue
                seconds = time.perf_counter() - start
                entry["seconds"].setdefault(cache, []).append(round(seconds, 3))
                entry.setdefault("page_cache_gib_before", {}).setdefault(cache, []).append(cached)
                entry.setdefault("cache_method", {})[cache] = method
                entry["checksum"] = checksum(model, keys)
                entry["device"] = str(next(model.parameters()).device)
                del model
                print(f"{name:>22} {cache}: {seconds:7.2f} s", flush=True)
                after_each()


# -------------------------------------------------------------------------- main


def summarize(results: dict[str, Any], weight_bytes: int) -> None:
    """Medians, GB/s and speed-up of ours against each diffusers loader, per cache state."""
    ours = results.get("ours", {}).get("seconds", {})
    for entry in results.values():
        entry["median_seconds"] = {
            c: round(statistics.median(v), 3) for c, v in entry["seconds"].items()
        }
        entry["gb_per_s"] = {
            c: round(weight_bytes / GB / m, 2) for c, m in entry["median_seconds"].items()
        }
    for name, entry in results.items():
        if name != "ours" and ours:
            entry["ours_speedup"] = {
                c: round(m / statistics.median(ours[c]), 3)
                for c, m in entry["median_seconds"].items()
                if c in ours
            }
    sums = {tuple(e["checksum"]) for e in results.values() if e.get("checksum")}
    if len(sums) > 1:
        raise SystemExit(f"loaders disagree on the weights: checksums {sums}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["14b", "1.3b"], default="14b")
    parser.add_argument(
        "--tiny", action="store_true", help="the DiT of wan-tiny-random (a CPU smoke run)"
    )
    parser.add_argument("--device", default="auto", help="auto: cuda:0 if present, else cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="compute dtype of the loaded model (default bfloat16; float32 with --tiny)",
    )
    parser.add_argument(
        "--stored-dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of the written files (default: --dtype; the official release is float32)",
    )
    parser.add_argument("--shard-gb", type=float, default=10.0, help="largest shard, in GB")
    parser.add_argument("--repeats", type=int, default=2, help="loads per loader and cache")
    parser.add_argument("--cache", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the layouts are written (a folder is made inside)",
    )
    parser.add_argument("--mode", choices=["auto", "together", "sequential"], default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the written layouts")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/load_time_<model>.json)",
    )
    args = parser.parse_args()

    if args.tiny:
        name, config = "tiny", load_model_config("wan-tiny-random").dit
        shard_bytes = 20_000  # several shards even for the tiny model
    else:
        name = args.model
        config = WanDiTConfig.wan21_t2v_14b() if name == "14b" else WanDiTConfig.wan21_t2v_1_3b()
        shard_bytes = int(args.shard_gb * GB)
    if args.device == "auto":
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    args.stored_dtype = args.stored_dtype or args.dtype
    dtype, stored = DTYPES[args.dtype], DTYPES[args.stored_dtype]
    specs = tensor_specs(config, stored)
    shards = shard_plan(specs, shard_bytes)
    weight_bytes = sum(torch.Size(s).numel() * d.itemsize for _, s, d in specs)
    params = sum(torch.Size(s).numel() for _, s, _ in specs)

    args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"load-time-{name}-", dir=args.workdir))
    free = shutil.disk_usage(root).free
    mode = args.mode
    if mode == "auto":
        mode = "together" if free > 2 * weight_bytes + 2 * GB else "sequential"
    if free < weight_bytes + GB:
        raise SystemExit(
            f"{root}: {free / GB:.1f} GB free, one layout needs {weight_bytes / GB:.1f} GB"
        )
    print(
        f"{name}: {params / 1e9:.2f} B parameters, {weight_bytes / GB:.2f} GB per layout "
        f"({args.stored_dtype}), {len(shards)} shards, mode {mode}, device {device}",
        flush=True,
    )
    official_dir, diffusers_dir = root / "official", root / "diffusers"
    from diffusers import WanTransformer3DModel  # noqa: F401  (imports are not load time)

    generator_device = device if device.type == "cuda" else torch.device("cpu")
    results: dict[str, Any] = {}
    write_seconds: dict[str, float] = {}
    out = args.out or REPO / "benchmarks" / "results" / f"load_time_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import diffusers
    import safetensors

    gpu = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )

    def write_report(complete: bool) -> None:
        """(Re)write the JSON with what is measured so far (``complete``: all of it)."""
        summarize(results, weight_bytes)
        report = {
            "command": "python " + " ".join(sys.argv),
            "complete": complete,
            "gpu": gpu,
            "device": str(device),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "safetensors": safetensors.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": name,
            "parameters": params,
            "stored_dtype": args.stored_dtype,
            "compute_dtype": args.dtype,
            "weight_bytes": weight_bytes,
            "shards": len(shards),
            "mode": mode,
            "workdir": str(args.workdir),
            "write_seconds": write_seconds,
            "repeats": args.repeats,
            "results": results,
        }
        out.write_text(json.dumps(report, indent=2) + "\n")

    files: dict[str, list[Path]] = {}
    paths: dict[str, Path] = {}
    try:
        layouts = [None] if mode == "together" else ["official", "diffusers"]
        for only in layouts:
            for layout in ["official", "diffusers"] if only is None else [only]:
                start = time.perf_counter()
                folder = official_dir if layout == "official" else diffusers_dir
                paths[layout], files[layout] = write_layout(
                    layout, folder, config, specs, shards, generator_device
                )
                write_seconds[layout] = round(time.perf_counter() - start, 1)
                print(f"wrote the {layout} layout in {write_seconds[layout]} s", flush=True)
            runs = loaders(
                config,
                dtype,
                device,
                official_dir / f"{PREFIX}.safetensors.index.json",
                diffusers_dir / "transformer",
                only,
            )
            time_loaders(
                runs, files, args.cache, args.repeats, device, results, lambda: write_report(False)
            )
            if only is not None and not args.keep:
                shutil.rmtree(official_dir if only == "official" else diffusers_dir)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    write_report(True)
    for loader, entry in results.items():
        for cache, seconds in entry.get("median_seconds", {}).items():
            speed = entry.get("ours_speedup", {}).get(cache)
            note = f"  (ours x{speed})" if speed else ""
            print(
                f"{loader:>22} {cache}: median {seconds:.2f} s, "
                f"{entry['gb_per_s'][cache]} GB/s{note}"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
