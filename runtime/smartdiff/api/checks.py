"""The limits and value checks shared by the request parameters and the resource.

Role: one place for what a video request may ask for (sizes, frame counts, step
counts, URIs, Kubernetes names) and for the wording of a rejection. ``params``
(``UserParams``), ``videogeneration`` (the ``VideoGeneration`` spec) and ``crd``
(the OpenAPI bounds and CEL rules the API server enforces) all read the constants
below, so a CLI request, a manifest checked locally and a manifest checked by the
API server are judged by the same rules.

Every check raises ``PydanticCustomError`` (inside pydantic validators this becomes
a ``ValidationError`` entry without pydantic's "Value error, " prefix) whose message
names the field, the offending value and what is allowed, e.g.
``frames=80 is not allowed: frames must be 4n+1 (1, 5, 9, ..., 1025); nearest: 77 or 81``.
Talks to: nothing (stdlib and pydantic-core only).
"""

from __future__ import annotations

import math
import re
from typing import Final

from pydantic_core import PydanticCustomError

DEFAULT_MODEL: Final = "wan2.1-t2v-1.3b"

SIZE_MULTIPLE: Final = 16
SIZE_MIN: Final = 16
SIZE_MAX: Final = 4096
FRAMES_MIN: Final = 1
FRAMES_MAX: Final = 1025
FPS_MIN: Final = 1
FPS_MAX: Final = 120
STEPS_MIN: Final = 1
STEPS_MAX: Final = 1000
GUIDANCE_MIN: Final = 0.0
GUIDANCE_MAX: Final = 50.0
SHIFT_MAX: Final = 100.0  # shift must be > 0
SEED_MAX: Final = 2**63 - 1
PROMPT_MAX_CHARS: Final = 10_000
MEMORY_LEVEL_MAX: Final = 3
CACHE_THRESHOLD_MAX: Final = 1e6
MAX_GPUS: Final = 4096

MODEL_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# RFC 1123 subdomain, as Kubernetes object names (Secrets, LocalQueues, PVCs).
K8S_NAME_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
K8S_NAME_MAX: Final = 253
# Extended resource names such as nvidia.com/gpu or amd.com/gpu.
RESOURCE_NAME_PATTERN: Final = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
# A positive Kubernetes quantity such as 64Gi, 500M or 1.5e9 (no sign).
QUANTITY_PATTERN: Final = r"^[0-9]+(\.[0-9]+)?([eE][0-9]+|[kMGTPE]|[KMGTPE]i|m)?$"
# Bucket names follow the S3 rules (3-63 lowercase letters, digits, dots and dashes).
S3_URI_PATTERN: Final = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
PVC_URI_PATTERN: Final = r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?$"
FILE_URI_PATTERN: Final = r"^file:///.*$"
WEIGHTS_URI_PATTERN: Final = (
    r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?"
    r"|file:///.*)$"
)
URI_MAX: Final = 2048


def rejection(name: str, value: object, allowed: str) -> PydanticCustomError:
    """The error for ``name=value``: says what is allowed instead."""
    # No context dict: the message is used verbatim, braces in values included.
    return PydanticCustomError("value_not_allowed", f"{name}={value!r} is not allowed: {allowed}")


def check_int_range(name: str, value: int, low: int, high: int | None = None) -> int:
    """``low <= value <= high`` (``high`` None: no upper bound)."""
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise rejection(name, value, f"{name} must be an integer {bound}")
    return value


def check_float_range(
    name: str, value: float, low: float, high: float, *, low_exclusive: bool = False
) -> float:
    """A finite number in ``[low, high]`` (or ``(low, high]`` with ``low_exclusive``)."""
    too_low = value <= low if low_exclusive else value < low
    if not math.isfinite(value) or too_low or value > high:
        bound = f"greater than {low:g}" if low_exclusive else f"at least {low:g}"
        raise rejection(name, value, f"{name} must be a number {bound} and at most {high:g}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> object:
    """One of ``choices`` (used as a before-validator, so it sees the raw input)."""
    if isinstance(value, str) and value in choices:
        return value
    listed = ", ".join(repr(choice) for choice in choices)
    raise rejection(name, value, f"{name} must be one of {listed}")


def check_cache_threshold(policy: str, threshold: float | None) -> float | None:
    """A step-cache threshold: unset, or a finite number >= 0 with a policy other than none."""
    if threshold is None:
        return None
    check_float_range("cache.threshold", threshold, 0.0, CACHE_THRESHOLD_MAX)
    if policy == "none":
        raise rejection(
            "cache.threshold",
            threshold,
            "a threshold needs cache.policy teacache, pab or fbcache (policy is 'none')",
        )
    return threshold


def check_size(name: str, value: int) -> int:
    """A frame width or height: a multiple of 16 in ``[16, 4096]``."""
    if value % SIZE_MULTIPLE == 0 and SIZE_MIN <= value <= SIZE_MAX:
        return value
    if value < SIZE_MIN:
        nearest = f"{SIZE_MIN}"
    elif value > SIZE_MAX:
        nearest = f"{SIZE_MAX}"
    else:
        below = value // SIZE_MULTIPLE * SIZE_MULTIPLE
        nearest = f"{below} or {below + SIZE_MULTIPLE}"
    raise rejection(
        name,
        value,
        f"{name} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MIN} and {SIZE_MAX}"
        f" (the VAE downsamples by 8 and the transformer patches by 2); nearest: {nearest}",
    )


def check_frames(name: str, value: int) -> int:
    """A frame count: ``4n+1`` in ``[1, 1025]`` (the VAE compresses time by 4)."""
    if value % 4 == 1 and FRAMES_MIN <= value <= FRAMES_MAX:
        return value
    if value < FRAMES_MIN:
        nearest = f"{FRAMES_MIN}"
    elif value > FRAMES_MAX:
        nearest = f"{FRAMES_MAX}"
    else:
        below = (value - 1) // 4 * 4 + 1
        nearest = f"{below} or {below + 4}" if below + 4 <= FRAMES_MAX else f"{below}"
    raise rejection(
        name,
        value,
        f"{name} must be 4n+1 (1, 5, 9, ..., {FRAMES_MAX}); nearest: {nearest}",
    )


def check_prompt(name: str, value: str, *, allow_empty: bool) -> str:
    """Prompt text: at most 10000 characters, not blank unless ``allow_empty``."""
    if not allow_empty and not value.strip():
        raise rejection(name, value, f"{name} must contain non-whitespace text")
    if len(value) > PROMPT_MAX_CHARS:
        raise rejection(
            name,
            f"{value[:40]}... ({len(value)} characters)",
            f"{name} must be at most {PROMPT_MAX_CHARS} characters",
        )
    return value


def check_pattern(name: str, value: str, pattern: str, allowed: str, max_len: int) -> str:
    """``value`` matches ``pattern`` (anchored) and has at most ``max_len`` characters."""
    if len(value) > max_len or re.fullmatch(pattern, value) is None:
        raise rejection(name, value, f"{name} must be {allowed} (at most {max_len} characters)")
    return value


def check_model_name(name: str, value: str) -> str:
    """A model config name such as ``wan2.1-t2v-1.3b``."""
    return check_pattern(
        name,
        value,
        MODEL_NAME_PATTERN,
        "a model name of letters, digits, '.', '_' and '-' (e.g. wan2.1-t2v-1.3b)",
        128,
    )


def check_k8s_name(name: str, value: str) -> str:
    """A Kubernetes object name (RFC 1123 subdomain)."""
    return check_pattern(
        name,
        value,
        K8S_NAME_PATTERN,
        "a Kubernetes object name (lowercase letters, digits, '-' and '.')",
        K8S_NAME_MAX,
    )


def check_weights_uri(name: str, value: str) -> str:
    """Where checkpoints live: ``s3://bucket/prefix``, ``pvc://claim/path`` or ``file:///path``."""
    return check_pattern(
        name,
        value,
        WEIGHTS_URI_PATTERN,
        "a URI with scheme s3:// (s3://bucket/prefix), pvc:// (pvc://claim/path)"
        " or file:// (file:///absolute/path)",
        URI_MAX,
    )


def check_s3_uri(name: str, value: str) -> str:
    """An S3 object key or prefix: ``s3://bucket/key`` or ``s3://bucket/prefix/``."""
    return check_pattern(
        name, value, S3_URI_PATTERN, "an S3 URI s3://bucket/key or s3://bucket/prefix/", URI_MAX
    )
