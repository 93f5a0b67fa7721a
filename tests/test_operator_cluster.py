"""The operator on the real local control plane: Jobs, restarts, GC, bad input, retries.

One operator process (``python -m smartdiff_operator``, authenticated as a
ServiceAccount that holds only the rules of ``smartdiff_operator.rbac``) serves
every test of this module. Pods land on kwok GPU nodes; where a test needs a pod
to end, ``NodePlayer`` plays the kubelet. The API server, the Job controller,
the scheduler and the garbage collector are the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import Kubectl
from operator_support import (
    REPO,
    NodePlayer,
    OperatorProcess,
    admin_api,
    condition,
    fail_with,
    running_operator,
    wait_for,
)

pytestmark = pytest.mark.cluster
EXAMPLE = REPO / "examples" / "video.yaml"


@pytest.fixture(scope="module")
def operator(
    cluster: Any, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with running_operator(cluster, kubectl, tmp_path_factory.mktemp("operator")) as process:
        yield process


@pytest.fixture
def namespace(namespace: str, kubectl: Kubectl) -> Iterator[str]:
    """The conftest's fresh namespace; its generations are deleted first when the test ends.

    Deleting them directly frees their GPUs at once: the namespace controller
    learns about a new CRD only at its next discovery, so it may leave them
    running for a while.
    """
    yield namespace
    kubectl.run("delete", "vg", "--all", "-n", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def core(cluster: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(admin_api(cluster))


def get_vg(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return kubectl.get("vg", name, "-n", namespace)


def phase_of(kubectl: Kubectl, namespace: str, name: str) -> str | None:
    return (get_vg(kubectl, namespace, name).get("status") or {}).get("phase")


def wait_phase(
    kubectl: Kubectl, namespace: str, name: str, phase: str, operator: OperatorProcess,
    timeout: float = 60,
) -> dict[str, Any]:  # fmt: skip
    try:
        return wait_for(
            f"VideoGeneration {name} to be {phase}",
            lambda: (
                (vg := get_vg(kubectl, namespace, name)).get("status", {}).get("phase") == phase
                and vg
            ),
            timeout=timeout,
        )
    except AssertionError as error:
        vg = get_vg(kubectl, namespace, name)
        raise AssertionError(
            f"{error}\nstatus: {json.dumps(vg.get('status'), indent=1)}\n"
            f"operator log:\n{operator.log_tail()}"
        ) from None


def generation(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": "a red fox runs through fresh snow",
        "video": {"width": 64, "height": 48, "frames": 5},
        "sampling": {"steps": 4},
        "output": {"uri": "s3://videos/generated/"},
    }
    body.update(spec)
    return {
        "apiVersion": "smartdiff.io/v1alpha1",
        "kind": "VideoGeneration",
        "metadata": {"name": name},
        "spec": body,
    }


def jobs_in(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    return list(kubectl.get("jobs", "-n", namespace)["items"])


def pods_in(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    return list(kubectl.get("pods", "-n", namespace)["items"])


def events_for(kubectl: Kubectl, namespace: str, name: str) -> list[tuple[str, str]]:
    items = kubectl.get(
        "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
    )["items"]
    return [(e["type"], e["reason"]) for e in items]


def test_example_runs_as_one_owned_job_and_an_operator_restart_makes_no_duplicate(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(EXAMPLE))
    vg = wait_phase(kubectl, namespace, "cat-surfing", "Running", operator)
    (job,) = jobs_in(kubectl, namespace)
    assert job["metadata"]["name"] == "cat-surfing"
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (
        "VideoGeneration",
        vg["metadata"]["uid"],
        True,
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:6] == [
        "torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "1",
    ]  # fmt: skip
    (pod,) = pods_in(kubectl, namespace)
    assert pod["spec"]["nodeName"] in {"gpu-node-0", "gpu-node-1"}
    assert pod["spec"]["serviceAccountName"] == "cat-surfing-runtime"
    status = vg["status"]
    assert status["jobName"] == "cat-surfing"
    assert status["topology"]["summary"] == "single"
    assert status["observedGeneration"] == vg["metadata"]["generation"]
    assert condition(vg, "Running")["reason"] == "PodsRunning"  # type: ignore[index]
    table = kubectl.run("get", "vg", "-n", namespace).stdout
    assert table.split("\n")[0].split()[:6] == [
        "NAME",
        "PHASE",
        "PROGRESS",
        "GPUS",
        "TOPOLOGY",
        "AGE",
    ]
    assert "Running" in table and "single" in table
    assert ("Normal", "JobCreated") in events_for(kubectl, namespace, "cat-surfing")

    # Crash the operator mid-run and start it again: it resumes, finds the Job, makes none.
    job_uid = job["metadata"]["uid"]
    operator.stop(sig=9)
    operator.start()
    wait_for(
        "the restarted operator to resume the generation",
        lambda: 'smartdiff_operator_reconciles_total{result="ok"}' in operator.metrics(),
    )
    (job,) = jobs_in(kubectl, namespace)
    assert job["metadata"]["uid"] == job_uid
    assert len(pods_in(kubectl, namespace)) == 1
    assert "smartdiff_operator_jobs_created_total 0.0" in operator.metrics()
    assert phase_of(kubectl, namespace, "cat-surfing") == "Running"


def test_an_edited_spec_is_rejected_by_the_api_server(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    kubectl.apply(generation("frozen", queueName="later"), "-n", namespace)
    edited = generation("frozen", queueName="later", prompt="a different prompt")
    proc = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(edited), check=False)
    assert proc.returncode != 0
    assert "spec is immutable" in proc.stderr, proc.stderr
    assert get_vg(kubectl, namespace, "frozen")["spec"]["prompt"].startswith("a red fox")


# (name, spec changes, message naming the field). Rejected by the API server's schema and CEL.
SERVER_REJECTS: list[tuple[str, dict[str, Any], str]] = [
    (
        "frames",
        {"video": {"frames": 80}},
        "spec.video.frames: Invalid value: 80: frames must be 4n+1",
    ),
    (
        "width",
        {"video": {"width": 833}},
        "spec.video.width: Invalid value: 833: width must be a multiple of 16",
    ),
    (
        "height-min",
        {"video": {"height": 0}},
        "spec.video.height in body should be greater than or equal to 16",
    ),
    (
        "steps-type",
        {"sampling": {"steps": "fifty"}},
        'spec.sampling.steps: Invalid value: "string"',
    ),
    ("guidance-max", {"sampling": {"guidanceScale": 51}}, "spec.sampling.guidanceScale"),
    ("seed-negative", {"sampling": {"seed": -1}}, "spec.sampling.seed"),
    ("solver", {"sampling": {"solver": "ddim"}}, 'spec.sampling.solver: Unsupported value: "ddim"'),
    ("prompt-missing", {"prompt": None}, "spec.prompt: Required value"),
    ("prompt-blank", {"prompt": "   "}, "spec.prompt"),
    ("gpus-zero", {"resources": {"gpus": 0}}, "spec.resources.gpus"),
    (
        "gpus-per-node",
        {"resources": {"gpus": 12, "gpusPerNode": 8}},
        "gpus must be at most gpusPerNode or a multiple of it",
    ),
    (
        "explicit-product",
        {"resources": {"gpus": 4}, "parallelism": {"mode": "explicit", "ulysses": 2}},
        "spec.parallelism: Invalid value: parallelism: explicit cfg x ulysses x ring "
        "must equal resources.gpus",
    ),
    ("degrees-in-auto", {"parallelism": {"ring": 2}}, "spec.parallelism.mode"),
    ("deadline-negative", {"activeDeadlineSeconds": -5}, "spec.activeDeadlineSeconds"),
    ("backoff-max", {"backoffLimit": 101}, "spec.backoffLimit"),
    ("ttl-negative", {"ttlSecondsAfterFinished": -1}, "spec.ttlSecondsAfterFinished"),
    ("output-missing", {"output": None}, "spec.output: Required value"),
    ("output-scheme", {"output": {"uri": "http://example.com/v.mp4"}}, "spec.output.uri"),
    ("queue-name", {"queueName": "Bad_Queue"}, "spec.queueName"),
    ("memory", {"resources": {"memory": "lots"}}, "spec.resources.memory"),
    (
        "toleration",
        {"resources": {"tolerations": [{"key": "gpu", "tolerationSeconds": 5}]}},
        "tolerationSeconds needs effect NoExecute",
    ),
    (
        "cache-threshold",
        {"acceleration": {"cache": {"threshold": 0.1}}},
        "threshold needs a cache policy other than none",
    ),
    ("unknown-field", {"sampler": "unipc"}, 'unknown field "spec.sampler"'),
]

# Valid for the schema, rejected by the operator before anything is created.
OPERATOR_REJECTS: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "model",
        {"model": {"name": "wan9-t2v-99b"}},
        "UnknownModel",
        "spec.model.name='wan9-t2v-99b' is not allowed",
    ),
    (
        "topology",
        {"video": {"width": 16, "height": 16, "frames": 1}, "resources": {"gpus": 4}},
        "ImpossibleTopology",
        "spec.resources.gpus",
    ),
    (  # explicit context parallelism over more ranks than the video has tokens
        "tokens",
        {
            "video": {"width": 16, "height": 16, "frames": 1},
            "resources": {"gpus": 2},
            "parallelism": {"mode": "explicit", "ulysses": 2},
        },
        "ImpossibleTopology",
        "spec.parallelism",
    ),
]


def test_bad_manifests_are_rejected_naming_the_field_and_none_reaches_a_pod(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    assert len(SERVER_REJECTS) + len(OPERATOR_REJECTS) >= 15
    for name, changes, message in SERVER_REJECTS:
        body = generation(f"bad-{name}", **changes)
        body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
        proc = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(body), check=False)
        assert proc.returncode != 0, f"{name}: accepted"
        assert message in proc.stderr, f"{name}: {proc.stderr}"
    for name, changes, _, _ in OPERATOR_REJECTS:
        kubectl.apply(generation(f"bad-{name}", **changes), "-n", namespace)
    for name, _, reason, message in OPERATOR_REJECTS:
        vg = wait_phase(kubectl, namespace, f"bad-{name}", "Failed", operator)
        failed = condition(vg, "Failed")
        assert failed is not None and failed["reason"] == reason, failed
        assert message in failed["message"], failed
        assert ("Warning", reason) in events_for(kubectl, namespace, f"bad-{name}")
    assert jobs_in(kubectl, namespace) == []
    assert pods_in(kubectl, namespace) == []
    rejected = operator.metrics()
    assert 'smartdiff_operator_rejected_specs_total{reason="UnknownModel"}' in rejected


def test_a_failing_pod_is_retried_up_to_backoff_limit_then_failed_with_the_exit_reason(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, core: Any
) -> None:
    policy = fail_with(1, "Error", "RuntimeError: CUDA error: an illegal memory access")
    with NodePlayer(core, namespace, policy) as player:
        kubectl.apply(generation("flaky", backoffLimit=1), "-n", namespace)
        vg = wait_phase(kubectl, namespace, "flaky", "Failed", operator, timeout=90)
    assert player.errors == []
    assert len(player.handled) == 2  # the first try and one retry
    failed = condition(vg, "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    assert "exited with code 1 (Error): RuntimeError: CUDA error" in failed["message"]
    (job,) = jobs_in(kubectl, namespace)
    assert job["status"]["failed"] == 2
    events = events_for(kubectl, namespace, "flaky")
    assert ("Warning", "BackOff") in events and ("Warning", "BackoffLimitExceeded") in events
    assert vg["status"]["completionTime"]


def test_deadline_exceeded(kubectl: Kubectl, namespace: str, operator: OperatorProcess) -> None:
    kubectl.apply(generation("slow", activeDeadlineSeconds=2), "-n", namespace)
    vg = wait_phase(kubectl, namespace, "slow", "Failed", operator, timeout=60)
    failed = condition(vg, "Failed")
    assert failed is not None and failed["reason"] == "DeadlineExceeded", failed


def test_kueue_job_waits_suspended_until_admitted(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    kubectl.apply(generation("queued", queueName="gpu-queue"), "-n", namespace)
    vg = wait_phase(kubectl, namespace, "queued", "Queued", operator)
    assert condition(vg, "Suspended")["reason"] == "QueuedByKueue"  # type: ignore[index]
    (job,) = jobs_in(kubectl, namespace)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert pods_in(kubectl, namespace) == []
    # Admission, as Kueue does it: unsuspend the Job.
    kubectl.run(
        "patch",
        "job",
        "queued",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"suspend":false}}',
    )
    wait_phase(kubectl, namespace, "queued", "Running", operator)


def test_an_unschedulable_generation_says_why(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    kubectl.apply(generation("huge", resources={"gpus": 12}), "-n", namespace)

    def blocked() -> dict[str, Any] | None:
        vg = get_vg(kubectl, namespace, "huge")
        running = condition(vg, "Running")
        return vg if running and running["reason"] == "Unschedulable" else None

    vg = wait_for("the Unschedulable reason", blocked, timeout=60)
    assert vg["status"]["phase"] == "Pending"
    assert "nvidia.com/gpu" in condition(vg, "Running")["message"]  # type: ignore[index]
    assert ("Warning", "Unschedulable") in events_for(kubectl, namespace, "huge")


def test_deleting_the_generation_removes_its_job_pods_and_identity(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    # Two pods of two GPUs: an Indexed Job behind a headless Service.
    kubectl.apply(generation("gone", resources={"gpus": 4, "gpusPerNode": 2}), "-n", namespace)
    wait_phase(kubectl, namespace, "gone", "Running", operator, timeout=60)
    assert len(pods_in(kubectl, namespace)) == 2
    (service,) = kubectl.get("services", "-n", namespace)["items"]
    assert service["spec"]["clusterIP"] == "None"
    kubectl.run("delete", "vg", "gone", "-n", namespace, "--wait=false")

    def children() -> list[str]:
        found = []
        for kind in ("jobs", "pods", "services", "serviceaccounts", "roles", "rolebindings"):
            items = kubectl.get(kind, "-n", namespace, "-l", "smartdiff.io/videogeneration=gone")
            found += [f"{kind}/{i['metadata']['name']}" for i in items["items"]]
        return found

    wait_for("the garbage collector to remove every child", lambda: not children(), timeout=60)


def test_metrics_and_liveness_are_served(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    assert operator.alive()
    kubectl.apply(generation("counted-bad", model={"name": "wan9-t2v"}), "-n", namespace)
    kubectl.apply(generation("counted-queued", queueName="q"), "-n", namespace)
    wait_phase(kubectl, namespace, "counted-bad", "Failed", operator)
    wait_phase(kubectl, namespace, "counted-queued", "Queued", operator)
    text = operator.metrics()
    for sample in (
        'smartdiff_operator_reconciles_total{result="ok"}',
        'smartdiff_operator_reconciles_total{result="invalid"}',
        'smartdiff_operator_rejected_specs_total{reason="UnknownModel"}',
        'smartdiff_operator_phase_transitions_total{phase="Failed"}',
        'smartdiff_operator_phase_transitions_total{phase="Queued"}',
        'smartdiff_operator_generation_duration_seconds_count{phase="Failed"}',
        'smartdiff_operator_objects_created_total{kind="Job"}',
    ):
        assert sample in text, sample
    writes = [
        line for line in text.splitlines() if line.startswith("smartdiff_operator_status_writes")
    ]
    assert writes and float(writes[0].split()[-1]) >= 2
    # The operator's ServiceAccount (smartdiff_operator.rbac) was never denied anything.
    denied = [
        line
        for line in operator.log_text().splitlines()
        if "system:serviceaccount:smartdiff-system:smartdiff-operator" in line
        and " cannot " in line
    ]
    assert denied == [], denied[:3]
