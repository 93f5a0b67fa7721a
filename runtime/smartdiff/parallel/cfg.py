"""Classifier-free guidance, with the two branches on two rank groups when ``cfg == 2``.

:func:`guided_noise` is the parallel form of the generator's noise prediction: the DiT on the
conditional and the unconditional text, combined as ``uncond + g * (cond - uncond)`` in fp32.
With ``groups.cfg == 2`` the ranks of CFG index 0 run the conditional branch and those of index
1 the unconditional one (each split further over its own sequence group by a
:class:`~smartdiff.parallel.dit.ParallelDiT`); the two predictions are exchanged with one
all-gather over the cfg group, so every rank returns the same combined prediction and the
latents stay identical everywhere. With ``cfg == 1`` the branches run one after the other.

Talks to: the DiT callable (``WanDiT`` or ``ParallelDiT``), ``torch.distributed`` on the cfg
group.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from smartdiff.parallel.groups import ParallelGroups


class DiTCall(Protocol):
    """What :func:`guided_noise` needs of a DiT: ``dtype`` and the forward call."""

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor: ...


def guided_noise(
    dit: DiTCall,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    groups: ParallelGroups,
) -> torch.Tensor:
    """The (guided) prediction for ``latents [B, C, F, H, W]`` at ``timestep`` (0-d), fp32.

    ``uncond`` is ``None`` when CFG is off (then ``groups.cfg`` must be 1); the DiT gets the
    latents cast to its dtype and ``timestep`` expanded to the batch, as the generator does.
    """
    x = latents.to(dit.dtype)
    steps = timestep.expand(x.shape[0])
    if uncond is None:
        if groups.cfg != 1:
            raise ValueError(
                "cfg=2 needs classifier-free guidance, but no unconditional embedding was given "
                "(guidance scale <= 1): launch with cfg=1"
            )
        return dit(x, steps, cond).float()
    if groups.cfg == 1:
        noise_cond = dit(x, steps, cond).float()
        noise_uncond = dit(x, steps, uncond).float()
    else:
        local = dit(x, steps, cond if groups.cfg_rank == 0 else uncond).contiguous()
        both = torch.empty(
            (2 * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device
        )
        dist.all_gather_into_tensor(both, local, group=groups.group("cfg"))
        noise_cond, noise_uncond = (half.float() for half in both.chunk(2))
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)
