"""VAE decoding once per launch instead of once per rank.

Every rank ends the denoising loop with the same latents. Decoding them on every rank would
cost each GPU the VAE's peak memory and time for the same video; :func:`decode_once` decodes
on one rank (global rank 0 by default, the one that writes and uploads the video) and, if
asked, broadcasts the decoded video to the others. The Wan VAE cannot be split spatially
exactly without gathering at its middle attention block (it attends over whole frames), so
one decode plus one broadcast is the exact choice here.

Talks to: a ``decode`` callable (e.g. ``vae.decode(vae.denormalize_latents(z))``),
``torch.distributed.broadcast`` on the default group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from smartdiff.parallel.groups import ParallelGroups

MAX_DIMS = 8
DTYPE_CODES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.uint8,
    torch.float64,
)


def decode_once(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    groups: ParallelGroups,
    *,
    root: int = 0,
    broadcast: bool = True,
) -> torch.Tensor | None:
    """``decode(latents)`` on global rank ``root`` only.

    Returns the decoded tensor on ``root``; on the other ranks the broadcast copy (on
    ``groups.device``) when ``broadcast``, else ``None`` (they skip the decode and return at
    once).
    """
    if not 0 <= root < groups.world_size:
        raise ValueError(f"root={root} is not allowed: must be a rank in [0, {groups.world_size})")
    if groups.world_size == 1:
        return decode(latents)
    video = decode(latents) if groups.rank == root else None
    if not broadcast:
        return video
    header = torch.zeros(MAX_DIMS + 2, dtype=torch.int64, device=groups.device)
    if video is not None:
        if video.ndim > MAX_DIMS or video.dtype not in DTYPE_CODES:
            raise ValueError(
                f"decoded video {tuple(video.shape)} {video.dtype} cannot be broadcast: at most "
                f"{MAX_DIMS} dims and a dtype among {DTYPE_CODES}"
            )
        video = video.to(groups.device).contiguous()
        header[0] = video.ndim
        header[1] = DTYPE_CODES.index(video.dtype)
        header[2 : 2 + video.ndim] = torch.tensor(video.shape, dtype=torch.int64)
    dist.broadcast(header, src=root)
    if video is None:
        ndim, code = int(header[0]), int(header[1])
        shape = [int(size) for size in header[2 : 2 + ndim].tolist()]
        video = torch.empty(shape, dtype=DTYPE_CODES[code], device=groups.device)
    dist.broadcast(video, src=root)
    return video
