"""Local attention that also returns its log-sum-exp, and the merge of partial results.

Ring attention computes attention of local queries against one key/value block at a time and
merges the partial results exactly through their log-sum-exp (LSE). A backend here is a
function ``(q, k, v) -> (out, lse)``:

- ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]``, contiguous, the same dtype; no mask; softmax
  scale ``1/sqrt(D)``;
- ``out [B, H, Sq, D]`` in the dtype of ``q``; ``lse [B, H, Sq]`` fp32, the natural logarithm of
  ``sum_k exp(q.k / sqrt(D))``.

Backends: ``math`` (plain fp32 matmul/softmax, any device, the CPU's and the reference),
``cudnn``, ``flash`` and ``efficient`` (torch's own SDPA kernels called through
``torch.ops.aten``, CUDA only). :func:`select_lse_attention` picks the first CUDA kernel that
runs and agrees with ``math`` on a small probe (cuDNN first: the fastest on H100/H200), so a
kernel whose LSE convention differs in a torch release is skipped instead of giving wrong videos.

Talks to: ``torch.ops.aten`` SDPA kernels; used by :mod:`smartdiff.parallel.ring`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LOG = logging.getLogger(__name__)

LseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

CUDA_ORDER = ("cudnn", "flash", "efficient")
PROBE_TOLERANCE = 2e-2  # max abs error of a bf16 kernel on the probe (values are O(1))


def math_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and LSE in fp32 with plain matmul and softmax (see the module docstring)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs, v.float()).to(q.dtype), lse


def cudnn_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN fused attention (bf16/fp16 on CUDA); its LSE is ``[B, H, S]`` or ``[B, H, S, 1]``."""
    result = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False
    )
    out, lse = result[0], result[1]
    return out, lse.reshape(q.shape[:3]).float()


def flash_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 as built into torch (bf16/fp16 on CUDA)."""
    result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
    return result[0], result[1].reshape(q.shape[:3]).float()


def efficient_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-efficient attention (fp32/bf16/fp16 on CUDA); its LSE is padded to 32 queries."""
    result = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    return result[0], result[1][..., : q.shape[2]].float()


LSE_BACKENDS: dict[str, LseFn] = {
    "math": math_attention_lse,
    "cudnn": cudnn_attention_lse,
    "flash": flash_attention_lse,
    "efficient": efficient_attention_lse,
}


@dataclass(frozen=True)
class LseAttention:
    """A chosen LSE attention backend (name and function); call it like the function."""

    name: str
    fn: LseFn

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(q, k, v)


def select_lse_attention(
    device: torch.device, dtype: torch.dtype, head_dim: int, name: str = "auto"
) -> LseAttention:
    """The LSE attention backend for ``dtype`` tensors with ``head_dim`` channels on ``device``.

    ``name="auto"``: ``math`` on the CPU; on CUDA the first of ``cudnn``, ``flash``,
    ``efficient`` that passes a probe against ``math``, else ``math``. A named backend is probed
    too and raises ``ValueError`` if it fails.
    """
    if name != "auto" and name not in LSE_BACKENDS:
        raise ValueError(
            f"LSE attention backend {name!r} is not allowed: one of auto, {', '.join(LSE_BACKENDS)}"
        )
    if name == "math" or (name == "auto" and device.type != "cuda"):
        return LseAttention("math", math_attention_lse)
    candidates = CUDA_ORDER if name == "auto" else (name,)
    failures = []
    for candidate in candidates:
        problem = probe_lse_backend(LSE_BACKENDS[candidate], device, dtype, head_dim)
        if problem is None:
            return LseAttention(candidate, LSE_BACKENDS[candidate])
        failures.append(f"{candidate}: {problem}")
    if name != "auto":
        raise ValueError(
            f"LSE attention backend {name!r} does not work for {dtype} head_dim={head_dim} on "
            f"{device}: {failures[0]}"
        )
    LOG.warning(
        "no fused LSE attention kernel works here (%s); ring attention uses fp32 math",
        "; ".join(failures),
    )
    return LseAttention("math", math_attention_lse)


def probe_lse_backend(
    fn: LseFn, device: torch.device, dtype: torch.dtype, head_dim: int
) -> str | None:
    """Run ``fn`` on a small seeded input against ``math``; ``None`` if it agrees, else why not."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    shapes = ((1, 2, 80, head_dim), (1, 2, 72, head_dim), (1, 2, 72, head_dim))
    q, k, v = (torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes)
    try:
        out, lse = fn(q, k, v)
    except (RuntimeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    ref_out, ref_lse = math_attention_lse(q, k, v)
    if out.shape != ref_out.shape or lse.shape != ref_lse.shape:
        return f"shapes out {tuple(out.shape)} lse {tuple(lse.shape)} differ from math"
    out_error = (out.float() - ref_out.float()).abs().max().item()
    lse_error = (lse - ref_lse).abs().max().item()
    if not (out_error <= PROBE_TOLERANCE and lse_error <= PROBE_TOLERANCE):
        return f"max error out {out_error:.3g}, lse {lse_error:.3g} > {PROBE_TOLERANCE}"
    return None


def merge_partials(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a partial result into an fp32 accumulator (``None`` to start one).

    ``softmax`` over the union of two key sets is the LSE-weighted mix of the two partial
    softmaxes: ``lse = log(e^lse + e^part_lse)``, ``out = out * e^(lse_old - lse) + part_out *
    e^(part_lse - lse)``. The accumulator ``out`` is updated in place when given.
    """
    if out is None or lse is None:
        return part_out.float(), part_lse.clone()
    merged = torch.logaddexp(lse, part_lse)
    out.mul_(torch.exp(lse - merged)[..., None])
    out.add_(part_out.float() * torch.exp(part_lse - merged)[..., None])
    return out, merged
