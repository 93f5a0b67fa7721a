"""Safetensors checkpoints: read (single file, sharded index or directory), load strictly, write.

Model modules (the Wan DiT, the Wan VAE, ...) build an ``nn.Module``, convert the tensor names
of a checkpoint to their own naming and hand both to :func:`load_strict`. Tests and benchmarks
use :func:`write_sharded` to produce checkpoints in the Hugging Face layout::

    directory/
      diffusion_pytorch_model.safetensors                     (one shard), or
      diffusion_pytorch_model-00001-of-00003.safetensors ...  (several shards) plus
      diffusion_pytorch_model.safetensors.index.json          {"metadata": {...}, "weight_map": {}}

Nothing here knows about a particular model; errors name the path and every offending key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_SUFFIX = ".safetensors.index.json"
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read, or does not fit the module it is loaded into."""


def read_state_dict(
    path: str | os.PathLike[str], *, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint into a dict.

    Args:
        path: a ``.safetensors`` file, a sharded index ``*.safetensors.index.json`` (its
            ``weight_map`` names the shard of each tensor, relative to the index), or a directory
            holding exactly one of those (an index is preferred over the shards it lists).
        device: where the tensors are materialized (``"cpu"``, ``"cuda:0"``, ...).
    """
    resolved = _resolve_checkpoint(Path(path))
    if resolved.name.endswith(INDEX_SUFFIX):
        return _read_sharded(resolved, device)
    return _read_file(resolved, device)


def _resolve_checkpoint(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if path.is_file():
        if path.name.endswith(INDEX_SUFFIX) or path.name.endswith(SAFETENSORS_SUFFIX):
            return path
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is neither a '{SAFETENSORS_SUFFIX}' file nor a "
            f"sharded index '*{INDEX_SUFFIX}'"
        )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is neither a file nor a directory")
    indexes = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(INDEX_SUFFIX))
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise CheckpointError(
            f"checkpoint directory {str(path)!r} holds several sharded indexes ({names}); "
            "pass the path of the one to load"
        )
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SAFETENSORS_SUFFIX))
    if len(files) == 1:
        return files[0]
    if not files:
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise CheckpointError(
            f"checkpoint directory {str(path)!r} holds no '*{SAFETENSORS_SUFFIX}' file and no "
            f"'*{INDEX_SUFFIX}' index (it holds: {present})"
        )
    names = ", ".join(p.name for p in files)
    raise CheckpointError(
        f"checkpoint directory {str(path)!r} holds several safetensors files ({names}) and no "
        f"'*{INDEX_SUFFIX}' index saying how they fit together; pass the path of one file"
    )


def _read_file(path: Path, device: str, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            available = set(handle.keys())
            wanted = sorted(available) if keys is None else keys
            absent = [key for key in wanted if key not in available]
            if absent:
                raise CheckpointError(
                    f"shard {str(path)!r} lacks {len(absent)} tensor(s) that its index assigns "
                    f"to it: {', '.join(absent)}"
                )
            return {key: handle.get_tensor(key) for key in wanted}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types, OSError, ...
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {exc}") from exc


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read sharded index {str(index_path)!r}: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"sharded index {str(index_path)!r} has no 'weight_map' object mapping tensor names "
            "to shard files"
        )
    bad = [key for key, shard in weight_map.items() if not isinstance(shard, str)]
    if bad:
        raise CheckpointError(
            f"sharded index {str(index_path)!r}: 'weight_map' values must be shard file names, "
            f"got non-strings for: {', '.join(sorted(bad))}"
        )
    return weight_map


def _read_sharded(index_path: Path, device: str) -> dict[str, torch.Tensor]:
    weight_map = _read_index(index_path)
    keys_by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        keys_by_shard.setdefault(shard, []).append(key)
    root = index_path.parent
    missing = sorted(shard for shard in keys_by_shard if not (root / shard).is_file())
    if missing:
        raise CheckpointError(
            f"sharded index {str(index_path)!r} lists shard file(s) missing from "
            f"{str(root)!r}: {', '.join(missing)}"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(keys_by_shard.items()):
        state_dict.update(_read_file(root / shard, device, keys))
    return state_dict


def load_strict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Put every tensor of ``state_dict`` into ``module``, or raise one error listing all problems.

    Each tensor is cast to the dtype of the parameter or buffer it replaces, so parameters a
    model keeps in fp32 stay fp32 in a bf16 model. A module built on the meta device gets the
    tensors themselves (on their own device); a materialized module keeps its device.

    Raises:
        CheckpointError: naming ``source``, every missing key, every unexpected key and every
            tensor whose shape differs (with both shapes).
    """
    targets = module.state_dict(keep_vars=True)
    missing = sorted(set(targets) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(targets))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(targets[key].shape)}"
        for key in set(targets) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(targets[key].shape)
    )
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {source!r} does not fit {type(module).__name__}:"]
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"wrong shape for {len(mismatched)} key(s): {'; '.join(mismatched)}")
        raise CheckpointError("\n  ".join(parts))
    converted: dict[str, torch.Tensor] = {}
    for key, target in targets.items():
        tensor = state_dict[key]
        device = tensor.device if target.device.type == "meta" else target.device
        converted[key] = tensor.to(device=device, dtype=target.dtype)
    module.load_state_dict(converted, strict=True, assign=True)


def write_sharded(
    state_dict: Mapping[str, torch.Tensor],
    directory: str | os.PathLike[str],
    *,
    max_shard_bytes: int,
    prefix: str = "diffusion_pytorch_model",
) -> Path:
    """Write ``state_dict`` in the Hugging Face layout and return the path to pass to readers.

    Tensors are packed in key order into shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own). One shard is written as ``{prefix}.safetensors`` and
    that file is returned; several are written as ``{prefix}-0000i-of-0000n.safetensors`` next
    to ``{prefix}.safetensors.index.json``, which is returned.
    """
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if not state_dict:
        raise CheckpointError("cannot write an empty state dict")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    seen_storage: set[int] = set()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storage:  # safetensors refuses tensors sharing memory
            tensor = tensor.clone()
        seen_storage.add(tensor.untyped_storage().data_ptr())
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    metadata = {"format": "pt"}
    if len(shards) == 1:
        single = root / f"{prefix}{SAFETENSORS_SUFFIX}"
        save_file(shards[0], str(single), metadata=metadata)
        return single
    weight_map: dict[str, str] = {}
    total = 0
    for number, shard in enumerate(shards, start=1):
        name = f"{prefix}-{number:05d}-of-{len(shards):05d}{SAFETENSORS_SUFFIX}"
        save_file(shard, str(root / name), metadata=metadata)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index_path = root / f"{prefix}{INDEX_SUFFIX}"
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index_path
