"""The DiT's self-attention callable under context parallelism (Ulysses, ring or both).

:class:`ContextParallelAttention` has the signature of
:class:`smartdiff.models.wan_dit.AttentionFn` -- ``(q, k, v [B, H, s, D]) -> [B, H, s, D]`` --
but its inputs are this rank's shard of ``s = chunk`` tokens (:mod:`.layout`). It:

1. with ``ulysses > 1``, exchanges heads for tokens (:func:`.ulysses.scatter_heads`), so the
   rank holds its ring block of ``chunk * ulysses`` tokens for ``head_split(H, U)[u]`` heads;
2. with ``ring > 1``, runs ring attention over the ring group (:func:`.ring.ring_attention`,
   LSE-merged, with the local LSE kernel); otherwise attends over the whole (gathered) sequence
   with ``local`` -- the model's own attention backend -- after cutting off padding keys;
3. with ``ulysses > 1``, gives the heads back (:func:`.ulysses.gather_heads`).

One instance serves one forward pass (it knows the sequence's :class:`SequenceLayout`);
:class:`smartdiff.parallel.dit.ParallelDiT` builds it. Cross-attention to the text needs no
communication (every rank holds the whole text) and keeps the model's own callable.

Talks to: :mod:`.ulysses`, :mod:`.ring`, :class:`.groups.ParallelGroups`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smartdiff.models.wan_dit import AttentionFn
from smartdiff.parallel.groups import ParallelGroups
from smartdiff.parallel.layout import SequenceLayout, head_split
from smartdiff.parallel.local_attention import LseAttention
from smartdiff.parallel.ring import ring_attention
from smartdiff.parallel.ulysses import gather_heads, scatter_heads


@dataclass(frozen=True)
class ContextParallelAttention:
    """Self-attention over a sequence split by ``layout`` across ``groups`` (module docstring).

    Args:
        groups: the process groups (its ring and ulysses degrees must match ``layout``).
        layout: the token split of this forward pass.
        local: attention over a whole sequence (Ulysses-only path), e.g. the model's backend.
        lse_attention: local attention returning the LSE (ring path).
    """

    groups: ParallelGroups
    layout: SequenceLayout
    local: AttentionFn
    lse_attention: LseAttention

    def __post_init__(self) -> None:
        if (self.layout.ring, self.layout.ulysses) != (self.groups.ring, self.groups.ulysses):
            raise ValueError(
                f"SequenceLayout ring={self.layout.ring} ulysses={self.layout.ulysses} does not "
                f"match ParallelGroups ring={self.groups.ring} ulysses={self.groups.ulysses}"
            )

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups, layout = self.groups, self.layout
        if q.shape[2] != layout.chunk:
            raise ValueError(
                f"context-parallel attention got {q.shape[2]} tokens per rank, the layout "
                f"has {layout.chunk} ({layout.tokens} tokens over {layout.ranks} ranks)"
            )
        counts = head_split(q.shape[1], groups.ulysses)
        if groups.ulysses > 1:
            group = groups.group("ulysses")
            q, k, v = scatter_heads(q, k, v, group, counts, groups.ulysses_rank)
        if q.shape[1] == 0:  # more Ulysses ranks than heads: this rank has none
            out = q
        elif groups.ring > 1:
            valid = tuple(layout.block_valid(index) for index in range(groups.ring))
            out = ring_attention(
                q,
                k,
                v,
                group=groups.group("ring"),
                ring_rank=groups.ring_rank,
                block_valid=valid,
                attention=self.lse_attention,
            )
        else:
            out = self._attend_unpadded(q, k, v, layout.tokens)
        if groups.ulysses > 1:
            out = gather_heads(out, group, counts, groups.ulysses_rank)
        return out

    def _attend_unpadded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int
    ) -> torch.Tensor:
        """The whole sequence is here: attend its ``tokens`` real tokens, zero the padding."""
        padding = q.shape[2] - tokens
        if padding == 0:
            return self.local(q, k, v)
        out = self.local(q[:, :, :tokens], k[:, :, :tokens], v[:, :, :tokens])
        return F.pad(out, (0, 0, 0, padding))
