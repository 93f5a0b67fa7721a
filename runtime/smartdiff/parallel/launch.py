"""The launch environment of one rank, as torchrun (and a Kubernetes pod) provides it.

torchrun exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``
(the node index), ``MASTER_ADDR`` and ``MASTER_PORT`` to every worker, on one node
(``torchrun --standalone --nproc-per-node N``) as on several (``--nnodes M --rdzv-backend c10d
--rdzv-endpoint HOST:PORT --rdzv-id JOB``); ``torch.distributed`` then initializes from them
with ``init_method="env://"``. :func:`read_launch_env` validates them into a :class:`LaunchEnv`;
a process started without torchrun gets a single-rank environment.

Talks to: nothing (stdlib only); :mod:`smartdiff.parallel.groups` consumes the result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    """Where this rank sits in the launch.

    Args:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of ranks over all nodes.
        local_rank: rank on this node (the CUDA device index).
        local_world_size: ranks on this node.
        node_rank: index of this node (torchrun's ``GROUP_RANK``).
        master_addr / master_port: the rendezvous store ``env://`` connects to; empty / 0 when
            ``world_size == 1`` and nothing needs to connect.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "local_rank", "node_rank"):
            _check_int(name, getattr(self, name), 0)
        for name in ("world_size", "local_world_size"):
            _check_int(name, getattr(self, name), 1)
        if self.rank >= self.world_size:
            raise ValueError(
                f"launch env RANK={self.rank} is not allowed: must be < WORLD_SIZE="
                f"{self.world_size}"
            )
        if self.local_rank >= self.local_world_size:
            raise ValueError(
                f"launch env LOCAL_RANK={self.local_rank} is not allowed: must be < "
                f"LOCAL_WORLD_SIZE={self.local_world_size}"
            )
        if self.local_world_size > self.world_size:
            raise ValueError(
                f"launch env LOCAL_WORLD_SIZE={self.local_world_size} is not allowed: must be "
                f"<= WORLD_SIZE={self.world_size}"
            )
        if self.world_size > 1:
            if not self.master_addr:
                raise ValueError(
                    f"launch env MASTER_ADDR is empty with WORLD_SIZE={self.world_size}: "
                    "start the ranks with torchrun, which sets it"
                )
            if not 0 < self.master_port < 65536:
                raise ValueError(
                    f"launch env MASTER_PORT={self.master_port} is not allowed: must be a TCP "
                    "port in 1..65535"
                )

    @property
    def distributed(self) -> bool:
        """Whether more than one rank takes part."""
        return self.world_size > 1

    @property
    def nodes(self) -> int:
        """Number of nodes, assuming every node runs ``local_world_size`` ranks (torchrun)."""
        return self.world_size // self.local_world_size


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Parse torchrun's variables from ``environ`` (default ``os.environ``).

    Without ``WORLD_SIZE`` the process is a single rank. Raises ``ValueError`` naming the
    variable and its value when one is malformed or inconsistent.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return LaunchEnv()
    world_size = _read_int(env, "WORLD_SIZE", None)
    rank = _read_int(env, "RANK", None)
    local_rank = _read_int(env, "LOCAL_RANK", rank)
    return LaunchEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=_read_int(env, "LOCAL_WORLD_SIZE", world_size),
        node_rank=_read_int(env, "GROUP_RANK", _read_int(env, "NODE_RANK", 0)),
        master_addr=env.get("MASTER_ADDR", ""),
        master_port=_read_int(env, "MASTER_PORT", 0),
    )


def _read_int(env: Mapping[str, str], name: str, default: int | None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(
                f"launch env {name} is missing (WORLD_SIZE is set, so torchrun should have "
                f"set {name} too)"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"launch env {name}={raw!r} is not allowed: must be a decimal integer"
        ) from None


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"LaunchEnv.{name}={value!r} is not allowed: must be an int >= {minimum}")
