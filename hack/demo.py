#!/usr/bin/env python3
"""The README's first command (``make demo``): ``kubectl apply -f examples/video.yaml`` -> MP4.

On a machine without GPUs or a container runtime, it shows the whole product path for real:

1. starts the local control plane and S3 server (``hack/localcluster.py``);
2. installs the VideoGeneration CRD and runs the operator with its own least-privilege
   ServiceAccount;
3. applies ``examples/video.yaml`` with kubectl; the operator creates the Job and the real
   scheduler puts its pod on a kwok GPU node;
4. a node player (the test harness's, ``tests/operator_support.py``) plays that node's
   kubelet: it runs the pod's container command here -- the runtime worker, with the tiny
   random model on the CPU standing in for the GPU model -- which reports progress, uploads
   the MP4 to S3 and writes the output into the status;
5. prints ``kubectl get vg``, downloads the video to ``out/`` and stops everything.

The video is noise (random weights): the point is the pipeline, not the picture.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests")]

import localcluster  # noqa: E402
from operator_support import LocalRun, NodePlayer, admin_api, running_operator  # noqa: E402

EXAMPLE = REPO / "examples" / "video.yaml"
TINY = {
    "SMARTDIFF_DEV_MODEL": "wan-tiny-random",
    "SMARTDIFF_DEVICE": "cpu",
    "SMARTDIFF_DTYPE": "float32",
}


class Kubectl:
    """The pinned kubectl against the demo cluster; echoes what it runs."""

    def __init__(self, kubeconfig: str) -> None:
        self.binary = localcluster.tool_paths()["kubectl"]
        self.kubeconfig = kubeconfig

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, echo: bool = False
    ) -> subprocess.CompletedProcess[str]:
        if echo:
            print(f"$ kubectl {' '.join(args)}", flush=True)
        proc = subprocess.run(
            [self.binary, "--kubeconfig", self.kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        if echo:
            print(proc.stdout, end="", flush=True)
        return proc

    def apply(self, obj: dict[str, Any]) -> None:
        self.run("apply", "-f", "-", stdin=json.dumps(obj))


def s3_client(state: localcluster.ClusterState) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=state.s3_endpoint,
        aws_access_key_id=state.s3_access_key,
        aws_secret_access_key=state.s3_secret_key,
        region_name=state.s3_region,
        config=Config(signature_version="s3v4"),
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "out", help="where the MP4 goes")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="smartdiff-demo-") as tmp:
        work = Path(tmp)
        print("== starting the local control plane + S3 server", flush=True)
        state = localcluster.up(work / "cluster")
        try:
            kubectl = Kubectl(state.kubeconfig)
            kubectl.run("get", "nodes", "-o", "wide", echo=True)
            s3 = s3_client(state)
            s3.create_bucket(Bucket="videos")
            kubectl.run(
                "create", "secret", "generic", "s3-credentials",
                f"--from-literal=AWS_ACCESS_KEY_ID={state.s3_access_key}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={state.s3_secret_key}",
                f"--from-literal=AWS_ENDPOINT_URL_S3={state.s3_endpoint}",
                f"--from-literal=AWS_REGION={state.s3_region}",
            )  # fmt: skip
            print("== the operator (least-privilege ServiceAccount)", flush=True)
            from kubernetes import client

            core = client.CoreV1Api(admin_api(state))
            run = LocalRun(core, state.server, state.ca_file, work / "pods", extra_env=TINY)
            with (
                running_operator(state, kubectl, work / "operator"),
                NodePlayer(core, "default", run),
            ):
                kubectl.run("apply", "-f", str(EXAMPLE), echo=True)
                phase = ""
                deadline = time.monotonic() + 600
                while phase not in ("Succeeded", "Failed") and time.monotonic() < deadline:
                    time.sleep(1)
                    vg = json.loads(kubectl.run("get", "vg", "cat-surfing", "-o", "json").stdout)
                    phase = (vg.get("status") or {}).get("phase", "")
                kubectl.run("get", "vg", "-o", "wide", echo=True)
                kubectl.run("get", "jobs,pods", "-o", "wide", echo=True)
            status = vg.get("status") or {}
            if phase != "Succeeded":
                for pod, log in run.logs.items():
                    print(f"--- {pod}\n{log[-3000:]}")
                print(json.dumps(status, indent=2))
                return 1
            uri = status["output"]["uri"]
            bucket, key = uri.removeprefix("s3://").split("/", 1)
            out = args.out / Path(key).name
            out.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(out))
            print(
                f"== {uri} ({status['output']['bytes']} bytes, sha256 "
                f"{status['output']['sha256'][:16]}...) downloaded to {out}; "
                f"timings {status.get('timings')}"
            )
            print("   (random weights: the video is noise; the pipeline is real)")
        finally:
            print("== stopping: no process or port is left behind", flush=True)
            localcluster.down(work / "cluster")
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
