"""Shared pytest fixtures: the real local control plane and S3 server.

``cluster`` starts (once per test session) etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok GPU nodes and a versitygw S3
server on loopback through ``hack/localcluster.py``, and stops them at the
end. Nothing here is a mock: tests talk to the real servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))

import localcluster  # noqa: E402


@dataclass(frozen=True)
class Kubectl:
    """Runs the pinned kubectl against the local cluster."""

    binary: str
    kubeconfig: str

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.binary, "--kubeconfig", self.kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
            )
        return proc

    def apply(self, obj: dict[str, Any] | str, *extra: str) -> subprocess.CompletedProcess[str]:
        text = obj if isinstance(obj, str) else json.dumps(obj)
        return self.run("apply", *extra, "-f", "-", stdin=text)

    def get(self, *args: str) -> dict[str, Any]:
        return json.loads(self.run("get", *args, "-o", "json").stdout)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(signature_version="s3v4"),
        )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the cluster (``-m cluster`` / ``-m "not cluster"``).

    ``make test`` runs them in a pass of their own, in one process, so one cluster serves
    them all (xdist's ``loadgroup`` does not group them with pytest 9.2 + xdist 3.8)."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localcluster.ClusterState]:
    """A running local cluster (2 kwok nodes with 8 nvidia.com/gpu each) and S3 server."""
    root = Path(os.environ.get("SMARTDIFF_TEST_CLUSTER_DIR") or tmp_path_factory.mktemp("cluster"))
    state = localcluster.up(root / "c")
    try:
        yield state
    finally:
        localcluster.down(root / "c")


@pytest.fixture(scope="session")
def kubectl(cluster: localcluster.ClusterState) -> Kubectl:
    return Kubectl(localcluster.tool_paths()["kubectl"], cluster.kubeconfig)


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl.run("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def s3_server(cluster: localcluster.ClusterState) -> S3Server:
    return S3Server(
        cluster.s3_endpoint, cluster.s3_access_key, cluster.s3_secret_key, cluster.s3_region
    )


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the S3 server."""
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name
