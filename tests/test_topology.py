"""The topology planner: table-driven plans, explicit checks and impossible requests."""

from __future__ import annotations

from typing import Any

import pytest

from smartdiff.api.topology import (
    ParallelDegrees,
    Topology,
    plan_topology,
    resolve_gpus,
    video_tokens,
)

TOKENS_480P = 32760  # 832x480x81 through the Wan VAE and 1x2x2 patches
TOKENS_720P = 75600  # 1280x720x81


def test_video_tokens_match_wan() -> None:
    assert video_tokens(width=832, height=480, frames=81) == TOKENS_480P
    assert video_tokens(width=1280, height=720, frames=81) == TOKENS_720P
    assert video_tokens(width=16, height=16, frames=1) == 1


def test_video_tokens_of_the_wan22_vae() -> None:
    # Wan2.2 TI2V-5B at its official 1280x704x121: 31 latent frames of 44x80 latents
    # (16x VAE), 2x2 patches -> 31 x 22 x 40 tokens; a quarter of the 8x count.
    assert video_tokens(width=1280, height=704, frames=121, spatial_compression=16) == 27280
    assert video_tokens(width=1280, height=704, frames=121) == 4 * 27280


# (spec.resources.gpus, catalog defaultGpus) -> GPUs the run uses
GPU_RESOLUTION = [
    ((2, 4), 2),  # the spec's count wins
    ((1, 4), 1),  # even when it is smaller than the default
    ((None, 4), 4),  # unset: the model's default
    ((None, None), 1),  # neither: one GPU
    ((8, None), 8),
]


@pytest.mark.parametrize(("given", "gpus"), GPU_RESOLUTION, ids=[str(g) for g, _ in GPU_RESOLUTION])
def test_resolve_gpus(given: tuple[int | None, int | None], gpus: int) -> None:
    assert resolve_gpus(*given) == gpus


@pytest.mark.parametrize(
    ("given", "fragment"),
    [((0, None), "resources.gpus=0"), ((None, 0), "defaultGpus=0"), ((None, 5000), "5000")],
)
def test_resolve_gpus_rejects_bad_counts(
    given: tuple[int | None, int | None], fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        resolve_gpus(*given)


# (gpus, gpus_per_node, heads, do_cfg) -> (nodes, per_node, cfg, ulysses, ring)
AUTO_PLANS = [
    ((1, None, 12, True), (1, 1, 1, 1, 1)),
    ((2, None, 12, True), (1, 2, 2, 1, 1)),  # CFG parallel first
    ((2, None, 12, False), (1, 2, 1, 2, 1)),  # no CFG: Ulysses
    ((4, None, 12, True), (1, 4, 2, 2, 1)),
    ((8, None, 12, True), (1, 8, 2, 4, 1)),
    ((8, None, 12, False), (1, 8, 1, 4, 2)),  # 8 does not divide 12 heads: u4 x r2
    ((8, None, 40, False), (1, 8, 1, 8, 1)),  # 14B: 40 heads
    ((3, None, 12, True), (1, 3, 1, 3, 1)),  # odd: no CFG parallel
    ((5, None, 12, True), (1, 5, 1, 1, 5)),  # 5 does not divide 12: ring
    ((4, None, 2, False), (1, 4, 1, 2, 2)),  # tiny model, 2 heads
    ((16, 8, 40, True), (2, 8, 2, 8, 1)),  # a CFG branch per node
    ((16, 8, 40, False), (2, 8, 1, 8, 2)),  # Ulysses in a node, ring across nodes
    ((32, 8, 40, True), (4, 8, 2, 8, 2)),
    ((6, 2, 12, True), (3, 2, 2, 1, 3)),  # Ulysses group must not straddle nodes
    ((4, 8, 12, True), (1, 4, 2, 2, 1)),  # fits one node
]


@pytest.mark.parametrize(("request_", "expected"), AUTO_PLANS)
def test_auto_plans(
    request_: tuple[int, int | None, int, bool], expected: tuple[int, int, int, int, int]
) -> None:
    gpus, per_node, heads, do_cfg = request_
    topology = plan_topology(
        gpus=gpus, gpus_per_node=per_node, num_heads=heads, tokens=TOKENS_480P, do_cfg=do_cfg
    )
    assert topology == Topology(*expected)
    assert topology.world_size == topology.gpus == gpus
    # Ulysses groups are consecutive ranks: they must fit inside one node.
    assert topology.gpus_per_node % topology.ulysses == 0


# (gpus, per_node, heads, do_cfg, degrees, uneven) -> expected topology
EXPLICIT_PLANS = [
    ((4, None, 12, True, (2, 2, 1), True), (1, 4, 2, 2, 1)),
    ((4, None, 12, False, (1, 1, 4), True), (1, 4, 1, 1, 4)),
    ((8, None, 12, False, (1, 8, 1), True), (1, 8, 1, 8, 1)),  # uneven head split allowed
    ((16, 8, 40, True, (2, 4, 2), True), (2, 8, 2, 4, 2)),
    ((4, None, 2, False, (1, 4, 1), True), (1, 4, 1, 4, 1)),  # more ranks than heads
]


@pytest.mark.parametrize(("request_", "expected"), EXPLICIT_PLANS)
def test_explicit_plans(
    request_: tuple[int, int | None, int, bool, tuple[int, int, int], bool],
    expected: tuple[int, int, int, int, int],
) -> None:
    gpus, per_node, heads, do_cfg, degrees, uneven = request_
    topology = plan_topology(
        gpus=gpus,
        gpus_per_node=per_node,
        num_heads=heads,
        tokens=TOKENS_480P,
        do_cfg=do_cfg,
        explicit=ParallelDegrees(*degrees),
        uneven_heads=uneven,
    )
    assert topology == Topology(*expected)


IMPOSSIBLE: list[tuple[str, dict[str, Any], list[str]]] = [
    ("zero gpus", {"gpus": 0}, ["gpus=0", ">= 1"]),
    ("too many gpus", {"gpus": 5000}, ["gpus=5000", "at most 4096"]),
    ("zero heads", {"num_heads": 0}, ["num_heads=0"]),
    ("zero tokens", {"tokens": 0}, ["tokens=0"]),
    ("bad per node", {"gpus": 4, "gpus_per_node": 0}, ["gpus_per_node=0"]),
    (
        "not a node multiple",
        {"gpus": 12, "gpus_per_node": 8},
        ["gpus=12", "gpus_per_node=8", "use 8 or 16"],
    ),
    ("too few tokens", {"gpus": 8, "tokens": 3, "do_cfg": False}, ["tokens=3", "at most 3"]),
    (
        "product mismatch",
        {"gpus": 8, "explicit": ParallelDegrees(2, 2, 1)},
        ["cfg=2 x ulysses=2 x ring=1 = 4", "gpus=8"],
    ),
    (
        "cfg 2 without CFG",
        {"gpus": 2, "do_cfg": False, "explicit": ParallelDegrees(2, 1, 1)},
        ["cfg=2", "classifier-free guidance"],
    ),
    ("cfg 3", {"gpus": 3, "explicit": ParallelDegrees(3, 1, 1)}, ["cfg=3", "1 or 2"]),
    ("ulysses 0", {"gpus": 1, "explicit": ParallelDegrees(1, 0, 1)}, ["ulysses=0"]),
    (
        "uneven heads unsupported",
        {"gpus": 8, "num_heads": 12, "uneven_heads": False, "explicit": ParallelDegrees(1, 8, 1)},
        ["ulysses=8", "num_heads=12", "[1, 2, 3, 4, 6]"],
    ),
    (
        "explicit too few tokens",
        {"gpus": 4, "tokens": 2, "do_cfg": False, "explicit": ParallelDegrees(1, 2, 2)},
        ["tokens=2", "ulysses=2 x ring=2"],
    ),
]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [case[1:] for case in IMPOSSIBLE],
    ids=[case[0] for case in IMPOSSIBLE],
)
def test_impossible_requests_name_the_fields(
    overrides: dict[str, Any], fragments: list[str]
) -> None:
    kwargs: dict[str, Any] = {
        "gpus": 1,
        "gpus_per_node": None,
        "num_heads": 12,
        "tokens": TOKENS_480P,
        "do_cfg": True,
        **overrides,
    }
    with pytest.raises(ValueError) as caught:
        plan_topology(**kwargs)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("degrees", "summary"),
    [((1, 1, 1), "single"), ((2, 2, 1), "cfg2xu2"), ((1, 4, 2), "u4xr2"), ((2, 1, 4), "cfg2xr4")],
)
def test_summary(degrees: tuple[int, int, int], summary: str) -> None:
    cfg, ulysses, ring = degrees
    assert Topology(1, cfg * ulysses * ring, cfg, ulysses, ring).summary == summary


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((1, 4, 2, 2, 2), "does not match"),
        ((1, 2, 3, 1, 1), "cfg=3"),
        ((0, 1, 1, 1, 1), "nodes=0"),
        ((1, 1, 1, 0, 1), "ulysses=0"),
    ],
)
def test_topology_rejects_inconsistent_values(
    args: tuple[int, int, int, int, int], fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        Topology(*args)
