"""FlexCache: TeaCache, PAB and first-block cache, through the real generator on the tiny model.

Caches at threshold 0 must be bit-identical to no cache; a cache must never cross requests
(two tasks in a row equal each alone, and the DiT is left without a cache, even after a
failure); the TeaCache decision rule is checked against hand-computed values; the first-block
cache reduces its metric over ranks and ignores padding; PAB follows its broadcast schedule.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from smartdiff.api.params import CachePolicy, SystemParams, UserParams
from smartdiff.cache.base import StepCache, StepPosition, attached
from smartdiff.cache.factory import default_threshold, make_step_cache, model_size
from smartdiff.cache.fbcache import FirstBlockCache, FirstBlockCacheConfig
from smartdiff.cache.pab import PabBranch, PabConfig, PyramidAttentionBroadcast
from smartdiff.cache.teacache import (
    PUBLISHED_COEFFICIENTS,
    TeaCache,
    TeaCacheBranch,
    TeaCacheConfig,
    decide,
)
from smartdiff.engine.backend import Backend
from smartdiff.engine.generator import CfgMode, Generator, GeneratorOptions
from smartdiff.engine.request import check_request
from smartdiff.engine.task import Task
from smartdiff.models.wan_dit import WanDiTConfig
from smartdiff.samplers import SamplerConfig, make_sampler

TINY = "wan-tiny-random"
POLICIES = ("teacache", "pab", "fbcache")


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    yield Backend.from_params(TINY, SystemParams(device="cpu", dtype="float32"))


def params(policy: str = "none", threshold: float | None = None, **overrides: Any) -> UserParams:
    fields: dict[str, Any] = dict(
        model=TINY,
        prompt="a lighthouse at dusk",
        width=32,
        height=32,
        frames=5,
        steps=8,
        guidance_scale=4.0,
        seed=7,
        cache=CachePolicy.model_validate({"policy": policy, "threshold": threshold}),
    )
    fields.update(overrides)
    return UserParams(**fields)


def generate(
    backend: Backend, user: UserParams, cfg_mode: CfgMode = "sequential"
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run one task; also return what the attached cache did (read at the last step)."""
    seen: dict[str, Any] = {}

    def on_step(task: Task, step: int, total: int) -> None:
        cache = backend.dit.step_cache
        assert cache is None or isinstance(cache, StepCache)
        if step == 1 and cache is not None:
            seen.update(first_step_forwards=cache.stats.forwards)
        if step == total and cache is not None:
            seen.update(stats=cache.stats, branches=cache.branches)

    task = Task(user)
    task.start()
    video = Generator(backend, GeneratorOptions(cfg_mode=cfg_mode)).generate(task, on_step)
    assert backend.dit.step_cache is None, "the cache stayed attached after the task"
    return video, seen


@pytest.fixture(scope="module")
def exact(backend: Backend) -> torch.Tensor:
    return generate(backend, params())[0]


# ----------------------------------------------------------------- through the generator


@pytest.mark.parametrize("policy", POLICIES)
def test_threshold_zero_is_bit_identical_to_no_cache(
    backend: Backend, exact: torch.Tensor, policy: str
) -> None:
    video, seen = generate(backend, params(policy, 0.0))
    assert torch.equal(video, exact)
    assert seen["stats"].forwards == 16 and seen["stats"].skipped == 0
    assert seen["stats"].attention_reused == 0
    assert seen["branches"] == 2  # conditional and unconditional kept apart


@pytest.mark.parametrize("policy, threshold", [("teacache", 5.0), ("pab", 2.0), ("fbcache", 0.5)])
def test_a_positive_threshold_reuses_work(
    backend: Backend, exact: torch.Tensor, policy: str, threshold: float
) -> None:
    video, seen = generate(backend, params(policy, threshold))
    stats = seen["stats"]
    assert stats.skipped > 0 or stats.attention_reused > 0
    assert torch.isfinite(video).all() and not torch.equal(video, exact)
    # Reuse approximates: the video stays close to the exact one (random weights, 8 steps).
    assert float((video - exact).abs().max()) < 0.5


def test_teacache_retention_steps_compute_the_first_five_steps(backend: Backend) -> None:
    _, seen = generate(backend, params("teacache", 1e6))
    # 8 steps x 2 branches; steps 0..4 always run, 5..7 are skipped at a huge threshold.
    assert seen["stats"].forwards == 16 and seen["stats"].skipped == 6


def test_batched_cfg_has_one_branch(backend: Backend) -> None:
    _, seen = generate(backend, params("fbcache", 0.0), cfg_mode="batched")
    assert seen["branches"] == 1 and seen["stats"].forwards == 8


@pytest.mark.parametrize("policy, threshold", [("teacache", 5.0), ("pab", 2.0), ("fbcache", 0.5)])
def test_a_cache_never_crosses_requests(backend: Backend, policy: str, threshold: float) -> None:
    first = params(policy, threshold, prompt="a red boat", seed=1)
    second = params(policy, threshold, prompt="snow on a pine forest", seed=2)
    alone = generate(backend, second)[0]
    _, seen_first = generate(backend, first)
    after_first, seen_second = generate(backend, second)
    assert torch.equal(after_first, alone)
    # A fresh cache per task: its counters start at this task's first step (2 CFG branches).
    assert seen_second["first_step_forwards"] == 2
    assert seen_second["stats"] is not seen_first["stats"]


def test_the_cache_is_detached_when_a_task_fails(backend: Backend) -> None:
    task = Task(params("fbcache", 0.5))
    task.start()

    def boom(task: Task, step: int, total: int) -> None:
        assert backend.dit.step_cache is not None
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Generator(backend).generate(task, boom)
    assert backend.dit.step_cache is None


def test_requests_with_every_policy_are_accepted(backend: Backend) -> None:
    for policy in ("none", *POLICIES):
        check_request(params(policy), backend.model)


def test_attaching_twice_is_refused(backend: Backend) -> None:
    cache = make_step_cache("fbcache", None, backend.model.dit)
    with (
        attached(backend.dit, cache),
        pytest.raises(RuntimeError, match="already has"),
        attached(backend.dit, make_step_cache("pab", None, backend.model.dit)),
    ):
        pass
    assert backend.dit.step_cache is None


def test_run_blocks_needs_begin_step(backend: Backend) -> None:
    cache = make_step_cache("teacache", None, backend.model.dit)
    assert cache is not None
    dit = backend.dit
    latents = torch.zeros(1, 16, 2, 4, 4)
    with attached(dit, cache), pytest.raises(RuntimeError, match="begin_step"):
        dit(latents, torch.tensor([500.0]), torch.zeros(1, 8, dit.config.text_dim))


# ------------------------------------------------------------------------- TeaCache rule


def test_teacache_decisions_match_hand_computed_values() -> None:
    # poly(x) = 2x (coefficients highest power first); plain variant (first and last step
    # always computed); each step moves the embedding by a relative L1 distance of 0.1.
    config = TeaCacheConfig(threshold=0.5, coefficients=(2.0, 0.0), retention_steps=False)
    state = TeaCacheBranch()
    total = 7
    embedding = torch.ones(1, 4)
    decisions, accumulated = [], []
    for index in range(total):
        decisions.append(decide(config, state, index, total, embedding))
        accumulated.append(round(state.accumulated, 6))
        state.residual = torch.zeros(1)  # as if computed once
        embedding = embedding * 1.1  # |1.1e - e| / |e| = 0.1 -> poly = 0.2
    # step 1: 0.2 skip, 2: 0.4 skip, 3: 0.6 >= 0.5 compute (reset), 4: 0.2, 5: 0.4, 6: last.
    assert decisions == [True, False, False, True, False, False, True]
    assert accumulated == [0.0, 0.2, 0.4, 0.0, 0.2, 0.4, 0.0]


def test_teacache_published_polynomials() -> None:
    ret = TeaCacheConfig.published("1.3b")
    assert ret.retention_steps and ret.threshold == 0.08
    # -5.21862437e4 x^4 + 9.23041404e3 x^3 - 5.28275948e2 x^2 + 1.36987616e1 x - 4.99875664e-2
    # at x = 0.1, by hand: -5.21862437 + 9.23041404 - 5.28275948 + 1.36987616 - 0.04998757
    assert ret.rescale(0.1) == pytest.approx(0.04891878, abs=1e-7)
    plain = TeaCacheConfig.published("14b", retention_steps=False)
    assert plain.coefficients == PUBLISHED_COEFFICIENTS[("14b", False)]
    assert plain.rescale(0.0) == pytest.approx(-13.02252404)
    assert [TeaCacheConfig.published("14b").always_computed(i, 50) for i in (4, 5, 49)] == [
        True,
        False,
        False,
    ]
    assert [plain.always_computed(i, 50) for i in (0, 1, 48, 49)] == [True, False, False, True]


def test_teacache_threshold_zero_never_skips_even_with_negative_rescaling() -> None:
    config = TeaCacheConfig.published("1.3b", threshold=0.0)  # poly(0) < 0
    state = TeaCacheBranch(residual=torch.zeros(1))
    e0 = torch.ones(1, 6, 4)
    assert all(decide(config, state, index, 50, e0) for index in range(50))


def test_teacache_model_size_and_defaults() -> None:
    assert model_size(WanDiTConfig.wan21_t2v_1_3b()) == "1.3b"
    assert model_size(WanDiTConfig.wan21_t2v_14b()) == "14b"
    assert default_threshold("teacache", WanDiTConfig.wan21_t2v_14b()) == 0.2
    assert default_threshold("pab", WanDiTConfig.wan21_t2v_1_3b()) == 2.0
    cache = make_step_cache("teacache", None, WanDiTConfig.wan21_t2v_14b())
    assert isinstance(cache, TeaCache)
    assert cache.config.coefficients == PUBLISHED_COEFFICIENTS[("14b", True)]
    with pytest.raises(ValueError, match="cache.policy='magic'"):
        make_step_cache("magic", None, WanDiTConfig.wan21_t2v_1_3b())


# ------------------------------------------------------------- first-block cache, PAB


def test_first_block_metric_is_reduced_over_ranks_and_ignores_padding() -> None:
    calls: list[torch.Tensor] = []

    def reduce(sums: torch.Tensor) -> torch.Tensor:
        calls.append(sums.clone())
        return sums * 3  # as if three ranks held the same sums: the ratio is unchanged

    cache = FirstBlockCache(FirstBlockCacheConfig(0.1), reduce)
    previous = torch.ones(1, 6, 2)
    current = previous.clone()
    current[:, :4] += 0.5  # real rows changed by 0.5
    current[:, 4:] += 100.0  # padding rows: must not count
    change = cache.relative_change(current, previous, valid_tokens=4)
    assert change == pytest.approx(0.5)
    assert len(calls) == 1 and calls[0].tolist() == pytest.approx([4.0, 8.0])


def test_pab_schedule() -> None:
    cache = PyramidAttentionBroadcast(PabConfig(self_range=2, cross_range=3))
    state = PabBranch()
    timesteps = [900.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0, 50.0]
    plan = []
    for index, t in enumerate(timesteps):
        cache.plan(state, StepPosition(index, len(timesteps), t))
        plan.append((state.computing["self"], state.computing["cross"]))
        for kind in ("self", "cross"):  # what the blocks would keep inside the window
            if state.keeping and state.computing[kind]:
                state.outputs[kind][0] = torch.zeros(1)  # type: ignore[index]
    # 900 outside the window; 700 first inside (nothing kept yet) computes both; then self
    # every 2 steps, cross every 3; 50 is outside again.
    assert plan == [
        (True, True),
        (True, True),
        (False, False),
        (True, False),
        (False, True),
        (True, False),
        (False, False),
        (True, True),
    ]
    assert PabConfig.from_threshold(0.0) == PabConfig(self_range=1, cross_range=1)
    assert PabConfig.from_threshold(3.7) == PabConfig(self_range=3, cross_range=9)


# ------------------------------------------------------------------- two experts (A14B)

A14B = "wan22-a14b-tiny-random"


@pytest.fixture(scope="module")
def a14b() -> Iterator[Backend]:
    yield Backend.from_params(A14B, SystemParams(device="cpu", dtype="float32"))


def generate_two_experts(
    backend: Backend, policy: str, threshold: float | None
) -> tuple[torch.Tensor, list[Any], list[int]]:
    """One A14B task; each expert's cache (as attached during the task) and the plan."""
    seen: list[Any] = [None, None]

    def on_step(task: Task, step: int, total: int) -> None:
        for expert in (0, 1):
            cache = backend.expert(expert).step_cache
            if cache is not None:
                seen[expert] = cache

    user = params(policy, threshold, model=A14B, steps=10, shift=1.0, guidance_scale_2=3.0)
    task = Task(user)
    task.start()
    generator = Generator(backend)
    video = generator.generate(task, on_step)
    assert backend.expert(0).step_cache is None and backend.expert(1).step_cache is None
    plan = generator.expert_schedule(task).plan(
        make_sampler(user.solver, SamplerConfig(num_steps=10, shift=1.0)).timesteps.tolist()
    )
    return video, seen, [step.expert for step in plan]


def test_each_expert_has_its_own_cache(a14b: Backend) -> None:
    exact, none_seen, experts = generate_two_experts(a14b, "none", None)
    assert none_seen == [None, None]
    high, low = experts.count(0), experts.count(1)
    assert high >= 2 and low >= 2, experts  # both experts run several steps
    video, seen, _ = generate_two_experts(a14b, "teacache", 0.0)
    assert torch.equal(video, exact)  # threshold 0: bit-identical with two experts too
    assert seen[0] is not seen[1]
    assert seen[0].stats.forwards == 2 * high and seen[1].stats.forwards == 2 * low
    # A huge threshold: each expert computes its own first step (nothing reused across the
    # switch) and the retention steps (the first five of the task), then skips the rest.
    _, seen, _ = generate_two_experts(a14b, "teacache", 1e6)
    first_low = experts.index(1)
    computed_low = max(1, 5 - first_low)
    assert seen[1].stats.skipped == 2 * (low - computed_low) > 0
    assert seen[0].stats.skipped == 2 * max(0, high - 5)
