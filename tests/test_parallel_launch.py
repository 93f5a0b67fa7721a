"""Launch under real torchrun: one node (``--standalone``) and two nodes (c10d rendezvous).

Both run ``benchmarks/parallel_step.py --tiny`` on the CPU (gloo): the ranks read torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...), join through
``env://``, build their ``ParallelGroups`` and compare each parallel prediction with their own
single-process prediction (``check_rel_err`` in the JSON, relative error <= 1e-5). The two-node
case starts two torchrun agents on loopback that meet through a c10d rendezvous, as the pods of
an Indexed Job do, with ring attention across the two "nodes".
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "parallel_step.py"
TOLERANCE = 1e-5
SMOKE = ["--tiny", "--no-diffusers", "--steps", "1", "--warmup", "0"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _checked(report_path: Path, topologies: list[str], launcher: str) -> None:
    report = json.loads(report_path.read_text())
    ours = [r for r in report["results"] if r["impl"] == "smartdiff"]
    assert [r["topology"] for r in ours] == topologies, report
    for result in ours:
        assert result["check_rel_err"] <= TOLERANCE, result
        assert result["median_s"] > 0
    assert report["command"].startswith(launcher), report["command"]


def test_torchrun_one_node(tmp_path: Path) -> None:
    out = tmp_path / "one_node.json"
    command = _torchrun(
        "--standalone", "--nproc-per-node", "2", str(SCRIPT), *SMOKE,
        "--topologies", "auto,r2", "--out", str(out),
    )  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _checked(out, ["cfg2", "u2", "r2"], "torchrun --nproc-per-node 2 ")


def test_torchrun_two_nodes_c10d_rendezvous(tmp_path: Path) -> None:
    out = tmp_path / "two_nodes.json"
    endpoint = f"127.0.0.1:{_free_port()}"
    command = _torchrun(
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", endpoint, "--rdzv-id", "vg-test", str(SCRIPT), *SMOKE,
        "--topologies", "r2", "--out", str(out),
    )  # fmt: skip
    agents = [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    logs = []
    try:
        for agent in agents:
            logs.append(agent.communicate(timeout=180)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert all(agent.returncode == 0 for agent in agents), "\n".join(log[-3000:] for log in logs)
    _checked(out, ["r2"], "torchrun --nnodes 2 --nproc-per-node 1 ")
