"""Attention from optional packages: FlashAttention (3 on Hopper, else 2) and SageAttention.

Neither package is a dependency; the registry lists them and checks that they import before
a factory here is called. Both take ``[B, S, H, D]`` tensors, which the DiT's ``[B, H, S, D]``
inputs already are underneath (they are transposed views), so the wrappers transpose views
both ways and copy nothing.

- ``flash-attn``: ``flash_attn_interface.flash_attn_func`` (FlashAttention-3, Hopper only) when
  it imports and the GPU is sm90, else ``flash_attn.flash_attn_func`` (FlashAttention-2).
  Both return the LSE (natural log, ``[B, H, S]``) on request, so ring attention can use them.
- ``sage``: ``sageattention.sageattn`` (INT8 QK^T; its own choice of kernel for the GPU).

Talks to: the optional packages; referenced by import path from :mod:`.registry`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

AttentionCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LseCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def flash_module(device: torch.device) -> tuple[str, Any]:
    """``("fa3" | "fa2", flash_attn_func)`` for ``device``."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    if hopper and importlib.util.find_spec("flash_attn_interface") is not None:
        return "fa3", importlib.import_module("flash_attn_interface").flash_attn_func
    return "fa2", importlib.import_module("flash_attn").flash_attn_func


@dataclass(frozen=True)
class FlashAttention:
    """FlashAttention-2 or -3 on ``[B, H, S, D]`` views (module docstring)."""

    version: str
    func: Any

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        result = self.func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = result[0] if isinstance(result, tuple) else result
        return out.transpose(1, 2)

    def with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        result = self.func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_attn_probs=True
        )
        return result[0].transpose(1, 2), result[1].float().reshape(q.shape[:3])


def make_flash_attn(device: torch.device) -> FlashAttention:
    return FlashAttention(*flash_module(device))


def make_flash_attn_lse(device: torch.device) -> LseCall:
    return make_flash_attn(device).with_lse


@dataclass(frozen=True)
class SageAttention:
    """``sageattention.sageattn`` on ``[B, H, S, D]`` views."""

    func: Any

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            tensor_layout="NHD",
            is_causal=False,
        )
        return out.transpose(1, 2)


def make_sage(device: torch.device) -> SageAttention:
    del device
    return SageAttention(importlib.import_module("sageattention").sageattn)
