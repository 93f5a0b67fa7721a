"""Wan2.2 TI2V per-token timesteps under context parallelism equal the single-process DiT.

Image-to-video gives the first latent frame's tokens timestep 0 and the others the step's
timestep, so ``WanDiT.embed`` returns per-token ``e [B, S, dim]`` and ``e0 [B, S, 6, dim]``;
``ParallelDiT`` must shard them like the tokens. One spawn of 2 CPU ranks (gloo) runs every case
with a tiny TI2V-shaped DiT (``configs/models/wan22-ti2v-tiny-random.yaml``'s DiT: 48 latent
channels, 2 layers, 2 heads): Ulysses 2 and ring 2, even and uneven token counts (padded
shards), a batch of two samples with different timesteps, and TeaCache over a few steps (its
distance over per-token ``e0`` reduced over the sequence group; refused without ``reduce``).
Each rank computes the single-process reference itself from the same seeded weights; relative
error ``||out - ref|| / ||ref|| <= 1e-5``. Spawn helpers and weight init from
``test_parallel_dit``.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_parallel_dit import TOLERANCE, _randomize, relative_error

TEXT_LEN = 5
TEXT_DIM = 32
CHANNELS = 48
TEACACHE_STEPS = (999.0, 998.0, 997.0, 996.0, 995.0)  # distances about 0.17, 0.22, 0.14


@dataclass(frozen=True)
class Ti2vCase:
    """One sequence-parallel configuration and input shape."""

    name: str
    ulysses: int = 1
    ring: int = 1
    latent: tuple[int, int, int] = (3, 6, 8)  # (F, H, W): 3*3*4 = 36 tokens, 12 in frame 0
    batch: int = 1
    kind: str = "dit"  # "dit": one forward; "teacache": cached steps; "teacache_no_reduce"


CASES = (
    Ti2vCase("ulysses2", ulysses=2),
    Ti2vCase("ring2", ring=2),
    Ti2vCase("ulysses2_27tokens", ulysses=2, latent=(3, 6, 6)),
    Ti2vCase("ring2_27tokens", ring=2, latent=(3, 6, 6)),
    # 9 tokens: rank 0 holds frame 0 (t=0) and two later tokens, rank 1 four tokens + 1 pad
    Ti2vCase("ring2_9tokens_batch2", ring=2, latent=(3, 2, 6), batch=2),
    Ti2vCase("ulysses2_9tokens_batch2", ulysses=2, latent=(3, 2, 6), batch=2),
    Ti2vCase("teacache_ulysses2_27tokens", ulysses=2, latent=(3, 6, 6), kind="teacache"),
    Ti2vCase("teacache_ring2_27tokens", ring=2, latent=(3, 6, 6), kind="teacache"),
    Ti2vCase("teacache_without_reduce_refused", ulysses=2, kind="teacache_no_reduce"),
)


def tiny_ti2v_dit():  # noqa: ANN201 - WanDiT, imported in the worker
    """The DiT of ``wan22-ti2v-tiny-random`` with seeded random weights."""
    from smartdiff.models.wan_dit import WanDiT, WanDiTConfig

    config = WanDiTConfig(
        dim=24,
        ffn_dim=48,
        num_heads=2,
        num_layers=2,
        patch_size=(1, 2, 2),
        in_dim=CHANNELS,
        out_dim=CHANNELS,
        freq_dim=32,
        text_dim=TEXT_DIM,
    )
    model = WanDiT(config).eval().requires_grad_(False)
    _randomize(model, seed=5)
    return model


def token_timesteps(case: Ti2vCase, timestep: float) -> torch.Tensor:
    """``[B, S]``: 0 on the first latent frame's tokens (the image), ``timestep`` elsewhere;
    sample ``b`` uses ``timestep - 100 b``."""
    frames, height, width = case.latent
    per_frame = (height // 2) * (width // 2)
    mask = torch.ones(frames * per_frame)
    mask[:per_frame] = 0.0
    values = timestep - 100.0 * torch.arange(case.batch, dtype=torch.float32)
    return values[:, None] * mask[None, :]


def case_inputs(case: Ti2vCase) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(13)
    latents = torch.randn((case.batch, CHANNELS, *case.latent), generator=generator)
    context = torch.randn((case.batch, TEXT_LEN, TEXT_DIM), generator=generator)
    return latents, context


# ------------------------------------------------------------------------------- the cases


def run_case(case: Ti2vCase, groups) -> float:  # noqa: ANN001 - ParallelGroups
    """The case's relative error on this rank."""
    from smartdiff.parallel.dit import ParallelDiT

    model = tiny_ti2v_dit()
    latents, context = case_inputs(case)
    if case.kind == "dit":
        t = token_timesteps(case, 731.0)
        assert model.embed(latents, t, context).e0.ndim == 4  # the per-token path
        return relative_error(
            ParallelDiT(model, groups)(latents, t, context), model(latents, t, context)
        )
    if case.kind == "teacache":
        return _teacache_error(case, groups, model, latents, context)
    return _refused_without_reduce(case, groups, model, latents, context)


def _teacache_config():  # noqa: ANN202 - TeaCacheConfig
    from smartdiff.cache.teacache import TeaCacheConfig

    # plain variant, rescale(d) = d: steps 0 and 4 computed, 1 skipped, 2 computed (the sum
    # 0.17 + 0.22 passes 0.3), 3 skipped
    return TeaCacheConfig(threshold=0.3, coefficients=(1.0, 0.0), retention_steps=False)


def _teacache_error(case: Ti2vCase, groups, model, latents, context) -> float:  # noqa: ANN001
    """Cached steps on the ranks vs on one process: same skips, same latents, same distance."""
    from smartdiff.cache.base import attached, sum_over_group
    from smartdiff.cache.teacache import TeaCache, relative_l1
    from smartdiff.parallel.dit import ParallelDiT, shard_inputs
    from smartdiff.parallel.layout import SequenceLayout

    reduce = sum_over_group(groups.sequence_group)
    parallel_model = tiny_ti2v_dit()  # its own cache: a second model with the same weights
    ref_cache, par_cache = TeaCache(_teacache_config()), TeaCache(_teacache_config(), reduce)

    def denoise(dit, owner, cache: TeaCache) -> torch.Tensor:  # noqa: ANN001
        x = latents.clone()
        with attached(owner, cache):
            for index, t in enumerate(TEACACHE_STEPS):
                cache.begin_step(index, len(TEACACHE_STEPS), t)
                x = x - 0.05 * dit(x, token_timesteps(case, t), context)
        return x

    ref = denoise(model, model, ref_cache)
    out = denoise(ParallelDiT(parallel_model, groups), parallel_model, par_cache)
    if (ref_cache.stats.skipped, par_cache.stats.skipped) != (2, 2):
        return float("inf")  # the decisions differ, or are not those the case is built for
    # the distance itself: reduced over the shards == over every token on one process
    inputs = [model.embed(latents, token_timesteps(case, t), context) for t in TEACACHE_STEPS[:2]]
    layout = SequenceLayout(inputs[0].tokens.shape[1], ring=groups.ring, ulysses=groups.ulysses)
    start, stop = layout.shard(groups.sequence_rank)
    valid = layout.shard_valid(groups.sequence_rank)
    shards = [shard_inputs(i, start, stop).e0[:, :valid] for i in inputs]
    whole = relative_l1(inputs[1].e0, inputs[0].e0)
    distance_error = abs(relative_l1(shards[1], shards[0], reduce) - whole) / whole
    return max(relative_error(out, ref), distance_error)


def _refused_without_reduce(case: Ti2vCase, groups, model, latents, context) -> float:  # noqa: ANN001
    """TeaCache without ``reduce`` on a per-token shard raises (every rank alike)."""
    from smartdiff.cache.base import attached
    from smartdiff.cache.teacache import TeaCache
    from smartdiff.parallel.dit import ParallelDiT

    cache = TeaCache(_teacache_config())
    with attached(model, cache):
        cache.begin_step(0, 2, 999.0)
        try:
            ParallelDiT(model, groups)(latents, token_timesteps(case, 999.0), context)
        except ValueError as error:
            return 0.0 if "per-token timesteps" in str(error) else 1.0
    return 1.0


# ------------------------------------------------------------------------------ the spawn


def worker(rank: int, world: int, port: int, cases: list[dict], out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from smartdiff.parallel.groups import ParallelGroups

    errors: dict[str, float] = {}
    first: ParallelGroups | None = None
    for fields in cases:
        case = Ti2vCase(**{**fields, "latent": tuple(fields["latent"])})
        groups = ParallelGroups.initialize(ulysses=case.ulysses, ring=case.ring, device="cpu")
        first = first or groups
        with torch.no_grad():
            errors[case.name] = run_case(case, groups)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(errors))
    assert first is not None
    first.shutdown()


@pytest.fixture(scope="module")
def errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    out_dir = tmp_path_factory.mktemp("parallel_ti2v")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(2, port, [asdict(c) for c in CASES], str(out_dir)), nprocs=2)
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return {name: max(e[name] for e in per_rank) for name in per_rank[0]}


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_ti2v_two_ranks_equal_single_process(errors: dict[str, float], name: str) -> None:
    assert errors[name] <= TOLERANCE, errors
