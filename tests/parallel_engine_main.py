"""Run under torchrun by ``test_parallel_engine.py``: the tiny model through the real
``Engine`` on every rank with ``ParallelGroups`` for several topologies; rank 0 saves each
video (and the seed and cache summary) to ``argv[1]/<case>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from smartdiff.api.params import CachePolicy, SystemParams, UserParams
from smartdiff.engine.engine import Engine
from smartdiff.engine.task import TaskStatus
from smartdiff.parallel.groups import ParallelGroups

CASES = {  # name -> (cfg, ulysses, ring, cache policy)
    "cfg2": (2, 1, 1, "none"),
    "ulysses2": (1, 2, 1, "none"),
    "ring2": (1, 1, 2, "none"),
    "ulysses2_teacache": (1, 2, 1, "teacache"),
}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    for name, (cfg, ulysses, ring, cache) in CASES.items():
        system = SystemParams(device="cpu", dtype="float32", cfg=cfg, ulysses=ulysses, ring=ring)
        groups = ParallelGroups.from_degrees(system, device="cpu")
        engine = Engine.from_params("wan-tiny-random", system, groups=groups)
        # No seed: each rank draws its own; the generator must share rank 0's.
        params = UserParams(
            model="wan-tiny-random", prompt="a red kite over the sea", width=64, height=48,
            frames=5, steps=4, guidance_scale=4.0, shift=3.0, cache=CachePolicy(policy=cache),
        )  # fmt: skip
        task = engine.submit(params)
        engine.run_until_idle()
        assert task.status is TaskStatus.SUCCEEDED, task.error
        if groups.is_main:
            torch.save({"video": task.buffers.video, "seed": task.seed}, out / f"{name}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
