"""The backend: loads a model's components and owns them, with the device, dtype and memory level.

:meth:`Backend.from_params` turns the static model config
(:class:`~smartdiff.models.registry.ModelConfig`) and the per-process
:class:`~smartdiff.api.params.SystemParams` into ready models: the DiT and VAE from safetensors
(official Wan or diffusers naming, through their own ``from_checkpoint``), the UMT5 text encoder
through transformers, or seeded RANDOM weights for a ``random_weights`` model such as
``wan-tiny-random``. The generator receives the backend object explicitly; nothing here lives in
class-level or module-level state.

Memory levels (DESIGN.md): 0 everything on the device; 1 VAE tiling (not available yet in
:class:`~smartdiff.models.wan_vae.WanVAE`: level 1 decodes untiled and says so in the log);
2 the text encoder stays on the CPU; 3 inactive DiT experts on the CPU (Wan2.1 has a single
expert, so 3 behaves as 2).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Final

import torch

from smartdiff.api.params import SystemParams
from smartdiff.models.registry import ModelConfig, load_model_config
from smartdiff.models.text_encoder import TextEncoder
from smartdiff.models.wan_dit import AttentionFn, WanDiT
from smartdiff.models.wan_vae import WanVAE

LOG = logging.getLogger(__name__)

DTYPES: Final[dict[str, torch.dtype]] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
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
        raise ValueError(f"device={name!r} is not allowed: no CUDA device is available "
                         "(allowed: 'auto', 'cpu')")
    return device


def resolve_placement(system: SystemParams) -> Placement:
    """The :class:`Placement` for ``system`` (device, dtype, memory level)."""
    device = resolve_device(system.device)
    text_device = torch.device("cpu") if system.memory_level >= 2 else device
    return Placement(device=device, dtype=DTYPES[system.dtype], text_encoder_device=text_device,
                     memory_level=system.memory_level)


def resolve_attention(name: str, placement: Placement | None = None,
                      head_dim: int | None = None) -> AttentionFn | None:
    """The DiT's self-attention backend for ``name`` (:mod:`smartdiff.attention.registry`).

    With only a name, checks that the name exists (``ValueError`` listing the valid ones) and
    returns ``None``; with the placement and head dim, builds and checks the backend once
    (``auto``: the fastest that runs here within the accuracy bound, logged) and returns it.
    """
    from smartdiff.attention.registry import check_name, select_attention

    check_name(name)
    if placement is None or head_dim is None:
        return None
    return select_attention(name, device=placement.device, dtype=placement.dtype,
                            head_dim=head_dim)


class Backend:
    """Owns the models of one model config on one process.

    Args:
        model: the model config.
        placement: device, dtype, memory level.
        dit / vae / text_encoder: the ready components (eval mode, no grad).
        load_seconds: time spent building them.
    """

    def __init__(self, model: ModelConfig, placement: Placement, *, dit: WanDiT, vae: WanVAE,
                 text_encoder: TextEncoder, load_seconds: float = 0.0) -> None:
        self.model = model
        self.placement = placement
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.load_seconds = load_seconds

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
    def from_params(cls, model: ModelConfig | str, system: SystemParams,
                    weights_path: str | os.PathLike[str] | None = None) -> Backend:
        """Build every component.

        Args:
            model: a :class:`ModelConfig` or a config name (``configs/models/<name>.yaml``).
            system: device, dtype, attention backend and memory level (parallel degrees are
                the parallel layer's business and must be 1 here).
            weights_path: a released weights folder, official Wan2.1 or diffusers layout
                (:func:`smartdiff.io.release.detect_release`), or a weights URI: ``file://``,
                ``pvc://`` or ``s3://`` (downloaded into the node-local cache,
                :func:`smartdiff.io.weights.resolve_weights_uri`). Required unless the model
                has ``random_weights``, in which case ``None`` builds seeded random weights.
        """
        config = load_model_config(model) if isinstance(model, str) else model
        if system.world_size != 1:
            raise ValueError(
                f"Backend.from_params runs one process: cfg={system.cfg}, "
                f"ulysses={system.ulysses}, ring={system.ring} (world size "
                f"{system.world_size}) need the parallel launcher (allowed here: all 1)"
            )
        resolve_attention(system.attention)  # an unknown name fails before anything is built
        placement = resolve_placement(system)
        attention = resolve_attention(system.attention, placement, config.dit.head_dim)
        if placement.memory_level == 1:
            LOG.warning("memory_level 1 asks for VAE tiling, which WanVAE does not provide yet; "
                        "the VAE decodes untiled")
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
        dit, vae, text_encoder = parts
        if placement.device.type == "cuda":
            # Fused norms/modulation/RoPE: 1.12x per forward on an H200 (benchmarks/).
            dit.fuse_elementwise()
            torch.cuda.synchronize(placement.device)
        seconds = time.perf_counter() - start
        LOG.info("loaded %s on %s (%s, memory level %d) in %.2f s", config.name,
                 placement.device, placement.dtype, placement.memory_level, seconds)
        return cls(config, placement, dit=dit, vae=vae, text_encoder=text_encoder,
                   load_seconds=seconds)


def _random_components(config: ModelConfig, placement: Placement, attention: AttentionFn | None
                       ) -> tuple[WanDiT, WanVAE, TextEncoder]:
    """Seeded RANDOM weights (built on the CPU in fp32 with the modules' own initialization,
    then moved): the same seed gives the same weights on every device."""
    seed = config.random_seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = WanDiT(config.dit, attention=attention)
        torch.manual_seed(seed + 1)
        vae = WanVAE(config.vae)
    dit = dit.cast(placement.dtype).to(placement.device).eval().requires_grad_(False)
    vae = vae.to(device=placement.device, dtype=placement.dtype).eval().requires_grad_(False)
    text_encoder = TextEncoder.random(config.text_encoder, seed=seed + 2,
                                      device=placement.text_encoder_device,
                                      dtype=placement.dtype)
    return dit, vae, text_encoder


def _load_components(config: ModelConfig, placement: Placement, attention: AttentionFn | None,
                     weights: str | os.PathLike[str]) -> tuple[WanDiT, WanVAE, TextEncoder]:
    """Load from a release folder (official Wan2.1 or diffusers layout) or a weights URI."""
    from smartdiff.io.release import check_release_architecture, detect_release
    from smartdiff.io.weights import resolve_weights_uri

    root = resolve_weights_uri(weights)
    release = detect_release(root, subfolders=config.weights,
                             tokenizer_required=config.text_encoder.tokenizer != "byte-level")
    check_release_architecture(release, config)
    LOG.info("weights %s: %s layout", root, release.layout)
    dit = WanDiT.from_checkpoint(release.dit, config.dit, device=placement.device,
                                 dtype=placement.dtype, attention=attention)
    vae = WanVAE.from_checkpoint(release.vae, config.vae, device=placement.device,
                                 dtype=placement.dtype)
    load_text_encoder = (TextEncoder.from_official_checkpoint if release.layout == "official"
                         else TextEncoder.from_pretrained)
    text_encoder = load_text_encoder(release.text_encoder, config.text_encoder,
                                     tokenizer_path=release.tokenizer,
                                     device=placement.text_encoder_device, dtype=placement.dtype)
    return dit, vae, text_encoder
