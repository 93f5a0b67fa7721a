"""Model configs: ``configs/models/<name>.yaml`` -> a frozen :class:`ModelConfig`.

The static configuration level (DESIGN.md): the architecture of each component (DiT, VAE,
text encoder), where their weights sit inside a weights folder, and the recommended request
settings. The backend reads one to build its models; the CLI reads one to fill the request
defaults. An unknown name raises :class:`UnknownModelError` listing the known names.

The folder searched is ``$SMARTDIFF_MODEL_CONFIGS`` when set, else the repository's
``configs/models``; every call takes an explicit ``config_dir`` too.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from smartdiff.models.text_encoder import TextEncoderConfig
from smartdiff.models.wan22_vae import Wan22VAEConfig
from smartdiff.models.wan_dit import WanDiTConfig
from smartdiff.models.wan_vae import WanVAEConfig

CONFIG_DIR_ENV: Final = "SMARTDIFF_MODEL_CONFIGS"
# Pipeline families: Wan2.1 text-to-video; Wan2.2 A14B (two experts, Wan2.1 VAE); Wan2.2
# TI2V-5B (Wan2.2 VAE, per-token timesteps, text- or image-to-video).
FAMILIES: Final = ("wan2.1-t2v", "wan2.2-t2v-a14b", "wan2.2-ti2v")
TWO_EXPERT_FAMILIES: Final = ("wan2.2-t2v-a14b",)
WAN22_VAE_FAMILIES: Final = ("wan2.2-ti2v",)
_TOP_LEVEL_KEYS: Final = frozenset(
    {
        "name",
        "family",
        "description",
        "random_weights",
        "random_seed",
        "dit",
        "vae",
        "text_encoder",
        "weights",
        "defaults",
        "experts",
    }
)


class UnknownModelError(KeyError):
    """No config file for the model name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class ModelConfigError(ValueError):
    """A model config file is malformed; the message names the file and the field."""


@dataclass(frozen=True, kw_only=True)
class WeightsLayout:
    """Sub-folders of a weights folder holding each component (the diffusers layout).

    Args:
        dit / vae / text_encoder / tokenizer: paths relative to the weights folder.
        dit_2: the second (low-noise) expert of a two-expert model.
    """

    dit: str = "transformer"
    dit_2: str = "transformer_2"
    vae: str = "vae"
    text_encoder: str = "text_encoder"
    tokenizer: str = "tokenizer"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not value or Path(value).is_absolute():
                raise ValueError(f"WeightsLayout.{f.name} must be a relative path, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelDefaults:
    """Recommended request settings (the CLI uses them for fields the user left out)."""

    width: int = 832
    height: int = 480
    frames: int = 81
    fps: int = 16
    steps: int = 50
    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None
    shift: float = 5.0
    solver: str = "unipc"
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        for name in ("width", "height", "frames", "fps", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelDefaults.{name} must be a positive int, got {value!r}")
        for name in ("guidance_scale", "guidance_scale_2", "shift"):
            value = getattr(self, name)
            if value is None and name == "guidance_scale_2":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"ModelDefaults.{name} must be a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    def as_request_fields(self) -> dict[str, Any]:
        """The defaults as ``UserParams`` keyword arguments (unset optional ones left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class ExpertsConfig:
    """The two DiT experts of a Wan2.2 A14B model (:mod:`smartdiff.engine.experts`).

    Args:
        boundary_ratio: the high-noise expert runs the steps with timestep
            ``>= boundary_ratio * 1000``, the low-noise expert the others; in (0, 1).
    """

    boundary_ratio: float = 0.875

    def __post_init__(self) -> None:
        value = self.boundary_ratio
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ValueError(f"ExpertsConfig.boundary_ratio must be in (0, 1), got {value!r}")
        object.__setattr__(self, "boundary_ratio", float(value))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything static about one model.

    Args:
        name: the config name (file stem), e.g. ``wan2.1-t2v-1.3b``.
        family: the pipeline family (``wan2.1-t2v``, ``wan2.2-t2v-a14b``, ``wan2.2-ti2v``).
        description: one line for humans.
        dit / vae / text_encoder: the component architectures (the ``wan2.2-ti2v`` family
            has the Wan2.2 VAE; a two-expert model's experts share the ``dit`` architecture).
        experts: the expert switch of a two-expert family, ``None`` otherwise.
        weights: where each component sits in a weights folder.
        defaults: recommended request settings.
        random_weights: the model has no checkpoint; the backend builds seeded random weights.
        random_seed: seed of those random weights.
    """

    name: str
    family: str
    dit: WanDiTConfig
    vae: WanVAEConfig | Wan22VAEConfig
    text_encoder: TextEncoderConfig
    experts: ExpertsConfig | None = None
    weights: WeightsLayout = field(default_factory=WeightsLayout)
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    description: str = ""
    random_weights: bool = False
    random_seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"ModelConfig.family must be one of {', '.join(FAMILIES)}, got {self.family!r}"
            )
        two_experts = self.family in TWO_EXPERT_FAMILIES
        if two_experts != (self.experts is not None):
            raise ValueError(
                f"ModelConfig {self.name!r}: family {self.family!r} "
                + ("needs an 'experts' section" if two_experts else "has no 'experts' section")
            )
        wan22_vae = self.family in WAN22_VAE_FAMILIES
        if wan22_vae != isinstance(self.vae, Wan22VAEConfig):
            raise ValueError(
                f"ModelConfig {self.name!r}: family {self.family!r} needs the "
                + ("Wan2.2 VAE" if wan22_vae else "Wan2.1 VAE")
            )
        if self.dit.text_dim != self.text_encoder.d_model:
            raise ValueError(
                f"ModelConfig {self.name!r}: dit.text_dim ({self.dit.text_dim}) must equal "
                f"text_encoder.d_model ({self.text_encoder.d_model})"
            )
        if self.dit.in_dim != self.vae.z_dim or self.dit.out_dim != self.vae.z_dim:
            raise ValueError(
                f"ModelConfig {self.name!r}: dit.in_dim ({self.dit.in_dim}) and dit.out_dim "
                f"({self.dit.out_dim}) must equal vae.z_dim ({self.vae.z_dim})"
            )

    @property
    def num_experts(self) -> int:
        """DiT experts: 2 for Wan2.2 A14B, else 1."""
        return 1 if self.experts is None else 2

    @property
    def per_token_timesteps(self) -> bool:
        """The DiT takes one timestep per token (Wan2.2 TI2V: ``expand_timesteps``)."""
        return self.family == "wan2.2-ti2v"

    @property
    def image_to_video(self) -> bool:
        """Requests may give a first-frame image (Wan2.2 TI2V)."""
        return self.family == "wan2.2-ti2v"

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (VAE stride x DiT patch)."""
        return self.vae.spatial_compression * max(self.dit.patch_size[1:])

    @property
    def frame_multiple(self) -> int:
        """``frames - 1`` must be a multiple of this (the VAE's temporal stride)."""
        return self.vae.temporal_compression * self.dit.patch_size[0]

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(channels, latent frames, latent height, latent width)`` of a request."""
        r, s = self.vae.temporal_compression, self.vae.spatial_compression
        return self.dit.in_dim, (frames - 1) // r + 1, height // s, width // s


def default_config_dir() -> Path:
    """``$SMARTDIFF_MODEL_CONFIGS`` if set, else ``<repository>/configs/models``."""
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "configs" / "models"


def known_models(config_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the model configs in ``config_dir`` (sorted)."""
    folder = Path(config_dir) if config_dir is not None else default_config_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_model_config(name: str, config_dir: str | os.PathLike[str] | None = None) -> ModelConfig:
    """Read ``<config_dir>/<name>.yaml``; raise :class:`UnknownModelError` for an unknown name."""
    folder = Path(config_dir) if config_dir is not None else default_config_dir()
    known = known_models(folder)
    if name not in known:
        listing = ", ".join(known) or f"none: no *.yaml in {str(folder)!r}"
        raise UnknownModelError(f"unknown model {name!r}; known models: {listing}")
    return parse_model_config(folder / f"{name}.yaml")


def parse_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Build a :class:`ModelConfig` from one YAML file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelConfigError(f"cannot read model config {str(path)!r}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelConfigError(f"model config {str(path)!r} must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ModelConfigError(
            f"model config {str(path)!r}: unknown keys {unknown}; allowed: "
            f"{sorted(_TOP_LEVEL_KEYS)}"
        )
    if raw.get("name") != path.stem:
        raise ModelConfigError(
            f"model config {str(path)!r}: name {raw.get('name')!r} must "
            f"equal the file name {path.stem!r}"
        )
    sections: dict[str, Any] = {}
    vae_class = Wan22VAEConfig if raw.get("family") in WAN22_VAE_FAMILIES else WanVAEConfig
    for key, cls in (
        ("dit", WanDiTConfig),
        ("vae", vae_class),
        ("text_encoder", TextEncoderConfig),
        ("weights", WeightsLayout),
        ("defaults", ModelDefaults),
        ("experts", ExpertsConfig),
    ):
        if key in raw or key in ("dit", "vae", "text_encoder"):
            sections[key] = _build(cls, raw.get(key), path, key)
    scalars = {
        k: raw[k] for k in ("family", "description", "random_weights", "random_seed") if k in raw
    }
    try:
        return ModelConfig(name=raw["name"], **sections, **scalars)
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(f"model config {str(path)!r}: {exc}") from exc


def _build(cls: type[Any], section: Any, path: Path, key: str) -> Any:
    if not isinstance(section, dict):
        raise ModelConfigError(
            f"model config {str(path)!r}: section {key!r} must be a mapping, got {section!r}"
        )
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ModelConfigError(
            f"model config {str(path)!r}: unknown keys {unknown} in "
            f"{key!r}; allowed: {sorted(allowed)}"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(f"model config {str(path)!r}, section {key!r}: {exc}") from exc
