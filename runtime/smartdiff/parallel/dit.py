"""A ``WanDiT`` forward pass split over the sequence ranks (context parallel).

:class:`ParallelDiT` wraps a :class:`~smartdiff.models.wan_dit.WanDiT` (the same weights on
every rank) and is called like it: ``dit(latents, timestep, context) -> [B, C, F, H, W]``. Each
rank of a sequence group (ring x ulysses, :class:`.groups.ParallelGroups`):

1. embeds the whole input (``WanDiT.embed``: patches, timestep, text, RoPE table -- cheap);
2. keeps its token shard (:class:`.layout.SequenceLayout`; the last shards are zero-padded) and
   the matching rows of the RoPE table -- and of the time embeddings ``e``/``e0`` when the
   timesteps are per token (Wan2.2 TI2V), see :func:`shard_inputs`;
3. runs every block on its shard with :class:`.attention.ContextParallelAttention` as the
   self-attention (cross-attention to the text and the FFN are token-local);
4. runs the head on its shard, all-gathers the shards over the sequence group, drops the
   padding and unpatchifies.

Every rank of the sequence group returns the whole output, so samplers stay unchanged. With a
single-rank sequence group the call is the plain model's. CFG parallel is the caller's
business (:mod:`.cfg`); it gives each CFG rank group its own branch.

Talks to: :class:`WanDiT` (``embed``, ``blocks``, ``head``, ``unpatchify``, ``attention``,
``cross_attention``), ``torch.distributed.all_gather_into_tensor`` on the sequence group.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from smartdiff.models.wan_dit import RotaryTable, WanDiT, WanDiTConfig, WanDiTInputs
from smartdiff.parallel.attention import ContextParallelAttention
from smartdiff.parallel.groups import ParallelGroups
from smartdiff.parallel.layout import SequenceLayout
from smartdiff.parallel.local_attention import (
    LseAttention,
    math_attention_lse,
    select_lse_attention,
)


class ParallelDiT:
    """``model`` run context-parallel over ``groups`` (see the module docstring).

    Args:
        model: the DiT, identical on every rank; its ``attention`` is the local backend of the
            Ulysses path, its ``cross_attention`` is used as is.
        groups: the process groups of this rank.
        lse_attention: local attention with LSE for the ring path; default
            :func:`select_lse_attention` for the model's device, dtype and head size.
    """

    def __init__(
        self, model: WanDiT, groups: ParallelGroups, lse_attention: LseAttention | None = None
    ) -> None:
        self.model = model
        self.groups = groups
        if lse_attention is None:
            device = next(model.parameters()).device
            lse_attention = (
                select_lse_attention(device, model.dtype, model.config.head_dim)
                if groups.ring > 1
                else LseAttention("math", math_attention_lse)  # unused without a ring
            )
        self.lse_attention = lse_attention

    @property
    def config(self) -> WanDiTConfig:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """Like :meth:`WanDiT.forward`; every rank of the sequence group gets the whole output."""
        return self.forward(latents, timestep, context)

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        groups, model = self.groups, self.model
        if groups.sequence_size == 1:
            return model(latents, timestep, context)
        inputs = model.embed(latents, timestep, context)
        tokens = inputs.tokens.shape[1]
        if tokens < groups.sequence_size:
            raise ValueError(
                f"{tokens} video tokens cannot be split over ring={groups.ring} x "
                f"ulysses={groups.ulysses} = {groups.sequence_size} ranks: each rank needs at "
                "least one token (use fewer ranks or a larger video)"
            )
        layout = SequenceLayout(tokens, ring=groups.ring, ulysses=groups.ulysses)
        start, stop = layout.shard(groups.sequence_rank)
        shard = shard_inputs(inputs, start, stop)
        attention = ContextParallelAttention(groups, layout, model.attention, self.lse_attention)
        # Through the model's block runner, so a step cache attached to it works here too.
        x = model.run_blocks(
            shard.tokens,
            shard,
            attention,
            valid_tokens=layout.shard_valid(groups.sequence_rank),
        )
        out = gather_tokens(model.head(x, shard.e), groups.sequence_group, layout)
        return model.unpatchify(out, inputs.grid)


def parallelize(model: WanDiT, groups: ParallelGroups) -> WanDiT | ParallelDiT:
    """``model`` itself for a single-rank sequence group, else a :class:`ParallelDiT`."""
    return model if groups.sequence_size == 1 else ParallelDiT(model, groups)


def shard_inputs(inputs: WanDiTInputs, start: int, stop: int) -> WanDiTInputs:
    """``inputs`` with every per-token tensor cut to the token rows ``start:stop`` (padded).

    Always the tokens and the RoPE rows (padding rotates by 0: cos 1, sin 0). With per-token
    timesteps (Wan2.2 TI2V: ``e [B, S, dim]``, ``e0 [B, S, 6, dim]``) also ``e`` and ``e0``,
    padded with 0 (modulation by the tables alone: finite, and the rows are dropped after the
    gather); per-sample ``e [B, dim]``, ``e0 [B, 6, dim]`` and the text are shared as they are.
    """
    rope = RotaryTable(
        cos=shard_tokens(inputs.rope.cos, start, stop, fill=1.0),
        sin=shard_tokens(inputs.rope.sin, start, stop),
    )
    shard = dataclasses.replace(inputs, tokens=shard_tokens(inputs.tokens, start, stop), rope=rope)
    if inputs.e.ndim == 3:  # per-token timesteps
        e0 = shard_tokens(inputs.e0.flatten(-2), start, stop).unflatten(-1, inputs.e0.shape[-2:])
        shard = dataclasses.replace(shard, e=shard_tokens(inputs.e, start, stop), e0=e0)
    return shard


def shard_tokens(x: torch.Tensor, start: int, stop: int, fill: float = 0.0) -> torch.Tensor:
    """Rows ``start:stop`` along the token dim (dim -2: ``[B, S, C]`` or ``[S, C]``), padded
    with ``fill`` past the end of ``x``."""
    tokens = x.shape[-2]
    part = x[..., start : min(stop, tokens), :]
    missing = stop - max(start, min(stop, tokens))
    if missing:
        part = F.pad(part, (0, 0, 0, missing), value=fill)
    return part.contiguous()


def gather_tokens(
    x: torch.Tensor, group: dist.ProcessGroup | None, layout: SequenceLayout
) -> torch.Tensor:
    """All shards ``[B, chunk, C]`` of the sequence group -> ``[B, tokens, C]`` (no padding)."""
    batch, chunk, channels = x.shape
    if group is None or layout.ranks == 1:
        return x[:, : layout.tokens]
    gathered = torch.empty((layout.ranks * batch, chunk, channels), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(gathered, x.contiguous(), group=group)
    full = gathered.view(layout.ranks, batch, chunk, channels).transpose(0, 1)
    full = full.reshape(batch, layout.padded, channels)
    return full[:, : layout.tokens]
