"""Wan model folders exactly as they are released: which layout a folder is, and where each
component sits in it.

Two layouts are recognized (file names as published on the Hugging Face hub), each in the
form of the model it is asked for (:func:`release_kind`):

- the official Wan2.1 release (``Wan-AI/Wan2.1-T2V-1.3B``, ``Wan-AI/Wan2.1-T2V-14B``)::

      config.json                                       DiT architecture (dim, ffn_dim, ...)
      diffusion_pytorch_model.safetensors               DiT, one file (1.3B), or
      diffusion_pytorch_model-0000i-of-0000n.safetensors  shards (14B) plus
      diffusion_pytorch_model.safetensors.index.json
      Wan2.1_VAE.pth                                    VAE, official naming (torch pickle)
      models_t5_umt5-xxl-enc-bf16.pth                   T5 encoder, official naming (pickle)
      google/umt5-xxl/                                  tokenizer files

  the official Wan2.2 TI2V-5B release (``Wan-AI/Wan2.2-TI2V-5B``) is the same with the
  48-channel VAE ``Wan2.2_VAE.pth`` (``config.json`` states ``model_type: ti2v``); the official
  Wan2.2 T2V-A14B release (``Wan-AI/Wan2.2-T2V-A14B``) has two DiT folders instead of the
  top-level DiT, each a ``config.json`` plus safetensors (sharded, with an index)::

      high_noise_model/    the high-noise expert (timesteps >= boundary): diffusers' transformer/
      low_noise_model/     the low-noise expert: diffusers' transformer_2/
      Wan2.1_VAE.pth  models_t5_umt5-xxl-enc-bf16.pth  google/umt5-xxl/
      configuration.json   informative, may be absent; not read

- the diffusers release (``Wan-AI/Wan2.1-T2V-14B-Diffusers``, ``Wan-AI/Wan2.2-T2V-A14B-
  Diffusers``, ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``)::

      model_index.json
      transformer/  [transformer_2/]  vae/  text_encoder/  tokenizer/  scheduler/

  (sub-folder names from the model config's ``weights`` section; ``transformer_2/`` only for
  two experts). In diffusers' ``WanPipeline`` the ``transformer`` runs the timesteps at or above
  ``boundary_ratio * 1000``, so it is the high-noise expert. ``scheduler/`` is not read:
  the samplers take their settings from the request. ``model_index.json`` marks the layout but
  is not needed when every component folder is there (``save_pretrained`` of each component
  writes no index).

:func:`detect_release` looks at a folder and returns a :class:`ReleaseFolder` naming the path
of each component, or raises one :class:`ReleaseLayoutError` saying what the folder holds and
what is missing. :func:`check_release_architecture` compares the folder's DiT ``config.json``
with the model config before gigabytes are read. Nothing here reads tensors: the backend hands
the paths to ``WanDiT.from_checkpoint``, ``WanVAE.from_checkpoint`` and the ``TextEncoder``
loaders (``.pth`` files are only ever read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from smartdiff.models.registry import ModelConfig, WeightsLayout

Layout = Literal["official", "diffusers"]

OFFICIAL_DIT_CONFIG: Final = "config.json"
DIT_WEIGHTS_PREFIX: Final = "diffusion_pytorch_model"
OFFICIAL_VAE: Final = "Wan2.1_VAE.pth"
OFFICIAL_WAN22_VAE: Final = "Wan2.2_VAE.pth"
OFFICIAL_HIGH_NOISE: Final = "high_noise_model"
OFFICIAL_LOW_NOISE: Final = "low_noise_model"
OFFICIAL_CONFIGURATION: Final = "configuration.json"  # Wan2.2 A14B: informative, not read
OFFICIAL_T5: Final = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER: Final = "google/umt5-xxl"
DIFFUSERS_INDEX: Final = "model_index.json"
SAFETENSORS_SUFFIX: Final = ".safetensors"
INDEX_SUFFIX: Final = ".safetensors.index.json"
# Files of which at least one makes a folder a tokenizer (sentencepiece or fast tokenizer).
TOKENIZER_FILES: Final = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
# Official config.json fields compared with the model config (the rest are informative).
_OFFICIAL_DIT_FIELDS: Final = (
    "dim",
    "ffn_dim",
    "num_heads",
    "num_layers",
    "in_dim",
    "out_dim",
    "freq_dim",
    "text_dim",
    "eps",
    "patch_size",
    "cross_attn_norm",
    "qk_norm",
)
_MODEL_TYPES: Final = {"t2v": "text-to-video", "ti2v": "text/image-to-video"}
_DEFAULT_SUBFOLDERS: Final = {
    "dit": "transformer",
    "dit_2": "transformer_2",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
}


class ReleaseLayoutError(FileNotFoundError):
    """A weights folder is not a complete Wan release (or its config disagrees with the model
    config); the message lists what the folder holds and what is missing or wrong."""


@dataclass(frozen=True)
class ReleaseKind:
    """What a model needs from a release folder.

    Attributes:
        name: the release named in errors (``Wan2.1``, ``Wan2.2 T2V-A14B``, ``Wan2.2 TI2V-5B``).
        two_experts: the DiT is two experts (official ``high_noise_model/`` and
            ``low_noise_model/``; diffusers ``transformer/`` and ``transformer_2/``).
        official_vae: the VAE file of the official layout.
        model_type: the ``model_type`` an official DiT ``config.json`` may state.
    """

    name: str
    two_experts: bool
    official_vae: str
    model_type: str

    def __post_init__(self) -> None:
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(
                f"ReleaseKind.model_type must be one of {', '.join(_MODEL_TYPES)}, "
                f"got {self.model_type!r}"
            )
        if not self.official_vae.endswith(".pth"):
            raise ValueError(
                f"ReleaseKind.official_vae must name a .pth file, got {self.official_vae!r}"
            )


WAN21_T2V: Final = ReleaseKind("Wan2.1", False, OFFICIAL_VAE, "t2v")
WAN22_T2V_A14B: Final = ReleaseKind("Wan2.2 T2V-A14B", True, OFFICIAL_VAE, "t2v")
WAN22_TI2V: Final = ReleaseKind("Wan2.2 TI2V-5B", False, OFFICIAL_WAN22_VAE, "ti2v")
_KINDS: Final = {
    "wan2.1-t2v": WAN21_T2V,
    "wan2.2-t2v-a14b": WAN22_T2V_A14B,
    "wan2.2-ti2v": WAN22_TI2V,
}


def release_kind(model: ModelConfig) -> ReleaseKind:
    """The release a model loads from, by its family."""
    kind = _KINDS.get(model.family)
    if kind is None:
        raise ValueError(
            f"model {model.name!r}: family {model.family!r} has no known release layout "
            f"(known: {', '.join(_KINDS)})"
        )
    return kind


@dataclass(frozen=True)
class ReleaseFolder:
    """Where each component of a release sits.

    Attributes:
        root: the folder.
        layout: ``"official"`` or ``"diffusers"``.
        dit_config: the DiT's ``config.json`` (official names, or diffusers names in
            ``transformer/``).
        dit: what ``WanDiT.from_checkpoint`` reads: the single safetensors file or the index
            (of a two-expert model: the high-noise expert, ``high_noise_model/`` or
            ``transformer/``).
        vae: ``Wan2.1_VAE.pth`` or ``Wan2.2_VAE.pth`` (official) or the ``vae/`` folder
            (diffusers).
        text_encoder: ``models_t5_umt5-xxl-enc-bf16.pth`` (official naming) or the
            ``text_encoder/`` folder (transformers ``UMT5EncoderModel``).
        tokenizer: the tokenizer folder; ``None`` when it is absent and was not required.
        dit_2: the low-noise expert's checkpoint (``low_noise_model/`` or ``transformer_2/``)
            of a two-expert model, else ``None``.
        dit_2_config: its ``config.json``, else ``None``.
    """

    root: Path
    layout: Layout
    dit_config: Path
    dit: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path | None
    dit_2: Path | None = None
    dit_2_config: Path | None = None

    def second_expert(self) -> Path:
        """:attr:`dit_2`; :class:`ReleaseLayoutError` when the folder has one DiT only."""
        if self.dit_2 is None:
            raise ReleaseLayoutError(
                f"weights folder {str(self.root)!r} ({self.layout} layout) holds one DiT; a "
                f"two-expert model needs {OFFICIAL_HIGH_NOISE}/ and {OFFICIAL_LOW_NOISE}/ "
                "(official) or transformer/ and transformer_2/ (diffusers)"
            )
        return self.dit_2


def detect_release(
    root: str | os.PathLike[str],
    *,
    subfolders: WeightsLayout | None = None,
    tokenizer_required: bool = True,
    kind: ReleaseKind = WAN21_T2V,
) -> ReleaseFolder:
    """Recognize the layout of ``root`` and locate every component.

    Args:
        root: the weights folder.
        subfolders: the diffusers sub-folder names (a model config's ``weights``); default
            ``transformer``, ``transformer_2``, ``vae``, ``text_encoder``, ``tokenizer``.
        tokenizer_required: whether a missing tokenizer folder is an error (models with an
            in-process tokenizer do not need one).
        kind: the release the model needs (:func:`release_kind`); default Wan2.1.

    Raises:
        ReleaseLayoutError: ``root`` is not a folder, or is neither layout complete; the message
            lists the folder's entries and, for the layout it resembles (both when it resembles
            neither), every missing part.
    """
    folder = Path(root)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ReleaseLayoutError(f"weights folder {str(folder)!r} {what}")
    names = _subfolder_names(subfolders)
    official, official_missing = _official(folder, kind, tokenizer_required)
    diffusers, diffusers_missing = _diffusers(folder, names, kind, tokenizer_required)
    if official is not None:
        return official
    if diffusers is not None:
        return diffusers
    official_marks = _official_marks(folder, kind)
    diffusers_marks = _diffusers_marks(folder, names)
    lines = [
        f"weights folder {str(folder)!r} is not a complete {kind.name} release",
        f"it holds: {_listing(folder)}",
    ]
    if official_marks or not diffusers_marks:
        lines.append(f"the official {kind.name} layout lacks: " + "; ".join(official_missing))
    if diffusers_marks or not official_marks:
        lines.append("the diffusers layout lacks: " + "; ".join(diffusers_missing))
    raise ReleaseLayoutError("\n  ".join(lines))


def _subfolder_names(subfolders: WeightsLayout | None) -> dict[str, str]:
    if subfolders is None:
        return dict(_DEFAULT_SUBFOLDERS)
    return {name: getattr(subfolders, name) for name in _DEFAULT_SUBFOLDERS}


def _listing(folder: Path, limit: int = 30) -> str:
    entries = sorted(
        p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith(".")
    )
    if not entries:
        return "nothing"
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def _official_marks(folder: Path, kind: ReleaseKind) -> list[str]:
    candidates = [kind.official_vae, OFFICIAL_T5, OFFICIAL_TOKENIZER]
    if kind.two_experts:
        candidates += [OFFICIAL_HIGH_NOISE, OFFICIAL_LOW_NOISE, OFFICIAL_CONFIGURATION]
    marks = [name for name in candidates if (folder / name).exists()]
    marks += [p.name for p in folder.glob(f"{DIT_WEIGHTS_PREFIX}*{SAFETENSORS_SUFFIX}*")]
    return marks


def _diffusers_marks(folder: Path, names: Mapping[str, str]) -> list[str]:
    candidates = (DIFFUSERS_INDEX, *names.values(), "scheduler")
    return [name for name in candidates if (folder / name).exists()]


def find_dit_weights(folder: Path) -> tuple[Path | None, list[str]]:
    """The DiT checkpoint in ``folder``: its index (whose shards all exist) or its single
    safetensors file; else ``None`` and what is missing."""
    index = folder / f"{DIT_WEIGHTS_PREFIX}{INDEX_SUFFIX}"
    single = folder / f"{DIT_WEIGHTS_PREFIX}{SAFETENSORS_SUFFIX}"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, AttributeError) as error:
            return None, [f"a readable {index.name} ({error})"]
        absent = [shard for shard in shards if not (folder / shard).is_file()]
        if not shards:
            return None, [f"shards: {index.name} has an empty weight_map"]
        if absent:
            return None, [f"shard(s) listed in {index.name}: {', '.join(absent)}"]
        return index, []
    if single.is_file():
        return single, []
    shards = sorted(p.name for p in folder.glob(f"{DIT_WEIGHTS_PREFIX}-*{SAFETENSORS_SUFFIX}"))
    if shards:
        return None, [f"{index.name} (the index of the shards {', '.join(shards)})"]
    return None, [
        f"{single.name} (or shards {DIT_WEIGHTS_PREFIX}-0000i-of-0000n"
        f"{SAFETENSORS_SUFFIX} with {index.name})"
    ]


def _dit_subfolder(folder: Path, name: str, what: str) -> tuple[Path | None, list[str]]:
    """A DiT in ``folder/name/`` (``config.json`` plus safetensors): its checkpoint, or
    ``None`` and what is missing, each entry prefixed with ``name/``."""
    sub = folder / name
    if not sub.is_dir():
        return None, [f"{name}/ ({what}: config.json and safetensors)"]
    weights, missing = find_dit_weights(sub)
    if not (sub / "config.json").is_file():
        missing = ["config.json", *missing]
    return (weights if not missing else None), [f"{name}/{item}" for item in missing]


def _tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def _official(
    folder: Path, kind: ReleaseKind, tokenizer_required: bool
) -> tuple[ReleaseFolder | None, list[str]]:
    missing: list[str] = []
    dit_2: Path | None = None
    if kind.two_experts:
        config = folder / OFFICIAL_HIGH_NOISE / OFFICIAL_DIT_CONFIG
        dit, dit_missing = _dit_subfolder(folder, OFFICIAL_HIGH_NOISE, "the high-noise expert")
        dit_2, dit_2_missing = _dit_subfolder(folder, OFFICIAL_LOW_NOISE, "the low-noise expert")
        missing += dit_missing + dit_2_missing
    else:
        config = folder / OFFICIAL_DIT_CONFIG
        if not config.is_file():
            missing.append(f"{OFFICIAL_DIT_CONFIG} (the DiT architecture)")
        dit, dit_missing = find_dit_weights(folder)
        missing += dit_missing
    for name in (kind.official_vae, OFFICIAL_T5):
        if not (folder / name).is_file():
            missing.append(name)
    tokenizer: Path | None = folder / OFFICIAL_TOKENIZER
    if not _tokenizer_dir(folder / OFFICIAL_TOKENIZER):
        if tokenizer_required:
            missing.append(
                f"{OFFICIAL_TOKENIZER}/ (tokenizer files: {' or '.join(TOKENIZER_FILES)})"
            )
        tokenizer = None
    if missing or dit is None:
        return None, missing
    return ReleaseFolder(
        root=folder,
        layout="official",
        dit_config=config,
        dit=dit,
        vae=folder / kind.official_vae,
        text_encoder=folder / OFFICIAL_T5,
        tokenizer=tokenizer,
        dit_2=dit_2,
        dit_2_config=None if dit_2 is None else dit_2.parent / OFFICIAL_DIT_CONFIG,
    ), []


def _has_safetensors(path: Path) -> bool:
    return path.is_dir() and any(
        p.name.endswith(SAFETENSORS_SUFFIX) or p.name.endswith(INDEX_SUFFIX) for p in path.iterdir()
    )


def _diffusers(
    folder: Path, names: Mapping[str, str], kind: ReleaseKind, tokenizer_required: bool
) -> tuple[ReleaseFolder | None, list[str]]:
    dit, missing = _dit_subfolder(folder, names["dit"], "the DiT")
    dit_2: Path | None = None
    if kind.two_experts:
        dit_2, dit_2_missing = _dit_subfolder(folder, names["dit_2"], "the low-noise expert")
        missing += dit_2_missing
    for key, what in (("vae", "the VAE"), ("text_encoder", "the UMT5 encoder")):
        sub = folder / names[key]
        if not _has_safetensors(sub):
            missing.append(f"{names[key]}/ ({what}: safetensors)")
    if (folder / names["text_encoder"]).is_dir() and not (
        folder / names["text_encoder"] / "config.json"
    ).is_file():
        missing.append(f"{names['text_encoder']}/config.json")
    tokenizer: Path | None = folder / names["tokenizer"]
    if not _tokenizer_dir(folder / names["tokenizer"]):
        if tokenizer_required:
            missing.append(
                f"{names['tokenizer']}/ (tokenizer files: {' or '.join(TOKENIZER_FILES)})"
            )
        tokenizer = None
    if missing or dit is None:
        if not (folder / DIFFUSERS_INDEX).is_file():
            missing.insert(0, DIFFUSERS_INDEX)
        return None, missing
    return ReleaseFolder(
        root=folder,
        layout="diffusers",
        dit_config=folder / names["dit"] / "config.json",
        dit=dit,
        vae=folder / names["vae"],
        text_encoder=folder / names["text_encoder"],
        tokenizer=tokenizer,
        dit_2=dit_2,
        dit_2_config=None if dit_2 is None else folder / names["dit_2"] / "config.json",
    ), []


# ----------------------------------------------------------------- architecture checks


def read_dit_config(
    release: ReleaseFolder, *, second_expert: bool = False, model_type: str = "t2v"
) -> dict[str, Any]:
    """The DiT fields the folder's ``config.json`` states, in the official names
    (``dim``, ``ffn_dim``, ``num_heads``, ...; diffusers names are translated).

    Args:
        release: the folder.
        second_expert: read the low-noise expert's ``config.json`` (:attr:`dit_2_config`).
        model_type: the ``model_type`` an official ``config.json`` may state (absent means
            ``t2v``): ``t2v`` for Wan2.1 and Wan2.2 A14B, ``ti2v`` for Wan2.2 TI2V-5B.
    """
    path = release.dit_config
    if second_expert:
        if release.dit_2_config is None:
            raise ReleaseLayoutError(f"{str(release.root)!r} has no second DiT expert")
        path = release.dit_2_config
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ReleaseLayoutError(f"cannot read {str(path)!r}: {error}") from error
    if not isinstance(raw, dict):
        raise ReleaseLayoutError(f"{str(path)!r} is not a JSON object")
    if release.layout == "official":
        stated_type = raw.get("model_type", "t2v")
        if stated_type != model_type:
            raise ReleaseLayoutError(
                f"{str(path)!r}: model_type {stated_type!r} is not supported "
                f"(allowed: {model_type!r}, {_MODEL_TYPES.get(model_type, model_type)})"
            )
        stated = {key: raw[key] for key in _OFFICIAL_DIT_FIELDS if key in raw}
    else:
        stated = _from_diffusers_names(raw)
    if "patch_size" in stated:
        stated["patch_size"] = tuple(stated["patch_size"])
    return stated


def _from_diffusers_names(raw: Mapping[str, Any]) -> dict[str, Any]:
    renames = {
        "ffn_dim": "ffn_dim",
        "num_attention_heads": "num_heads",
        "num_layers": "num_layers",
        "in_channels": "in_dim",
        "out_channels": "out_dim",
        "freq_dim": "freq_dim",
        "text_dim": "text_dim",
        "eps": "eps",
        "patch_size": "patch_size",
        "cross_attn_norm": "cross_attn_norm",
    }
    stated = {ours: raw[theirs] for theirs, ours in renames.items() if raw.get(theirs) is not None}
    if "num_attention_heads" in raw and "attention_head_dim" in raw:
        stated["dim"] = int(raw["num_attention_heads"]) * int(raw["attention_head_dim"])
    if "qk_norm" in raw:
        stated["qk_norm"] = raw["qk_norm"] is not None
    return stated


def check_release_architecture(release: ReleaseFolder, model: ModelConfig) -> None:
    """Raise :class:`ReleaseLayoutError` when the folder's DiT ``config.json`` (each expert's,
    for a two-expert model) states a value that differs from the model config, or the folder
    lacks the second expert the model needs (checked before any weight is read)."""
    model_type = release_kind(model).model_type
    experts = [("", False)]
    if model.num_experts == 2:
        release.second_expert()
        experts = [("high-noise expert: ", False), ("low-noise expert: ", True)]
    expected = model.dit
    wrong = []
    for label, second in experts:
        stated = read_dit_config(release, second_expert=second, model_type=model_type)
        for key, value in sorted(stated.items()):
            want = getattr(expected, key)
            same = abs(float(value) - float(want)) <= 1e-12 if key == "eps" else value == want
            if not same:
                wrong.append(f"{label}{key}: folder has {value!r}, model config expects {want!r}")
    if wrong:
        raise ReleaseLayoutError(
            f"the DiT in {str(release.root)!r} ({release.layout} layout) is not model "
            f"{model.name!r}: " + "; ".join(wrong)
        )
