"""A prompt-embedding cache: a repeated prompt skips the text encoder.

The backend owns one :class:`PromptEmbeddingCache` next to its text encoder; the generator's
encode stage asks it for the embeddings of the prompt and the negative prompt. Entries are
keyed by the exact prompt text (the encoder cleans it the same way every time), the encoder
identity, and the dtype and device the embeddings are wanted in; they are kept, already
converted, on that device, and evicted least recently used first. A ``[1, 512, 4096]`` bf16
entry weighs 4 MiB, so the default of 64 entries stays small next to a DiT. Only prompts
missing from the cache go through the encoder, in one batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import torch


class PromptEncoder(Protocol):
    """What the cache needs of a text encoder
    (:class:`~smartdiff.models.text_encoder.TextEncoder`)."""

    def encode(
        self,
        prompts: str | list[str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor: ...


class PromptEmbeddingCache:
    """Least-recently-used cache of prompt embeddings ``[1, L, D]``.

    Args:
        max_entries: how many embeddings to keep (0 disables caching).
    """

    def __init__(self, max_entries: int = 64) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 0:
            raise ValueError(
                f"PromptEmbeddingCache max_entries must be an int >= 0, got {max_entries!r}"
            )
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def encode(
        self,
        encoder: PromptEncoder,
        prompts: Sequence[str],
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Embeddings ``[len(prompts), L, D]`` of ``prompts`` on ``device`` in ``dtype``,
        encoding only those not cached (in one batch)."""
        keys = [(id(encoder), prompt, str(device), dtype) for prompt in prompts]
        missing = [i for i, key in enumerate(keys) if key not in self._entries]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            encoded = encoder.encode([prompts[i] for i in missing], device=device, dtype=dtype)
            fresh = {i: encoded[j : j + 1] for j, i in enumerate(missing)}
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        rows = []
        for i, key in enumerate(keys):
            if i in fresh:
                rows.append(fresh[i])
                if self.max_entries:
                    self._entries[key] = fresh[i]
            else:
                self._entries.move_to_end(key)
                rows.append(self._entries[key])
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return torch.cat(rows)
