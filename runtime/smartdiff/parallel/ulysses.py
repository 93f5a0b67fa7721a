"""Ulysses all-to-all: trade a token shard of every head for every token of a few heads.

Before attention each of the ``U`` ranks of a Ulysses group holds ``q, k, v [B, H, s, D]`` for
its ``s`` tokens and all ``H`` heads; :func:`scatter_heads` sends head group ``j``
(``head_split(H, U)[j]`` heads, in head order) to rank ``j`` in one all-to-all for q, k and v
together, so that rank ``j`` holds ``[B, c_j, U*s, D]``: all ``U*s`` tokens of the group in shard
order, for its ``c_j`` heads. :func:`gather_heads` is the inverse for the attention output.
Uneven head counts (12 heads over 8 ranks, 2 over 4) travel with exact split sizes; a rank with
no heads sends and receives empty tensors.

Talks to: ``torch.distributed.all_to_all_single`` on the Ulysses group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def scatter_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    counts: tuple[int, ...],
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v [B, H, s, D]`` (any strides) -> each ``[B, counts[rank], U*s, D]``, contiguous.

    ``counts`` is the head split over the group (``sum(counts) == H``), ``rank`` this rank's
    index in the group.
    """
    batch, heads, tokens, dim = q.shape
    if sum(counts) != heads:
        raise ValueError(f"head split {counts} does not add up to the {heads} heads of q")
    # [H, 3, B, s, D]: head-major, so each destination's heads are one contiguous slice.
    send = torch.empty((heads, 3, batch, tokens, dim), dtype=q.dtype, device=q.device)
    for index, tensor in enumerate((q, k, v)):
        send[:, index].copy_(tensor.transpose(0, 1))
    mine = counts[rank]
    ranks = len(counts)
    received = torch.empty((ranks * mine, 3, batch, tokens, dim), dtype=q.dtype, device=q.device)
    dist.all_to_all_single(
        received,
        send,
        output_split_sizes=[mine] * ranks,
        input_split_sizes=list(counts),
        group=group,
    )
    # [U, c, 3, B, s, D] -> [3, B, c, U, s, D] -> [3, B, c, U*s, D]
    gathered = received.view(ranks, mine, 3, batch, tokens, dim).permute(2, 3, 1, 0, 4, 5)
    full = gathered.reshape(3, batch, mine, ranks * tokens, dim)
    return full[0], full[1], full[2]


def gather_heads(
    out: torch.Tensor, group: dist.ProcessGroup, counts: tuple[int, ...], rank: int
) -> torch.Tensor:
    """``out [B, counts[rank], U*s, D]`` -> ``[B, H, s, D]`` (this rank's tokens, every head)."""
    batch, mine, total, dim = out.shape
    ranks = len(counts)
    if mine != counts[rank] or total % ranks:
        raise ValueError(
            f"attention output {tuple(out.shape)} does not fit head split {counts} at rank "
            f"{rank} over {ranks} ranks"
        )
    tokens = total // ranks
    # [B, c, U, s, D] -> [U, c, B, s, D] -> [U*c, B, s, D]: destination-major.
    send = (
        out.reshape(batch, mine, ranks, tokens, dim)
        .permute(2, 1, 0, 3, 4)
        .reshape(ranks * mine, batch, tokens, dim)
        .contiguous()  # the reshape may be a strided view (e.g. one head per rank)
    )
    heads = sum(counts)
    received = torch.empty((heads, batch, tokens, dim), dtype=out.dtype, device=out.device)
    dist.all_to_all_single(
        received,
        send,
        output_split_sizes=list(counts),
        input_split_sizes=[mine] * ranks,
        group=group,
    )
    return received.transpose(0, 1)
