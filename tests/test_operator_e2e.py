"""End to end on the real control plane: ``kubectl apply -f examples/video.yaml`` -> MP4 in S3.

The operator (a subprocess with its own least-privilege ServiceAccount) creates
the Job; the scheduler puts its pod on a kwok GPU node; ``NodePlayer`` plays that
node's kubelet and runs the pod's ``torchrun ... -m smartdiff.worker`` here, as
one CPU rank of the tiny random model, with the pod's environment and a token of
the pod's own ServiceAccount. The worker reads its VideoGeneration, reports
progress, uploads the MP4 to the S3 server and writes the output into the status;
the test reads the video back from S3. A second test makes S3 unreachable.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Kubectl, S3Server
from operator_support import (
    REPO,
    LocalRun,
    NodePlayer,
    OperatorProcess,
    admin_api,
    api_call,
    condition,
    free_port,
    running_operator,
    wait_for,
)
from smartdiff.io.video import read_mp4

pytestmark = pytest.mark.cluster
EXAMPLE = REPO / "examples" / "video.yaml"
# The CPU stand-in for a GPU pod: the tiny random model at its default size (64x48, 5 frames,
# 4 steps), fp32 on the CPU.
TINY = {
    "SMARTDIFF_DEV_MODEL": "wan-tiny-random",
    "SMARTDIFF_DEVICE": "cpu",
    "SMARTDIFF_DTYPE": "float32",
    "OMP_NUM_THREADS": "2",
}
VG_PATH = "/apis/smartdiff.io/v1alpha1/namespaces/{ns}/videogenerations"


@pytest.fixture(scope="module")
def operator(
    cluster: Any, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with running_operator(cluster, kubectl, tmp_path_factory.mktemp("operator")) as process:
        yield process


@pytest.fixture(scope="module")
def core(cluster: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(admin_api(cluster))


@pytest.fixture
def namespace(namespace: str, kubectl: Kubectl) -> Iterator[str]:
    """The conftest's fresh namespace; its generations are deleted first at the end."""
    yield namespace
    kubectl.run("delete", "vg", "--all", "-n", namespace, "--wait=false", check=False)


def s3_secret(kubectl: Kubectl, namespace: str, s3: S3Server, endpoint: str) -> None:
    kubectl.run(
        "create", "secret", "generic", "s3-credentials", "-n", namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
        f"--from-literal=AWS_ENDPOINT_URL_S3={endpoint}",
        f"--from-literal=AWS_REGION={s3.region}",
    )  # fmt: skip


def ensure_bucket(s3: S3Server, bucket: str) -> None:
    client = s3.client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def wait_finished(
    kubectl: Kubectl, namespace: str, name: str, operator: OperatorProcess, run: LocalRun
) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        vg = kubectl.get("vg", name, "-n", namespace)
        return vg if (vg.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    try:
        return wait_for(f"{name} to finish", finished, timeout=300, every=0.5)
    except AssertionError as error:
        logs = "\n".join(f"--- {pod}:\n{log[-3000:]}" for pod, log in run.logs.items())
        raise AssertionError(
            f"{error}\nworker logs:\n{logs}\noperator:\n{operator.log_tail()}"
        ) from None


def test_example_video_ends_as_an_mp4_in_s3_and_a_succeeded_generation(
    kubectl: Kubectl,
    namespace: str,
    operator: OperatorProcess,
    core: Any,
    cluster: Any,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    ensure_bucket(s3_server, "videos")
    s3_secret(kubectl, namespace, s3_server, s3_server.endpoint_url)
    run = LocalRun(core, cluster.server, cluster.ca_file, tmp_path, extra_env=TINY)
    with NodePlayer(core, namespace, run) as player:
        kubectl.run("apply", "-n", namespace, "-f", str(EXAMPLE))
        vg = wait_finished(kubectl, namespace, "cat-surfing", operator, run)
    (pod_name,) = run.logs
    log = run.logs[pod_name]
    assert vg["status"]["phase"] == "Succeeded", (vg["status"], log[-3000:])
    assert player.errors == [] and player.handled[pod_name].exit_code == 0
    assert "DEV MODEL OVERRIDE" in log  # the stand-in is loud about itself

    # The video is in S3, as the status says.
    status = vg["status"]
    output = status["output"]
    key = f"generated/{namespace}/cat-surfing.mp4"
    assert output["uri"] == f"s3://videos/{key}"
    data = s3_server.client().get_object(Bucket="videos", Key=key)["Body"].read()
    assert output["bytes"] == len(data) > 0
    assert output["sha256"] == hashlib.sha256(data).hexdigest()
    local = tmp_path / "downloaded.mp4"
    local.write_bytes(data)
    video = read_mp4(local)
    assert video.frames.shape == (5, 48, 64, 3)  # the tiny model's default size, H.264
    # Progress, timings and conditions written by the runtime and the operator.
    assert status["progress"] == {"step": 4, "totalSteps": 4, "display": "4/4"}
    assert set(status["timings"]) == {
        "loadSeconds", "encodeSeconds", "denoiseSeconds", "decodeSeconds", "uploadSeconds",
    }  # fmt: skip
    assert condition(vg, "Complete")["status"] == "True"  # type: ignore[index]
    assert condition(vg, "Uploaded")["reason"] == "Uploaded"  # type: ignore[index]
    assert status["completionTime"] and status["startTime"]
    # What a user sees.
    table = kubectl.run("get", "vg", "cat-surfing", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "PROGRESS", "GPUS", "TOPOLOGY", "AGE", "OUTPUT"]
    row = table[1].split()
    assert row[:5] == ["cat-surfing", "Succeeded", "4/4", "1", "single"]
    assert row[-1] == f"s3://videos/{key}"
    items = kubectl.get(
        "events", "-n", namespace, "--field-selector", "involvedObject.name=cat-surfing"
    )["items"]
    reasons = {e["reason"] for e in items}
    assert {"JobCreated", "Running", "Succeeded"} <= reasons, reasons

    # The pod's ServiceAccount may read this generation and patch its status, nothing else.
    token = (tmp_path / pod_name / "token").read_text()
    own = VG_PATH.format(ns=namespace) + "/cat-surfing"
    assert api_call(cluster, "GET", own, token)[0] == 200
    kubectl.apply(
        {
            "apiVersion": "smartdiff.io/v1alpha1",
            "kind": "VideoGeneration",
            "metadata": {"name": "other", "namespace": namespace},
            "spec": {"prompt": "x", "queueName": "q", "output": {"uri": "s3://videos/"}},
        }
    )
    other = VG_PATH.format(ns=namespace) + "/other"
    denied = {
        "GET another generation": api_call(cluster, "GET", other, token),
        "list generations": api_call(cluster, "GET", VG_PATH.format(ns=namespace), token),
        "patch its spec": api_call(cluster, "PATCH", own, token, {"spec": {"prompt": "y"}}),
        "patch another status": api_call(
            cluster, "PATCH", other + "/status", token, {"status": {"phase": "Failed"}}
        ),
        "read the secret": api_call(
            cluster, "GET", f"/api/v1/namespaces/{namespace}/secrets/s3-credentials", token
        ),
        "list pods": api_call(cluster, "GET", f"/api/v1/namespaces/{namespace}/pods", token),
    }
    assert {what: code for what, (code, _) in denied.items()} == dict.fromkeys(denied, 403)


def test_unreachable_s3_retries_then_fails_with_upload_failed_and_keeps_the_file(
    kubectl: Kubectl,
    namespace: str,
    operator: OperatorProcess,
    core: Any,
    cluster: Any,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    dead_endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s3_secret(kubectl, namespace, s3_server, dead_endpoint)
    env = {**TINY, "SMARTDIFF_UPLOAD_ATTEMPTS": "2", "SMARTDIFF_UPLOAD_BACKOFF_SECONDS": "0.2"}
    run = LocalRun(core, cluster.server, cluster.ca_file, tmp_path, extra_env=env)
    manifest = {
        "apiVersion": "smartdiff.io/v1alpha1",
        "kind": "VideoGeneration",
        "metadata": {"name": "no-s3"},
        "spec": {
            "model": {"name": "wan2.1-t2v-1.3b"},
            "prompt": "a lighthouse in a storm",
            "output": {"uri": "s3://videos/kept/", "credentialsSecret": "s3-credentials"},
        },
    }
    with NodePlayer(core, namespace, run):
        kubectl.apply(manifest, "-n", namespace)
        vg = wait_finished(kubectl, namespace, "no-s3", operator, run)
    failed = condition(vg, "Failed")
    assert vg["status"]["phase"] == "Failed" and failed is not None, vg["status"]
    assert failed["reason"] == "UploadFailed", failed
    assert "after 2 attempt(s)" in failed["message"], failed["message"]
    uploaded = condition(vg, "Uploaded")
    assert uploaded is not None and (uploaded["status"], uploaded["reason"]) == (
        "False",
        "UploadFailed",
    )
    kept = re.search(r"kept at (\S+\.mp4)", failed["message"])
    assert kept is not None, failed["message"]
    path = Path(kept.group(1))
    assert path.is_relative_to(tmp_path) and path.stat().st_size > 0
    assert read_mp4(path).frames.shape[0] == 5
    assert "output" not in vg["status"]
