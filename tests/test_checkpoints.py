"""Safetensors checkpoints: single file vs shards, directory resolution, strict loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from smartdiff.io.checkpoints import (
    CheckpointError,
    load_strict,
    read_state_dict,
    write_sharded,
)


def _state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(16, 8, generator=generator),
        "a.bias": torch.randn(16, generator=generator),
        "b.weight": torch.randn(4, 16, generator=generator).bfloat16(),
        "b.bias": torch.randn(4, generator=generator).bfloat16(),
        "c.table": torch.randn(1, 6, 16, generator=generator),
    }


def _assert_identical(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key, tensor in left.items():
        assert tensor.dtype == right[key].dtype, key
        assert torch.equal(tensor, right[key]), key


def test_sharded_and_single_file_give_identical_dicts(tmp_path: Path) -> None:
    original = _state_dict()
    single = write_sharded(original, tmp_path / "single", max_shard_bytes=1 << 20)
    index = write_sharded(original, tmp_path / "sharded", max_shard_bytes=200)
    assert single.name == "diffusion_pytorch_model.safetensors"
    assert index.name == "diffusion_pytorch_model.safetensors.index.json"
    shards = sorted(p.name for p in index.parent.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith(f"-00001-of-{len(shards):05d}.safetensors")
    weight_map = json.loads(index.read_text())["weight_map"]
    assert set(weight_map) == set(original) and set(weight_map.values()) == set(shards)
    from_single = read_state_dict(single)
    _assert_identical(from_single, original)
    _assert_identical(read_state_dict(tmp_path / "single"), from_single)
    _assert_identical(read_state_dict(index), from_single)
    _assert_identical(read_state_dict(tmp_path / "sharded"), from_single)


def test_write_sharded_handles_shared_memory(tmp_path: Path) -> None:
    base = torch.arange(8.0)
    path = write_sharded({"x": base[:4], "y": base[4:]}, tmp_path, max_shard_bytes=1 << 20)
    loaded = read_state_dict(path)
    assert torch.equal(loaded["x"], base[:4]) and torch.equal(loaded["y"], base[4:])


def test_load_strict_names_every_problem_at_once() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    state_dict = {
        "0.weight": torch.zeros(4, 5),  # wrong shape
        "0.bias": torch.zeros(4),
        "1.weight": torch.zeros(2, 4),  # "1.bias" missing
        "2.weight": torch.zeros(3),  # unexpected
        "extra": torch.zeros(1),  # unexpected
    }
    with pytest.raises(CheckpointError) as caught:
        load_strict(module, state_dict, source="/ckpt/model.safetensors")
    message = str(caught.value)
    assert "/ckpt/model.safetensors" in message
    assert "missing 1 key(s): 1.bias" in message
    assert "unexpected 2 key(s): 2.weight, extra" in message
    assert "0.weight: checkpoint (4, 5) vs model (4, 8)" in message
    assert torch.count_nonzero(module[0].bias) > 0  # nothing was loaded


def test_load_strict_casts_to_each_parameter_dtype() -> None:
    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    module.bias.data = module.bias.data.float()  # a parameter kept in fp32
    state_dict = {"weight": torch.full((2, 3), 1.5), "bias": torch.full((2,), 0.25).bfloat16()}
    load_strict(module, state_dict, source="mem")
    assert module.weight.dtype == torch.bfloat16 and module.bias.dtype == torch.float32
    assert torch.equal(module.weight.float(), torch.full((2, 3), 1.5))
    assert torch.equal(module.bias, torch.full((2,), 0.25))


def test_load_strict_materializes_a_meta_module() -> None:
    with torch.device("meta"):
        module = torch.nn.Linear(3, 2)
    weight, bias = torch.randn(2, 3), torch.randn(2)
    load_strict(module, {"weight": weight, "bias": bias}, source="mem")
    assert module.weight.device.type == "cpu" and isinstance(module.weight, torch.nn.Parameter)
    assert torch.equal(module(torch.eye(3)), weight.T + bias)


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope")
    (tmp_path / "README.md").write_text("no weights here")
    with pytest.raises(CheckpointError, match="holds no .*safetensors.*README.md"):
        read_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="neither"):
        read_state_dict(tmp_path / "README.md")


def test_several_unrelated_files_without_index(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "one.safetensors"))
    save_file({"y": torch.zeros(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(
        CheckpointError, match="several safetensors files.*one.safetensors, two.safetensors"
    ):
        read_state_dict(tmp_path)


def test_index_preferred_and_index_errors(tmp_path: Path) -> None:
    index = write_sharded(_state_dict(), tmp_path, max_shard_bytes=200)
    save_file({"stray": torch.zeros(1)}, str(tmp_path / "stray.safetensors"))
    assert "stray" not in read_state_dict(tmp_path)  # the index decides what is loaded

    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map["a.weight"] = "gone.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="missing from .*gone.safetensors"):
        read_state_dict(index)

    weight_map["a.weight"] = "stray.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="stray.safetensors.*lacks 1 tensor.*a.weight"):
        read_state_dict(index)

    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read sharded index"):
        read_state_dict(index)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        read_state_dict(tmp_path)


def test_unreadable_safetensors_file(tmp_path: Path) -> None:
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        read_state_dict(broken)
