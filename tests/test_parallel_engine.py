"""The real engine under torchrun (2 CPU ranks, gloo) equals one process.

``parallel_engine_main.py`` runs the tiny model through ``Engine`` with ``ParallelGroups`` for
CFG parallel, Ulysses, ring, and Ulysses with TeaCache (the cache's decisions reduced over the
sequence ranks); each video must equal the single-process engine's with the same seed
(rank 0's, shared with the other rank) at relative error <= 1e-5.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smartdiff.api.params import CachePolicy, SystemParams, UserParams
from smartdiff.engine.engine import Engine

HERE = Path(__file__).resolve().parent
CASES = {"cfg2": "none", "ulysses2": "none", "ring2": "none", "ulysses2_teacache": "teacache"}


@pytest.fixture(scope="module")
def parallel_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parallel-engine")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(HERE / "parallel_engine_main.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def single_process(seed: int, cache: str) -> torch.Tensor:
    engine = Engine.from_params("wan-tiny-random", SystemParams(device="cpu", dtype="float32"))
    params = UserParams(
        model="wan-tiny-random", prompt="a red kite over the sea", width=64, height=48,
        frames=5, steps=4, guidance_scale=4.0, shift=3.0, seed=seed,
        cache=CachePolicy(policy=cache),
    )  # fmt: skip
    task = engine.submit(params)
    engine.run_until_idle()
    video: torch.Tensor = task.buffers.video
    return video


@pytest.mark.parametrize("case", sorted(CASES))
def test_parallel_engine_equals_one_process(parallel_videos: Path, case: str) -> None:
    saved = torch.load(parallel_videos / f"{case}.pt")
    reference = single_process(saved["seed"], CASES[case])
    error = float((saved["video"] - reference).norm() / reference.norm())
    assert error <= 1e-5, f"{case}: relative error {error:.3e}"
    assert float(reference.std()) > 0.01  # a real video, not a constant
