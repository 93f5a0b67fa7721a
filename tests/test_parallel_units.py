"""Single-process pieces of the parallel package: layouts, launch env, LSE attention and merge.

The multi-process equivalence tests are ``test_parallel_dit.py`` (2 ranks) and
``test_parallel_hybrid.py`` (4 ranks); here the arithmetic they rely on is checked against
plain references (``torch.nn.functional.scaled_dot_product_attention``, ``torch.logsumexp``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smartdiff.parallel.cfg import guided_noise
from smartdiff.parallel.dit import parallelize, shard_tokens
from smartdiff.parallel.groups import ParallelGroups
from smartdiff.parallel.launch import LaunchEnv, read_launch_env
from smartdiff.parallel.layout import SequenceLayout, head_split
from smartdiff.parallel.local_attention import (
    math_attention_lse,
    merge_partials,
    select_lse_attention,
)
from smartdiff.parallel.vae import decode_once

TORCHRUN_ENV = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "vg-abc-0.vg-abc",
    "MASTER_PORT": "29500",
}


def test_layout_pads_the_end_and_counts_real_tokens() -> None:
    layout = SequenceLayout(27, ring=2, ulysses=2)
    assert (layout.chunk, layout.padded, layout.block) == (7, 28, 14)
    assert [layout.shard(r) for r in range(4)] == [(0, 7), (7, 14), (14, 21), (21, 28)]
    assert [layout.shard_valid(r) for r in range(4)] == [7, 7, 7, 6]
    assert [layout.block_valid(r) for r in range(2)] == [14, 13]
    tiny = SequenceLayout(5, ring=2, ulysses=2)
    assert [tiny.shard_valid(r) for r in range(4)] == [2, 2, 1, 0]
    assert [tiny.block_valid(r) for r in range(2)] == [4, 1]


def test_layout_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"SequenceLayout.ring=0"):
        SequenceLayout(10, ring=0)
    with pytest.raises(ValueError, match=r"sequence_rank=4 is not allowed"):
        SequenceLayout(10, ring=2, ulysses=2).shard(4)


def test_head_split_is_exact_and_in_head_order() -> None:
    assert head_split(12, 8) == (2, 2, 2, 2, 1, 1, 1, 1)
    assert head_split(40, 4) == (10, 10, 10, 10)
    assert head_split(2, 4) == (1, 1, 0, 0)
    with pytest.raises(ValueError, match="num_heads=0"):
        head_split(0, 2)


def test_launch_env_reads_torchrun_variables() -> None:
    env = read_launch_env(TORCHRUN_ENV)
    assert env == LaunchEnv(
        rank=5,
        world_size=8,
        local_rank=1,
        local_world_size=4,
        node_rank=1,
        master_addr="vg-abc-0.vg-abc",
        master_port=29500,
    )
    assert env.nodes == 2 and env.distributed
    assert read_launch_env({}) == LaunchEnv()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"RANK": "8"}, "RANK=8 is not allowed: must be < WORLD_SIZE=8"),
        ({"RANK": "x"}, "RANK='x' is not allowed"),
        ({"MASTER_ADDR": ""}, "MASTER_ADDR is empty"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
        ({"LOCAL_RANK": "4"}, "LOCAL_RANK=4 is not allowed"),
    ],
)
def test_launch_env_names_the_bad_variable(change: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        read_launch_env({**TORCHRUN_ENV, **change})


def test_launch_env_needs_rank_with_world_size() -> None:
    with pytest.raises(ValueError, match="RANK is missing"):
        read_launch_env({"WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def _qkv(sq: int, sk: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((2, 3, s, 16), generator=generator) for s in (sq, sk, sk))


def test_math_attention_returns_sdpa_and_logsumexp() -> None:
    q, k, v = _qkv(9, 13)
    out, lse = math_attention_lse(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-6, atol=1e-6)
    expected = torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(lse, expected, rtol=1e-6, atol=1e-6)


def test_merging_key_blocks_equals_attention_over_all_keys() -> None:
    q, k, v = _qkv(9, 20, seed=1)
    out = lse = None
    for start, stop in ((0, 7), (7, 8), (8, 20)):
        part_out, part_lse = math_attention_lse(q, k[:, :, start:stop], v[:, :, start:stop])
        out, lse = merge_partials(out, lse, part_out, part_lse)
    assert out is not None and lse is not None
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    full_lse = torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(lse, full_lse, rtol=1e-6, atol=1e-6)


def test_lse_backend_choice() -> None:
    assert select_lse_attention(torch.device("cpu"), torch.float32, 16).name == "math"
    with pytest.raises(ValueError, match="'sage' is not allowed: one of auto, math"):
        select_lse_attention(torch.device("cpu"), torch.float32, 16, "sage")


def test_shard_tokens_pads_with_fill() -> None:
    x = torch.arange(10.0).reshape(1, 5, 2)
    torch.testing.assert_close(shard_tokens(x, 2, 4), x[:, 2:4])
    padded = shard_tokens(x, 4, 7, fill=1.0)
    torch.testing.assert_close(padded, torch.tensor([[[8.0, 9.0], [1.0, 1.0], [1.0, 1.0]]]))
    assert shard_tokens(x[0], 6, 8).shape == (2, 2)


def test_single_process_helpers_run_the_plain_computation() -> None:
    groups = ParallelGroups.single()
    model = torch.nn.Identity()
    assert parallelize(model, groups) is model  # type: ignore[arg-type]
    calls = []

    class Linear:
        dtype = torch.float32

        def __call__(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            calls.append(t.shape)
            return x * c.sum()

    x = torch.ones(1, 2, 1, 2, 2)
    cond, uncond = torch.full((1, 3, 4), 2.0), torch.full((1, 3, 4), 1.0)
    noise = guided_noise(Linear(), x, torch.tensor(5.0), cond, uncond, 3.0, groups)
    torch.testing.assert_close(noise, x * (12.0 + 3.0 * (24.0 - 12.0)))
    assert calls == [(1,), (1,)]
    assert decode_once(lambda z: z * 2, x, groups) is not None


def test_groups_check_degrees_against_the_launch() -> None:
    with pytest.raises(ValueError, match=r"cfg=2 x ring=1 x ulysses=2 = 4 do not match"):
        ParallelGroups.initialize(cfg=2, ulysses=2, launch=LaunchEnv(), device="cpu")
    with pytest.raises(ValueError, match="world size 2 needs a mesh"):
        ParallelGroups(2, 1, 1, 0, torch.device("cpu"), None, None)
    with pytest.raises(ValueError, match=r"ParallelGroups.cfg=3 is not allowed"):
        ParallelGroups(3, 1, 1, 0, torch.device("cpu"), None, None)


def test_groups_from_system_params_and_topology() -> None:
    from smartdiff.api.params import SystemParams
    from smartdiff.api.topology import Topology

    groups = ParallelGroups.from_degrees(SystemParams(), launch=LaunchEnv(), device="cpu")
    assert (groups.world_size, groups.mesh, groups.device.type) == (1, None, "cpu")
    topology = Topology(nodes=1, gpus_per_node=2, cfg=2, ulysses=1, ring=1)
    with pytest.raises(ValueError, match="WORLD_SIZE=1"):
        ParallelGroups.from_degrees(topology, launch=LaunchEnv(), device="cpu")
