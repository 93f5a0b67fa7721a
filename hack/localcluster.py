#!/usr/bin/env python3
"""A real Kubernetes control plane and S3 server on loopback, for tests and demos.

Starts, from the pinned binaries that ``hack/tools.sh`` builds and caches:
etcd, kube-apiserver (TLS, RBAC, service-account token signing),
kube-controller-manager (Job controller, garbage collector, service accounts),
kube-scheduler, kwok (fake nodes advertising ``nvidia.com/gpu``) and versitygw
(an S3 gateway over a local folder). Every port is chosen free on 127.0.0.1,
every process runs in its own session and is stopped by ``down``, so a clean
stop leaves no process and no port behind.

Standard library only: it runs under any Python 3.11, before the project's
virtual environment exists. Used by ``hack/cluster`` (shell) and by the pytest
session fixtures in ``tests/conftest.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

HACK_DIR = Path(__file__).resolve().parent
TOOLS = HACK_DIR / "tools.sh"
KWOK_STAGES = HACK_DIR / "kwok-stages.yaml"
DEFAULT_ROOT = Path(
    os.environ.get("SMARTDIFF_CLUSTER_DIR", f"/tmp/smartdiff-cluster-{os.getuid()}")
)

S3_ACCESS_KEY = "smartdiff"
S3_SECRET_KEY = "smartdiff-secret-key"
S3_REGION = "us-east-1"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
GPU_RESOURCE = "nvidia.com/gpu"


class ClusterError(RuntimeError):
    """The local cluster could not be started or stopped cleanly."""


@dataclass
class ClusterState:
    """What a running local cluster is made of; saved as ``state.json`` in its root."""

    root: str
    kubeconfig: str
    server: str
    ca_file: str
    s3_endpoint: str
    s3_access_key: str = S3_ACCESS_KEY
    s3_secret_key: str = S3_SECRET_KEY
    s3_region: str = S3_REGION
    nodes: list[str] = field(default_factory=list)
    gpus_per_node: int = 8
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def save(self) -> None:
        Path(self.root, "state.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, root: Path) -> ClusterState:
        return cls(**json.loads((root / "state.json").read_text()))

    def env(self) -> dict[str, str]:
        """Environment variables that point clients at this cluster and S3 server."""
        return {
            "KUBECONFIG": self.kubeconfig,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": self.s3_region,
        }


def tool_paths() -> dict[str, str]:
    """Build what is missing and return name -> binary path for every tool."""
    out = subprocess.run([str(TOOLS), "env"], check=True, capture_output=True, text=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- certificates -------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_cert(pki: Path, name: str, subject: str, *, server: bool = False) -> None:
    """A P-256 key and a certificate signed by the cluster CA."""
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=pki)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    ext = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if server:
        ext.append("extendedKeyUsage=serverAuth")
        ext.append(
            "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
            "DNS:kubernetes.default.svc.cluster.local"
        )
    else:
        ext.append("extendedKeyUsage=clientAuth")
    (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "3650",
        "-sha256",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=pki,
    )


def make_pki(pki: Path) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=pki)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=smartdiff-local-ca",
        "-days",
        "3650",
        "-sha256",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    _make_cert(pki, "apiserver", "/CN=kube-apiserver", server=True)
    _make_cert(pki, "admin", "/O=system:masters/CN=smartdiff-admin")
    _make_cert(pki, "controller-manager", "/CN=system:kube-controller-manager")
    _make_cert(pki, "scheduler", "/CN=system:kube-scheduler")
    # Service-account token signing key pair.
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=pki)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    path.write_text(
        textwrap.dedent(
            f"""\
            apiVersion: v1
            kind: Config
            clusters:
            - name: smartdiff-local
              cluster:
                server: {server}
                certificate-authority: {pki / "ca.crt"}
            users:
            - name: {user}
              user:
                client-certificate: {pki / f"{user}.crt"}
                client-key: {pki / f"{user}.key"}
            contexts:
            - name: smartdiff-local
              context:
                cluster: smartdiff-local
                user: {user}
                namespace: default
            current-context: smartdiff-local
            """
        )
    )


# --- processes ----------------------------------------------------------------------


def _start(
    name: str, argv: list[str], logs: Path, *, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=cwd,
    )


def _log_tail(logs: Path, name: str, lines: int = 25) -> str:
    path = logs / f"{name}.log"
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait(
    what: str, check, timeout: float, procs: dict[str, subprocess.Popen[bytes]], logs: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise ClusterError(
                    f"{name} exited with code {proc.returncode} while waiting for {what}; "
                    f"last log lines ({logs / (name + '.log')}):\n{_log_tail(logs, name)}"
                )
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")


def _https_ok(url: str, pki: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


def _kubectl(kubectl: str, kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        [kubectl, "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def node_manifest(name: str, gpus: int) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.product": "NVIDIA-H200",
                "nvidia.com/gpu.count": str(gpus),
            },
        },
        "status": {
            "capacity": {
                "cpu": "128",
                "memory": "1536Gi",
                "ephemeral-storage": "4Ti",
                "pods": "110",
                GPU_RESOURCE: str(gpus),
            }
        },
    }


# --- the cluster --------------------------------------------------------------------


def up(
    root: Path = DEFAULT_ROOT, *, nodes: int = 2, gpus_per_node: int = 8, timeout: float = 90
) -> ClusterState:
    """Start everything under ``root`` (which must not hold a running cluster)."""
    if (root / "state.json").exists():
        try:
            state = ClusterState.load(root)
        except (OSError, ValueError, TypeError):
            state = None
        if state and any(_alive(pid) for pid in state.pids.values()):
            raise ClusterError(
                f"a cluster is already running in {root}; run `hack/cluster down` first"
            )
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    pki, logs = root / "pki", root / "logs"
    logs.mkdir()
    tools = tool_paths()
    make_pki(pki)

    ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver", "s3")}
    server = f"https://127.0.0.1:{ports['apiserver']}"
    admin_kc = root / "kubeconfig"
    state = ClusterState(
        root=str(root),
        kubeconfig=str(admin_kc),
        server=server,
        ca_file=str(pki / "ca.crt"),
        s3_endpoint=f"http://127.0.0.1:{ports['s3']}",
        gpus_per_node=gpus_per_node,
        ports=ports,
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def started(name: str, proc: subprocess.Popen[bytes]) -> None:
        procs[name] = proc
        state.pids[name] = proc.pid
        state.save()

    try:
        # versitygw's sidecar folder must not share a path prefix with its data root.
        s3_dir, s3_meta = root / "s3" / "data", root / "s3" / "meta"
        s3_dir.mkdir(parents=True)
        s3_meta.mkdir()
        started(
            "versitygw",
            _start(
                "versitygw",
                [
                    tools["versitygw"],
                    "--access",
                    S3_ACCESS_KEY,
                    "--secret",
                    S3_SECRET_KEY,
                    "--region",
                    S3_REGION,
                    "--port",
                    f"127.0.0.1:{ports['s3']}",
                    "posix",
                    "--sidecar",
                    str(s3_meta),
                    str(s3_dir),
                ],
                logs,
            ),
        )
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        started(
            "etcd",
            _start(
                "etcd",
                [
                    tools["etcd"],
                    "--name",
                    "local",
                    "--data-dir",
                    str(root / "etcd"),
                    "--listen-client-urls",
                    etcd_url,
                    "--advertise-client-urls",
                    etcd_url,
                    "--listen-peer-urls",
                    peer_url,
                    "--initial-advertise-peer-urls",
                    peer_url,
                    "--initial-cluster",
                    f"local={peer_url}",
                    "--unsafe-no-fsync",
                    "--listen-metrics-urls",
                    "",
                    "--log-level",
                    "warn",
                ],
                logs,
            ),
        )
        _wait("etcd", lambda: port_open(ports["etcd"]), 30, procs, logs)
        started(
            "kube-apiserver",
            _start(
                "kube-apiserver",
                [
                    tools["kube-apiserver"],
                    f"--etcd-servers={etcd_url}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={ports['apiserver']}",
                    f"--cert-dir={pki}",
                    f"--tls-cert-file={pki / 'apiserver.crt'}",
                    f"--tls-private-key-file={pki / 'apiserver.key'}",
                    f"--client-ca-file={pki / 'ca.crt'}",
                    "--authorization-mode=Node,RBAC",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={pki / 'sa.pub'}",
                    f"--service-account-signing-key-file={pki / 'sa.key'}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--allow-privileged=true",
                    "--profiling=false",
                ],
                logs,
            ),
        )
        _wait(
            "kube-apiserver /readyz",
            lambda: _https_ok(f"{server}/readyz", pki),
            timeout,
            procs,
            logs,
        )

        write_kubeconfig(admin_kc, server, pki, "admin")
        for user in ("controller-manager", "scheduler"):
            write_kubeconfig(root / f"{user}.kubeconfig", server, pki, user)
        cm_kc = root / "controller-manager.kubeconfig"
        started(
            "kube-controller-manager",
            _start(
                "kube-controller-manager",
                [
                    tools["kube-controller-manager"],
                    f"--kubeconfig={cm_kc}",
                    f"--authentication-kubeconfig={cm_kc}",
                    f"--authorization-kubeconfig={cm_kc}",
                    "--bind-address=127.0.0.1",
                    "--secure-port=0",
                    "--leader-elect=false",
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={pki / 'sa.key'}",
                    f"--root-ca-file={pki / 'ca.crt'}",
                    f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                    f"--cluster-signing-key-file={pki / 'ca.key'}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--controllers=*",
                    "--concurrent-gc-syncs=5",
                ],
                logs,
            ),
        )
        sched_kc = root / "scheduler.kubeconfig"
        started(
            "kube-scheduler",
            _start(
                "kube-scheduler",
                [
                    tools["kube-scheduler"],
                    f"--kubeconfig={sched_kc}",
                    f"--authentication-kubeconfig={sched_kc}",
                    f"--authorization-kubeconfig={sched_kc}",
                    "--bind-address=127.0.0.1",
                    "--secure-port=0",
                    "--leader-elect=false",
                ],
                logs,
            ),
        )
        started(
            "kwok",
            _start(
                "kwok",
                [
                    tools["kwok"],
                    f"--kubeconfig={admin_kc}",
                    f"--config={KWOK_STAGES}",
                    "--manage-all-nodes=false",
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                    f"--cidr={POD_CIDR}",
                    "--node-ip=127.0.0.1",
                    "--node-lease-duration-seconds=40",
                ],
                logs,
            ),
        )

        node_names = [f"gpu-node-{i}" for i in range(nodes)]
        docs = {
            "apiVersion": "v1",
            "kind": "List",
            "items": [node_manifest(n, gpus_per_node) for n in node_names],
        }
        _kubectl(tools["kubectl"], admin_kc, "apply", "-f", "-", stdin=json.dumps(docs))
        state.nodes = node_names
        state.save()

        def nodes_ready() -> bool:
            out = _kubectl(tools["kubectl"], admin_kc, "get", "nodes", "-o", "json")
            items = json.loads(out)["items"]
            ready = [
                n
                for n in items
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in n["status"].get("conditions", [])
                )
                and n["status"].get("allocatable", {}).get(GPU_RESOURCE) == str(gpus_per_node)
            ]
            return len(ready) == nodes

        _wait("kwok nodes Ready", nodes_ready, timeout, procs, logs)
        # Pods need the namespace's default ServiceAccount (made by the controller-manager).
        _wait(
            "the default ServiceAccount",
            lambda: bool(
                _kubectl(
                    tools["kubectl"], admin_kc, "get", "serviceaccount", "default", "-o", "name"
                )
            ),
            timeout,
            procs,
            logs,
        )
        _wait("the S3 server", lambda: port_open(ports["s3"]), timeout, procs, logs)
        return state
    except BaseException:
        down(root)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone once reaped.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _stop(procs: list[tuple[str, int]], *, grace: float) -> None:
    """SIGTERM each process group, wait up to ``grace`` seconds, then SIGKILL."""
    for _, pid in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM if grace else signal.SIGKILL)
    deadline = time.monotonic() + max(grace, 5)
    while time.monotonic() < deadline and any(_alive(pid) for _, pid in procs):
        if grace and time.monotonic() > deadline - max(grace, 5) + grace:
            break
        time.sleep(0.05)
    for _, pid in procs:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for _, pid in procs):
        time.sleep(0.05)


def down(root: Path = DEFAULT_ROOT, *, keep: bool = False) -> None:
    """Stop every process of the cluster in ``root`` and check its ports are free."""
    state_file = root / "state.json"
    if not state_file.exists():
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        return
    state = ClusterState.load(root)
    # Clients first, then the API server, then its storage: a server whose etcd
    # vanished first waits out its own timeouts before it exits.
    stages = [
        ["kwok", "kube-scheduler", "kube-controller-manager"],
        ["kube-apiserver"],
        ["etcd", "versitygw"],
    ]
    pids = list(state.pids.items())
    for stage in stages:
        group = [(n, p) for n, p in pids if n in stage] or []
        _stop(group, grace=10)
    _stop(pids, grace=0)
    left = [name for name, pid in pids if _alive(pid)]
    busy = [f"{name}:{port}" for name, port in state.ports.items() if port_open(port)]
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    if left or busy:
        raise ClusterError(f"after stopping: processes still alive {left}, ports still open {busy}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/cluster", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="state folder (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build what is missing and start the cluster and S3 server")
    p_up.add_argument("--nodes", type=int, default=2)
    p_up.add_argument("--gpus-per-node", type=int, default=8)
    sub.add_parser("down", help="stop everything and remove the state folder")
    sub.add_parser("env", help="print shell exports for the running cluster")
    sub.add_parser("build", help="only build (or find cached) binaries")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        for name, path in tool_paths().items():
            print(f"{name}: {path}")
        return 0
    if args.cmd == "up":
        t0 = time.monotonic()
        state = up(args.root, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
        print(
            f"cluster up in {time.monotonic() - t0:.1f}s: {state.server}, "
            f"nodes {', '.join(state.nodes)} ({state.gpus_per_node} x {GPU_RESOURCE} each); "
            f"S3 at {state.s3_endpoint}",
            file=sys.stderr,
        )
        for k, v in state.env().items():
            print(f"export {k}={v}")
        return 0
    if args.cmd == "env":
        for k, v in ClusterState.load(args.root).env().items():
            print(f"export {k}={v}")
        return 0
    down(args.root)
    print("cluster down: no process or port left", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
