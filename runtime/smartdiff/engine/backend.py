"""The backend: loads a model's components and owns them, with the device, dtype and memory level.

:meth:`Backend.from_params` turns the static model config
(:class:`~smartdiff.models.registry.ModelConfig`) and the per-process
:class:`~smartdiff.api.params.SystemParams` into ready models: the DiT and VAE from safetensors
(official Wan or diffusers naming, through their own ``from_checkpoint``), the UMT5 text encoder
through transformers, or seeded RANDOM weights for a ``random_weights`` model such as
``wan-tiny-random``. The generator receives the backend object explicitly; nothing here lives in
class-level or module-level state.

Memory levels (DESIGN.md, :func:`smartdiff.engine.offload.plan_memory`): 0 everything on
the device; 1 the VAE decodes tiled (:mod:`smartdiff.models.vae_tiling`); 2 the text encoder
stays on the CPU; 3 inactive DiT experts on the CPU (Wan2.2 A14B: the low-noise expert waits
on the host, :class:`~smartdiff.engine.offload.ExpertOffloader`; a single-expert model behaves
as at 2). Two-expert models (``dit_2``) and the Wan2.2 VAE are built from the model config; the
backend also owns the prompt-embedding cache next to its text encoder.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Final

import torch

from smartdiff.api.params import SystemParams
from smartdiff.engine.offload import ExpertOffloader, plan_memory
from smartdiff.engine.prompt_cache import PromptEmbeddingCache
from smartdiff.models.registry import ModelConfig, load_model_config
from smartdiff.models.text_encoder import TextEncoder
from smartdiff.models.wan22_vae import Wan22VAE, Wan22VAEConfig
from smartdiff.models.wan_dit import AttentionFn, WanDiT
from smartdiff.models.wan_vae import WanVAE, fuse_norm_silu
from smartdiff.parallel.dit import ParallelDiT, parallelize
from smartdiff.parallel.groups import ParallelGroups

LOG = logging.getLogger(__name__)

DTYPES: Final[dict[str, torch.dtype]] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class Placement:
    """Where each component lives and computes.

    Attributes:
        device: the DiT's and the VAE's device.
        dtype: compute dtype of the DiT (except its fp32 islands), the VAE and the text encoder.
        text_encoder_device: the device the text encoder runs on (the CPU at memory level >= 2).
        memory_level: the requested level, 0..3.
    """

    device: torch.device
    dtype: torch.dtype
    text_encoder_device: torch.device
    memory_level: int


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> the first CUDA device if present, else the CPU; otherwise ``name``."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name!r} is not allowed: no CUDA device is available (allowed: 'auto', 'cpu')"
        )
    return device


def resolve_placement(system: SystemParams, device: torch.device | None = None) -> Placement:
    """The :class:`Placement` for ``system`` (device, dtype, memory level); ``device``
    overrides ``system.device`` (a parallel rank computes on its own ``cuda:<local_rank>``)."""
    device = device if device is not None else resolve_device(system.device)
    text_device = torch.device("cpu") if system.memory_level >= 2 else device
    return Placement(
        device=device,
        dtype=DTYPES[system.dtype],
        text_encoder_device=text_device,
        memory_level=system.memory_level,
    )


def resolve_attention(
    name: str, placement: Placement | None = None, head_dim: int | None = None
) -> AttentionFn | None:
    """The DiT's self-attention backend for ``name`` (:mod:`smartdiff.attention.registry`).

    With only a name, checks that the name exists (``ValueError`` listing the valid ones) and
    returns ``None``; with the placement and head dim, builds and checks the backend once
    (``auto``: the fastest that runs here within the accuracy bound, logged) and returns it.
    """
    from smartdiff.attention.registry import check_name, select_attention

    check_name(name)
    if placement is None or head_dim is None:
        return None
    return select_attention(name, device=placement.device, dtype=placement.dtype, head_dim=head_dim)


class Backend:
    """Owns the models of one model config on one process.

    Args:
        model: the model config.
        placement: device, dtype, memory level.
        dit / vae / text_encoder: the ready components (eval mode, no grad).
        dit_2: the low-noise expert of a two-expert model (Wan2.2 A14B), else ``None``.
        load_seconds: time spent building them.
        groups: this rank's process groups (:class:`~smartdiff.parallel.groups.ParallelGroups`)
            under a parallel launch; ``None`` for one process.
    """

    def __init__(
        self,
        model: ModelConfig,
        placement: Placement,
        *,
        dit: WanDiT,
        vae: WanVAE | Wan22VAE,
        text_encoder: TextEncoder,
        load_seconds: float = 0.0,
        groups: ParallelGroups | None = None,
        dit_2: WanDiT | None = None,
    ) -> None:
        self.model = model
        self.placement = placement
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.load_seconds = load_seconds
        self.groups = groups
        # What the denoising loop calls: the DiT itself, or the DiT split over the sequence
        # ranks (context parallel); CFG parallel is the generator's (guided_noise).
        self.runner: WanDiT | ParallelDiT = dit if groups is None else parallelize(dit, groups)
        self.dit_2 = dit_2
        self.runner_2: WanDiT | ParallelDiT | None = (
            dit_2 if dit_2 is None or groups is None else parallelize(dit_2, groups)
        )
        self.memory = plan_memory(placement.memory_level)
        self.vae.tiling = self.memory.vae_tiling
        # Level 3 with two experts: one on the device at a time (the other's weights on host).
        self.offloader = (
            ExpertOffloader([dit, dit_2], placement.device)
            if dit_2 is not None and self.memory.offload_inactive_experts
            else None
        )
        self.prompt_cache = PromptEmbeddingCache()

    @property
    def num_experts(self) -> int:
        return 1 if self.dit_2 is None else 2

    def expert(self, index: int) -> WanDiT:
        """DiT expert ``index`` (0: the only or high-noise expert, 1: the low-noise expert)."""
        if index == 0:
            return self.dit
        if index == 1 and self.dit_2 is not None:
            return self.dit_2
        raise ValueError(
            f"expert {index} is not allowed: model {self.model.name!r} has "
            f"{self.num_experts} expert(s)"
        )

    def expert_runner(self, index: int) -> WanDiT | ParallelDiT:
        """What the denoising loop calls for expert ``index`` (see :attr:`runner`)."""
        self.expert(index)  # checks the index
        runner = self.runner if index == 0 else self.runner_2
        assert runner is not None
        return runner

    def activate_expert(self, index: int) -> None:
        """Make sure expert ``index`` is on the device (memory level 3 swaps experts)."""
        self.expert(index)
        if self.offloader is not None:
            self.offloader.activate(index)

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs (rank 0, or the only process)."""
        return self.groups is None or self.groups.is_main

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype

    @property
    def memory_level(self) -> int:
        return self.placement.memory_level

    @classmethod
    def from_params(
        cls,
        model: ModelConfig | str,
        system: SystemParams,
        weights_path: str | os.PathLike[str] | None = None,
        groups: ParallelGroups | None = None,
    ) -> Backend:
        """Build every component.

        Args:
            model: a :class:`ModelConfig` or a config name (``configs/models/<name>.yaml``).
            system: device, dtype, attention backend, memory level and parallel degrees.
            weights_path: a released weights folder, official Wan2.1/Wan2.2 or diffusers
                layout (:func:`smartdiff.io.release.detect_release`), or a weights URI: ``file://``,
                ``pvc://`` or ``s3://`` (downloaded into the node-local cache,
                :func:`smartdiff.io.weights.resolve_weights_uri`). Required unless the model
                has ``random_weights``, in which case ``None`` builds seeded random weights.
            groups: this rank's process groups, required when the degrees' product (world
                size) is above 1 (:meth:`ParallelGroups.from_degrees` under torchrun); every
                rank builds the same weights on ``groups.device``.
        """
        config = load_model_config(model) if isinstance(model, str) else model
        if system.world_size != 1 and (
            groups is None
            or (groups.cfg, groups.ulysses, groups.ring)
            != (system.cfg, system.ulysses, system.ring)
        ):
            raise ValueError(
                f"cfg={system.cfg}, ulysses={system.ulysses}, ring={system.ring} (world size "
                f"{system.world_size}) need the process groups of a parallel launch "
                "(ParallelGroups.from_degrees under torchrun) with the same degrees"
            )
        resolve_attention(system.attention)  # an unknown name fails before anything is built
        placement = resolve_placement(system, groups.device if groups is not None else None)
        attention = resolve_attention(system.attention, placement, config.dit.head_dim)
        start = time.perf_counter()
        if weights_path is None:
            if not config.random_weights:
                raise ValueError(
                    f"model {config.name!r} needs weights_path (a folder with "
                    f"{config.weights.dit}/, {config.weights.vae}/, {config.weights.text_encoder}/"
                    f" and {config.weights.tokenizer}/); only random_weights models build without"
                )
            parts = _random_components(config, placement, attention)
        else:
            parts = _load_components(config, placement, attention, weights_path)
        dit, dit_2, vae, text_encoder = parts
        if placement.device.type == "cuda":
            # Fused norms/modulation/RoPE: 1.12x per forward on an H200 (benchmarks/); the
            # VAE's norm + SiLU pairs: 1.17x per decode.
            dit.fuse_elementwise()
            if dit_2 is not None:
                dit_2.fuse_elementwise()
            fuse_norm_silu(vae)
            torch.cuda.synchronize(placement.device)
        seconds = time.perf_counter() - start
        LOG.info(
            "loaded %s on %s (%s, memory level %d) in %.2f s",
            config.name,
            placement.device,
            placement.dtype,
            placement.memory_level,
            seconds,
        )
        return cls(
            config,
            placement,
            dit=dit,
            vae=vae,
            text_encoder=text_encoder,
            load_seconds=seconds,
            groups=groups,
            dit_2=dit_2,
        )


Components = tuple[WanDiT, WanDiT | None, WanVAE | Wan22VAE, TextEncoder]


def _vae_class(config: ModelConfig) -> type[WanVAE] | type[Wan22VAE]:
    return Wan22VAE if isinstance(config.vae, Wan22VAEConfig) else WanVAE


def _second_expert_device(placement: Placement) -> torch.device:
    """Where the low-noise expert is built: the host at memory level 3 (it is inactive first)."""
    offload = plan_memory(placement.memory_level).offload_inactive_experts
    return torch.device("cpu") if offload else placement.device


def _random_components(
    config: ModelConfig, placement: Placement, attention: AttentionFn | None
) -> Components:
    """Seeded RANDOM weights (built on the CPU in fp32 with the modules' own initialization,
    then moved): the same seed gives the same weights on every device."""
    seed = config.random_seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = WanDiT(config.dit, attention=attention)
        torch.manual_seed(seed + 1)
        vae = _vae_class(config)(config.vae)  # type: ignore[arg-type]
        dit_2 = None
        if config.num_experts == 2:
            torch.manual_seed(seed + 3)
            dit_2 = WanDiT(config.dit, attention=attention)
    dit = dit.cast(placement.dtype).to(placement.device).eval().requires_grad_(False)
    if dit_2 is not None:
        dit_2 = dit_2.cast(placement.dtype).to(_second_expert_device(placement))
        dit_2 = dit_2.eval().requires_grad_(False)
    vae = vae.to(device=placement.device, dtype=placement.dtype).eval().requires_grad_(False)
    text_encoder = TextEncoder.random(
        config.text_encoder,
        seed=seed + 2,
        device=placement.text_encoder_device,
        dtype=placement.dtype,
    )
    return dit, dit_2, vae, text_encoder


def _load_components(
    config: ModelConfig,
    placement: Placement,
    attention: AttentionFn | None,
    weights: str | os.PathLike[str],
) -> Components:
    """Load from a release folder (official Wan2.1/Wan2.2 or diffusers layout) or a weights
    URI; a two-expert model's high-noise expert is ``release.dit``, its low-noise one
    ``release.dit_2``."""
    from smartdiff.io.release import check_release_architecture, detect_release, release_kind
    from smartdiff.io.weights import resolve_weights_uri

    root = resolve_weights_uri(weights)
    release = detect_release(
        root,
        subfolders=config.weights,
        tokenizer_required=config.text_encoder.tokenizer != "byte-level",
        kind=release_kind(config),
    )
    check_release_architecture(release, config)
    LOG.info("weights %s: %s layout", root, release.layout)
    dit = WanDiT.from_checkpoint(
        release.dit, config.dit, device=placement.device, dtype=placement.dtype, attention=attention
    )
    dit_2 = None
    if config.num_experts == 2:
        dit_2 = WanDiT.from_checkpoint(
            release.second_expert(),
            config.dit,
            device=_second_expert_device(placement),
            dtype=placement.dtype,
            attention=attention,
        )
    vae = _vae_class(config).from_checkpoint(
        release.vae,
        config.vae,  # type: ignore[arg-type]
        device=placement.device,
        dtype=placement.dtype,
    )
    load_text_encoder = (
        TextEncoder.from_official_checkpoint
        if release.layout == "official"
        else TextEncoder.from_pretrained
    )
    text_encoder = load_text_encoder(
        release.text_encoder,
        config.text_encoder,
        tokenizer_path=release.tokenizer,
        device=placement.text_encoder_device,
        dtype=placement.dtype,
    )
    return dit, dit_2, vae, text_encoder
