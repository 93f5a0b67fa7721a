"""The parts of a ``VideoGeneration`` spec: model, video, sampling, acceleration,
resources, parallelism and output.

Role: one pydantic model per sub-object of ``.spec`` (camelCase JSON, snake_case
attributes). Each field carries the bounds the CRD's OpenAPI schema needs and, where
a bound is not expressible in OpenAPI, a CEL rule (``x-kubernetes-validations``)
next to it; a validator mirrors every rule so a manifest checked locally fails as
it would on the API server, with the messages of ``smartdiff.api.checks``.
Talks to: ``checks`` (limits, messages), ``params`` (enum names, ``CachePolicy``),
``topology`` (``ParallelDegrees``); assembled by ``videogeneration``.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from pydantic import ConfigDict, Field, JsonValue, ValidationInfo, field_validator, model_validator

from smartdiff.api import checks
from smartdiff.api.base import ApiModel, json_name
from smartdiff.api.params import (
    CACHE_POLICIES,
    DTYPES,
    SOLVERS,
    CachePolicy,
    CachePolicyName,
    DType,
    Solver,
)
from smartdiff.api.topology import ParallelDegrees

AttentionBackend = Literal[
    "auto",
    "sdpa",
    "sdpa-flash",
    "sdpa-cudnn",
    "flash-attn",
    "sage",
    "sd-int8",
    "sd-int8-wgmma",
    "sparge",
]
ATTENTION_BACKENDS: Final[tuple[str, ...]] = get_args(AttentionBackend)
ParallelismMode = Literal["auto", "explicit"]
TolerationOperator = Literal["Exists", "Equal"]
TaintEffect = Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]

MAX_TOLERATIONS: Final = 64
MAX_NODE_SELECTOR: Final = 64

# Defaults of optional sub-objects: the API server applies ``{}`` and then the
# defaults of the fields inside, so CEL rules can read e.g. sampling.guidanceScale.
# ``resources.gpus`` has no default (unset means the model catalog's default).
_DEFAULT_EMPTY: Final[dict[str, JsonValue]] = {"default": {}}


def cel_rule(rule: str, message: str, **extra: str) -> dict[str, JsonValue]:
    """One CEL rule for ``x-kubernetes-validations`` (``extra``: e.g. ``fieldPath``)."""
    rule_dict: dict[str, JsonValue] = {"rule": rule, "message": message}
    rule_dict.update(extra)
    return rule_dict


class ModelRef(ApiModel):
    """Which model to run and where its weights are."""

    name: str = Field(
        default=checks.DEFAULT_MODEL,
        json_schema_extra={"pattern": checks.MODEL_NAME_PATTERN, "maxLength": 128},
    )
    """Model config name, e.g. ``wan2.1-t2v-1.3b`` or ``wan2.1-t2v-14b``."""
    weights: str | None = Field(
        default=None,
        json_schema_extra={"pattern": checks.WEIGHTS_URI_PATTERN, "maxLength": checks.URI_MAX},
    )
    """Checkpoint location: ``s3://bucket/prefix``, ``pvc://claim/path`` or
    ``file:///path``; unset means the platform's default for the model."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_model_name(json_name(info), value)

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else checks.check_weights_uri(json_name(info), value)


class VideoSpec(ApiModel):
    """Shape of the video."""

    width: int = Field(
        default=832,
        json_schema_extra={
            "minimum": checks.SIZE_MIN,
            "maximum": checks.SIZE_MAX,
            "x-kubernetes-validations": [
                cel_rule("self % 16 == 0", "width must be a multiple of 16")
            ],
        },
    )
    """Frame width in pixels: a multiple of 16 in [16, 4096]."""
    height: int = Field(
        default=480,
        json_schema_extra={
            "minimum": checks.SIZE_MIN,
            "maximum": checks.SIZE_MAX,
            "x-kubernetes-validations": [
                cel_rule("self % 16 == 0", "height must be a multiple of 16")
            ],
        },
    )
    """Frame height in pixels: a multiple of 16 in [16, 4096]."""
    frames: int = Field(
        default=81,
        json_schema_extra={
            "minimum": checks.FRAMES_MIN,
            "maximum": checks.FRAMES_MAX,
            "x-kubernetes-validations": [
                cel_rule("self % 4 == 1", "frames must be 4n+1 (1, 5, 9, ..., 81, ...)")
            ],
        },
    )
    """Number of frames: 4n+1 in [1, 1025]."""
    fps: int = Field(
        default=16, json_schema_extra={"minimum": checks.FPS_MIN, "maximum": checks.FPS_MAX}
    )
    """Frames per second of the encoded video, in [1, 120]."""

    @field_validator("width", "height")
    @classmethod
    def _check_size(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_size(json_name(info), value)

    @field_validator("frames")
    @classmethod
    def _check_frames(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_frames(json_name(info), value)

    @field_validator("fps")
    @classmethod
    def _check_fps(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_int_range(json_name(info), value, checks.FPS_MIN, checks.FPS_MAX)


class SamplingSpec(ApiModel):
    """How the video is denoised."""

    steps: int = Field(
        default=50, json_schema_extra={"minimum": checks.STEPS_MIN, "maximum": checks.STEPS_MAX}
    )
    """Denoising steps, in [1, 1000]."""
    guidance_scale: float = Field(
        default=5.0,
        json_schema_extra={"minimum": checks.GUIDANCE_MIN, "maximum": checks.GUIDANCE_MAX},
    )
    """Classifier-free guidance scale in [0, 50]; <= 1 disables CFG."""
    guidance_scale_2: float | None = Field(
        default=None,
        json_schema_extra={"minimum": checks.GUIDANCE_MIN, "maximum": checks.GUIDANCE_MAX},
    )
    """Guidance of the low-noise expert of a two-expert model (Wan2.2 A14B), in [0, 50];
    unset uses ``guidanceScale``."""
    shift: float = Field(default=5.0, json_schema_extra={"exclusiveMinimum": 0, "maximum": 100})
    """Flow-matching timestep shift, in (0, 100]."""
    solver: Solver = "unipc"
    """Flow-matching solver: ``unipc``, ``dpm++`` or ``euler``."""
    # No OpenAPI maximum: the API server reads bounds as float64, where 2^63-1 is not an
    # integer; int64 decoding bounds it there, the validator below bounds it here.
    seed: int | None = Field(default=None, json_schema_extra={"minimum": 0})
    """Noise seed in [0, 2^63-1]; unset draws a fresh seed (reported in the logs)."""

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_int_range(json_name(info), value, checks.STEPS_MIN, checks.STEPS_MAX)

    @field_validator("guidance_scale")
    @classmethod
    def _check_guidance(cls, value: float, info: ValidationInfo) -> float:
        return checks.check_float_range(
            json_name(info), value, checks.GUIDANCE_MIN, checks.GUIDANCE_MAX
        )

    @field_validator("guidance_scale_2")
    @classmethod
    def _check_guidance_2(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return None
        return checks.check_float_range(
            json_name(info), value, checks.GUIDANCE_MIN, checks.GUIDANCE_MAX
        )

    @field_validator("shift")
    @classmethod
    def _check_shift(cls, value: float, info: ValidationInfo) -> float:
        return checks.check_float_range(
            json_name(info), value, 0.0, checks.SHIFT_MAX, low_exclusive=True
        )

    @field_validator("solver", mode="before")
    @classmethod
    def _check_solver(cls, value: object, info: ValidationInfo) -> object:
        return checks.check_choice(json_name(info), value, SOLVERS)

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            checks.check_int_range(json_name(info), value, 0, checks.SEED_MAX)
        return value


class CacheSpec(ApiModel):
    """Step cache (FlexCache): reuse transformer work between similar steps."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_rule(
                    "self.policy != 'none' || !has(self.threshold)",
                    "threshold needs a cache policy other than none",
                    fieldPath=".threshold",
                )
            ]
        }
    )

    policy: CachePolicyName = "none"
    """``none``, ``teacache``, ``pab`` (pyramid attention broadcast) or ``fbcache``."""
    threshold: float | None = Field(default=None, json_schema_extra={"minimum": 0})
    """Reuse threshold (>= 0); unset means the policy's default."""

    @field_validator("policy", mode="before")
    @classmethod
    def _check_policy(cls, value: object, info: ValidationInfo) -> object:
        return checks.check_choice(json_name(info), value, CACHE_POLICIES)

    @model_validator(mode="after")
    def _check_threshold(self) -> CacheSpec:
        checks.check_cache_threshold(self.policy, self.threshold)
        return self

    def to_policy(self) -> CachePolicy:
        """The engine's ``CachePolicy``."""
        return CachePolicy(policy=self.policy, threshold=self.threshold)


class AccelerationSpec(ApiModel):
    """Speed and memory choices; they do not change what is generated beyond numerics."""

    attention: AttentionBackend = "auto"
    """Attention backend: ``auto``, ``sdpa``, ``sdpa-flash``, ``sdpa-cudnn``,
    ``flash-attn``, ``sage``, ``sd-int8``, ``sd-int8-wgmma`` (Hopper) or ``sparge``."""
    cache: CacheSpec = Field(default_factory=CacheSpec, json_schema_extra=_DEFAULT_EMPTY)
    """Step cache policy."""
    memory_level: int = Field(default=0, json_schema_extra={"minimum": 0, "maximum": 3})
    """0 all on GPU; 1 VAE tiling; 2 text encoder on CPU; 3 inactive experts on CPU."""
    dtype: DType = "bfloat16"
    """Compute dtype: ``bfloat16``, ``float16`` or ``float32``."""

    @field_validator("attention", mode="before")
    @classmethod
    def _check_attention(cls, value: object, info: ValidationInfo) -> object:
        return checks.check_choice(json_name(info), value, ATTENTION_BACKENDS)

    @field_validator("dtype", mode="before")
    @classmethod
    def _check_dtype(cls, value: object, info: ValidationInfo) -> object:
        return checks.check_choice(json_name(info), value, DTYPES)

    @field_validator("memory_level")
    @classmethod
    def _check_memory_level(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_int_range(json_name(info), value, 0, checks.MEMORY_LEVEL_MAX)


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration) for tainted GPU nodes."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_rule(
                    "(has(self.key) && self.key != '')"
                    " || (has(self.operator) && self.operator == 'Exists')",
                    "an empty key needs operator Exists (it tolerates every taint)",
                ),
                cel_rule(
                    "!has(self.operator) || self.operator != 'Exists'"
                    " || !has(self.value) || self.value == ''",
                    "value must be empty when operator is Exists",
                ),
                cel_rule(
                    "!has(self.tolerationSeconds)"
                    " || (has(self.effect) && self.effect == 'NoExecute')",
                    "tolerationSeconds needs effect NoExecute",
                ),
            ]
        }
    )

    key: str | None = Field(default=None, json_schema_extra={"maxLength": 316})
    """Taint key to tolerate; empty with operator Exists tolerates every taint."""
    operator: TolerationOperator | None = None
    """``Equal`` (the default: key and value must match) or ``Exists``."""
    value: str | None = Field(default=None, json_schema_extra={"maxLength": 63})
    """Taint value to match with operator Equal."""
    effect: TaintEffect | None = None
    """``NoSchedule``, ``PreferNoSchedule`` or ``NoExecute``; unset matches all effects."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated before eviction."""

    @field_validator("operator", "effect", mode="before")
    @classmethod
    def _check_choice(cls, value: object, info: ValidationInfo) -> object:
        choices = get_args(TolerationOperator if info.field_name == "operator" else TaintEffect)
        return None if value is None else checks.check_choice(json_name(info), value, choices)

    @model_validator(mode="after")
    def _check_consistent(self) -> Toleration:
        if not self.key and self.operator != "Exists":
            raise checks.rejection("operator", self.operator, "an empty key needs operator Exists")
        if self.operator == "Exists" and self.value:
            raise checks.rejection("value", self.value, "value must be empty with operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise checks.rejection(
                "tolerationSeconds",
                self.toleration_seconds,
                f"tolerationSeconds needs effect NoExecute (effect is {self.effect or 'unset'})",
            )
        return self


class ResourcesSpec(ApiModel):
    """The GPUs (and memory) the generation may use, and where they may come from."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_rule(
                    "!has(self.gpusPerNode) || !has(self.gpus) || self.gpus <= self.gpusPerNode"
                    " || self.gpus % self.gpusPerNode == 0",
                    "gpus must be at most gpusPerNode or a multiple of it",
                    fieldPath=".gpus",
                )
            ]
        }
    )

    gpus: int | None = Field(
        default=None, json_schema_extra={"minimum": 1, "maximum": checks.MAX_GPUS}
    )
    """Total GPUs, >= 1; more than ``gpusPerNode`` spans several nodes. Unset means the
    platform's default for the model (its catalog's ``defaultGpus``), else 1."""
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        json_schema_extra={"pattern": checks.RESOURCE_NAME_PATTERN, "maxLength": 253},
    )
    """Extended resource name of a GPU (``nvidia.com/gpu``, or a MIG profile resource)."""
    gpus_per_node: int | None = Field(
        default=None, json_schema_extra={"minimum": 1, "maximum": checks.MAX_GPUS}
    )
    """Most GPUs one node offers; unset means all GPUs on one node."""
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        json_schema_extra={
            "maxProperties": MAX_NODE_SELECTOR,
            "additionalProperties": {"type": "string", "maxLength": 63},
        },
    )
    """Node labels the pods require (e.g. a GPU product label)."""
    tolerations: list[Toleration] = Field(
        default_factory=list, json_schema_extra={"maxItems": MAX_TOLERATIONS}
    )
    """Tolerations for tainted GPU nodes."""
    memory: str | None = Field(
        default=None, json_schema_extra={"pattern": checks.QUANTITY_PATTERN, "maxLength": 64}
    )
    """Host memory per pod as a quantity (``64Gi``); unset means no request or limit."""

    @field_validator("gpus", "gpus_per_node")
    @classmethod
    def _check_gpu_count(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            checks.check_int_range(json_name(info), value, 1, checks.MAX_GPUS)
        return value

    @field_validator("gpu_resource_name")
    @classmethod
    def _check_resource_name(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_pattern(
            json_name(info),
            value,
            checks.RESOURCE_NAME_PATTERN,
            "an extended resource name such as nvidia.com/gpu",
            253,
        )

    @field_validator("node_selector")
    @classmethod
    def _check_node_selector(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_NODE_SELECTOR:
            raise checks.rejection(
                "nodeSelector", f"{len(value)} labels", f"at most {MAX_NODE_SELECTOR} labels"
            )
        for key, label in value.items():
            if len(label) > 63:
                raise checks.rejection(
                    f"nodeSelector[{key}]", label, "a label value of at most 63 characters"
                )
        return value

    @field_validator("tolerations")
    @classmethod
    def _check_tolerations(cls, value: list[Toleration]) -> list[Toleration]:
        if len(value) > MAX_TOLERATIONS:
            raise checks.rejection(
                "tolerations", f"{len(value)} items", f"at most {MAX_TOLERATIONS} tolerations"
            )
        return value

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        return checks.check_pattern(
            json_name(info), value, checks.QUANTITY_PATTERN, "a quantity such as 64Gi", 64
        )

    @model_validator(mode="after")
    def _check_nodes(self) -> ResourcesSpec:
        per_node = self.gpus_per_node
        if self.gpus is None or per_node is None:
            return self
        if self.gpus > per_node and self.gpus % per_node != 0:
            lower = self.gpus // per_node * per_node
            raise checks.rejection(
                "gpus",
                self.gpus,
                f"gpus must be at most gpusPerNode={per_node} or a multiple of it"
                f" (a run across nodes uses every GPU of each node); use {lower}"
                f" or {lower + per_node}",
            )
        return self

    def nodes(self, gpus: int) -> int:
        """Number of nodes (pods) ``gpus`` GPUs span (``gpus``: the resolved count)."""
        per_node = self.gpus_per_node
        return 1 if per_node is None or gpus <= per_node else gpus // per_node

    def gpus_per_pod(self, gpus: int) -> int:
        """GPUs each pod requests when the run uses ``gpus`` GPUs (the resolved count)."""
        return gpus // self.nodes(gpus)


class ParallelismSpec(ApiModel):
    """How the GPUs split the work: planned (``auto``) or given (``explicit``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_rule(
                    "self.mode == 'explicit'"
                    " || (!has(self.cfg) && !has(self.ulysses) && !has(self.ring))",
                    "cfg, ulysses and ring may be set only with mode explicit",
                    fieldPath=".mode",
                )
            ]
        }
    )

    mode: ParallelismMode = "auto"
    """``auto`` plans the degrees from the GPUs, heads and CFG; ``explicit`` uses
    cfg x ulysses x ring, whose product must equal the GPU count (``resources.gpus``, or
    the model's default when unset)."""
    cfg: int | None = Field(default=None, json_schema_extra={"minimum": 1, "maximum": 2})
    """CFG-parallel degree, 1 or 2 (explicit mode; default 1)."""
    ulysses: int | None = Field(
        default=None, json_schema_extra={"minimum": 1, "maximum": checks.MAX_GPUS}
    )
    """Ulysses context-parallel degree (explicit mode; default 1)."""
    ring: int | None = Field(
        default=None, json_schema_extra={"minimum": 1, "maximum": checks.MAX_GPUS}
    )
    """Ring-attention context-parallel degree (explicit mode; default 1)."""

    @field_validator("mode", mode="before")
    @classmethod
    def _check_mode(cls, value: object, info: ValidationInfo) -> object:
        return checks.check_choice(json_name(info), value, get_args(ParallelismMode))

    @field_validator("cfg")
    @classmethod
    def _check_cfg(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value not in (1, 2):
            raise checks.rejection(json_name(info), value, "cfg must be 1 or 2")
        return value

    @field_validator("ulysses", "ring")
    @classmethod
    def _check_degree(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            checks.check_int_range(json_name(info), value, 1, checks.MAX_GPUS)
        return value

    @model_validator(mode="after")
    def _check_mode_fields(self) -> ParallelismSpec:
        if self.mode == "auto":
            given = {
                name: value
                for name, value in (
                    ("cfg", self.cfg),
                    ("ulysses", self.ulysses),
                    ("ring", self.ring),
                )
                if value is not None
            }
            if given:
                raise checks.rejection(
                    "mode",
                    self.mode,
                    f"{', '.join(given)} may be set only with mode explicit"
                    " (set mode: explicit, or leave them out to plan automatically)",
                )
        return self

    def degrees(self) -> ParallelDegrees | None:
        """The explicit degrees (unset ones are 1), or None in auto mode."""
        if self.mode == "auto":
            return None
        return ParallelDegrees(cfg=self.cfg or 1, ulysses=self.ulysses or 1, ring=self.ring or 1)


class OutputSpec(ApiModel):
    """Where the MP4 goes."""

    uri: str = Field(
        json_schema_extra={"pattern": checks.S3_URI_PATTERN, "maxLength": checks.URI_MAX}
    )
    """``s3://bucket/key.mp4``, or a prefix ending in ``/`` (the object is then
    ``<prefix><namespace>/<name>.mp4``)."""
    credentials_secret: str | None = Field(
        default=None, json_schema_extra={"pattern": checks.K8S_NAME_PATTERN, "maxLength": 253}
    )
    """Secret (same namespace) with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    optionally AWS_ENDPOINT_URL / AWS_REGION; unset uses the pod's own identity."""

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_s3_uri(json_name(info), value)

    @field_validator("credentials_secret")
    @classmethod
    def _check_secret(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else checks.check_k8s_name(json_name(info), value)

    @property
    def bucket(self) -> str:
        """The S3 bucket."""
        return self.uri.removeprefix("s3://").partition("/")[0]

    @property
    def is_prefix(self) -> bool:
        """Whether ``uri`` names a prefix (ends in ``/`` or has no key)."""
        key = self.uri.removeprefix("s3://").partition("/")[2]
        return key == "" or key.endswith("/")

    def object_key(self, namespace: str, name: str) -> str:
        """The object key the video is uploaded to."""
        key = self.uri.removeprefix("s3://").partition("/")[2]
        return f"{key}{namespace}/{name}.mp4" if self.is_prefix else key

    def object_uri(self, namespace: str, name: str) -> str:
        """``s3://bucket/key`` of the video."""
        return f"s3://{self.bucket}/{self.object_key(namespace, name)}"
