"""Memory levels 0-3 (``smartdiff.engine.offload``) and the prompt-embedding cache, on CPU.

Every level must give the same video as level 0 (within 1e-5, fp32): level 1 decodes tiled,
2 keeps the text encoder on the CPU, 3 keeps the inactive expert of a two-expert model on the
host. Placement per level is checked on the backend: the VAE's tiling, the text encoder's
device, and at level 3 which expert holds device tensors (on a CPU-only host "device" and
"host" are both the CPU, so the check is on storage identity: an offloaded expert's tensors
are exactly its host copies). The tiny models use random weights (no checkpoint).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smartdiff.api.params import SystemParams, UserParams
from smartdiff.engine.engine import Engine
from smartdiff.engine.offload import ExpertOffloader, plan_memory
from smartdiff.engine.prompt_cache import PromptEmbeddingCache
from smartdiff.engine.task import Task, TaskStatus
from smartdiff.models.vae_tiling import VAETiling

A14B, WAN21 = "wan22-a14b-tiny-random", "wan-tiny-random"
TOLERANCE = 1e-5


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def request(model: str, prompt: str = "a lighthouse in a storm", seed: int = 7) -> UserParams:
    return UserParams(
        model=model,
        prompt=prompt,
        negative_prompt="blurry",
        width=64,
        height=48,
        frames=5,
        steps=6,
        guidance_scale=4.0,
        shift=5.0,
        seed=seed,
    )


def generate(engine: Engine, params: UserParams) -> Task:
    task = engine.submit(params)
    engine.run_until_idle()
    assert task.status is TaskStatus.SUCCEEDED, task.error
    return task


def engine_at(model: str, level: int) -> Engine:
    return Engine.from_params(
        model, SystemParams(device="cpu", dtype="float32", memory_level=level)
    )


@pytest.fixture(scope="module")
def level0_videos() -> dict[str, torch.Tensor]:
    return {model: generate(engine_at(model, 0), request(model)).video for model in (A14B, WAN21)}


@pytest.mark.parametrize("model", [A14B, WAN21])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_every_level_gives_the_level0_video(
    level0_videos: dict[str, torch.Tensor], model: str, level: int
) -> None:
    engine = engine_at(model, level)
    backend = engine.backend
    video = generate(engine, request(model)).video
    assert relative_error(video, level0_videos[model]) <= TOLERANCE
    # placement of this level
    assert (backend.vae.tiling is not None) == (level >= 1)
    assert backend.memory.text_encoder_on_cpu == (level >= 2)
    if level >= 2:
        assert backend.text_encoder.device == torch.device("cpu")
    two_experts = model == A14B
    assert (backend.offloader is not None) == (two_experts and level == 3)
    if backend.offloader is not None:
        # the last steps are low-noise ones: expert 1 resident, expert 0 on the host
        assert backend.offloader.resident == 1
        assert backend.offloader.is_offloaded(0) and not backend.offloader.is_offloaded(1)


def test_level0_keeps_both_experts_and_the_untiled_decode() -> None:
    backend = engine_at(A14B, 0).backend
    assert backend.num_experts == 2 and backend.offloader is None and backend.vae.tiling is None
    assert backend.memory == plan_memory(0)


def test_spatial_tiles_in_the_engine_give_the_same_video(
    level0_videos: dict[str, torch.Tensor],
) -> None:
    engine = engine_at(WAN21, 1)
    engine.backend.vae.tiling = VAETiling(tile_size=32, overlap=8)  # 2 x 2 tiles of 64x48
    video = generate(engine, request(WAN21)).video
    assert relative_error(video, level0_videos[WAN21]) <= TOLERANCE


def test_a_repeated_prompt_skips_the_text_encoder() -> None:
    engine = engine_at(WAN21, 2)
    cache = engine.backend.prompt_cache
    first = generate(engine, request(WAN21))
    calls = []
    original = engine.backend.text_encoder.encode
    engine.backend.text_encoder.encode = lambda *a, **k: calls.append(a) or original(*a, **k)
    second = generate(engine, request(WAN21, seed=8))
    assert calls == [] and cache.hits == 2 and cache.misses == 2
    assert torch.equal(second.buffers.prompt_embeds, first.buffers.prompt_embeds)
    generate(engine, request(WAN21, prompt="another prompt"))
    assert len(calls) == 1 and calls[0][0] == ["another prompt"]  # only the new prompt


def test_prompt_cache_evicts_least_recently_used() -> None:
    class Encoder:
        def encode(self, prompts: list[str], *, device: object, dtype: torch.dtype) -> torch.Tensor:
            return torch.stack([torch.full((2, 3), float(len(p))) for p in prompts]).to(dtype)

    cache, encoder = PromptEmbeddingCache(max_entries=2), Encoder()
    cpu = torch.device("cpu")
    for prompts in (["a", "bb"], ["a"], ["ccc"]):  # "bb" is the least recently used
        cache.encode(encoder, prompts, device=cpu, dtype=torch.float32)
    assert len(cache) == 2 and cache.hits == 1 and cache.misses == 3
    out = cache.encode(encoder, ["bb", "a"], device=cpu, dtype=torch.float32)
    assert out.shape == (2, 2, 3) and out[0, 0, 0] == 2.0 and out[1, 0, 0] == 1.0
    assert cache.misses == 4  # "bb" was evicted, "a" was kept


def test_offloader_swaps_experts_and_keeps_their_weights() -> None:
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)) for _ in range(2)]
    x = torch.randn(3, 4)
    expected = [expert(x) for expert in experts]
    offloader = ExpertOffloader(experts, "cpu")
    assert offloader.resident == 0
    assert not offloader.is_offloaded(0) and offloader.is_offloaded(1)
    offloader.activate(1)
    assert offloader.is_offloaded(0) and not offloader.is_offloaded(1)
    assert torch.equal(experts[1](x), expected[1])
    offloader.activate(0)
    assert torch.equal(experts[0](x), expected[0])
    with pytest.raises(ValueError, match="expert index 2"):
        offloader.activate(2)
    offloader.close()


@pytest.mark.parametrize("level", [-1, 4, True])
def test_plan_memory_rejects_unknown_levels(level: int) -> None:
    with pytest.raises(ValueError, match="memory_level"):
        plan_memory(level)
