"""Parallel DiT on 2 CPU processes (gloo) equals the single-process DiT.

One ``torch.multiprocessing`` spawn of 2 ranks runs every case below in the same process group
(a fresh ``ParallelGroups`` mesh per case): CFG parallel, Ulysses, ring, an uneven head split
(3 heads over Ulysses 2), uneven token counts (padding), and a whole tiny pipeline (DiT +
UniPC steps + VAE decoded once and broadcast). Each rank computes the single-process reference
itself from the same seeded weights (plain ``WanDiT`` calls, CFG combined by hand) and writes the
relative error ``||out - ref|| / ||ref||`` per case; each test checks one case at <= 1e-5.

The worker and the case runner are imported by ``test_parallel_hybrid.py`` (4 ranks).
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

TOLERANCE = 1e-5
GUIDANCE = 4.0
TEXT_LEN = 5


@dataclass(frozen=True)
class Case:
    """One parallel configuration and input shape."""

    name: str
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    heads: int = 2
    latent: tuple[int, int, int] = (3, 6, 8)  # (F, H, W): 3*3*4 = 36 tokens
    kind: str = "dit"  # "dit": one forward; "guided": CFG noise; "pipeline": steps + decode
    batch: int = 1


TWO_RANK_CASES = (
    Case("cfg2", cfg=2, kind="guided"),
    Case("ulysses2", ulysses=2),
    Case("ring2", ring=2),
    Case("ulysses2_3heads", ulysses=2, heads=3),
    Case("ulysses2_27tokens", ulysses=2, latent=(3, 6, 6)),
    Case("ring2_27tokens", ring=2, latent=(3, 6, 6)),
    Case("ring2_5tokens_3heads", ring=2, heads=3, latent=(1, 2, 10)),
    Case("ulysses2_3heads_batch2", ulysses=2, heads=3, latent=(3, 6, 6), batch=2),
    Case("ring2_batch2", ring=2, latent=(3, 6, 6), batch=2),
    Case("pipeline_cfg2", cfg=2, kind="pipeline"),
    Case("pipeline_ulysses2", ulysses=2, kind="pipeline"),
)


# ------------------------------------------------------------------------ models and inputs


def tiny_dit(heads: int):  # noqa: ANN201 - WanDiT, imported in the worker
    from smartdiff.models.wan_dit import WanDiT, WanDiTConfig

    config = WanDiTConfig(
        dim=8 * heads,
        ffn_dim=32,
        num_heads=heads,
        num_layers=2,
        in_dim=4,
        out_dim=4,
        freq_dim=16,
        text_dim=12,
    )
    model = WanDiT(config).eval().requires_grad_(False)
    _randomize(model, seed=heads)
    return model


def tiny_vae():  # noqa: ANN201 - WanVAE
    from smartdiff.models.wan_vae import WanVAE, WanVAEConfig

    config = WanVAEConfig(
        base_dim=8,
        z_dim=4,
        dim_mult=(1, 1, 1, 1),
        num_res_blocks=1,
        latents_mean=(0.1, -0.2, 0.0, 0.3),
        latents_std=(1.5, 0.8, 1.0, 2.0),
    )
    vae = WanVAE(config).eval().requires_grad_(False)
    _randomize(vae, seed=7)
    return vae


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if ("norm" in name and param.ndim == 1) or name.endswith("gamma"):
                param.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                fan_in = math.prod(param.shape[1:]) if param.ndim > 1 else param.shape[0]
                param.copy_(noise / math.sqrt(fan_in))


def inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    latents = torch.randn((case.batch, 4, *case.latent), generator=generator)
    cond = torch.randn((case.batch, TEXT_LEN, 12), generator=generator)
    uncond = torch.randn((case.batch, TEXT_LEN, 12), generator=generator)
    return latents, torch.tensor(731.0), cond, uncond


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# ------------------------------------------------------------------------------- the cases


def run_case(case: Case, groups) -> float:  # noqa: ANN001 - ParallelGroups
    """The case's relative error on this rank."""
    from smartdiff.parallel.cfg import guided_noise
    from smartdiff.parallel.dit import ParallelDiT

    model = tiny_dit(case.heads)
    dit = ParallelDiT(model, groups)
    latents, timestep, cond, uncond = inputs(case)
    t = timestep.expand(case.batch)
    if case.kind == "dit":
        context = cond if groups.cfg_rank == 0 else uncond
        if case.batch > 1:  # a different timestep per sample
            t = t + torch.arange(case.batch) * 100.0
        return relative_error(dit(latents, t, context), model(latents, t, context))
    if case.kind == "guided":
        out = guided_noise(dit, latents, timestep, cond, uncond, GUIDANCE, groups)
        c, u = model(latents, t, cond), model(latents, t, uncond)
        return relative_error(out, u + GUIDANCE * (c - u))
    return _pipeline_error(model, dit, groups, latents, cond, uncond)


def _pipeline_error(model, dit, groups, latents, cond, uncond) -> float:  # noqa: ANN001
    """Three UniPC steps with CFG, then the VAE decoded on rank 0 and broadcast."""
    from smartdiff.parallel.cfg import guided_noise
    from smartdiff.parallel.vae import decode_once
    from smartdiff.samplers import SamplerConfig, make_sampler

    vae = tiny_vae()
    latents = latents[:, :, :2, :4, :4]  # decodes to 5 frames of 32x32

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(vae.denormalize_latents(z))

    def denoise(predict) -> torch.Tensor:  # noqa: ANN001
        sampler = make_sampler("unipc", SamplerConfig(num_steps=3, shift=3.0))
        x = latents.clone()
        for index, timestep in enumerate(sampler.timesteps):
            x = sampler.step(predict(x, timestep), x, index)
        return x

    def reference_step(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        c = model(x, timestep.expand(1), cond).float()
        u = model(x, timestep.expand(1), uncond).float()
        return u + GUIDANCE * (c - u)

    ref_latents = denoise(reference_step)
    par_latents = denoise(
        lambda x, timestep: guided_noise(dit, x, timestep, cond, uncond, GUIDANCE, groups)
    )
    ref_video = decode(ref_latents)
    video = decode_once(decode, par_latents, groups)
    assert video is not None and video.shape == (1, 3, 5, 32, 32), video
    return max(relative_error(par_latents, ref_latents), relative_error(video, ref_video))


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

    errors: dict[str, float | str] = {}
    first: ParallelGroups | None = None
    for fields in cases:
        case = Case(**{**fields, "latent": tuple(fields["latent"])})
        groups = ParallelGroups.initialize(
            cfg=case.cfg, ulysses=case.ulysses, ring=case.ring, device="cpu"
        )
        first = first or groups
        with torch.no_grad():
            errors[case.name] = run_case(case, groups)
    assert first is not None
    errors["share_seed"] = 0.0 if first.share(100 + rank) == 100 else 1.0
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(errors))
    first.shutdown()


def spawn_cases(cases: tuple[Case, ...], world: int, out_dir: Path) -> dict[str, float]:
    """Run ``cases`` on ``world`` spawned ranks; the worst relative error of each case (and
    ``share_seed``: 0 when ``ParallelGroups.share`` gave every rank rank 0's value)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(world, port, [asdict(c) for c in cases], str(out_dir)), nprocs=world)
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    return {name: max(errors[name] for errors in per_rank) for name in per_rank[0]}


@pytest.fixture(scope="module")
def two_rank_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    return spawn_cases(TWO_RANK_CASES, 2, tmp_path_factory.mktemp("parallel2"))


@pytest.mark.parametrize("name", [case.name for case in TWO_RANK_CASES])
def test_two_ranks_equal_single_process(two_rank_errors: dict[str, float], name: str) -> None:
    assert two_rank_errors[name] <= TOLERANCE, two_rank_errors


def test_share_gives_every_rank_the_value_of_rank_0(two_rank_errors: dict[str, float]) -> None:
    assert two_rank_errors["share_seed"] == 0.0
