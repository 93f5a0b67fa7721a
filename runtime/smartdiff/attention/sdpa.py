"""PyTorch's ``scaled_dot_product_attention``, free or pinned to one of its kernels.

``sdpa`` lets torch dispatch (flash, efficient, cuDNN or math, whichever its heuristics pick
for the inputs); ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient`` and ``sdpa-math`` pin one
kernel through ``torch.nn.attention.sdpa_kernel``, so an input the kernel cannot take raises
instead of silently falling back (the registry's probe turns that into "unavailable").

Every factory returns an attention function ``(q, k, v [B, H, S, D]) -> [B, H, S, D]`` (no
mask, scale ``1/sqrt(D)``), see :class:`smartdiff.attention.registry.AttentionFn`.

Talks to: torch only; referenced by import path from :mod:`.registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def free_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with torch's own kernel choice."""
    return F.scaled_dot_product_attention(q, k, v)


@dataclass(frozen=True)
class PinnedSdpa:
    """SDPA restricted to one kernel (``torch.nn.attention.SDPBackend``)."""

    kernel: SDPBackend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([self.kernel]):
            return F.scaled_dot_product_attention(q, k, v)


def make_sdpa(device: torch.device) -> Callable[..., torch.Tensor]:
    del device
    return free_attention


def make_flash(device: torch.device) -> PinnedSdpa:
    del device
    return PinnedSdpa(SDPBackend.FLASH_ATTENTION)


def make_cudnn(device: torch.device) -> PinnedSdpa:
    del device
    return PinnedSdpa(SDPBackend.CUDNN_ATTENTION)


def make_efficient(device: torch.device) -> PinnedSdpa:
    del device
    return PinnedSdpa(SDPBackend.EFFICIENT_ATTENTION)


def make_math(device: torch.device) -> PinnedSdpa:
    del device
    return PinnedSdpa(SDPBackend.MATH)


# SDPA kernels with their log-sum-exp, for ring attention: the context-parallel layer's own
# wrappers over ``torch.ops.aten`` (one implementation of each in the code base).


def make_math_lse(device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    del device
    from smartdiff.parallel.local_attention import math_attention_lse

    return math_attention_lse


def make_flash_lse(device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    del device
    from smartdiff.parallel.local_attention import flash_attention_lse

    return flash_attention_lse


def make_cudnn_lse(device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    del device
    from smartdiff.parallel.local_attention import cudnn_attention_lse

    return cudnn_attention_lse


def make_efficient_lse(device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    del device
    from smartdiff.parallel.local_attention import efficient_attention_lse

    return efficient_attention_lse
