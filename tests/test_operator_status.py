"""Status computed from observation: phases, condition reasons, times, patches, events.

Pure tests of ``smartdiff_operator.status`` over Job and Pod objects shaped as
the API server returns them (the cluster tests check the same code against the
real Job controller). Every computed status also passes ``check_consistent``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from smartdiff.api.status import VideoGenerationStatus
from smartdiff.api.topology import Topology
from smartdiff_operator import names
from smartdiff_operator.status import (
    Observation,
    StatusContradiction,
    check_consistent,
    compute_status,
    status_patch,
    transition_events,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
JOB_UID = "job-uid-1"
ONE = Topology(nodes=1, gpus_per_node=1, cfg=1, ulysses=1, ring=1)
TWO_NODES = Topology(nodes=2, gpus_per_node=8, cfg=2, ulysses=8, ring=1)


def vg(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "smartdiff.io/v1alpha1",
        "kind": "VideoGeneration",
        "metadata": {"name": "cat", "namespace": "ns", "uid": "vg-uid", "generation": generation},
        "spec": {"prompt": "a cat", "output": {"uri": "s3://videos/"}},
    }
    if status is not None:
        body["status"] = status
    return body


def job(
    *conditions: tuple[str, str, str],
    suspend: bool = False,
    queue: str | None = None,
    **status: Any,
) -> dict[str, Any]:
    labels = {names.LABEL_MANAGED_BY: names.MANAGER}
    if queue:
        labels[names.KUEUE_QUEUE_LABEL] = queue
    return {
        "metadata": {"name": "cat", "uid": JOB_UID, "labels": labels},
        "spec": {"suspend": suspend, "backoffLimit": 1},
        "status": {
            "conditions": [
                {
                    "type": t,
                    "status": "True",
                    "reason": r,
                    "message": m,
                    "lastTransitionTime": "2026-03-01T12:05:00Z",
                }
                for t, r, m in conditions
            ],
            **status,
        },
    }


def pod(name: str, phase: str, *, node: str = "gpu-node-0", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {names.LABEL_CONTROLLER_UID: JOB_UID}},
        "spec": {"nodeName": node},
        "status": {"phase": phase, **status},
    }


def terminated(
    exit_code: int, reason: str, message: str = "", at: str = "12:04:00"
) -> dict[str, Any]:
    return {
        "containerStatuses": [
            {
                "name": names.CONTAINER,
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason,
                        "message": message,
                        "finishedAt": f"2026-03-01T{at}Z",
                    }
                },
            }
        ]
    }


def compute(
    observed_job: dict[str, Any] | None,
    pods: list[dict[str, Any]] = (),  # type: ignore[assignment]
    *,
    before: dict[str, Any] | None = None,
    topology: Topology = ONE,
    now: datetime = T0,
    invalid: tuple[str, str] | None = None,
) -> VideoGenerationStatus:
    observation = Observation(
        job_name="cat",
        job=observed_job,
        pods=list(pods),
        invalid=invalid,
        topology=None if invalid else topology,
    )
    status = compute_status(vg(before), observation, now)
    check_consistent(status)
    VideoGenerationStatus.model_validate(status.to_json_dict())  # round-trips through JSON
    return status


def conditions(status: VideoGenerationStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_before_the_job_exists_the_generation_is_pending() -> None:
    status = compute(None)
    assert status.phase == "Pending"
    assert conditions(status)["Running"] == ("False", "Creating")
    assert status.observed_generation == 1
    assert status.topology is not None and status.topology.summary == "single"
    assert all(c.observed_generation == 1 for c in status.conditions)


def test_a_suspended_kueue_job_is_queued() -> None:
    status = compute(job(suspend=True, queue="gpu-queue"))
    assert status.phase == "Queued"
    assert conditions(status)["Suspended"] == ("True", "QueuedByKueue")
    assert "gpu-queue" in (status.condition("Suspended").message or "")  # type: ignore[union-attr]
    assert status.job_name == "cat"


def test_pending_pods_say_why_they_do_not_run() -> None:
    unschedulable = pod(
        "cat-x",
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    status = compute(job(), [unschedulable])
    assert status.phase == "Pending"
    assert conditions(status)["Running"] == ("False", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in status.condition("Running").message  # type: ignore[union-attr]

    pulling = pod(
        "cat-y",
        "Pending",
        containerStatuses=[
            {
                "name": names.CONTAINER,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling"}},
            }
        ],
    )
    assert conditions(compute(job(), [pulling]))["Running"] == ("False", "ImagePullBackOff")
    assert conditions(compute(job(), [pod("cat-z", "Pending")]))["Running"] == (
        "False",
        "PodsPending",
    )


def test_running_needs_every_pod_of_a_multi_node_run() -> None:
    one_of_two = compute(job(), [pod("a", "Running"), pod("b", "Pending")], topology=TWO_NODES)
    assert one_of_two.phase == "Pending"
    assert one_of_two.condition("Running").message == "1/2 pods running"  # type: ignore[union-attr]
    both = compute(
        job(), [pod("a", "Running"), pod("b", "Running", node="gpu-node-1")], topology=TWO_NODES
    )
    assert both.phase == "Running"
    assert conditions(both)["Running"] == ("True", "PodsRunning")
    assert "gpu-node-0, gpu-node-1" in both.condition("Running").message  # type: ignore[union-attr]
    assert both.topology is not None and both.topology.summary == "cfg2xu8"


def test_finished_pods_before_the_job_completes_still_count_as_running() -> None:
    status = compute(job(), [pod("a", "Succeeded", **terminated(0, "Completed"))])
    assert status.phase == "Running"
    assert conditions(status)["Running"] == ("True", "PodsSucceeded")


def test_a_completed_job_succeeds_and_keeps_what_the_runtime_wrote() -> None:
    runtime_status = {
        "progress": {"step": 4, "totalSteps": 4},
        "output": {"uri": "s3://videos/ns/cat.mp4", "bytes": 1234, "sha256": "a" * 64},
        "conditions": [
            {
                "type": "Uploaded",
                "status": "True",
                "reason": "Uploaded",
                "message": "uploaded",
                "lastTransitionTime": "2026-03-01T12:03:00Z",
            }
        ],
    }
    done = job(
        ("Complete", "CompletionsReached", ""),
        startTime="2026-03-01T12:01:00Z",
        completionTime="2026-03-01T12:05:00Z",
    )
    status = compute(
        done, [pod("a", "Succeeded", **terminated(0, "Completed"))], before=runtime_status
    )
    assert status.phase == "Succeeded"
    assert conditions(status) == {
        "Uploaded": ("True", "Uploaded"),
        "Suspended": ("False", "Succeeded"),
        "Running": ("False", "Succeeded"),
        "Complete": ("True", "Succeeded"),
        "Failed": ("False", "Succeeded"),
    }
    assert "s3://videos/ns/cat.mp4" in status.condition("Complete").message  # type: ignore[union-attr]
    assert status.output is not None and status.output.size_bytes == 1234
    assert status.progress is not None and status.progress.display == "4/4"
    assert status.start_time == datetime(2026, 3, 1, 12, 1, tzinfo=UTC)
    assert status.completion_time == datetime(2026, 3, 1, 12, 5, tzinfo=UTC)
    # Only the operator's fields are in the patch.
    patch = status_patch(runtime_status, status)
    assert patch is not None
    assert set(patch) <= {"phase", "conditions", "observedGeneration", "topology", "jobName",
                          "startTime", "completionTime"}  # fmt: skip
    # The Job removed after its TTL changes nothing.
    assert compute(None, before=status.to_json_dict()) == status


@pytest.mark.parametrize(
    ("job_reason", "exit_code", "container_reason", "message", "expected"),
    [
        ("BackoffLimitExceeded", 1, "Error", "Traceback ... boom", "BackoffLimitExceeded"),
        ("BackoffLimitExceeded", 137, "OOMKilled", "", "OOMKilled"),
        ("DeadlineExceeded", 137, "Error", "", "DeadlineExceeded"),
        (
            "BackoffLimitExceeded",
            1,
            "Error",
            json.dumps({"reason": "UploadFailed", "message": "kept at /out/cat.mp4"}),
            "UploadFailed",
        ),
    ],
)
def test_a_failed_job_fails_with_the_most_telling_reason(
    job_reason: str, exit_code: int, container_reason: str, message: str, expected: str
) -> None:
    failed_job = job(("Failed", job_reason, "Job has reached the specified backoff limit"))
    first = pod("a", "Failed", **terminated(1, "Error", "first try", at="12:02:00"))
    last = pod("b", "Failed", **terminated(exit_code, container_reason, message, at="12:04:00"))
    status = compute(failed_job, [first, last])
    assert status.phase == "Failed"
    failed = status.condition("Failed")
    assert failed is not None and (failed.status, failed.reason) == ("True", expected)
    assert f"pod b exited with code {exit_code} ({container_reason})" in failed.message
    assert job_reason in failed.message
    if expected == "UploadFailed":
        assert "kept at /out/cat.mp4" in failed.message
    assert status.completion_time == datetime(2026, 3, 1, 12, 5, tzinfo=UTC)


def test_a_failed_pod_waiting_for_its_retry_is_backoff() -> None:
    status = compute(job(failed=1), [pod("a", "Failed", **terminated(1, "Error", "boom"))])
    assert status.phase == "Pending"
    running = status.condition("Running")
    assert running is not None and running.reason == "BackOff"
    assert "exited with code 1" in running.message and "failure 1 of 2" in running.message


def test_an_invalid_spec_fails_without_a_job() -> None:
    status = compute(None, invalid=("UnknownModel", "spec.model.name='x' is not allowed"))
    assert status.phase == "Failed"
    assert conditions(status)["Failed"] == ("True", "UnknownModel")
    assert status.completion_time == T0
    assert status.job_name is None


def test_transition_times_change_only_with_the_status() -> None:
    pending = compute(job(), [pod("a", "Pending")], now=T0)
    later = T0 + timedelta(seconds=30)
    still_pending = compute(job(), [pod("a", "Pending")], before=pending.to_json_dict(), now=later)
    assert still_pending == pending
    assert status_patch(pending.to_json_dict(), still_pending) is None  # nothing is written
    running = compute(job(), [pod("a", "Running")], before=pending.to_json_dict(), now=later)
    times = {c.type: c.last_transition_time for c in running.conditions}
    assert times["Running"] == later
    assert times["Complete"] == T0  # still False: the time of its last transition stays
    patch = status_patch(pending.to_json_dict(), running)
    assert patch is not None and set(patch) == {"phase", "conditions"}


def test_transitions_post_events() -> None:
    pending = compute(job(), [pod("a", "Pending")])
    running = compute(job(), [pod("a", "Running")], before=pending.to_json_dict())
    events = transition_events(pending, running)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Running")]
    failed = compute(
        job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")),
        [],
        before=running.to_json_dict(),
    )
    assert [(e.type, e.reason) for e in transition_events(running, failed)] == [
        ("Warning", "DeadlineExceeded")
    ]
    unschedulable = pod(
        "a",
        "Pending",
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
    )
    blocked = compute(job(), [unschedulable], before=pending.to_json_dict())
    assert [(e.type, e.reason) for e in transition_events(pending, blocked)] == [
        ("Warning", "Unschedulable")
    ]
    assert transition_events(blocked, blocked) == []


def test_pods_of_an_older_job_with_the_same_name_are_ignored() -> None:
    stale = pod("old", "Running")
    stale["metadata"]["labels"][names.LABEL_CONTROLLER_UID] = "another-job"
    assert compute(job(), [stale]).phase == "Pending"


def test_contradicting_conditions_are_caught() -> None:
    status = compute(job(), [pod("a", "Running")])
    flipped = [
        c.model_copy(update={"status": "True"}) if c.type == "Complete" else c
        for c in status.conditions
    ]
    with pytest.raises(StatusContradiction, match="Complete is True while Running"):
        check_consistent(status.model_copy(update={"conditions": flipped}))
    with pytest.raises(StatusContradiction, match="phase Queued but the conditions say Running"):
        check_consistent(status.model_copy(update={"phase": "Queued"}))
