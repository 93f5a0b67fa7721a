"""The generator: one task through text encoding, iterative denoising and VAE decoding.

Given the :class:`~smartdiff.engine.backend.Backend` (passed in, never global) and a RUNNING
:class:`~smartdiff.engine.task.Task`, :meth:`Generator.generate` fills the task's buffers stage
by stage and returns the decoded video. It reproduces diffusers' ``WanPipeline``:

- encode: the prompt (and, with CFG, the negative prompt) through the text encoder, padded to
  ``max_length`` with zeros past each prompt's tokens;
- noise: ``torch.randn`` of ``[1, 16, (F-1)//4+1, H//8, W//8]`` in fp32 from a CPU
  ``torch.Generator`` seeded with the task's seed, then moved to the device, so a seed gives
  the same initial latents (and video) as diffusers on any device;
- denoise: for each timestep of the sampler (``smartdiff.samplers``), the DiT on the latents
  cast to its dtype, classifier-free guidance ``uncond + g * (cond - uncond)`` (computed in
  fp32) when ``guidance_scale > 1``, the two branches run one after the other
  (``cfg_mode="sequential"``, as the reference) or as one batch of 2 (``"batched"``), then the
  sampler step on the fp32 latents; ``on_step(task, step, total)`` after every step;
- decode: the latents denormalized with the VAE's published mean/std and decoded.

Output: :meth:`Generator.generate` returns (and stores in ``task.buffers.video``) the video as
a float32 CPU tensor ``[1, 3, T, H, W]`` in ``[-1, 1]``; :func:`to_uint8_frames` turns it into
``[T, H, W, 3]`` uint8 frames for :func:`smartdiff.io.video.write_mp4`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from smartdiff.cache.base import attached, sum_over_group
from smartdiff.cache.factory import make_step_cache
from smartdiff.engine.backend import Backend
from smartdiff.engine.conditioning import FirstFrameCondition
from smartdiff.engine.experts import ExpertSchedule
from smartdiff.engine.task import Task, TaskStatus
from smartdiff.parallel.cfg import guided_noise
from smartdiff.parallel.vae import decode_once
from smartdiff.samplers import SamplerConfig, make_sampler

LOG = logging.getLogger(__name__)

StepCallback = Callable[[Task, int, int], None]
"""``on_step(task, step, total)``: called after each denoising step, ``step`` in 1..total."""
CfgMode = Literal["sequential", "batched"]


@dataclass(frozen=True)
class GeneratorOptions:
    """How the generator runs (not what it computes: both CFG modes give the same video).

    Args:
        cfg_mode: ``"sequential"``: conditional then unconditional DiT pass (lower peak memory,
            the reference's order); ``"batched"``: both in one batch of 2 (fewer launches).
    """

    cfg_mode: CfgMode = "sequential"

    def __post_init__(self) -> None:
        if self.cfg_mode not in ("sequential", "batched"):
            raise ValueError(
                f"GeneratorOptions.cfg_mode must be 'sequential' or 'batched', "
                f"got {self.cfg_mode!r}"
            )


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Standard normal fp32 latents drawn on the CPU from ``seed`` (as diffusers' ``randn_tensor``
    with a CPU generator), then moved to ``device``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def to_uint8_frames(video: torch.Tensor, index: int = 0) -> np.ndarray:
    """Video ``[B, 3, T, H, W]`` (or ``[3, T, H, W]``) in ``[-1, 1]`` -> ``[T, H, W, 3]`` uint8.

    Values are clamped to ``[-1, 1]`` and mapped to ``round((x + 1) * 127.5)``; ``index`` picks
    the batch entry.
    """
    if video.ndim == 5:
        video = video[index]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [B, 3, T, H, W] or [3, T, H, W], got {tuple(video.shape)}")
    frames = ((video.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return frames.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()


class Generator:
    """Runs tasks on a backend. Holds no per-task state: everything lives in the task."""

    def __init__(self, backend: Backend, options: GeneratorOptions | None = None) -> None:
        self.backend = backend
        self.options = options or GeneratorOptions()

    def generate(self, task: Task, on_step: StepCallback | None = None) -> torch.Tensor:
        """Encode, denoise and decode ``task`` (which must be RUNNING); return the video
        ``[1, 3, T, H, W]`` fp32 on the CPU in ``[-1, 1]`` (also in ``task.buffers.video``).

        Raises :class:`~smartdiff.engine.task.TaskCancelled` if the task is cancelled meanwhile
        (checked before every stage and step); exceptions of ``on_step`` propagate.
        """
        if task.status is not TaskStatus.RUNNING:
            raise ValueError(
                f"task {task.id} is {task.status.value}; only a running task can be generated"
            )
        self.encode(task)
        self.denoise(task, on_step)
        return self.decode(task)

    @contextmanager
    def _timed(self, task: Task, stage: str) -> Iterator[None]:
        task.raise_if_cancelled()
        start = time.perf_counter()
        yield
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)
        task.timings[stage] = time.perf_counter() - start

    def encode(self, task: Task) -> None:
        """Fill ``prompt_embeds`` (and ``negative_embeds`` with CFG) on the device."""
        backend = self.backend
        with self._timed(task, "encode"):
            prompts = [task.params.prompt]
            if task.params.do_cfg:
                prompts.append(task.params.negative_prompt)
            # A repeated prompt comes from the backend's cache, not the text encoder.
            embeds = backend.prompt_cache.encode(
                backend.text_encoder, prompts, device=backend.device, dtype=backend.dtype
            )
            task.buffers.prompt_embeds = embeds[:1]
            task.buffers.negative_embeds = embeds[1:] if task.params.do_cfg else None

    def latent_shape(self, task: Task) -> tuple[int, int, int, int, int]:
        """``[1, C, F', H', W']`` of the task's latents."""
        p = task.params
        return (1, *self.backend.model.latent_shape(p.frames, p.height, p.width))

    def expert_schedule(self, task: Task) -> ExpertSchedule:
        """Which expert and guidance each step uses (Wan2.2 A14B: two experts)."""
        experts = self.backend.model.experts
        return ExpertSchedule(
            boundary_ratio=None if experts is None else experts.boundary_ratio,
            guidance_scale=task.params.guidance_scale,
            guidance_scale_2=None if experts is None else task.params.guidance_scale_2,
        )

    def image_condition(self, task: Task) -> FirstFrameCondition | None:
        """The encoded first frame of an image-to-video request, else ``None``."""
        p = task.params
        if p.image is None:
            return None
        from smartdiff.io.images import load_image

        image = load_image(p.image, p.width, p.height)
        return FirstFrameCondition.from_image(
            self.backend.vae,
            image,
            self.latent_shape(task),
            self.backend.model.dit.patch_size,
            self.backend.device,
        )

    def denoise(self, task: Task, on_step: StepCallback | None = None) -> None:
        """Run every sampler step from fresh noise; leaves fp32 latents in ``task.buffers``.

        Two-expert models switch experts (and guidance) at the boundary timestep
        (:class:`ExpertSchedule`); image-to-video feeds the DiT the first frame encoded from
        the image, with timestep 0 on its tokens (:class:`FirstFrameCondition`).
        """
        p = task.params
        sampler = make_sampler(p.solver, SamplerConfig(num_steps=p.steps, shift=p.shift))
        timesteps = sampler.timesteps.to(self.backend.device)
        total = len(timesteps)
        plan = self.expert_schedule(task).plan(sampler.timesteps.tolist())
        # A fresh step cache per task and expert (FlexCache; None for policy "none"), attached
        # to each expert's DiT for this loop only, so nothing crosses requests or experts (an
        # expert's first step computes in full: nothing of the other expert is reused).
        groups = self.backend.groups
        reduce = (
            sum_over_group(groups.sequence_group)
            if groups is not None and groups.sequence_size > 1
            else None
        )
        caches = [
            make_step_cache(
                p.cache.policy, p.cache.threshold, self.backend.model.dit, reduce=reduce
            )
            for _ in range(self.backend.num_experts)
        ]
        with self._timed(task, "denoise"), ExitStack() as attachments:
            for expert, expert_cache in enumerate(caches):
                attachments.enter_context(attached(self.backend.expert(expert), expert_cache))
            assert task.seed is not None  # set by Task.__post_init__
            if groups is not None:  # a seed drawn per rank would differ: rank 0's wins
                task.seed = groups.share(task.seed)
            latents = initial_noise(self.latent_shape(task), task.seed, self.backend.device)
            condition = self.image_condition(task)
            task.set_progress(0, total)
            for index in range(total):
                task.raise_if_cancelled()
                step = plan[index]
                cache = caches[step.expert]
                if cache is not None:
                    cache.begin_step(index, total, float(sampler.timesteps[index]))
                self.backend.activate_expert(step.expert)  # memory level 3 swaps experts
                model_input, timestep = latents, timesteps[index]
                if condition is not None:
                    model_input = condition.blend(latents)
                    timestep = condition.token_timesteps(timestep)
                noise = self.predict_noise(
                    model_input,
                    timestep,
                    task,
                    expert=step.expert,
                    guidance_scale=step.guidance_scale,
                )
                latents = sampler.step(noise, latents, index)
                if condition is not None and index + 1 == total:
                    latents = condition.blend(latents)
                task.buffers.latents = latents
                task.set_progress(index + 1, total)
                if on_step is not None:
                    on_step(task, index + 1, total)
        for expert, expert_cache in enumerate(caches):
            if expert_cache is not None:
                suffix = f" (expert {expert})" if len(caches) > 1 else ""
                LOG.info("task %s: %s%s", task.id, expert_cache.describe(), suffix)

    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        task: Task,
        *,
        expert: int = 0,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The guided velocity for ``latents [1, C, F, H, W]`` at ``timestep`` (0-d, or per
        token ``[1, S]``), fp32, from DiT ``expert`` with ``guidance_scale`` (default: the
        request's)."""
        guidance = task.params.guidance_scale if guidance_scale is None else guidance_scale
        groups = self.backend.groups
        if groups is not None and groups.world_size > 1:
            # CFG parallel (each cfg rank group runs one branch) x context parallel (runner).
            return guided_noise(
                self.backend.expert_runner(expert),
                latents,
                timestep,
                task.buffers.prompt_embeds,
                task.buffers.negative_embeds if task.params.do_cfg else None,
                guidance,
                groups,
            )
        dit = self.backend.expert(expert)
        x = latents.to(dit.dtype)
        cond: torch.Tensor = task.buffers.prompt_embeds

        def steps(batch: int) -> torch.Tensor:  # [batch] or per token [batch, S]
            return timestep.expand(batch) if timestep.ndim == 0 else timestep.expand(batch, -1)

        if not task.params.do_cfg:
            return dit.forward(x, steps(x.shape[0]), cond).float()
        uncond: torch.Tensor = task.buffers.negative_embeds
        if self.options.cfg_mode == "batched":
            both = dit.forward(torch.cat([x, x]), steps(2 * x.shape[0]), torch.cat([cond, uncond]))
            noise_cond, noise_uncond = both.float().chunk(2)
        else:
            noise_cond = dit.forward(x, steps(x.shape[0]), cond).float()
            noise_uncond = dit.forward(x, steps(x.shape[0]), uncond).float()
        return noise_uncond + guidance * (noise_cond - noise_uncond)

    def decode(self, task: Task) -> torch.Tensor:
        """Decode the final latents; store and return the video (see :meth:`generate`)."""
        vae = self.backend.vae
        if task.buffers.latents is None:
            raise ValueError(f"task {task.id} has no latents to decode (denoise first)")
        groups = self.backend.groups
        with self._timed(task, "decode"):
            latents = task.buffers.latents.to(device=vae.device, dtype=vae.dtype)
            if groups is None or groups.world_size == 1:
                video = vae.decode(vae.denormalize_latents(latents)).float().cpu()
            else:  # decoded once, on rank 0 (which writes the video); the others get it too
                decoded = decode_once(
                    lambda z: vae.decode(vae.denormalize_latents(z)), latents, groups
                )
                assert decoded is not None
                video = decoded.float().cpu()
        task.buffers.video = video
        return video
