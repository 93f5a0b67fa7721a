"""Wan model folders exactly as they are released: which layout a folder is, and where each
component sits in it.

Two layouts are recognized (file names as published on the Hugging Face hub):

- the official Wan2.1 release (``Wan-AI/Wan2.1-T2V-1.3B``, ``Wan-AI/Wan2.1-T2V-14B``)::

      config.json                                       DiT architecture (dim, ffn_dim, ...)
      diffusion_pytorch_model.safetensors               DiT, one file (1.3B), or
      diffusion_pytorch_model-0000i-of-0000n.safetensors  shards (14B) plus
      diffusion_pytorch_model.safetensors.index.json
      Wan2.1_VAE.pth                                    VAE, official naming (torch pickle)
      models_t5_umt5-xxl-enc-bf16.pth                   T5 encoder, official naming (pickle)
      google/umt5-xxl/                                  tokenizer files

- the diffusers release (``Wan-AI/Wan2.1-T2V-14B-Diffusers``)::

      model_index.json
      transformer/  vae/  text_encoder/  tokenizer/  scheduler/

  (sub-folder names from the model config's ``weights`` section). ``scheduler/`` is not read:
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
_DEFAULT_SUBFOLDERS: Final = {
    "dit": "transformer",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
}


class ReleaseLayoutError(FileNotFoundError):
    """A weights folder is not a complete Wan release (or its config disagrees with the model
    config); the message lists what the folder holds and what is missing or wrong."""


@dataclass(frozen=True)
class ReleaseFolder:
    """Where each component of a release sits.

    Attributes:
        root: the folder.
        layout: ``"official"`` or ``"diffusers"``.
        dit_config: the DiT's ``config.json`` (official names, or diffusers names in
            ``transformer/``).
        dit: what ``WanDiT.from_checkpoint`` reads: the single safetensors file or the index.
        vae: ``Wan2.1_VAE.pth`` (official) or the ``vae/`` folder (diffusers).
        text_encoder: ``models_t5_umt5-xxl-enc-bf16.pth`` (official naming) or the
            ``text_encoder/`` folder (transformers ``UMT5EncoderModel``).
        tokenizer: the tokenizer folder; ``None`` when it is absent and was not required.
    """

    root: Path
    layout: Layout
    dit_config: Path
    dit: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path | None


def detect_release(
    root: str | os.PathLike[str],
    *,
    subfolders: WeightsLayout | None = None,
    tokenizer_required: bool = True,
) -> ReleaseFolder:
    """Recognize the layout of ``root`` and locate every component.

    Args:
        root: the weights folder.
        subfolders: the diffusers sub-folder names (a model config's ``weights``); default
            ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``.
        tokenizer_required: whether a missing tokenizer folder is an error (models with an
            in-process tokenizer do not need one).

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
    official, official_missing = _official(folder, tokenizer_required)
    diffusers, diffusers_missing = _diffusers(folder, names, tokenizer_required)
    if official is not None:
        return official
    if diffusers is not None:
        return diffusers
    official_marks = _official_marks(folder)
    diffusers_marks = _diffusers_marks(folder, names)
    lines = [
        f"weights folder {str(folder)!r} is not a complete Wan2.1 release",
        f"it holds: {_listing(folder)}",
    ]
    if official_marks or not diffusers_marks:
        lines.append("the official Wan2.1 layout lacks: " + "; ".join(official_missing))
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


def _official_marks(folder: Path) -> list[str]:
    marks = [
        name for name in (OFFICIAL_VAE, OFFICIAL_T5, OFFICIAL_TOKENIZER) if (folder / name).exists()
    ]
    marks += [p.name for p in folder.glob(f"{DIT_WEIGHTS_PREFIX}*{SAFETENSORS_SUFFIX}*")]
    return marks


def _diffusers_marks(folder: Path, names: Mapping[str, str]) -> list[str]:
    candidates = (DIFFUSERS_INDEX, *names.values(), "scheduler")
    return [name for name in candidates if (folder / name).exists()]


def _find_weights(folder: Path) -> tuple[Path | None, list[str]]:
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


def _tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def _official(folder: Path, tokenizer_required: bool) -> tuple[ReleaseFolder | None, list[str]]:
    missing: list[str] = []
    config = folder / OFFICIAL_DIT_CONFIG
    if not config.is_file():
        missing.append(f"{OFFICIAL_DIT_CONFIG} (the DiT architecture)")
    dit, dit_missing = _find_weights(folder)
    missing += dit_missing
    for name in (OFFICIAL_VAE, OFFICIAL_T5):
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
        vae=folder / OFFICIAL_VAE,
        text_encoder=folder / OFFICIAL_T5,
        tokenizer=tokenizer,
    ), []


def _has_safetensors(path: Path) -> bool:
    return path.is_dir() and any(
        p.name.endswith(SAFETENSORS_SUFFIX) or p.name.endswith(INDEX_SUFFIX) for p in path.iterdir()
    )


def _diffusers(
    folder: Path, names: Mapping[str, str], tokenizer_required: bool
) -> tuple[ReleaseFolder | None, list[str]]:
    missing: list[str] = []
    dit_dir = folder / names["dit"]
    dit, dit_missing = _find_weights(dit_dir) if dit_dir.is_dir() else (None, [])
    if not dit_dir.is_dir():
        missing.append(f"{names['dit']}/ (the DiT: config.json and safetensors)")
    else:
        if not (dit_dir / "config.json").is_file():
            missing.append(f"{names['dit']}/config.json")
        missing += [f"{names['dit']}/{item}" for item in dit_missing]
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
        dit_config=dit_dir / "config.json",
        dit=dit,
        vae=folder / names["vae"],
        text_encoder=folder / names["text_encoder"],
        tokenizer=tokenizer,
    ), []


# ----------------------------------------------------------------- architecture checks


def read_dit_config(release: ReleaseFolder) -> dict[str, Any]:
    """The DiT fields the folder's ``config.json`` states, in the official names
    (``dim``, ``ffn_dim``, ``num_heads``, ...; diffusers names are translated)."""
    try:
        raw = json.loads(release.dit_config.read_text())
    except (OSError, ValueError) as error:
        raise ReleaseLayoutError(f"cannot read {str(release.dit_config)!r}: {error}") from error
    if not isinstance(raw, dict):
        raise ReleaseLayoutError(f"{str(release.dit_config)!r} is not a JSON object")
    if release.layout == "official":
        model_type = raw.get("model_type", "t2v")
        if model_type != "t2v":
            raise ReleaseLayoutError(
                f"{str(release.dit_config)!r}: model_type {model_type!r} is not supported "
                "(allowed: 't2v', text-to-video)"
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
    """Raise :class:`ReleaseLayoutError` when the folder's DiT ``config.json`` states a value
    that differs from the model config (checked before any weight is read)."""
    stated = read_dit_config(release)
    expected = model.dit
    wrong = []
    for key, value in sorted(stated.items()):
        want = getattr(expected, key)
        same = abs(float(value) - float(want)) <= 1e-12 if key == "eps" else value == want
        if not same:
            wrong.append(f"{key}: folder has {value!r}, model config expects {want!r}")
    if wrong:
        raise ReleaseLayoutError(
            f"the DiT in {str(release.root)!r} ({release.layout} layout) is not model "
            f"{model.name!r}: " + "; ".join(wrong)
        )
