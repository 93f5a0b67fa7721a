"""Parallel DiT on 4 and 8 CPU processes (gloo) equals the single-process DiT.

The hybrids and the awkward splits: CFG 2 x Ulysses 2, ring 2 x Ulysses 2, ring 4, more Ulysses
ranks than heads (2 heads over 4: two ranks hold none), 3 heads over 4, token counts that leave
whole shards as padding (5 tokens over 4 ranks), and a tiny pipeline with CFG 2 x ring 2. On 8
ranks, the layouts of the 8-GPU runs: CFG 2 x Ulysses 4 (the 14B plan), Ulysses 8 over 12
heads (the 1.3B's uneven split: 2,2,2,2,1,1,1,1), ring 2 x Ulysses 4 over 12 heads, and a
pipeline on CFG 2 x ring 2 x Ulysses 2. One spawn per world size runs its cases (worker and
checks from ``test_parallel_dit``); relative error ``||out - ref|| / ||ref|| <= 1e-5`` against
the plain single-process ``WanDiT``.
"""

from __future__ import annotations

import pytest

from test_parallel_dit import TOLERANCE, Case, spawn_cases

FOUR_RANK_CASES = (
    Case("cfg2_ulysses2", cfg=2, ulysses=2, kind="guided"),
    Case("ring2_ulysses2", ring=2, ulysses=2),
    Case("ring4_27tokens", ring=4, latent=(3, 6, 6)),
    Case("ulysses4_2heads_27tokens", ulysses=4, heads=2, latent=(3, 6, 6)),
    Case("ulysses4_3heads_5tokens", ulysses=4, heads=3, latent=(1, 2, 10)),
    Case("ring2_ulysses2_3heads_5tokens", ring=2, ulysses=2, heads=3, latent=(1, 2, 10)),
    Case("pipeline_cfg2_ring2", cfg=2, ring=2, kind="pipeline"),
)


EIGHT_RANK_CASES = (
    Case("cfg2_ulysses4", cfg=2, ulysses=4, heads=4, kind="guided"),
    Case("ulysses8_12heads", ulysses=8, heads=12),
    Case("ring2_ulysses4_12heads", ring=2, ulysses=4, heads=12),
    Case("pipeline_cfg2_ring2_ulysses2", cfg=2, ring=2, ulysses=2, kind="pipeline"),
)


@pytest.fixture(scope="module")
def four_rank_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    return spawn_cases(FOUR_RANK_CASES, 4, tmp_path_factory.mktemp("parallel4"))


@pytest.mark.parametrize("name", [case.name for case in FOUR_RANK_CASES])
def test_four_ranks_equal_single_process(four_rank_errors: dict[str, float], name: str) -> None:
    assert four_rank_errors[name] <= TOLERANCE, four_rank_errors


@pytest.fixture(scope="module")
def eight_rank_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    return spawn_cases(EIGHT_RANK_CASES, 8, tmp_path_factory.mktemp("parallel8"))


@pytest.mark.parametrize("name", [case.name for case in EIGHT_RANK_CASES])
def test_eight_ranks_equal_single_process(eight_rank_errors: dict[str, float], name: str) -> None:
    assert eight_rank_errors[name] <= TOLERANCE, eight_rank_errors
