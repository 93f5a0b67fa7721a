"""Status computed from observation: a pure function of the Job, its Pods and the spec.

Role: ``compute_status`` turns what the operator observed (the generation as
stored, its Job, the Job's Pods, the validation verdict, the planned topology)
into the operator-owned part of ``.status``: ``phase``, four conditions,
``observedGeneration``, ``topology``, ``jobName``, ``startTime`` and
``completionTime``. Fields the runtime writes (``progress``, ``output``,
``timings``, the ``Uploaded`` condition) are read, never produced, here.

Conditions (metav1 style; one per type, ``lastTransitionTime`` kept while the
status stays the same):

- ``Suspended``: the Job waits for admission (Kueue) -> phase ``Queued``;
- ``Running``: all pods run (True); otherwise False with the reason that holds
  it up: ``Unschedulable``, ``ImagePullBackOff``, ``CreateContainerConfigError``,
  ``BackOff`` (waiting to retry a failed pod), ``PodsPending``, ...;
- ``Complete``: the Job succeeded -> ``Succeeded``;
- ``Failed``: the generation will not finish -> ``Failed``, with the most telling
  reason: ``InvalidSpec``/``UnknownModel``/``ImpossibleTopology`` (never ran),
  ``DeadlineExceeded``, the runtime's own reason from its termination message
  (``UploadFailed``, ``InvalidRequest``, ...), ``OOMKilled``, else the Job's
  (``BackoffLimitExceeded``); the message carries the last pod's exit code.

``check_consistent`` rejects contradicting conditions (KubeRay's rule), and
``status_patch`` returns only what changed, so status is written only on change.
``transition_events`` says which Kubernetes Events a change deserves.

Talks to: ``smartdiff.api.status`` (models), ``names``. No API calls, no clock.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

from smartdiff.api.status import (
    CONDITION_REASON_PATTERN,
    Condition,
    TopologyStatus,
    VideoGenerationStatus,
    upsert_condition,
)
from smartdiff.api.topology import Topology
from smartdiff_operator import names

SUSPENDED: Final = "Suspended"
RUNNING: Final = "Running"
COMPLETE: Final = "Complete"
FAILED: Final = "Failed"
OPERATOR_CONDITIONS: Final = (SUSPENDED, RUNNING, COMPLETE, FAILED)
UPLOADED: Final = "Uploaded"
"""Condition type the runtime writes (True: uploaded; False, UploadFailed: kept locally)."""

OPERATOR_FIELDS: Final = (
    "phase",
    "conditions",
    "observedGeneration",
    "topology",
    "jobName",
    "startTime",
    "completionTime",
)
TERMINAL_PHASES: Final = ("Succeeded", "Failed")
# Why a container cannot start (kubelet waiting reasons worth surfacing).
WAITING_REASONS: Final = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
        "RunContainerError",
    }
)
MESSAGE_MAX: Final = 4000
_REASON = re.compile(CONDITION_REASON_PATTERN)


class StatusContradiction(AssertionError):
    """Computed conditions contradict each other (a bug in this module)."""


@dataclass(frozen=True)
class Observation:
    """What the operator saw of one generation.

    Attributes:
        job_name: the Job's deterministic name.
        job: the Job as read (None: not created yet, or deleted after finishing).
        pods: the Job's pods (any state).
        invalid: ``(reason, message)`` when the spec can never run, else None.
        topology: the planned topology of a valid spec.
    """

    job_name: str
    job: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = ()
    invalid: tuple[str, str] | None = None
    topology: Topology | None = None


@dataclass(frozen=True)
class Verdict:
    """One condition's computed value."""

    status: str
    reason: str
    message: str = ""


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post on the generation."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class PodExit:
    """How a pod's runtime container ended."""

    pod: str
    exit_code: int | None
    reason: str
    message: str
    finished_at: str
    runtime_reason: str | None = None
    runtime_message: str | None = None

    def describe(self) -> str:
        code = "?" if self.exit_code is None else str(self.exit_code)
        detail = self.runtime_message or self.message
        text = f"pod {self.pod} exited with code {code} ({self.reason})"
        return f"{text}: {detail}" if detail else text


def parse_status(raw: object) -> VideoGenerationStatus:
    """The stored status (an empty one if absent or unreadable)."""
    if not isinstance(raw, Mapping):
        return VideoGenerationStatus()
    try:
        return VideoGenerationStatus.model_validate(dict(raw))
    except ValidationError:
        kept = {key: raw[key] for key in ("progress", "output", "timings") if key in raw}
        try:
            return VideoGenerationStatus.model_validate(kept)
        except ValidationError:
            return VideoGenerationStatus()


def compute_status(
    vg: Mapping[str, Any], observation: Observation, now: datetime
) -> VideoGenerationStatus:
    """The status ``vg`` should have, given ``observation`` at time ``now`` (UTC, aware)."""
    previous = parse_status(vg.get("status"))
    generation = vg.get("metadata", {}).get("generation")
    if observation.job is None and previous.phase in TERMINAL_PHASES and not observation.invalid:
        return previous  # the Job was removed after it finished (TTL): keep the outcome
    now = now.replace(microsecond=0)
    phase, verdicts = _assess(observation, previous)
    conditions = list(previous.conditions)
    for condition_type in OPERATOR_CONDITIONS:
        verdict = verdicts[condition_type]
        conditions = upsert_condition(
            conditions,
            Condition(
                type=condition_type,
                status=verdict.status,  # type: ignore[arg-type]  # one of True/False
                reason=verdict.reason,
                message=verdict.message[:MESSAGE_MAX],
                last_transition_time=now,
                observed_generation=generation,
            ),
        )
    job = observation.job or {}
    job_status = job.get("status", {})
    start = job_status.get("startTime") or previous.start_time
    completion: object = previous.completion_time
    if phase in TERMINAL_PHASES and completion is None:
        completion = job_status.get("completionTime") or _failed_time(job) or now
    topology = (
        TopologyStatus.from_topology(observation.topology)
        if observation.topology is not None
        else previous.topology
    )
    status = previous.model_copy(
        update={
            "phase": phase,
            "conditions": conditions,
            "observed_generation": generation,
            "topology": topology,
            "job_name": observation.job_name if observation.job is not None else previous.job_name,
        }
    )
    # Round-trip through validation: timestamps parsed, derived fields filled in.
    data = status.model_dump(by_alias=True, exclude_none=True)
    data["startTime"] = start
    data["completionTime"] = completion
    result = VideoGenerationStatus.model_validate(
        {key: value for key, value in data.items() if value is not None}
    )
    check_consistent(result)
    return result


def _assess(
    observation: Observation, previous: VideoGenerationStatus
) -> tuple[str, dict[str, Verdict]]:
    """The phase and the four operator conditions."""
    if observation.invalid is not None:
        reason, message = observation.invalid
        return "Failed", _verdicts(
            failed=Verdict("True", reason, message), not_reason=reason, phase="Failed"
        )
    job = observation.job
    if job is None:
        return "Pending", _verdicts(
            running=Verdict("False", "Creating", "creating the Job"), not_reason="Pending"
        )
    job_conditions = {
        c.get("type"): c
        for c in job.get("status", {}).get("conditions") or []
        if c.get("status") == "True"
    }
    current = _current_pods(job, observation.pods)
    if "Failed" in job_conditions or "FailureTarget" in job_conditions:
        cause = job_conditions.get("Failed") or job_conditions["FailureTarget"]
        reason, message = _failure(cause, current, previous)
        return "Failed", _verdicts(
            failed=Verdict("True", reason, message), not_reason="JobFailed", phase="Failed"
        )
    if "Complete" in job_conditions or "SuccessCriteriaMet" in job_conditions:
        where = f": {previous.output.uri}" if previous.output is not None else ""
        return "Succeeded", _verdicts(
            complete=Verdict("True", "Succeeded", f"the video was generated{where}"),
            not_reason="Succeeded",
            phase="Succeeded",
        )
    if job.get("spec", {}).get("suspend"):
        queue = job.get("metadata", {}).get("labels", {}).get(names.KUEUE_QUEUE_LABEL)
        if queue:
            verdict = Verdict(
                "True", "QueuedByKueue", f"waiting for Kueue to admit the Job (LocalQueue {queue})"
            )
        else:
            verdict = Verdict("True", "JobSuspended", "the Job is suspended")
        return "Queued", _verdicts(
            suspended=verdict,
            running=Verdict("False", "Suspended", verdict.message),
            not_reason="Queued",
        )
    wanted = observation.topology.nodes if observation.topology is not None else 1
    running = _running(current, wanted, job)
    phase = "Running" if running.status == "True" else "Pending"
    return phase, _verdicts(running=running, not_reason=phase)


def _verdicts(
    *,
    not_reason: str,
    suspended: Verdict | None = None,
    running: Verdict | None = None,
    complete: Verdict | None = None,
    failed: Verdict | None = None,
    phase: str | None = None,
) -> dict[str, Verdict]:
    """Given conditions as passed; the others False with ``not_reason``."""
    idle = Verdict("False", not_reason)
    if running is None and phase is not None:
        running = Verdict("False", not_reason)
    return {
        SUSPENDED: suspended or idle,
        RUNNING: running or idle,
        COMPLETE: complete or idle,
        FAILED: failed or idle,
    }


def _current_pods(
    job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """Pods of this very Job (a Job re-created under the same name has a new uid)."""
    uid = job.get("metadata", {}).get("uid")
    result = []
    for pod in pods:
        labels = pod.get("metadata", {}).get("labels", {})
        owner_uid = labels.get(names.LABEL_CONTROLLER_UID)
        if uid is None or owner_uid in (None, uid):
            result.append(pod)
    return result


def _running(pods: Sequence[Mapping[str, Any]], wanted: int, job: Mapping[str, Any]) -> Verdict:
    active = [
        p
        for p in pods
        if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
        and not p.get("metadata", {}).get("deletionTimestamp")
    ]
    running = [p for p in active if p.get("status", {}).get("phase") == "Running"]
    if active and len(running) >= wanted:
        nodes = sorted({str(p.get("spec", {}).get("nodeName", "?")) for p in running})
        return Verdict(
            "True", "PodsRunning", f"{len(running)}/{wanted} pods running on {', '.join(nodes)}"
        )
    for pod in active:
        blocked = _blocked(pod)
        if blocked is not None:
            return blocked
    succeeded = [p for p in pods if p.get("status", {}).get("phase") == "Succeeded"]
    if not active and succeeded:
        # The Job controller has not counted them yet: still running, not pending.
        return Verdict(
            "True",
            "PodsSucceeded",
            f"{len(succeeded)}/{wanted} pods finished; waiting for the Job to complete",
        )
    failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
    if not active and failed:
        last = _last_exit(failed)
        count = int(job.get("status", {}).get("failed") or len(failed))
        limit = int(job.get("spec", {}).get("backoffLimit") or 0)
        detail = last.describe() if last is not None else "a pod failed"
        return Verdict(
            "False", "BackOff", f"{detail}; retrying (failure {count} of {limit + 1} allowed)"
        )
    return Verdict("False", "PodsPending", f"{len(running)}/{wanted} pods running")


def _blocked(pod: Mapping[str, Any]) -> Verdict | None:
    """Why ``pod`` cannot run (unschedulable, image pull, config), if it says so."""
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status", {})
    for condition in status.get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            return Verdict("False", "Unschedulable", f"pod {name}: {condition.get('message', '')}")
    for container in status.get("containerStatuses") or []:
        waiting = container.get("state", {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in WAITING_REASONS:
            return Verdict("False", str(reason), f"pod {name}: {waiting.get('message', reason)}")
    return None


def runtime_report(message: str) -> tuple[str, str] | None:
    """``(reason, message)`` from a worker's JSON termination message, if it is one."""
    try:
        data = json.loads(message)
    except (TypeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    reason, text = data.get("reason"), data.get("message", "")
    if not isinstance(reason, str) or not _REASON.match(reason) or not isinstance(text, str):
        return None
    return reason, text


def pod_exit(pod: Mapping[str, Any]) -> PodExit | None:
    """How the runtime container of a finished pod ended (None if not terminated)."""
    name = str(pod.get("metadata", {}).get("name", "?"))
    for container in pod.get("status", {}).get("containerStatuses") or []:
        if container.get("name") != names.CONTAINER:
            continue
        terminated = container.get("state", {}).get("terminated")
        if not terminated:
            continue
        message = str(terminated.get("message") or "").strip()
        report = runtime_report(message)
        code = terminated.get("exitCode")
        return PodExit(
            pod=name,
            exit_code=int(code) if code is not None else None,
            reason=str(terminated.get("reason") or "Error"),
            message=message,
            finished_at=str(terminated.get("finishedAt") or ""),
            runtime_reason=report[0] if report else None,
            runtime_message=report[1] if report else None,
        )
    return None


def _last_exit(pods: Sequence[Mapping[str, Any]]) -> PodExit | None:
    exits = [e for e in (pod_exit(p) for p in pods) if e is not None and e.exit_code != 0]
    return max(exits, key=lambda e: (e.finished_at, e.pod)) if exits else None


def _failure(
    cause: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    previous: VideoGenerationStatus,
) -> tuple[str, str]:
    """The Failed condition's reason and message."""
    job_reason = str(cause.get("reason") or "JobFailed")
    job_message = str(cause.get("message") or "the Job failed").rstrip(".")
    last = _last_exit([p for p in pods if p.get("status", {}).get("phase") == "Failed"])
    uploaded = previous.condition(UPLOADED)
    runtime: tuple[str, str] | None = None
    if last is not None and last.runtime_reason is not None:
        runtime = (last.runtime_reason, last.runtime_message or "")
    elif uploaded is not None and uploaded.status == "False":
        runtime = (uploaded.reason, uploaded.message)
    if job_reason == "DeadlineExceeded":
        reason = job_reason
    elif runtime is not None:
        reason = runtime[0]
    elif last is not None and last.reason == "OOMKilled":
        reason = "OOMKilled"
    else:
        reason = job_reason if _REASON.match(job_reason) else "JobFailed"
    parts = [f"{job_message} ({job_reason})"]
    if last is not None:
        parts.append(f"last failure: {last.describe()}")
    elif runtime is not None:
        parts.append(f"runtime: {runtime[1]}")
    return reason, "; ".join(parts)


def _failed_time(job: Mapping[str, Any]) -> str | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") in ("Failed", "Complete") and condition.get("status") == "True":
            value = condition.get("lastTransitionTime")
            return str(value) if value else None
    return None


def check_consistent(status: VideoGenerationStatus) -> None:
    """Raise ``StatusContradiction`` if the conditions or the phase contradict each other."""

    def is_true(condition_type: str) -> bool:
        condition = status.condition(condition_type)
        return condition is not None and condition.status == "True"

    finished = [t for t in (COMPLETE, FAILED) if is_true(t)]
    if len(finished) > 1:
        raise StatusContradiction("Complete and Failed are both True")
    if finished and (is_true(RUNNING) or is_true(SUSPENDED)):
        raise StatusContradiction(f"{finished[0]} is True while Running or Suspended is True")
    if is_true(RUNNING) and is_true(SUSPENDED):
        raise StatusContradiction("Running and Suspended are both True")
    expected = (
        "Failed"
        if is_true(FAILED)
        else "Succeeded"
        if is_true(COMPLETE)
        else "Running"
        if is_true(RUNNING)
        else "Queued"
        if is_true(SUSPENDED)
        else "Pending"
    )
    if status.conditions and status.phase != expected:
        raise StatusContradiction(f"phase {status.phase} but the conditions say {expected}")


def status_patch(stored: object, computed: VideoGenerationStatus) -> dict[str, Any] | None:
    """The merge patch of ``.status`` from ``stored`` to ``computed`` (operator fields only).

    None when nothing the operator owns changed (then nothing is written).
    """
    before = parse_status(stored).to_json_dict()
    after = computed.to_json_dict()
    patch = {key: after.get(key) for key in OPERATOR_FIELDS if before.get(key) != after.get(key)}
    return patch or None


def transition_events(
    before: VideoGenerationStatus, after: VideoGenerationStatus
) -> list[EventSpec]:
    """Events for a status change: one per phase transition, one per new blocking reason."""
    events: list[EventSpec] = []
    if after.phase != before.phase and after.phase is not None:
        if after.phase == "Failed":
            failed = after.condition(FAILED)
            reason = failed.reason if failed is not None else "Failed"
            events.append(EventSpec("Warning", reason, failed.message if failed else "failed"))
        else:
            source = {
                "Succeeded": COMPLETE,
                "Queued": SUSPENDED,
                "Running": RUNNING,
                "Pending": RUNNING,
            }[after.phase]
            condition = after.condition(source)
            message = (
                condition.message if condition is not None and condition.message else after.phase
            )
            events.append(EventSpec("Normal", after.phase, message))
    old_running, new_running = before.condition(RUNNING), after.condition(RUNNING)
    if (
        new_running is not None
        and new_running.status == "False"
        and new_running.reason in WAITING_REASONS | {"Unschedulable", "BackOff"}
        and (old_running is None or old_running.reason != new_running.reason)
    ):
        events.append(EventSpec("Warning", new_running.reason, new_running.message))
    return events
