"""The ``VideoGeneration`` resource (smartdiff.io/v1alpha1) and its spec.

Role: the user-facing API. A ``VideoGeneration`` says which model to run, the
prompt, the video shape, sampling and acceleration choices, the GPUs it may use and
how to split them, and where to upload the video; its status says how far it got.
The same models

- validate a manifest locally (``VideoGeneration.from_yaml_file``) with the rules
  and messages of ``UserParams`` (``smartdiff.api.checks``), naming the field path
  in camelCase (``spec.video.frames``);
- generate the CRD (``smartdiff.api.crd``): the CEL rules the API server enforces
  are declared next to the fields they guard (``x-kubernetes-validations``) and
  mirrored by the validators here;
- convert a spec into the engine's ``UserParams`` and ``SystemParams`` and plan
  its topology.

The sub-objects of the spec live in ``smartdiff.api.spec``, the status in
``smartdiff.api.status``. Talks to: ``params``, ``topology``; imported by the
operator and the CLI. No torch, no kopf.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from smartdiff.api import checks
from smartdiff.api.base import ApiModel, describe_errors, json_name
from smartdiff.api.params import SystemParams, UserParams
from smartdiff.api.spec import (
    AccelerationSpec,
    ModelRef,
    OutputSpec,
    ParallelismSpec,
    ResourcesSpec,
    SamplingSpec,
    VideoSpec,
    cel_rule,
)
from smartdiff.api.status import VideoGenerationStatus
from smartdiff.api.topology import (
    WAN_SPATIAL_COMPRESSION,
    Topology,
    plan_topology,
    resolve_gpus,
    video_tokens,
)

GROUP: Final = "smartdiff.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "VideoGeneration"
PLURAL: Final = "videogenerations"
SINGULAR: Final = "videogeneration"
SHORT_NAMES: Final = ("vg",)

# Label-value safe (Kueue puts the queue name in the kueue.x-k8s.io/queue-name label).
QUEUE_NAME_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

_PARALLEL = "self.parallelism"
_DEGREE = "(has(self.parallelism.{0}) ? self.parallelism.{0} : 1)"
_EXPLICIT_PRODUCT = " * ".join(_DEGREE.format(name) for name in ("cfg", "ulysses", "ring"))
_HAS_GPUS = "has(self.resources) && has(self.resources.gpus)"
_GUIDANCE = (
    "(has(self.sampling) && has(self.sampling.guidanceScale) ? self.sampling.guidanceScale : 5.0)"
)
SPEC_RULES: Final[list[JsonValue]] = [
    cel_rule("self == oldSelf", "spec is immutable"),
    cel_rule(
        f"!has({_PARALLEL}) || !has({_PARALLEL}.mode) || {_PARALLEL}.mode != 'explicit'"
        f" || !({_HAS_GPUS}) || {_EXPLICIT_PRODUCT} == self.resources.gpus",
        "parallelism: explicit cfg x ulysses x ring must equal resources.gpus",
        fieldPath=".parallelism",
    ),
    cel_rule(
        f"!has({_PARALLEL}) || !has({_PARALLEL}.cfg) || {_PARALLEL}.cfg == 1 || {_GUIDANCE} > 1.0",
        "parallelism.cfg 2 needs classifier-free guidance (sampling.guidanceScale > 1)",
        fieldPath=".parallelism.cfg",
    ),
]


class VideoGenerationSpec(ApiModel):
    """What to generate, with which resources, and where the video goes.

    Immutable after creation: a new video is a new resource.
    """

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": SPEC_RULES})

    model: ModelRef = Field(default_factory=ModelRef, json_schema_extra={"default": {}})
    """The model and its weights."""
    prompt: str = Field(
        json_schema_extra={"minLength": 1, "maxLength": checks.PROMPT_MAX_CHARS, "pattern": r"\S"}
    )
    """What the video shows."""
    negative_prompt: str = Field(
        default="", json_schema_extra={"maxLength": checks.PROMPT_MAX_CHARS}
    )
    """What the video should avoid."""
    image: str | None = Field(
        default=None,
        json_schema_extra={"pattern": checks.WEIGHTS_URI_PATTERN, "maxLength": checks.URI_MAX},
    )
    """Image-to-video (Wan2.2 TI2V models): the first frame (PNG, JPEG or WebP) as
    ``s3://bucket/key``, ``pvc://claim/path`` or ``file:///path``; unset for text-to-video."""
    video: VideoSpec = Field(default_factory=VideoSpec, json_schema_extra={"default": {}})
    """Size, length and frame rate."""
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, json_schema_extra={"default": {}})
    """Denoising steps, guidance, shift, solver and seed."""
    acceleration: AccelerationSpec = Field(
        default_factory=AccelerationSpec, json_schema_extra={"default": {}}
    )
    """Attention backend, step cache, memory level and dtype."""
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, json_schema_extra={"default": {}}
    )
    """GPUs, node selection and memory."""
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, json_schema_extra={"default": {}}
    )
    """How the GPUs split the work."""
    output: OutputSpec
    """Where the MP4 is uploaded."""
    queue_name: str | None = Field(
        default=None, json_schema_extra={"pattern": QUEUE_NAME_PATTERN, "maxLength": 63}
    )
    """Kueue LocalQueue to admit the Job through; unset runs it directly."""
    active_deadline_seconds: int | None = Field(default=None, json_schema_extra={"minimum": 1})
    """Seconds the Job may run before it is stopped and the generation fails."""
    backoff_limit: int = Field(default=0, json_schema_extra={"minimum": 0, "maximum": 100})
    """Retries of a failed pod before the generation fails."""
    ttl_seconds_after_finished: int | None = Field(default=None, json_schema_extra={"minimum": 0})
    """Seconds after completion until the Job (not this resource) is deleted."""

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _check_prompt(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_prompt(json_name(info), value, allow_empty=info.field_name != "prompt")

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else checks.check_weights_uri(json_name(info), value)

    @field_validator("queue_name")
    @classmethod
    def _check_queue(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        return checks.check_pattern(
            json_name(info), value, QUEUE_NAME_PATTERN, "a LocalQueue name (DNS label)", 63
        )

    @field_validator("active_deadline_seconds")
    @classmethod
    def _check_deadline(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            checks.check_int_range(json_name(info), value, 1)
        return value

    @field_validator("backoff_limit")
    @classmethod
    def _check_backoff(cls, value: int, info: ValidationInfo) -> int:
        return checks.check_int_range(json_name(info), value, 0, 100)

    @field_validator("ttl_seconds_after_finished")
    @classmethod
    def _check_ttl(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            checks.check_int_range(json_name(info), value, 0)
        return value

    @model_validator(mode="after")
    def _check_parallelism(self) -> VideoGenerationSpec:
        degrees = self.parallelism.degrees()
        if degrees is None:
            return self
        # Unset gpus: the operator checks the product against the model's default count.
        if self.resources.gpus is not None and degrees.world_size != self.resources.gpus:
            raise checks.rejection(
                "parallelism",
                {"cfg": degrees.cfg, "ulysses": degrees.ulysses, "ring": degrees.ring},
                f"explicit cfg x ulysses x ring = {degrees.world_size} must equal "
                f"resources.gpus={self.resources.gpus}",
            )
        if degrees.cfg == 2 and self.sampling.guidance_scale <= 1.0:
            raise checks.rejection(
                "parallelism.cfg",
                degrees.cfg,
                "cfg 2 needs classifier-free guidance, but "
                f"sampling.guidanceScale={self.sampling.guidance_scale} <= 1 runs one branch",
            )
        return self

    @property
    def tokens(self) -> int:
        """Transformer sequence length of the requested video (Wan2.1 VAE and patching)."""
        return self.tokens_for(WAN_SPATIAL_COMPRESSION)

    def tokens_for(self, spatial_compression: int) -> int:
        """Sequence length with a VAE of ``spatial_compression`` (Wan2.2 TI2V-5B: 16)."""
        return video_tokens(
            width=self.video.width,
            height=self.video.height,
            frames=self.video.frames,
            spatial_compression=spatial_compression,
        )

    def resolved_gpus(self, model_default: int | None = None) -> int:
        """The GPU count this spec runs on: ``resources.gpus``, else ``model_default``
        (the catalog's ``defaultGpus``), else 1 (``smartdiff.api.topology.resolve_gpus``)."""
        return resolve_gpus(self.resources.gpus, model_default)

    def plan_topology(
        self,
        num_heads: int,
        *,
        default_gpus: int | None = None,
        spatial_compression: int = WAN_SPATIAL_COMPRESSION,
        uneven_heads: bool = True,
    ) -> Topology:
        """Plan (auto) or check (explicit) the topology for a model with ``num_heads``.

        Args:
            num_heads: attention heads of the model's transformer.
            default_gpus: the GPU count when ``resources.gpus`` is unset (the model
                catalog's ``defaultGpus``, or the count the operator resolved); None: 1.
            spatial_compression: the model's VAE spatial compression (8; TI2V-5B: 16).
            uneven_heads: whether the runtime accepts an uneven Ulysses head split.

        Raises:
            ValueError: the GPUs cannot be split this way; the message says why.
        """
        return plan_topology(
            gpus=self.resolved_gpus(default_gpus),
            gpus_per_node=self.resources.gpus_per_node,
            num_heads=num_heads,
            tokens=self.tokens_for(spatial_compression),
            do_cfg=self.sampling.guidance_scale > 1.0,
            explicit=self.parallelism.degrees(),
            uneven_heads=uneven_heads,
        )

    def to_user_params(self) -> UserParams:
        """The engine request this spec describes."""
        return UserParams(
            model=self.model.name,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.video.width,
            height=self.video.height,
            frames=self.video.frames,
            fps=self.video.fps,
            steps=self.sampling.steps,
            guidance_scale=self.sampling.guidance_scale,
            guidance_scale_2=self.sampling.guidance_scale_2,
            image=self.image,
            shift=self.sampling.shift,
            seed=self.sampling.seed,
            solver=self.sampling.solver,
            cache=self.acceleration.cache.to_policy(),
        )

    def to_system_params(self, topology: Topology, *, device: str = "auto") -> SystemParams:
        """The per-process settings of one rank running this spec on ``topology``."""
        return SystemParams(
            device=device,
            dtype=self.acceleration.dtype,
            attention=self.acceleration.attention,
            memory_level=self.acceleration.memory_level,
            cfg=topology.cfg,
            ulysses=topology.ulysses,
            ring=topology.ring,
        )


class ManifestError(ValueError):
    """A manifest that cannot be used; the message lists every problem with its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        if len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            listed = "\n".join(f"  - {problem}" for problem in problems)
            text = f"{source}: {len(problems)} problems in the VideoGeneration:\n{listed}"
        super().__init__(text)


class VideoGeneration(ApiModel):
    """A text-to-video generation request and its observed state."""

    api_version: Literal["smartdiff.io/v1alpha1"] = "smartdiff.io/v1alpha1"
    """``smartdiff.io/v1alpha1``."""
    kind: Literal["VideoGeneration"] = "VideoGeneration"
    """``VideoGeneration``."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Object metadata (name, namespace, labels, ...), kept as given."""
    spec: VideoGenerationSpec
    """The request."""
    status: VideoGenerationStatus | None = None
    """The observed state (written by the operator and the runtime)."""

    @property
    def name(self) -> str:
        """``metadata.name`` (empty if unset)."""
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        """``metadata.namespace`` (``default`` if unset)."""
        return str(self.metadata.get("namespace") or "default")

    def to_manifest(self) -> dict[str, Any]:
        """The JSON-ready manifest (camelCase, unset optional fields left out)."""
        return self.to_json_dict()

    @classmethod
    def from_manifest(cls, manifest: object, *, source: str = "manifest") -> VideoGeneration:
        """Validate a parsed manifest (a mapping, as from YAML or the API server).

        Raises:
            ManifestError: one error listing every problem with its camelCase path.
        """
        if not isinstance(manifest, Mapping):
            raise ManifestError(
                source, [f"expected a mapping (a VideoGeneration object), got {_kind(manifest)}"]
            )
        problems = _identity_problems(manifest)
        if problems:
            raise ManifestError(source, problems)
        try:
            return cls.model_validate(dict(manifest))
        except ValidationError as error:
            raise ManifestError(source, describe_errors(error, cls)) from None

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<string>") -> VideoGeneration:
        """Parse and validate one YAML document."""
        try:
            documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ManifestError(source, [f"not valid YAML{where}: {problem}"]) from None
        if len(documents) != 1:
            raise ManifestError(
                source, [f"expected exactly one YAML document, found {len(documents)}"]
            )
        return cls.from_manifest(documents[0], source=source)

    @classmethod
    def from_yaml_file(cls, path: str | Path) -> VideoGeneration:
        """Read, parse and validate a manifest file.

        Raises:
            ManifestError: unreadable file, not YAML, wrong kind or apiVersion, or
                invalid fields (each named by its path, e.g. ``spec.video.frames``).
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ManifestError(str(path), [f"cannot read the manifest: {reason}"]) from None
        return cls.from_yaml(text, source=str(path))


def _identity_problems(manifest: Mapping[Any, Any]) -> list[str]:
    """Wrong or missing ``kind`` / ``apiVersion``, checked before the fields."""
    problems = []
    kind = manifest.get("kind")
    if kind != KIND:
        problems.append(f"kind={kind!r} is not allowed: expected kind {KIND}")
    api_version = manifest.get("apiVersion")
    if api_version != API_VERSION:
        problems.append(
            f"apiVersion={api_version!r} is not allowed: expected apiVersion {API_VERSION}"
        )
    return problems


def _kind(value: object) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r:.60}"
