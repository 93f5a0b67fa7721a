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
- :meth:`TextEncoder.random`: RANDOM weights for tests and demos, with a byte-level tokenizer
  built in-process by the ``tokenizers`` library (:func:`build_byte_tokenizer`), deterministic
  for a seed. It encodes any text but its embeddings mean nothing.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
BYTE_TOKENIZER_SPECIALS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2 as in UMT5
TokenizerKind = Literal["pretrained", "byte-level"]
_WHITESPACE = re.compile(r"\s+")


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
        positive = ("vocab_size", "d_model", "d_ff", "d_kv", "num_layers", "num_heads",
                    "relative_attention_num_buckets", "relative_attention_max_distance",
                    "max_length")
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
        if not (isinstance(self.layer_norm_epsilon, float | int)
                and 0 < self.layer_norm_epsilon < 1):
            raise ValueError(
                f"TextEncoderConfig.layer_norm_epsilon must be in (0, 1), "
                f"got {self.layer_norm_epsilon!r}"
            )

    def to_transformers(self) -> UMT5Config:
        """The equivalent ``transformers.UMT5Config`` (encoder settings; dropout off)."""
        from transformers import UMT5Config

        return UMT5Config(
            vocab_size=self.vocab_size, d_model=self.d_model, d_ff=self.d_ff, d_kv=self.d_kv,
            num_layers=self.num_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            feed_forward_proj=self.feed_forward_proj,
            layer_norm_epsilon=float(self.layer_norm_epsilon), dropout_rate=0.0,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
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
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, eos_id)],
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
        model_max_length=max_length, padding_side="right",
    )


class TextEncoder:
    """A tokenizer and a ``UMT5EncoderModel``, turning prompts into padded embeddings.

    Args:
        tokenizer: a transformers tokenizer (pad id 0; appends ``</s>``).
        model: the encoder, already on its device and dtype, in eval mode.
        config: the settings (``max_length`` is used here).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: UMT5EncoderModel,
                 config: TextEncoderConfig) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> TextEncoder:
        """Move the encoder (in place) and return ``self``."""
        nn.Module.to(self.model, device=device, dtype=dtype)
        return self

    @classmethod
    def random(cls, config: TextEncoderConfig, *, seed: int = 0,
               device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> TextEncoder:
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
    def from_pretrained(cls, model_path: str | os.PathLike[str],
                        config: TextEncoderConfig, *,
                        tokenizer_path: str | os.PathLike[str] | None = None,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> TextEncoder:
        """Load weights (and, for ``tokenizer: pretrained``, the tokenizer) from local folders.

        Args:
            model_path: a folder with ``config.json`` and safetensors of a ``UMT5EncoderModel``.
            config: the expected architecture; a folder whose ``config.json`` disagrees on
                ``d_model``, ``num_layers`` or ``vocab_size`` is rejected.
            tokenizer_path: folder of the tokenizer files (default: ``model_path``).
        """
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

        model_dir = _existing_dir(model_path, "text encoder weights")
        _check_architecture(UMT5Config.from_pretrained(model_dir, local_files_only=True),
                            config, model_dir)  # before reading gigabytes of weights
        model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        nn.Module.train(model.requires_grad_(False), False)
        nn.Module.to(model, device=device)
        if config.tokenizer == "byte-level":
            tokenizer = build_byte_tokenizer(config.max_length)
        else:
            tokenizer_dir = _existing_dir(tokenizer_path or model_path, "tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(tokenizer, model, config)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> ``(input_ids, attention_mask)``, both ``[B, max_length]`` int64."""
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length",
            max_length=self.config.max_length, truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: str | list[str], *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Prompts -> ``[B, max_length, d_model]`` embeddings, zero past each prompt's tokens.

        Args:
            prompts: one prompt or a list of them.
            device / dtype: where the embeddings go (default: the encoder's device and dtype).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        input_ids, mask = self.tokenize(prompts)
        lengths = mask.gt(0).sum(dim=1)
        hidden = self.model(input_ids=input_ids.to(self.device),
                            attention_mask=mask.to(self.device)).last_hidden_state
        hidden = hidden.to(device=device or hidden.device, dtype=dtype or hidden.dtype)
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] \
            < lengths.to(hidden.device)[:, None]
        return torch.where(keep[:, :, None], hidden, torch.zeros((), dtype=hidden.dtype,
                                                                 device=hidden.device))


def _existing_dir(path: str | os.PathLike[str], what: str) -> str:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist or is not a folder")
    return str(folder)


def _check_architecture(found: Any, expected: TextEncoderConfig, source: str) -> None:
    fields = ("d_model", "num_layers", "vocab_size", "num_heads", "d_kv")
    wrong = {f: (getattr(found, f, None), getattr(expected, f)) for f in fields
             if getattr(found, f, None) != getattr(expected, f)}
    if wrong:
        details = ", ".join(f"{f}: folder has {a!r}, model config expects {b!r}"
                            for f, (a, b) in wrong.items())
        raise ValueError(f"text encoder in {source!r} does not match the model config ({details})")
