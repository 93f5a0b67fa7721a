"""The local control plane and S3 server are real: schema validation, CEL,
scheduling onto kwok GPU nodes, garbage collection, RBAC and S3 multipart.

Each test would fail against a mock: it needs the behaviour of the real
kube-apiserver, controller-manager, scheduler or S3 server.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import localcluster
from conftest import Kubectl, S3Server

pytestmark = pytest.mark.cluster


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def api_request(
    state: localcluster.ClusterState, path: str, token: str
) -> tuple[int, dict[str, Any]]:
    """GET ``path`` on the API server with a bearer token; return (status, body)."""
    ctx = ssl.create_default_context(cafile=state.ca_file)
    req = urllib.request.Request(state.server + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_version_is_the_pinned_release(kubectl: Kubectl) -> None:
    version = json.loads(kubectl.run("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"
    assert version["serverVersion"]["minor"] == "36"
    assert version["clientVersion"]["gitVersion"] == "v1.36.3"


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "clips.test.smartdiff.io"},
    "spec": {
        "group": "test.smartdiff.io",
        "names": {"kind": "Clip", "plural": "clips", "singular": "clip"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["frames"],
                                "x-kubernetes-validations": [
                                    {"rule": "self == oldSelf", "message": "spec is immutable"},
                                ],
                                "properties": {
                                    "frames": {
                                        "type": "integer",
                                        "minimum": 1,
                                        "maximum": 1025,
                                        "x-kubernetes-validations": [
                                            {
                                                "rule": "self % 4 == 1",
                                                "message": "frames must be 4n+1",
                                            },
                                        ],
                                    },
                                    "solver": {
                                        "type": "string",
                                        "enum": ["unipc", "euler"],
                                        "default": "unipc",
                                    },
                                },
                            },
                            "status": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            },
                        },
                    }
                },
            }
        ],
    },
}


def clip(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "test.smartdiff.io/v1",
        "kind": "Clip",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def test_crd_schema_defaults_and_cel_rules_are_enforced(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(CRD)
    kubectl.run(
        "wait", "--for=condition=Established", "crd/clips.test.smartdiff.io", "--timeout=30s"
    )

    kubectl.apply(clip("ok", namespace, frames=81))
    created = kubectl.get("clip", "ok", "-n", namespace)
    assert created["spec"] == {"frames": 81, "solver": "unipc"}  # default filled in by the server

    rejected = {
        "frames must be 4n+1": clip("cel", namespace, frames=80),
        "should be less than or equal to 1025": clip("max", namespace, frames=2049),
        'Unsupported value: "ddim"': clip("enum", namespace, frames=5, solver="ddim"),
        'spec.frames: Invalid value: "string"': clip("type", namespace, frames="five"),
        "spec.frames: Required value": clip("req", namespace),
    }
    for message, obj in rejected.items():
        proc = kubectl.run("apply", "-f", "-", stdin=json.dumps(obj), check=False)
        assert proc.returncode != 0, f"accepted {obj}"
        assert message in proc.stderr, proc.stderr

    edited = clip("ok", namespace, frames=85)
    proc = kubectl.run("apply", "-f", "-", stdin=json.dumps(edited), check=False)
    assert proc.returncode != 0 and "spec is immutable" in proc.stderr, proc.stderr
    # The status subresource is separate: writing status does not touch spec.
    kubectl.run(
        "patch",
        "clip",
        "ok",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Running"}}',
    )
    assert kubectl.get("clip", "ok", "-n", namespace)["status"] == {"phase": "Running"}


def test_job_pod_is_scheduled_on_a_kwok_gpu_node(kubectl: Kubectl, namespace: str) -> None:
    def job(name: str, gpus: int) -> dict[str, Any]:
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "main",
                                "image": "example.invalid/runtime:1",
                                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                            }
                        ],
                    }
                },
            },
        }

    kubectl.apply(job("fits", 4))
    kubectl.apply(job("too-big", 9))

    def pod_of(name: str) -> dict[str, Any] | None:
        pods = kubectl.get("pods", "-n", namespace, "-l", f"job-name={name}")["items"]
        return pods[0] if pods else None

    running = wait_for(
        "the 4-GPU pod to run",
        lambda: (p := pod_of("fits")) and p["status"].get("phase") == "Running" and p,
    )
    assert running["spec"]["nodeName"] in {"gpu-node-0", "gpu-node-1"}
    node = kubectl.get("node", running["spec"]["nodeName"])
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"

    # No node has 9 GPUs: the scheduler says so on the pod.
    pending = wait_for(
        "the 9-GPU pod to be marked unschedulable",
        lambda: (
            (p := pod_of("too-big"))
            and any(
                c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                for c in p["status"].get("conditions", [])
            )
            and p
        ),
    )
    assert "nvidia.com/gpu" in json.dumps(pending["status"]["conditions"])
    assert pending["status"]["phase"] == "Pending"


def test_deleting_an_owner_cascades_to_its_children(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("create", "configmap", "owner", "-n", namespace)
    owner = kubectl.get("configmap", "owner", "-n", namespace)
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "owner",
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
    }
    kubectl.apply(child)
    kubectl.run("delete", "configmap", "owner", "-n", namespace, "--cascade=background")
    wait_for(
        "the garbage collector to delete the child",
        lambda: (
            kubectl.run("get", "configmap", "child", "-n", namespace, check=False).returncode != 0
        ),
    )


def test_service_account_token_is_authenticated_and_denied_by_rbac(
    kubectl: Kubectl, namespace: str, cluster: localcluster.ClusterState
) -> None:
    kubectl.run("create", "serviceaccount", "reader", "-n", namespace)
    kubectl.run(
        "create",
        "role",
        "read-configmaps",
        "-n",
        namespace,
        "--verb=get,list",
        "--resource=configmaps",
    )
    kubectl.run(
        "create",
        "rolebinding",
        "reader",
        "-n",
        namespace,
        "--role=read-configmaps",
        f"--serviceaccount={namespace}:reader",
    )
    token = kubectl.run(
        "create", "token", "reader", "-n", namespace, "--duration=10m"
    ).stdout.strip()

    status, body = api_request(cluster, f"/api/v1/namespaces/{namespace}/configmaps", token)
    assert status == 200, body
    status, body = api_request(cluster, f"/api/v1/namespaces/{namespace}/secrets", token)
    assert status == 403, body
    assert body["reason"] == "Forbidden"
    assert f"system:serviceaccount:{namespace}:reader" in body["message"]
    # A forged token is not a ServiceAccount at all.
    status, _ = api_request(
        cluster, f"/api/v1/namespaces/{namespace}/configmaps", token[:-4] + "AAAA"
    )
    assert status == 401


def test_s3_multipart_upload_and_presigned_download(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    from boto3.s3.transfer import TransferConfig

    payload = bytes(range(256)) * (11 * 4096)  # 11 MiB: three 5 MiB parts
    path = tmp_path / "video.bin"
    path.write_bytes(payload)
    client = s3_server.client()
    config = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    client.upload_file(
        str(path),
        s3_bucket,
        "out/video.bin",
        Config=config,
        ExtraArgs={"ChecksumAlgorithm": "SHA256"},
    )

    head = client.head_object(Bucket=s3_bucket, Key="out/video.bin")
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-3")  # a real multipart upload of three parts

    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "out/video.bin"}, ExpiresIn=60
    )
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert hashlib.sha256(resp.read()).hexdigest() == hashlib.sha256(payload).hexdigest()
    # The signature is checked: the same signature for another key is refused.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url.replace("out/video.bin", "out/video.bim"), timeout=30)
    assert err.value.code == 403


def test_a_clean_stop_leaves_no_process_and_no_port(tmp_path: Path) -> None:
    state = localcluster.up(tmp_path / "second", nodes=1, gpus_per_node=4)
    pids, ports = dict(state.pids), dict(state.ports)
    assert all(localcluster.port_open(p) for p in (ports["apiserver"], ports["etcd"], ports["s3"]))
    localcluster.down(tmp_path / "second")
    assert not any(localcluster._alive(pid) for pid in pids.values())
    assert not any(localcluster.port_open(p) for p in ports.values())
    assert not (tmp_path / "second").exists()
