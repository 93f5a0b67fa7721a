"""The text encoder: UMT5-XXL (through transformers) turning prompts into padded embeddings.

The engine's backend builds a :class:`TextEncoder` from a :class:`TextEncoderConfig` (the
``text_encoder`` section of ``configs/models/*.yaml``); the generator calls
:meth:`TextEncoder.encode` once per prompt and hands the embeddings to the DiT as ``context``.

Prompt encoding follows the reference (diffusers' ``WanPipeline`` and the official Wan code):

1. clean the prompt: ``ftfy.fix_text`` when ftfy is installed, HTML unescaped twice, runs of
   whitespace collapsed to one space, stripped;
2. tokenize to ``max_length`` tokens (truncating, end-of-sequence token appended) with an
   attention mask;
3. run the encoder with that mask and take the last hidden state;
4. keep each sequence's first ``len`` vectors (``len`` = its number of real tokens) and set the
   rest to zeros, so padding positions carry exact zeros, not the encoder's output for ``<pad>``.

Two ways to get one:

- :meth:`TextEncoder.from_pretrained`: real weights from a Hugging Face folder (``config.json``
  + safetensors for ``UMT5EncoderModel``, tokenizer files for ``AutoTokenizer``), read with
  ``local_files_only`` (nothing is downloaded);
- :meth:`TextEncoder.from_official_checkpoint`: the official Wan release's
  ``models_t5_umt5-xxl-enc-bf16.pth`` (a plain state dict in the official Wan T5 naming, read
  with ``torch.load(weights_only=True)``: no code runs from the checkpoint), renamed to the
  transformers naming by :func:`official_t5_to_transformers`, plus the ``google/umt5-xxl``
  tokenizer folder shipped next to it;
- :meth:`TextEncoder.random`: RANDOM weights for tests and demos, with a byte-level tokenizer
  built in-process by the ``tokenizers`` library (:func:`build_byte_tokenizer`), deterministic
  for a seed. It encodes any text but its embeddings mean nothing.

The official naming (Wan2.1 ``wan/modules/t5.py``, ``T5Encoder`` with ``shared_pos=False``)
against transformers' ``UMT5EncoderModel``::

    token_embedding.weight                  shared.weight (tied to encoder.embed_tokens.weight)
    blocks.N.norm1.weight                   encoder.block.N.layer.0.layer_norm.weight
    blocks.N.attn.{q,k,v,o}.weight          encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight
    blocks.N.pos_embedding.embedding.weight encoder.block.N.layer.0.SelfAttention
                                              .relative_attention_bias.weight
    blocks.N.norm2.weight                   encoder.block.N.layer.1.layer_norm.weight
    blocks.N.ffn.gate.0.weight              encoder.block.N.layer.1.DenseReluDense.wi_0.weight
    blocks.N.ffn.fc1.weight                 encoder.block.N.layer.1.DenseReluDense.wi_1.weight
    blocks.N.ffn.fc2.weight                 encoder.block.N.layer.1.DenseReluDense.wo.weight
    norm.weight                             encoder.final_layer_norm.weight

(the official feed-forward is ``fc2(fc1(x) * gelu_tanh(gate(x)))``, transformers' gated-gelu is
``wo(wi_1(x) * gelu_tanh(wi_0(x)))``.)
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
BYTE_TOKENIZER_SPECIALS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2 as in UMT5
TokenizerKind = Literal["pretrained", "byte-level"]
_WHITESPACE = re.compile(r"\s+")
OFFICIAL_T5_CHECKPOINT: Final = "models_t5_umt5-xxl-enc-bf16.pth"
# (official Wan, transformers UMT5) names: whole keys at the top, key tails inside block N.
_T5_TOP_NAMES: Final = (
    ("token_embedding.weight", "shared.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
)
_T5_BLOCK_NAMES: Final = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    *((f"attn.{p}.weight", f"layer.0.SelfAttention.{p}.weight") for p in "qkvo"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)
_T5_BLOCK_KEYS: Final = (
    re.compile(r"^blocks\.(\d+)\.(.+)$"),
    re.compile(r"^encoder\.block\.(\d+)\.(.+)$"),
)
_T5_BLOCK_PREFIXES: Final = ("blocks.{}.", "encoder.block.{}.")
_TIED_EMBEDDING: Final = "encoder.embed_tokens.weight"


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """Architecture of a UMT5 encoder and how prompts are tokenized.

    Args:
        vocab_size: token embeddings (UMT5-XXL: 256384).
        d_model: hidden size, which is the DiT's ``text_dim`` (UMT5-XXL: 4096).
        d_ff: inner size of the gated feed-forward network (UMT5-XXL: 10240).
        d_kv: size of one attention head (UMT5-XXL: 64).
        num_layers: encoder blocks (UMT5-XXL: 24).
        num_heads: attention heads (UMT5-XXL: 64).
        relative_attention_num_buckets / relative_attention_max_distance: T5 position buckets.
        feed_forward_proj: ``"gated-gelu"`` (UMT5) or another transformers activation spec.
        layer_norm_epsilon: epsilon of the RMS layer norms.
        max_length: tokens per prompt after padding/truncation (Wan: 512).
        tokenizer: ``"pretrained"`` (tokenizer files next to the weights) or ``"byte-level"``
            (built in-process; only for random test models, its size is fixed).
    """

    vocab_size: int = 256384
    d_model: int = 4096
    d_ff: int = 10240
    d_kv: int = 64
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    max_length: int = 512
    tokenizer: TokenizerKind = "pretrained"

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "d_model",
            "d_ff",
            "d_kv",
            "num_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "max_length",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TextEncoderConfig.{name} must be a positive int, got {value!r}")
        if self.tokenizer not in ("pretrained", "byte-level"):
            raise ValueError(
                f"TextEncoderConfig.tokenizer must be 'pretrained' or 'byte-level', "
                f"got {self.tokenizer!r}"
            )
        if self.tokenizer == "byte-level" and self.vocab_size < byte_tokenizer_size():
            raise ValueError(
                f"TextEncoderConfig.vocab_size ({self.vocab_size}) must be >= "
                f"{byte_tokenizer_size()} (the byte-level tokenizer's size)"
            )
        if not (
            isinstance(self.layer_norm_epsilon, float | int) and 0 < self.layer_norm_epsilon < 1
        ):
            raise ValueError(
                f"TextEncoderConfig.layer_norm_epsilon must be in (0, 1), "
                f"got {self.layer_norm_epsilon!r}"
            )

    def to_transformers(self) -> UMT5Config:
        """The equivalent ``transformers.UMT5Config`` (encoder settings; dropout off)."""
        from transformers import UMT5Config

        return UMT5Config(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_ff=self.d_ff,
            d_kv=self.d_kv,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            feed_forward_proj=self.feed_forward_proj,
            layer_norm_epsilon=float(self.layer_norm_epsilon),
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )


def clean_prompt(text: str) -> str:
    """Normalize a prompt as the reference does before tokenizing (see the module docstring)."""
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def byte_tokenizer_size() -> int:
    """Number of tokens of :func:`build_byte_tokenizer`: 3 specials + 256 byte symbols."""
    return len(BYTE_TOKENIZER_SPECIALS) + 256


def build_byte_tokenizer(max_length: int = 512) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in-process (no files, no download) for random test models.

    Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (as UMT5), then one token per byte (GPT-2's
    printable byte alphabet), no merges. ``add_special_tokens`` appends ``</s>`` as T5 does.
    Fully determined by the code: two builds give the same ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(BYTE_TOKENIZER_SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    eos_id = vocab[EOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, eos_id)],
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
        padding_side="right",
    )


class TextEncoder:
    """A tokenizer and a ``UMT5EncoderModel``, turning prompts into padded embeddings.

    Args:
        tokenizer: a transformers tokenizer (pad id 0; appends ``</s>``).
        model: the encoder, already on its device and dtype, in eval mode.
        config: the settings (``max_length`` is used here).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, model: UMT5EncoderModel, config: TextEncoderConfig
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> TextEncoder:
        """Move the encoder (in place) and return ``self``."""
        nn.Module.to(self.model, device=device, dtype=dtype)
        return self

    @classmethod
    def random(
        cls,
        config: TextEncoderConfig,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TextEncoder:
        """RANDOM weights (transformers' own initialization under ``seed``) and the byte-level
        tokenizer. The global torch RNG is left as it was."""
        from transformers import UMT5EncoderModel

        if config.tokenizer != "byte-level":
            raise ValueError(
                f"TextEncoder.random needs TextEncoderConfig.tokenizer 'byte-level' (random models "
                f"have no tokenizer files), got {config.tokenizer!r}"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(config.to_transformers())
        nn.Module.train(model.requires_grad_(False), False)
        nn.Module.to(model, device=device, dtype=dtype)
        return cls(build_byte_tokenizer(config.max_length), model, config)

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | os.PathLike[str],
        config: TextEncoderConfig,
        *,
        tokenizer_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ) -> TextEncoder:
        """Load weights (and, for ``tokenizer: pretrained``, the tokenizer) from local folders.

        Args:
            model_path: a folder with ``config.json`` and safetensors of a ``UMT5EncoderModel``.
            config: the expected architecture; a folder whose ``config.json`` disagrees on
                ``d_model``, ``num_layers`` or ``vocab_size`` is rejected.
            tokenizer_path: folder of the tokenizer files (default: ``model_path``).
        """
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

        model_dir = _existing_dir(model_path, "text encoder weights")
        _check_architecture(
            UMT5Config.from_pretrained(model_dir, local_files_only=True), config, model_dir
        )  # before reading gigabytes of weights
        model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        nn.Module.train(model.requires_grad_(False), False)
        nn.Module.to(model, device=device)
        if config.tokenizer == "byte-level":
            tokenizer = build_byte_tokenizer(config.max_length)
        else:
            tokenizer_dir = _existing_dir(tokenizer_path or model_path, "tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(tokenizer, model, config)

    @classmethod
    def from_official_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str],
        config: TextEncoderConfig,
        *,
        tokenizer_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ) -> TextEncoder:
        """Load the official Wan release's T5 encoder (``models_t5_umt5-xxl-enc-bf16.pth``).

        Args:
            checkpoint: the ``.pth`` state dict in the official Wan T5 naming (read with
                ``torch.load(weights_only=True, mmap=True)``; no code runs from it).
            config: the architecture; the checkpoint must fit it exactly (one error lists
                every missing, unexpected or wrongly shaped tensor).
            tokenizer_path: the tokenizer folder (the release's ``google/umt5-xxl``); unused
                for ``tokenizer: byte-level``, required otherwise.
            device / dtype: where the encoder runs. As transformers' ``from_pretrained`` does,
                the modules in ``UMT5EncoderModel._keep_in_fp32_modules`` (the ``wo``
                projections) stay fp32 when ``dtype`` is a 16-bit type.
        """
        from transformers import UMT5EncoderModel

        from smartdiff.io.checkpoints import load_strict

        path = Path(checkpoint)
        state_dict = official_t5_to_transformers(read_torch_state_dict(path))
        with torch.device("meta"):
            model = UMT5EncoderModel(config.to_transformers())
        keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
        for name, param in model.named_parameters():
            fp32 = dtype in (torch.float16, torch.bfloat16) and bool(
                keep_fp32 & set(name.split("."))
            )
            param.data = param.data.to(torch.float32 if fp32 else dtype)
        load_strict(model, state_dict, source=str(path))
        model.encoder.embed_tokens.weight = model.shared.weight  # re-tie (one copy)
        nn.Module.train(model.requires_grad_(False), False)
        nn.Module.to(model, device=device)
        if config.tokenizer == "byte-level":
            tokenizer = build_byte_tokenizer(config.max_length)
        else:
            if tokenizer_path is None:
                raise ValueError(
                    f"tokenizer_path is required for TextEncoderConfig.tokenizer "
                    f"{config.tokenizer!r} (the release's google/umt5-xxl folder)"
                )
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                _existing_dir(tokenizer_path, "tokenizer"), local_files_only=True
            )
        return cls(tokenizer, model, config)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> ``(input_ids, attention_mask)``, both ``[B, max_length]`` int64."""
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.config.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(
        self,
        prompts: str | list[str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Prompts -> ``[B, max_length, d_model]`` embeddings, zero past each prompt's tokens.

        Args:
            prompts: one prompt or a list of them.
            device / dtype: where the embeddings go (default: the encoder's device and dtype).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        input_ids, mask = self.tokenize(prompts)
        lengths = mask.gt(0).sum(dim=1)
        hidden = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state
        hidden = hidden.to(device=device or hidden.device, dtype=dtype or hidden.dtype)
        keep = (
            torch.arange(hidden.shape[1], device=hidden.device)[None, :]
            < lengths.to(hidden.device)[:, None]
        )
        return torch.where(
            keep[:, :, None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        )


def read_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A ``.pth`` plain state dict, read with ``weights_only=True`` (no pickled code runs) and
    memory-mapped (tensors are paged in when used)."""
    from smartdiff.io.checkpoints import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"torch checkpoint {str(path)!r} does not exist or is not a file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle, zip and OS errors alike
        raise CheckpointError(f"cannot read torch checkpoint {str(path)!r}: {exc}") from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(
            f"torch checkpoint {str(path)!r} is not a plain state dict of named tensors"
        )
    return loaded


def _rename_t5(key: str, source: int) -> str:
    """One key from naming ``source`` (0 official, 1 transformers) to the other, else as is."""
    for pair in _T5_TOP_NAMES:
        if key == pair[source]:
            return pair[1 - source]
    match = _T5_BLOCK_KEYS[source].match(key)
    if match:
        for pair in _T5_BLOCK_NAMES:
            if match[2] == pair[source]:
                return _T5_BLOCK_PREFIXES[1 - source].format(match[1]) + pair[1 - source]
    return key


def official_t5_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Wan T5 encoder names -> ``UMT5EncoderModel`` names (table in the module
    docstring). The token embedding is given under both of its tied names. Keys that are
    already transformers names pass; unknown keys keep their names, for the strict loader to
    report."""
    converted = {_rename_t5(key, 0): tensor for key, tensor in state_dict.items()}
    if "shared.weight" in converted and _TIED_EMBEDDING not in converted:
        converted[_TIED_EMBEDDING] = converted["shared.weight"]
    return converted


def transformers_t5_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``UMT5EncoderModel`` names -> official Wan T5 names (the inverse of
    :func:`official_t5_to_transformers`; the tied ``encoder.embed_tokens.weight`` is dropped)."""
    return {
        _rename_t5(key, 1): tensor for key, tensor in state_dict.items() if key != _TIED_EMBEDDING
    }


def _existing_dir(path: str | os.PathLike[str], what: str) -> str:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist or is not a folder")
    return str(folder)


def _check_architecture(found: Any, expected: TextEncoderConfig, source: str) -> None:
    fields = ("d_model", "num_layers", "vocab_size", "num_heads", "d_kv")
    wrong = {
        f: (getattr(found, f, None), getattr(expected, f))
        for f in fields
        if getattr(found, f, None) != getattr(expected, f)
    }
    if wrong:
        details = ", ".join(
            f"{f}: folder has {a!r}, model config expects {b!r}" for f, (a, b) in wrong.items()
        )
        raise ValueError(f"text encoder in {source!r} does not match the model config ({details})")
