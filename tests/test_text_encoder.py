"""The text encoder against diffusers' ``WanPipeline`` prompt encoding, with a tiny random UMT5.

The reference is ``WanPipeline._get_t5_prompt_embeds`` run on the very same tokenizer and
``UMT5EncoderModel``: cleaning, tokenizing to max length with a mask, encoding, cutting each
sequence to its length and padding back with zeros must give identical embeddings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from smartdiff.models.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    build_byte_tokenizer,
    byte_tokenizer_size,
    clean_prompt,
)

TINY = TextEncoderConfig(
    vocab_size=byte_tokenizer_size(),
    d_model=32,
    d_ff=64,
    d_kv=8,
    num_layers=2,
    num_heads=4,
    max_length=64,
    tokenizer="byte-level",
)
PROMPTS = [
    "A cat &amp;amp; a dog   bake\ta cake\n together.",  # entities, whitespace runs
    "x",
    "naïve café, 東京 at night 🌃",  # multi-byte characters
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.random(TINY, seed=0)


def reference_embeds(encoder: TextEncoder, prompts: list[str], max_length: int) -> torch.Tensor:
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=encoder.tokenizer,
        text_encoder=encoder.model,
        vae=None,
        scheduler=None,
        transformer=None,
    )
    return pipe._get_t5_prompt_embeds(
        prompts, max_sequence_length=max_length, device=torch.device("cpu")
    )


@pytest.mark.parametrize("max_length", [512, 24])  # 24 truncates the long prompts
def test_matches_wan_pipeline_prompt_encoding(max_length: int) -> None:
    pytest.importorskip("diffusers")
    encoder = TextEncoder.random(dataclasses.replace(TINY, max_length=max_length), seed=0)
    ours = encoder.encode(PROMPTS)
    reference = reference_embeds(encoder, PROMPTS, max_length)
    assert ours.shape == reference.shape == (len(PROMPTS), max_length, TINY.d_model)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_padding_is_exact_zero_past_each_prompt(encoder: TextEncoder) -> None:
    _, mask = encoder.tokenize(PROMPTS)
    lengths = mask.sum(dim=1)
    embeds = encoder.encode(PROMPTS)
    for row, length in enumerate(lengths.tolist()):
        assert embeds[row, :length].abs().sum(dim=-1).min() > 0
        assert torch.count_nonzero(embeds[row, length:]) == 0
    assert lengths[1] == 2  # "x" and the end-of-sequence token


def test_a_prompt_does_not_depend_on_its_batch(encoder: TextEncoder) -> None:
    alone = encoder.encode(PROMPTS[1])
    batched = encoder.encode(PROMPTS)[1:2]
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-6)


def test_clean_prompt() -> None:
    assert clean_prompt("  a &amp;amp; b \n\t c  ") == "a & b c"


def test_byte_tokenizer_ids() -> None:
    tokenizer = build_byte_tokenizer(8)
    batch = tokenizer(
        ["ab"], padding="max_length", max_length=8, truncation=True, return_tensors="pt"
    )
    ids = batch["input_ids"][0].tolist()
    assert ids[2:] == [1, 0, 0, 0, 0, 0]  # </s> then <pad>
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert build_byte_tokenizer(8)(["ab"])["input_ids"] == tokenizer(["ab"])["input_ids"]
    assert tokenizer.decode(tokenizer("héllo")["input_ids"], skip_special_tokens=True) == "héllo"


def test_random_weights_are_seeded(encoder: TextEncoder) -> None:
    rng_state = torch.random.get_rng_state()
    again = TextEncoder.random(TINY, seed=0)
    other = TextEncoder.random(TINY, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # global RNG untouched
    torch.testing.assert_close(encoder.encode("seeded"), again.encode("seeded"), rtol=0, atol=0)
    assert not torch.allclose(encoder.encode("seeded"), other.encode("seeded"))


def test_from_pretrained_round_trip(encoder: TextEncoder, tmp_path: Path) -> None:
    encoder.model.save_pretrained(tmp_path / "text_encoder")
    encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = dataclasses.replace(TINY, tokenizer="pretrained")
    loaded = TextEncoder.from_pretrained(
        tmp_path / "text_encoder",
        config,
        tokenizer_path=tmp_path / "tokenizer",
        dtype=torch.float32,
    )
    torch.testing.assert_close(loaded.encode(PROMPTS), encoder.encode(PROMPTS), rtol=0, atol=0)

    wrong = dataclasses.replace(config, d_model=64)
    with pytest.raises(ValueError, match="d_model: folder has 32, model config expects 64"):
        TextEncoder.from_pretrained(
            tmp_path / "text_encoder", wrong, tokenizer_path=tmp_path / "tokenizer"
        )
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        TextEncoder.from_pretrained(
            tmp_path / "text_encoder", config, tokenizer_path=tmp_path / "missing"
        )


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="TextEncoderConfig.num_heads must be a positive int"):
        TextEncoderConfig(num_heads=0)
    with pytest.raises(ValueError, match="TextEncoderConfig.tokenizer must be"):
        TextEncoderConfig(tokenizer="sentencepiece")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size .* must be >= 259"):
        dataclasses.replace(TINY, vocab_size=100)
    with pytest.raises(ValueError, match="needs TextEncoderConfig.tokenizer 'byte-level'"):
        TextEncoder.random(dataclasses.replace(TINY, tokenizer="pretrained"))
