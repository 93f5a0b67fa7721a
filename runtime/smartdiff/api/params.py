"""Per-request (user) and per-process (system) parameters of the engine.

Role: the two configuration levels below the static model config (DESIGN.md):

- ``UserParams``: one request -- model name, prompt, video shape, sampling
  (steps, guidance, shift, seed, solver) and the cache policy. Built by the CLI,
  by a server front end, or from a ``VideoGeneration`` spec
  (``VideoGenerationSpec.to_user_params``).
- ``SystemParams``: one process -- device, dtype, attention backend, memory level
  and the parallel degrees (cfg x ulysses x ring) planned by
  ``smartdiff.api.topology``.

Both are frozen, strict pydantic models validated on construction; the checks and
limits come from ``smartdiff.api.checks`` so that a request and a manifest are
judged alike. Talks to: the engine (which consumes them); imports no torch.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from smartdiff.api import checks

Solver = Literal["unipc", "dpm++", "euler"]
CachePolicyName = Literal["none", "teacache", "pab", "fbcache"]
DType = Literal["bfloat16", "float16", "float32"]

SOLVERS: Final[tuple[str, ...]] = get_args(Solver)
CACHE_POLICIES: Final[tuple[str, ...]] = get_args(CachePolicyName)
DTYPES: Final[tuple[str, ...]] = get_args(DType)

_CONFIG: Final = ConfigDict(frozen=True, extra="forbid", strict=True)

DEVICE_PATTERN: Final = r"^(auto|[a-z]+(:[0-9]+)?)$"
ATTENTION_PATTERN: Final = r"^[a-z0-9][a-z0-9_.+-]{0,63}$"


class CachePolicy(BaseModel):
    """Which step cache (FlexCache) skips redundant transformer work, and how eagerly."""

    model_config = _CONFIG

    policy: CachePolicyName = "none"
    """``none``, ``teacache``, ``pab`` (pyramid attention broadcast) or ``fbcache``."""
    threshold: float | None = None
    """Reuse threshold (>= 0); None means the policy's own default."""

    @field_validator("policy", mode="before")
    @classmethod
    def _check_policy(cls, value: object) -> object:
        return checks.check_choice("cache.policy", value, CACHE_POLICIES)

    @model_validator(mode="after")
    def _check_threshold(self) -> CachePolicy:
        checks.check_cache_threshold(self.policy, self.threshold)
        return self


class UserParams(BaseModel):
    """One video request: what to generate and how to sample it.

    Defaults reproduce the Wan2.1 1.3B reference settings (832x480, 81 frames at
    16 fps, 50 UniPC steps, guidance 5, shift 5).
    """

    model_config = _CONFIG

    model: str = checks.DEFAULT_MODEL
    """Model config name (``configs/models/<model>.yaml``)."""
    prompt: str
    """What the video shows; must contain non-whitespace text."""
    negative_prompt: str = ""
    """What the video should avoid (the unconditional branch of CFG)."""
    width: int = 832
    """Frame width in pixels: a multiple of 16 in [16, 4096]."""
    height: int = 480
    """Frame height in pixels: a multiple of 16 in [16, 4096]."""
    frames: int = 81
    """Number of frames: 4n+1 in [1, 1025]."""
    fps: int = 16
    """Frames per second of the encoded video, in [1, 120]."""
    steps: int = 50
    """Denoising steps, in [1, 1000]."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale in [0, 50]; <= 1 disables CFG."""
    shift: float = 5.0
    """Flow-matching timestep shift, in (0, 100]."""
    seed: int | None = None
    """Noise seed in [0, 2**63-1]; None draws a fresh seed."""
    solver: Solver = "unipc"
    """Flow-matching solver: ``unipc``, ``dpm++`` or ``euler``."""
    cache: CachePolicy = CachePolicy()
    """Step cache policy."""
    guidance_scale_2: float | None = None
    """Guidance of the low-noise expert of a two-expert model (Wan2.2 A14B), in [0, 50];
    None uses ``guidance_scale``."""
    image: str | None = None
    """Image-to-video (Wan2.2 TI2V): the first frame, as a path, ``file:///path``,
    ``pvc://claim/path`` or ``s3://bucket/key``; None for text-to-video."""

    @property
    def do_cfg(self) -> bool:
        """Whether classifier-free guidance runs (as diffusers: ``guidance_scale > 1``)."""
        return self.guidance_scale > 1.0

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_model_name(_name(info), value)

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _check_prompt(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_prompt(_name(info), value, allow_empty=info.field_name != "prompt")

    @field_validator("solver", mode="before")
    @classmethod
    def _check_solver(cls, value: object, info: ValidationInfo) -> object:
        return checks.check_choice(_name(info), value, SOLVERS)

    @field_validator("width", "height")
    @classmethod
    def _check_size(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_size(_name(info), value)

    @field_validator("frames")
    @classmethod
    def _check_frames(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_frames(_name(info), value)

    @field_validator("fps")
    @classmethod
    def _check_fps(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_int_range(_name(info), value, checks.FPS_MIN, checks.FPS_MAX)

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_int_range(_name(info), value, checks.STEPS_MIN, checks.STEPS_MAX)

    @field_validator("guidance_scale")
    @classmethod
    def _check_guidance(cls, value: float, info: ValidationInfo) -> float:
        return checks.check_float_range(
            _name(info), value, checks.GUIDANCE_MIN, checks.GUIDANCE_MAX
        )

    @field_validator("guidance_scale_2")
    @classmethod
    def _check_guidance_2(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return None
        return checks.check_float_range(
            _name(info), value, checks.GUIDANCE_MIN, checks.GUIDANCE_MAX
        )

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and (not value.strip() or len(value) > checks.URI_MAX):
            raise checks.rejection(
                _name(info),
                value,
                f"a non-empty path or URI of at most {checks.URI_MAX} "
                "characters (path, file://, pvc:// or s3://)",
            )
        return value

    @field_validator("shift")
    @classmethod
    def _check_shift(cls, value: float, info: ValidationInfo) -> float:
        return checks.check_float_range(
            _name(info), value, 0.0, checks.SHIFT_MAX, low_exclusive=True
        )

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            checks.check_int_range(_name(info), value, 0, checks.SEED_MAX)
        return value


class SystemParams(BaseModel):
    """One engine process: where and how it computes, and its parallel degrees.

    The world size of a launch is ``cfg * ulysses * ring`` (see ``world_size``).
    """

    model_config = _CONFIG

    device: str = "auto"
    """``auto`` (CUDA if present, else CPU) or a torch device string (``cpu``, ``cuda:0``)."""
    dtype: DType = "bfloat16"
    """Compute dtype of the transformer and VAE."""
    attention: str = "auto"
    """Attention backend name from the attention registry, or ``auto``."""
    memory_level: int = 0
    """0 all on GPU; 1 VAE tiling; 2 text encoder on CPU; 3 inactive experts on CPU."""
    cfg: int = 1
    """CFG-parallel degree: 1, or 2 (conditional and unconditional on separate ranks)."""
    ulysses: int = 1
    """Ulysses (all-to-all over heads) context-parallel degree, >= 1."""
    ring: int = 1
    """Ring-attention context-parallel degree, >= 1."""

    @property
    def world_size(self) -> int:
        """Number of ranks: ``cfg * ulysses * ring``."""
        return self.cfg * self.ulysses * self.ring

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_pattern(
            _name(info), value, DEVICE_PATTERN, "'auto' or a device such as cpu or cuda:0", 32
        )

    @field_validator("dtype", mode="before")
    @classmethod
    def _check_dtype(cls, value: object, info: ValidationInfo) -> object:
        return checks.check_choice(_name(info), value, DTYPES)

    @field_validator("attention")
    @classmethod
    def _check_attention(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_pattern(
            _name(info),
            value,
            ATTENTION_PATTERN,
            "'auto' or an attention backend name such as sdpa or flash-attn",
            64,
        )

    @field_validator("memory_level")
    @classmethod
    def _check_memory_level(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_int_range(_name(info), value, 0, checks.MEMORY_LEVEL_MAX)

    @field_validator("cfg")
    @classmethod
    def _check_cfg(cls, value: int, info: ValidationInfo) -> int:
        if value not in (1, 2):
            raise checks.rejection(_name(info), value, "cfg must be 1 or 2")
        return value

    @field_validator("ulysses", "ring")
    @classmethod
    def _check_degree(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_int_range(_name(info), value, 1, checks.MAX_GPUS)


def _name(info: ValidationInfo) -> str:
    """The field name a validator is checking (always set for field validators)."""
    return info.field_name or "value"
