"""The attention backend registry: names -> implementations with declared capabilities.

Every backend is an :class:`AttentionSpec`: an import path to a factory (nothing heavy loads
until a backend is chosen) and what it supports -- devices, dtypes, the minimum GPU
architecture, head dims, the packages it needs, whether it returns the log-sum-exp (which ring
attention needs to merge partial results), and whether it is exact or approximate (quantized,
sparse). :func:`select_attention` checks a choice once, when the backend is built:

- an unknown name raises :class:`UnknownAttentionBackendError` listing the valid names;
- a known backend that cannot run here (wrong device, dtype, GPU, head dim, missing package,
  or a failing probe) raises :class:`AttentionUnavailableError` saying why;
- ``auto`` tries the backends in :func:`auto_order` (fastest first, as measured on that GPU
  family by ``benchmarks/attention.py``) and takes the first that runs and whose error on a
  small seeded probe is within ``accuracy_bound`` of an fp32 reference; every skipped
  candidate is logged with its reason (the fallback is never silent).

The result, an :class:`AttentionBackend`, is a callable with the DiT's attention signature
``(q, k, v [B, H, S, D]) -> [B, H, S, D]`` that remembers its name, spec and probe error; the
backend object that chose it keeps it (no global "active backend").

Talks to: the backend modules by import path (:mod:`.sdpa`, :mod:`.external`,
:mod:`.int8_triton`); used
by ``smartdiff.engine.backend`` and ``benchmarks/attention.py``. Imports no pydantic.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import torch

LOG = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(q [B, H, Sq, D], k [B, H, Sk, D], v [B, H, Sk, D]) -> [B, H, Sq, D]``, no mask, scale
``1/sqrt(D)``; inputs may be transposed views of ``[B, S, H, D]``."""
LseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Like :data:`AttentionFn` but returns ``(out, lse [B, H, Sq] fp32, natural log)``."""
ContextParallel = Literal["ulysses", "ring"]

AUTO: Final = "auto"
DEFAULT_ACCURACY_BOUND: Final = 2e-2  # relative L2 error against fp32 that ``auto`` accepts
PROBE_SHAPE: Final = (1, 2, 200)  # batch, heads, tokens of the probe (a partial last tile)
LSE_TOLERANCE: Final = 5e-2  # max abs LSE error on the probe (LSE values are O(5))
DTYPE_NAMES: Final = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
HALF: Final = ("bfloat16", "float16")
ALL_DTYPES: Final = ("float32", "bfloat16", "float16")


class UnknownAttentionBackendError(ValueError):
    """The name is not in the registry; the message lists the valid names."""


class AttentionUnavailableError(RuntimeError):
    """The backend exists but cannot run here; the message says why."""


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """What one backend is and what it supports.

    Args:
        name: the registry name (``SystemParams.attention``).
        factory: ``"module:function"``; ``function(device) -> AttentionFn``.
        lse_factory: ``"module:function"`` returning an :data:`LseFn`, or ``None`` (then the
            backend cannot serve ring attention).
        description: one line for humans and error messages.
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: input dtypes it takes (names).
        min_arch: lowest CUDA compute capability, or ``None``.
        max_arch: highest CUDA compute capability, or ``None`` (Hopper's wgmma exists on 9.0
            only).
        head_dims: head sizes it takes (``None``: any up to ``max_head_dim``).
        max_head_dim: largest head size.
        requires_any: import names of which at least one must be importable (empty: none).
        exact: computes softmax attention without quantization or skipping.
        probe_bound: largest relative error on the probe for the backend to count as working
            (the looser of this and the ``auto`` bound applies to a named choice).
    """

    name: str
    factory: str
    lse_factory: str | None = None
    description: str
    devices: tuple[str, ...] = ("cuda",)
    dtypes: tuple[str, ...] = HALF
    min_arch: tuple[int, int] | None = None
    max_arch: tuple[int, int] | None = None
    head_dims: tuple[int, ...] | None = None
    max_head_dim: int = 256
    requires_any: tuple[str, ...] = ()
    exact: bool = True
    probe_bound: float = DEFAULT_ACCURACY_BOUND

    @property
    def context_parallel(self) -> tuple[ContextParallel, ...]:
        """The context-parallel schemes it can be the local attention of."""
        return ("ulysses", "ring") if self.lse_factory else ("ulysses",)


_SDPA = "smartdiff.attention.sdpa"
_TRITON = "smartdiff.attention.int8_triton"

BACKENDS: Final[tuple[AttentionSpec, ...]] = (
    AttentionSpec(
        name="sdpa",
        factory=f"{_SDPA}:make_sdpa",
        description="torch scaled_dot_product_attention, torch picks the kernel",
        devices=("cpu", "cuda"),
        dtypes=ALL_DTYPES,
    ),
    AttentionSpec(
        name="sdpa-math",
        factory=f"{_SDPA}:make_math",
        lse_factory=f"{_SDPA}:make_math_lse",
        description="torch SDPA, math kernel (reference, slow)",
        devices=("cpu", "cuda"),
        dtypes=ALL_DTYPES,
        max_head_dim=1 << 16,
    ),
    AttentionSpec(
        name="sdpa-flash",
        factory=f"{_SDPA}:make_flash",
        lse_factory=f"{_SDPA}:make_flash_lse",
        description="torch SDPA, FlashAttention-2 kernel",
        min_arch=(8, 0),
    ),
    AttentionSpec(
        name="sdpa-cudnn",
        factory=f"{_SDPA}:make_cudnn",
        lse_factory=f"{_SDPA}:make_cudnn_lse",
        description="torch SDPA, cuDNN fused attention kernel",
        min_arch=(8, 0),
        max_head_dim=128,
    ),
    AttentionSpec(
        name="sdpa-efficient",
        factory=f"{_SDPA}:make_efficient",
        lse_factory=f"{_SDPA}:make_efficient_lse",
        description="torch SDPA, memory-efficient kernel",
        dtypes=ALL_DTYPES,
    ),
    AttentionSpec(
        name="flash-attn",
        factory="smartdiff.attention.external:make_flash_attn",
        lse_factory="smartdiff.attention.external:make_flash_attn_lse",
        description="FlashAttention-3 (Hopper) or -2 package",
        min_arch=(8, 0),
        requires_any=("flash_attn_interface", "flash_attn"),
    ),
    AttentionSpec(
        name="sage",
        factory="smartdiff.attention.external:make_sage",
        description="SageAttention package (INT8 QK^T)",
        min_arch=(8, 0),
        head_dims=(64, 128),
        requires_any=("sageattention",),
        exact=False,
    ),
    AttentionSpec(
        name="sd-int8",
        factory=f"{_TRITON}:make_int8",
        lse_factory=f"{_TRITON}:make_int8_lse",
        description="ours (Triton): INT8 QK^T with K smoothing, BF16 PV",
        min_arch=(8, 0),
        head_dims=(64, 128),
        requires_any=("triton",),
        exact=False,
    ),
    AttentionSpec(
        name="sd-int8-wgmma",
        factory="smartdiff.attention.int8_wgmma:make_int8_wgmma",
        lse_factory="smartdiff.attention.int8_wgmma:make_int8_wgmma_lse",
        description="ours (Gluon, Hopper): INT8 QK^T with K smoothing, BF16 PV, producer "
        "warpgroup + two ping-pong consumer warpgroups",
        dtypes=("bfloat16",),
        min_arch=(9, 0),
        max_arch=(9, 0),
        head_dims=(128,),
        requires_any=("triton.experimental.gluon",),
        exact=False,
    ),
    AttentionSpec(
        name="sd-int8-fp8",
        factory=f"{_TRITON}:make_int8_fp8",
        lse_factory=f"{_TRITON}:make_int8_fp8_lse",
        description="ours (Triton): INT8 QK^T with K smoothing, FP8 PV",
        min_arch=(8, 9),
        head_dims=(64, 128),
        requires_any=("triton",),
        exact=False,
        probe_bound=8e-2,
    ),
    AttentionSpec(
        name="sparge",
        factory=f"{_TRITON}:make_sparse",
        description="ours (Triton): block-sparse INT8 attention, tiles predicted "
        "from pooled q/k similarity",
        min_arch=(8, 0),
        head_dims=(64, 128),
        requires_any=("triton",),
        exact=False,
    ),
)

# Fastest first, per device family, as measured at the Wan shapes (benchmarks/attention.py and
# attention_timing.py, H200, benchmarks/results/attention_h200*.json and
# attention_timing_rounds30_1.3b_h200.json):
# sd-int8-wgmma 1.51x / 1.56x cuDNN SDPA (1.2e-2 relative error), cuDNN, sd-int8 0.95x / 0.99x,
# FA2 0.62x / 0.63x (1.3B / 14B shapes).
_AUTO_ORDER: Final[dict[str, tuple[str, ...]]] = {
    "cpu": ("sdpa", "sdpa-math"),
    "hopper": (
        "sd-int8-wgmma",
        "sdpa-cudnn",
        "sd-int8",
        "flash-attn",
        "sdpa-flash",
        "sdpa",
        "sdpa-efficient",
        "sdpa-math",
    ),
    "cuda": ("sdpa-cudnn", "flash-attn", "sdpa-flash", "sdpa", "sdpa-efficient", "sdpa-math"),
}


@dataclass(frozen=True)
class AttentionBackend:
    """A chosen, checked backend: call it like the function it wraps.

    Attributes:
        name: registry name.
        spec: its declared capabilities.
        fn: the attention function.
        lse: the LSE-returning variant (ring attention), or ``None``.
        probe_error: relative error against fp32 on the selection probe.
    """

    name: str
    spec: AttentionSpec
    fn: AttentionFn
    lse: LseFn | None
    probe_error: float

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fn(q, k, v)


def backend_names() -> tuple[str, ...]:
    """Every registered name (without ``auto``)."""
    return tuple(spec.name for spec in BACKENDS)


def get_spec(name: str) -> AttentionSpec:
    """The spec of ``name``; raises :class:`UnknownAttentionBackendError` if unknown."""
    for spec in BACKENDS:
        if spec.name == name:
            return spec
    raise UnknownAttentionBackendError(
        f"attention={name!r} is not allowed: known backends are {AUTO}, "
        f"{', '.join(backend_names())}"
    )


def check_name(name: str) -> None:
    """Raise :class:`UnknownAttentionBackendError` unless ``name`` is ``auto`` or registered."""
    if name != AUTO:
        get_spec(name)


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The candidates of ``auto`` on ``device``, fastest first."""
    if device.type != "cuda":
        return _AUTO_ORDER["cpu"]
    major, _ = torch.cuda.get_device_capability(device)
    return _AUTO_ORDER["hopper" if major == 9 else "cuda"]


def why_unavailable(
    spec: AttentionSpec,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    context_parallel: ContextParallel | None = None,
) -> str | None:
    """``None`` if the declared capabilities allow this use, else the reason they do not."""
    if device.type not in spec.devices:
        return f"runs on {', '.join(spec.devices)}, not {device.type}"
    dtype_name = DTYPE_NAMES.get(dtype, str(dtype))
    if dtype_name not in spec.dtypes:
        return f"takes {', '.join(spec.dtypes)}, not {dtype_name}"
    if spec.head_dims is not None and head_dim not in spec.head_dims:
        return f"takes head dims {', '.join(map(str, spec.head_dims))}, not {head_dim}"
    if head_dim > spec.max_head_dim:
        return f"takes head dims up to {spec.max_head_dim}, not {head_dim}"
    if (spec.min_arch or spec.max_arch) and device.type == "cuda":
        arch = torch.cuda.get_device_capability(device)
        here = f"this GPU is {arch[0]}.{arch[1]}"
        if spec.min_arch is not None and arch < spec.min_arch:
            return f"needs compute capability >= {'.'.join(map(str, spec.min_arch))}, {here}"
        if spec.max_arch is not None and arch > spec.max_arch:
            return f"needs compute capability <= {'.'.join(map(str, spec.max_arch))}, {here}"
    if spec.requires_any and not any(_importable(m) for m in spec.requires_any):
        return f"needs the package {' or '.join(spec.requires_any)}, which is not installed"
    if context_parallel is not None and context_parallel not in spec.context_parallel:
        return f"cannot serve {context_parallel} context parallelism (it returns no LSE)"
    return None


def select_attention(
    name: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    context_parallel: ContextParallel | None = None,
    accuracy_bound: float = DEFAULT_ACCURACY_BOUND,
) -> AttentionBackend:
    """Build and check the backend ``name`` (or the best one, for ``auto``); module docstring."""
    device = torch.device(device)
    if name != AUTO:
        spec = get_spec(name)
        try:
            return _build(
                spec,
                device,
                dtype,
                head_dim,
                context_parallel,
                max(accuracy_bound, spec.probe_bound),
            )
        except AttentionUnavailableError as error:
            usable = [
                s.name
                for s in BACKENDS
                if why_unavailable(s, device, dtype, head_dim, context_parallel) is None
            ]
            raise AttentionUnavailableError(
                f"attention={name!r} cannot run here: {error} (usable here by their declared "
                f"capabilities: {AUTO}, {', '.join(usable)})"
            ) from None
    skipped: list[str] = []
    for candidate in auto_order(device):
        try:
            backend = _build(
                get_spec(candidate), device, dtype, head_dim, context_parallel, accuracy_bound
            )
        except AttentionUnavailableError as error:
            skipped.append(f"{candidate}: {error}")
            continue
        if skipped:
            LOG.info(
                "attention auto -> %s (probe error %.2e); skipped %s",
                candidate,
                backend.probe_error,
                "; ".join(skipped),
            )
        else:
            LOG.info("attention auto -> %s (probe error %.2e)", candidate, backend.probe_error)
        return backend
    raise AttentionUnavailableError(
        f"attention='auto' found no backend for {DTYPE_NAMES.get(dtype, dtype)} head_dim="
        f"{head_dim} on {device}: {'; '.join(skipped)}"
    )


def _build(
    spec: AttentionSpec,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    context_parallel: ContextParallel | None,
    bound: float,
) -> AttentionBackend:
    reason = why_unavailable(spec, device, dtype, head_dim, context_parallel)
    if reason is not None:
        raise AttentionUnavailableError(reason)
    try:
        fn: AttentionFn = _load(spec.factory)(device)
        lse: LseFn | None = _load(spec.lse_factory)(device) if spec.lse_factory else None
        error = probe(fn, device, dtype, head_dim)
        if context_parallel == "ring" and lse is not None:
            lse_error = probe_lse(lse, device, dtype, head_dim)
            if not lse_error <= LSE_TOLERANCE:
                raise AttentionUnavailableError(
                    f"its LSE is off by {lse_error:.3g} on the probe (> {LSE_TOLERANCE})"
                )
    except AttentionUnavailableError:
        raise
    except Exception as failure:  # any failure on the probe (e.g. a kernel compile error)
        # means the backend does not work here; say which, do not crash the caller
        first_line = str(failure).splitlines()[0] if str(failure) else ""
        raise AttentionUnavailableError(
            f"it failed on the probe: {type(failure).__name__}: {first_line}"
        ) from failure
    if not error <= bound:
        raise AttentionUnavailableError(
            f"its probe error {error:.3g} exceeds the accuracy bound {bound:.3g}"
        )
    return AttentionBackend(name=spec.name, spec=spec, fn=fn, lse=lse, probe_error=error)


def _load(path: str) -> Callable[[torch.device], Any]:
    """The factory at ``"module:function"``."""
    module, _, attribute = path.partition(":")
    loaded: Callable[[torch.device], Any] = getattr(importlib.import_module(module), attribute)
    return loaded


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def probe_inputs(
    device: torch.device, dtype: torch.dtype, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded ``q, k, v [1, 2, 200, head_dim]`` as transposed views, like the DiT passes them."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    batch, heads, tokens = PROBE_SHAPE
    return tuple(  # type: ignore[return-value]
        torch.randn((batch, tokens, heads, head_dim), generator=generator)
        .to(device=device, dtype=dtype)
        .transpose(1, 2)
        for _ in range(3)
    )


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention and LSE by plain matmul and softmax (the probes' reference)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()), lse


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32 (NaN stays NaN, so a broken kernel fails checks)."""
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def probe(fn: AttentionFn, device: torch.device, dtype: torch.dtype, head_dim: int) -> float:
    """Relative error of ``fn`` against fp32 on the probe inputs."""
    q, k, v = probe_inputs(device, dtype, head_dim)
    out = fn(q, k, v)
    if out.shape != q.shape:
        raise AttentionUnavailableError(
            f"it returned shape {tuple(out.shape)} for q {tuple(q.shape)}"
        )
    return relative_error(out, reference_attention(q, k, v)[0])


def probe_lse(fn: LseFn, device: torch.device, dtype: torch.dtype, head_dim: int) -> float:
    """Largest absolute LSE error of ``fn`` against fp32 on the probe inputs."""
    q, k, v = probe_inputs(device, dtype, head_dim)
    _, lse = fn(q.contiguous(), k.contiguous(), v.contiguous())
    return float((lse.float() - reference_attention(q, k, v)[1]).abs().max())
