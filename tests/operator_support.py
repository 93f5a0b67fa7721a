"""Test support for the operator: manifests, a running operator, and a node player.

- ``make_generation`` builds a validated ``VideoGeneration`` for the pure tests.
- ``OperatorProcess`` runs ``python -m smartdiff_operator`` against the local
  cluster with the token of a ServiceAccount bound to the operator's own RBAC
  rules (``smartdiff_operator.rbac``), so the tests prove those rules suffice.
- ``NodePlayer`` plays the kubelet of the kwok GPU nodes (which have no
  container runtime): it watches pods scheduled there, decides each one's fate
  (run its container command locally, or fail it with a given exit), and writes
  the terminal pod status -- container ``terminated`` state with exit code,
  reason and termination message, phase Succeeded/Failed -- through the
  ``pods/status`` subresource, as a kubelet would.
- ``run_locally`` is the policy that runs a pod's ``torchrun ... -m
  smartdiff.worker`` on this machine: one CPU rank, the tiny random model, the
  pod's environment (downward API, Secret references resolved), and a token of
  the pod's ServiceAccount from the TokenRequest API.

Talks to: the local cluster (kubernetes client, admin kubeconfig), the operator
and worker as subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smartdiff.api.videogeneration import VideoGeneration

REPO = Path(__file__).resolve().parents[1]
UID = "0d6c7a1e-1111-4222-8333-444455556666"


def make_generation(
    name: str = "cat-surfing", namespace: str = "videos", uid: str = UID, **spec: Any
) -> VideoGeneration:
    """A validated VideoGeneration as read from the API server (name, namespace, uid)."""
    body: dict[str, Any] = {
        "prompt": "A cat in a red wetsuit surfs a big wave at sunset.",
        "video": {"width": 832, "height": 480, "frames": 81},
        "sampling": {"steps": 50, "seed": 42},
        "output": {"uri": "s3://videos/generated/", "credentialsSecret": "s3-credentials"},
    }
    body.update(spec)
    return VideoGeneration.from_manifest(
        {
            "apiVersion": "smartdiff.io/v1alpha1",
            "kind": "VideoGeneration",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": 1},
            "spec": body,
        }
    )


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30, every: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r:.300})")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_kubeconfig(path: Path, server: str, ca_file: str, token: str) -> Path:
    """A kubeconfig that authenticates with a bearer token."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "local",
                        "cluster": {"server": server, "certificate-authority": ca_file},
                    }
                ],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa"}}],
                "current-context": "sa",
            }
        )
    )
    return path


@dataclass
class OperatorProcess:
    """``python -m smartdiff_operator`` as a subprocess; ``start`` and ``stop`` can repeat."""

    kubeconfig: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = field(default_factory=free_port)
    liveness_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, timeout: float = 60) -> None:
        assert self.process is None, "already running"
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "SMARTDIFF_METRICS_PORT": str(self.metrics_port),
            "SMARTDIFF_LIVENESS_PORT": str(self.liveness_port),
            "SMARTDIFF_BIND_ADDRESS": "127.0.0.1",
            "SMARTDIFF_RESYNC_SECONDS": "10",
            "SMARTDIFF_RETRY_DELAY_SECONDS": "1",
            "SMARTDIFF_RUNTIME_IMAGE": "registry.invalid/smart-diffusion/runtime:test",
            "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), str(REPO / "operator")]),
            **self.env,
        }
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smartdiff_operator"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for("the operator's liveness endpoint", self.alive, timeout=timeout, every=0.3)

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"the operator exited; log:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2
            ) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as resp:
            return str(resp.read().decode())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass(frozen=True)
class PodExit:
    """The fate the node player gives a pod."""

    exit_code: int
    reason: str
    message: str = ""


PodPolicy = Callable[[dict[str, Any]], PodExit]


def fail_with(exit_code: int = 1, reason: str = "Error", message: str = "") -> PodPolicy:
    """A policy that fails every pod at once with the given exit."""

    def policy(_pod: dict[str, Any]) -> PodExit:
        return PodExit(exit_code, reason, message)

    return policy


class NodePlayer:
    """Plays the kubelet of the kwok nodes for pods of one namespace.

    Args:
        core: a ``kubernetes.client.CoreV1Api`` (admin).
        namespace: whose pods to play.
        policy: decides each pod's exit (it may run the pod's command).
    """

    def __init__(self, core: Any, namespace: str, policy: PodPolicy) -> None:
        self.core = core
        self.namespace = namespace
        self.policy = policy
        self.handled: dict[str, PodExit] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"node-player-{namespace}")
        self._workers: list[threading.Thread] = []

    def __enter__(self) -> NodePlayer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for worker in self._workers:
            worker.join(timeout=120)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.core.list_namespaced_pod(self.namespace).items
            except Exception as error:  # noqa: BLE001 - keep playing; reported at the end
                self.errors.append(f"list pods: {error}")
                pods = []
            for pod in pods:
                name = pod.metadata.name
                if (
                    name in self.handled
                    or pod.metadata.deletion_timestamp is not None
                    or pod.status.phase != "Running"
                ):
                    continue
                self.handled[name] = PodExit(-1, "Running")
                raw = self.core.api_client.sanitize_for_serialization(pod)
                worker = threading.Thread(target=self._play, args=(raw,), daemon=True)
                self._workers.append(worker)
                worker.start()
            self._stop.wait(0.2)

    def _play(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        started = datetime.now(UTC).replace(microsecond=0)
        try:
            outcome = self.policy(pod)
        except Exception as error:  # noqa: BLE001 - a harness bug fails the pod visibly
            outcome = PodExit(1, "Error", f"node player: {type(error).__name__}: {error}")
            self.errors.append(f"{name}: {error}")
        self.handled[name] = outcome
        finished = datetime.now(UTC).replace(microsecond=0)
        container = pod["spec"]["containers"][0]
        status = {
            "status": {
                "phase": "Succeeded" if outcome.exit_code == 0 else "Failed",
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "PodCompleted",
                     "lastTransitionTime": finished.isoformat()},
                    {"type": "ContainersReady", "status": "False", "reason": "PodCompleted",
                     "lastTransitionTime": finished.isoformat()},
                ],
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container["image"],
                        "imageID": "",
                        "ready": False,
                        "started": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": outcome.exit_code,
                                "reason": outcome.reason,
                                "message": outcome.message,
                                "startedAt": started.isoformat(),
                                "finishedAt": finished.isoformat(),
                                "containerID": f"kwok://{name}",
                            }
                        },
                    }
                ],
            }
        }  # fmt: skip
        try:
            self.core.patch_namespaced_pod_status(name, self.namespace, status)
        except Exception as error:  # noqa: BLE001
            self.errors.append(f"{name}: status not written: {error}")


@dataclass
class LocalRun:
    """Runs pods' worker command locally (CPU, tiny model) with the pod's environment.

    Args:
        core: admin ``CoreV1Api`` (reads Secrets, requests ServiceAccount tokens).
        server / ca_file: the API server for the worker.
        workdir: where tokens, logs, termination messages and outputs go.
        extra_env: added to (and overriding) the pod's environment.
    """

    core: Any
    server: str
    ca_file: str
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    timeout: float = 240
    logs: dict[str, str] = field(default_factory=dict)

    def __call__(self, pod: dict[str, Any]) -> PodExit:
        name = pod["metadata"]["name"]
        namespace = pod["metadata"]["namespace"]
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        container = pod["spec"]["containers"][0]
        env = self._environment(pod, container, folder)
        command = translate_command(container["command"])
        termination = folder / "termination-log"
        env["SMARTDIFF_TERMINATION_MESSAGE_PATH"] = str(termination)
        proc = subprocess.run(
            command, env=env, cwd=folder, capture_output=True, text=True, timeout=self.timeout
        )
        self.logs[name] = proc.stdout + proc.stderr
        (folder / "log.txt").write_text(self.logs[name])
        message = termination.read_text()[:4096] if termination.exists() else ""
        if not message and proc.returncode != 0:  # FallbackToLogsOnError
            message = "\n".join(self.logs[name].splitlines()[-80:])[-2048:]
        del namespace
        return PodExit(proc.returncode, "Completed" if proc.returncode == 0 else "Error", message)

    def _environment(
        self, pod: dict[str, Any], container: dict[str, Any], folder: Path
    ) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBECONFIG"))}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "runtime"), str(REPO / "operator")])
        for entry in container.get("env") or []:
            value = self._resolve(pod, namespace, entry)
            if value is not None:
                env[entry["name"]] = value
        # The projected ServiceAccount token a kubelet would mount.
        token = self.core.create_namespaced_service_account_token(
            pod["spec"]["serviceAccountName"],
            namespace,
            {"spec": {"expirationSeconds": 3600, "audiences": []}},
        ).status.token
        token_file = folder / "token"
        token_file.write_text(token)
        env["SMARTDIFF_KUBE_SERVER"] = self.server
        env["SMARTDIFF_KUBE_TOKEN_FILE"] = str(token_file)
        env["SMARTDIFF_KUBE_CA_FILE"] = self.ca_file
        env["SMARTDIFF_OUTPUT_DIR"] = str(folder / "output")
        env.update(self.extra_env)
        return env

    def _resolve(self, pod: dict[str, Any], namespace: str, entry: dict[str, Any]) -> str | None:
        if "value" in entry:
            return str(entry["value"])
        source = entry.get("valueFrom") or {}
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            try:
                secret = self.core.read_namespaced_secret(ref["name"], namespace)
            except Exception:
                if ref.get("optional"):
                    return None
                raise
            data = secret.data or {}
            if ref["key"] not in data:
                if ref.get("optional"):
                    return None
                raise KeyError(f"secret {ref['name']} has no key {ref['key']}")
            import base64

            return base64.b64decode(data[ref["key"]]).decode()
        raise ValueError(f"unsupported env source {entry}")


def field_value(pod: dict[str, Any], path: str) -> str:
    """The downward API: ``metadata.name``, ``metadata.annotations['k']``, ``spec.nodeName``."""
    if path.startswith("metadata.annotations['"):
        key = path[len("metadata.annotations['") : -2]
        return str(pod["metadata"].get("annotations", {}).get(key, ""))
    if path.startswith("metadata.labels['"):
        key = path[len("metadata.labels['") : -2]
        return str(pod["metadata"].get("labels", {}).get(key, ""))
    node: Any = pod
    for part in path.split("."):
        node = node.get(part, "") if isinstance(node, dict) else ""
    return str(node)


def translate_command(command: list[str]) -> list[str]:
    """``torchrun ... --nproc-per-node N ... -m MODULE`` -> one local CPU rank of MODULE."""
    assert command[0] == "torchrun", command
    module = command[command.index("-m") + 1]
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", "1",
        "-m", module,
    ]  # fmt: skip


def iter_conditions(vg: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    for condition in (vg.get("status") or {}).get("conditions") or []:
        yield condition["type"], condition["status"], condition.get("reason", "")


def condition(vg: dict[str, Any], condition_type: str) -> dict[str, Any] | None:
    for item in (vg.get("status") or {}).get("conditions") or []:
        if item["type"] == condition_type:
            return dict(item)
    return None


CRD_FILE = REPO / "crds" / "smartdiff.io_videogenerations.yaml"
OPERATOR_NAMESPACE = "smartdiff-system"


def apply_crd(kubectl: Any) -> None:
    """Apply the committed CRD and wait until it is served."""
    kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    kubectl.run(
        "wait",
        "--for=condition=Established",
        "crd/videogenerations.smartdiff.io",
        "--timeout=60s",
    )


def admin_api(cluster: Any) -> Any:
    """A ``kubernetes`` ApiClient with the cluster's admin kubeconfig."""
    from kubernetes import config

    return config.new_client_from_config(config_file=cluster.kubeconfig)


@contextlib.contextmanager
def running_operator(cluster: Any, kubectl: Any, workdir: Path) -> Iterator[OperatorProcess]:
    """The operator as a subprocess, authenticated as a ServiceAccount with only its RBAC."""
    from smartdiff_operator import rbac

    apply_crd(kubectl)
    if kubectl.run("get", "namespace", OPERATOR_NAMESPACE, check=False).returncode != 0:
        kubectl.run("create", "namespace", OPERATOR_NAMESPACE)
    for obj in rbac.operator_objects(OPERATOR_NAMESPACE):
        kubectl.apply(obj)
    token = kubectl.run(
        "create", "token", rbac.OPERATOR_NAME, "-n", OPERATOR_NAMESPACE, "--duration=2h"
    ).stdout.strip()
    workdir.mkdir(parents=True, exist_ok=True)
    kubeconfig = token_kubeconfig(workdir / "operator.kubeconfig", cluster.server,
                                  cluster.ca_file, token)  # fmt: skip
    operator = OperatorProcess(kubeconfig=kubeconfig, log_path=workdir / "operator.log")
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()


def api_call(
    cluster: Any, method: str, path: str, token: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    """One request to the API server with a bearer token; ``(HTTP status, JSON body)``."""
    import ssl

    ctx = ssl.create_default_context(cafile=cluster.ca_file)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/merge-patch+json"
    request = urllib.request.Request(cluster.server + path, data=data, headers=headers,
                                     method=method)  # fmt: skip
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
