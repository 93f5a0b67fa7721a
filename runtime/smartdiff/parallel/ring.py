"""Ring attention: queries stay, key/value blocks travel around the ring, LSE-merged.

The ``R`` ranks of a ring group each hold the queries, keys and values of one token block.
In ``R`` steps every rank attends its queries to each key/value block in turn: at step ``t`` it
holds the block of ring rank ``(r - t) mod R``, sends it to the next rank and receives the next
one from the previous rank (``batch_isend_irecv``, overlapped with the attention of the current
block), computes the partial attention with its log-sum-exp (:mod:`.local_attention`) and
merges it into an fp32 accumulator. Padding keys at the end of a block are cut off before
attention (``block_valid``); a block with no real keys is skipped, and padded queries are not
computed (their outputs are zero and dropped later).

Talks to: ``torch.distributed`` point-to-point ops on the ring group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from smartdiff.parallel.local_attention import LseAttention, merge_partials


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    ring_rank: int,
    block_valid: tuple[int, ...],
    attention: LseAttention,
) -> torch.Tensor:
    """Exact attention of the local ``q`` over the keys/values of every block of the ring.

    Args:
        q, k, v: ``[B, H, block, D]`` this rank's block (``block`` padded tokens).
        group: the ring process group (size ``R = len(block_valid)``).
        ring_rank: this rank's index in the ring; its block is block ``ring_rank``.
        block_valid: real tokens in each ring block (padding is at the end of a block).
        attention: the local attention that returns the LSE.

    Returns ``[B, H, block, D]`` in the dtype of ``q``; rows of padded queries are zero.
    """
    ring = len(block_valid)
    queries = block_valid[ring_rank]
    q_real = q[:, :, :queries].contiguous()
    current = torch.stack((k, v))  # [2, B, H, block, D], one message per step
    spare = torch.empty_like(current) if ring > 1 else current
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    for step in range(ring):
        requests = []
        if step < ring - 1:
            requests = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, current, group=group, group_peer=(ring_rank + 1) % ring),
                    dist.P2POp(dist.irecv, spare, group=group, group_peer=(ring_rank - 1) % ring),
                ]
            )
        keys = block_valid[(ring_rank - step) % ring]
        if queries and keys:
            part_out, part_lse = attention(
                q_real, current[0, :, :, :keys].contiguous(), current[1, :, :, :keys].contiguous()
            )
            out, lse = merge_partials(out, lse, part_out, part_lse)
        for request in requests:
            request.wait()
        current, spare = spare, current
    result = torch.zeros_like(q)
    if out is not None:
        result[:, :, :queries] = out.to(q.dtype)
    return result
