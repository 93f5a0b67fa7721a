"""The status of a ``VideoGeneration``: what the operator and the runtime observed.

Role: pydantic models of ``.status``. The operator computes ``phase``,
``conditions``, ``topology``, ``jobName`` and the times from the Job and Pods it
observes; the runtime pod patches ``progress``, ``output`` and ``timings`` through
its own ServiceAccount. ``phase`` is for humans and printer columns, ``conditions``
(metav1.Condition shape, with ``observedGeneration``) for machines.

Printer-column sources are plain fields so JSONPath can read them:
``progress.display`` ("12/50") and ``topology.summary`` ("cfg2xu2"); both are
derived on validation from the numbers next to them, so they never disagree.
Talks to: ``videogeneration`` (embeds the status), ``topology`` (``Topology``),
``crd`` (schema); the operator and runtime build and patch it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import (
    AwareDatetime,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from smartdiff.api import checks
from smartdiff.api.base import ApiModel, json_name
from smartdiff.api.topology import Topology, degrees_summary

Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]

PHASES: Final[tuple[str, ...]] = get_args(Phase)
CONDITION_STATUSES: Final[tuple[str, ...]] = get_args(ConditionStatus)

# The metav1.Condition rules (k8s.io/apimachinery/pkg/apis/meta/v1/types.go).
CONDITION_TYPE_PATTERN: Final = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN: Final = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
MAX_CONDITIONS: Final = 32

# Timestamps arrive as RFC 3339 strings from the API server: parse them (not strict).
Timestamp = Annotated[AwareDatetime, Field(strict=False)]


class Condition(ApiModel):
    """One observation of an aspect of the resource (metav1.Condition)."""

    type: str = Field(json_schema_extra={"pattern": CONDITION_TYPE_PATTERN, "maxLength": 316})
    """Condition type in CamelCase, e.g. ``Ready``, ``Complete`` or ``Failed``."""
    status: ConditionStatus
    """``True``, ``False`` or ``Unknown``."""
    reason: str = Field(
        json_schema_extra={
            "pattern": CONDITION_REASON_PATTERN,
            "minLength": 1,
            "maxLength": 1024,
        }
    )
    """Programmatic CamelCase identifier of the last transition's cause."""
    message: str = Field(default="", json_schema_extra={"maxLength": 32768})
    """Human-readable details of the last transition."""
    last_transition_time: Timestamp
    """When the condition last changed status."""
    observed_generation: int | None = Field(default=None, json_schema_extra={"minimum": 0})
    """``metadata.generation`` the condition was computed from."""

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_pattern(
            json_name(info), value, CONDITION_TYPE_PATTERN, "a CamelCase condition type", 316
        )

    @field_validator("status", mode="before")
    @classmethod
    def _check_status(cls, value: object, info: ValidationInfo) -> object:
        return checks.check_choice(json_name(info), value, CONDITION_STATUSES)

    @field_validator("reason")
    @classmethod
    def _check_reason(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_pattern(
            json_name(info), value, CONDITION_REASON_PATTERN, "a CamelCase reason", 1024
        )

    @field_validator("message")
    @classmethod
    def _check_message(cls, value: str, info: ValidationInfo) -> str:
        if len(value) > 32768:
            raise checks.rejection(
                json_name(info), f"{value[:40]}...", "message must be at most 32768 characters"
            )
        return value

    @field_validator("observed_generation")
    @classmethod
    def _check_generation(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            checks.check_int_range(json_name(info), value, 0)
        return value


class TopologyStatus(ApiModel):
    """The planned topology: nodes x GPUs per node, split as cfg x ulysses x ring."""

    nodes: int = Field(json_schema_extra={"minimum": 1})
    """Number of nodes (pods) the run spans."""
    gpus_per_node: int = Field(json_schema_extra={"minimum": 1})
    """GPUs used on each node."""
    cfg: int = Field(json_schema_extra={"minimum": 1, "maximum": 2})
    """CFG-parallel degree."""
    ulysses: int = Field(json_schema_extra={"minimum": 1})
    """Ulysses context-parallel degree."""
    ring: int = Field(json_schema_extra={"minimum": 1})
    """Ring-attention context-parallel degree."""
    summary: str = ""
    """Short label for printer columns (``cfg2xu2``, ``single``); derived from the degrees."""
    gpus: int | None = Field(default=None, json_schema_extra={"minimum": 1})
    """GPUs the run uses (nodes x gpusPerNode; the spec's count or the model's default);
    derived, for the GPUs printer column."""

    @model_validator(mode="before")
    @classmethod
    def _derive_summary(cls, data: Any) -> Any:
        if isinstance(data, dict):
            degrees = [data.get(key, 1) for key in ("cfg", "ulysses", "ring")]
            if all(type(degree) is int for degree in degrees):
                data = {**data, "summary": degrees_summary(*degrees)}
            layout = [data.get("nodes"), data.get("gpusPerNode", data.get("gpus_per_node"))]
            if all(type(count) is int for count in layout):
                data = {**data, "gpus": layout[0] * layout[1]}
        return data

    @model_validator(mode="after")
    def _check_consistent(self) -> TopologyStatus:
        self.to_topology()
        return self

    @classmethod
    def from_topology(cls, topology: Topology) -> TopologyStatus:
        """The status form of a planned ``Topology``."""
        return cls(
            nodes=topology.nodes,
            gpus_per_node=topology.gpus_per_node,
            cfg=topology.cfg,
            ulysses=topology.ulysses,
            ring=topology.ring,
        )

    def to_topology(self) -> Topology:
        """The ``Topology`` this status records (raises ValueError if inconsistent)."""
        try:
            return Topology(self.nodes, self.gpus_per_node, self.cfg, self.ulysses, self.ring)
        except ValueError as error:
            raise checks.rejection("topology", self.summary or "?", str(error)) from None


class ProgressStatus(ApiModel):
    """How far denoising has come."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.step <= self.totalSteps", "message": "step must be <= totalSteps"}
            ]
        }
    )

    step: int = Field(json_schema_extra={"minimum": 0})
    """Denoising steps completed."""
    total_steps: int = Field(json_schema_extra={"minimum": 1})
    """Denoising steps in total."""
    display: str = ""
    """``step/totalSteps`` for printer columns; derived."""

    @model_validator(mode="before")
    @classmethod
    def _derive_display(cls, data: Any) -> Any:
        if isinstance(data, dict):
            step = data.get("step")
            total = data.get("totalSteps", data.get("total_steps"))
            if type(step) is int and type(total) is int:
                return {**data, "display": f"{step}/{total}"}
        return data

    @model_validator(mode="after")
    def _check_step(self) -> ProgressStatus:
        checks.check_int_range("step", self.step, 0, self.total_steps)
        checks.check_int_range("totalSteps", self.total_steps, 1)
        return self


class OutputStatus(ApiModel):
    """The uploaded video."""

    uri: str = Field(json_schema_extra={"pattern": checks.S3_URI_PATTERN, "maxLength": 2048})
    """``s3://bucket/key`` of the MP4."""
    size_bytes: int | None = Field(default=None, alias="bytes", json_schema_extra={"minimum": 0})
    """Size of the object in bytes."""
    sha256: str | None = Field(default=None, json_schema_extra={"pattern": SHA256_PATTERN})
    """Lowercase hex SHA-256 of the object."""

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: str, info: ValidationInfo) -> str:
        return checks.check_s3_uri(json_name(info), value)

    @field_validator("size_bytes")
    @classmethod
    def _check_size(cls, value: int | None) -> int | None:
        if value is not None:
            checks.check_int_range("bytes", value, 0)
        return value

    @field_validator("sha256")
    @classmethod
    def _check_sha(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            checks.check_pattern(
                json_name(info), value, SHA256_PATTERN, "64 lowercase hex digits", 64
            )
        return value


class TimingsStatus(ApiModel):
    """Wall-clock seconds of each stage (the runtime reports them)."""

    load_seconds: float | None = Field(default=None, json_schema_extra={"minimum": 0})
    """Loading checkpoints and building the models."""
    encode_seconds: float | None = Field(default=None, json_schema_extra={"minimum": 0})
    """Text encoding."""
    denoise_seconds: float | None = Field(default=None, json_schema_extra={"minimum": 0})
    """The denoising loop."""
    decode_seconds: float | None = Field(default=None, json_schema_extra={"minimum": 0})
    """VAE decoding and video encoding."""
    upload_seconds: float | None = Field(default=None, json_schema_extra={"minimum": 0})
    """Uploading the video."""

    @field_validator("*")
    @classmethod
    def _check_seconds(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None:
            checks.check_float_range(json_name(info), value, 0.0, 1e9)
        return value


class VideoGenerationStatus(ApiModel):
    """Observed state of a ``VideoGeneration``."""

    phase: Phase | None = None
    """``Pending``, ``Queued``, ``Running``, ``Succeeded`` or ``Failed``."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={
            "maxItems": MAX_CONDITIONS,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    """Latest observations, one per type."""
    observed_generation: int | None = Field(default=None, json_schema_extra={"minimum": 0})
    """``metadata.generation`` this status was computed from."""
    topology: TopologyStatus | None = None
    """The planned topology."""
    progress: ProgressStatus | None = None
    """Denoising progress."""
    output: OutputStatus | None = None
    """The uploaded video."""
    timings: TimingsStatus | None = None
    """Stage durations."""
    job_name: str | None = Field(
        default=None, json_schema_extra={"pattern": checks.K8S_NAME_PATTERN, "maxLength": 253}
    )
    """Name of the owned Job."""
    start_time: Timestamp | None = None
    """When the Job started."""
    completion_time: Timestamp | None = None
    """When the generation finished (succeeded or failed)."""

    @field_validator("phase", mode="before")
    @classmethod
    def _check_phase(cls, value: object, info: ValidationInfo) -> object:
        return None if value is None else checks.check_choice(json_name(info), value, PHASES)

    @field_validator("conditions")
    @classmethod
    def _check_unique(cls, value: list[Condition]) -> list[Condition]:
        types = [condition.type for condition in value]
        duplicates = sorted({name for name in types if types.count(name) > 1})
        if duplicates:
            raise checks.rejection(
                "conditions", types, f"one condition per type (repeated: {duplicates})"
            )
        if len(value) > MAX_CONDITIONS:
            raise checks.rejection("conditions", types, f"at most {MAX_CONDITIONS} conditions")
        return value

    @field_validator("job_name")
    @classmethod
    def _check_job_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else checks.check_k8s_name(json_name(info), value)

    def condition(self, condition_type: str) -> Condition | None:
        """The condition of ``condition_type``, if present."""
        return next((c for c in self.conditions if c.type == condition_type), None)


def upsert_condition(conditions: Iterable[Condition], new: Condition) -> list[Condition]:
    """``conditions`` with ``new`` set, as apimachinery's ``meta.SetStatusCondition``.

    A condition of the same type is replaced; if its status did not change, its
    ``lastTransitionTime`` is kept (a transition is a change of status).
    """
    result: list[Condition] = []
    replaced = False
    for old in conditions:
        if old.type != new.type:
            result.append(old)
            continue
        replaced = True
        if old.status == new.status:
            new = new.model_copy(update={"last_transition_time": old.last_transition_time})
        result.append(new)
    if not replaced:
        result.append(new)
    return result
