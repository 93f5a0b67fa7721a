"""``ParallelGroups``: the process groups of one launch, from a device mesh (cfg, ring, ulysses).

Built once per process (:meth:`ParallelGroups.initialize`, or :meth:`ParallelGroups.single`
without torchrun) and passed down explicitly to the parallel DiT wrapper, the CFG helper and the
VAE helper; nothing reads a module global. The mesh has the named dimensions ``cfg``, ``ring``
and ``ulysses``, outermost first, so that (as :mod:`smartdiff.api.topology` plans)::

    rank = (cfg_rank * ring + ring_rank) * ulysses + ulysses_rank

and a Ulysses group is ``ulysses`` consecutive ranks (one node). The ``sequence`` group (ring x
ulysses, the ranks that share one CFG branch and split its tokens) is also built: it gathers
the DiT output. Initialization uses ``init_method="env://"`` from torchrun's variables
(:mod:`smartdiff.parallel.launch`), NCCL on CUDA and gloo on the CPU.

Talks to: ``torch.distributed`` (process groups, ``DeviceMesh``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from smartdiff.parallel.launch import LaunchEnv, read_launch_env

LOG = logging.getLogger(__name__)
MESH_DIMS = ("cfg", "ring", "ulysses")
T = TypeVar("T")


class Degrees(Protocol):
    """Parallel degrees, as ``SystemParams``, ``Topology`` and ``ParallelDegrees`` carry them."""

    @property
    def cfg(self) -> int: ...

    @property
    def ulysses(self) -> int: ...

    @property
    def ring(self) -> int: ...


@dataclass(frozen=True, eq=False)
class ParallelGroups:
    """Process groups and coordinates of this rank; see the module docstring for the layout.

    Args:
        cfg / ring / ulysses: the degrees (their product is the world size).
        rank: global rank.
        device: this rank's compute device.
        mesh: the (cfg, ring, ulysses) device mesh; ``None`` for a single process.
        sequence_group: the ring x ulysses group of this rank; ``None`` for a single process.
        owns_process_group: whether :meth:`initialize` started the default process group (and
            :meth:`shutdown` should destroy it).
    """

    cfg: int
    ring: int
    ulysses: int
    rank: int
    device: torch.device
    mesh: DeviceMesh | None
    sequence_group: dist.ProcessGroup | None
    owns_process_group: bool = False

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ValueError(f"ParallelGroups.cfg={self.cfg!r} is not allowed: must be 1 or 2")
        for name in ("ring", "ulysses"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelGroups.{name}={value!r} is not allowed: must be >= 1")
        if self.world_size > 1 and (self.mesh is None or self.sequence_group is None):
            raise ValueError(
                f"ParallelGroups of world size {self.world_size} needs a mesh and a sequence "
                "group (use ParallelGroups.initialize)"
            )

    # ----------------------------------------------------------------- construction

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelGroups:
        """One process, no communication: every parallel helper runs the plain model."""
        return cls(1, 1, 1, 0, torch.device(device), None, None)

    @classmethod
    def from_degrees(
        cls,
        degrees: Degrees,
        *,
        launch: LaunchEnv | None = None,
        device: torch.device | str = "auto",
    ) -> ParallelGroups:
        """:meth:`initialize` with the degrees of a ``SystemParams``, ``Topology`` or
        ``ParallelDegrees`` (anything with ``cfg``, ``ulysses`` and ``ring``)."""
        return cls.initialize(
            cfg=degrees.cfg,
            ulysses=degrees.ulysses,
            ring=degrees.ring,
            launch=launch,
            device=device,
        )

    @classmethod
    def initialize(
        cls,
        *,
        cfg: int = 1,
        ulysses: int = 1,
        ring: int = 1,
        launch: LaunchEnv | None = None,
        device: torch.device | str = "auto",
        timeout: timedelta | None = None,
    ) -> ParallelGroups:
        """Join the launch (``env://``) and build the mesh for ``cfg x ring x ulysses`` ranks.

        Args:
            cfg / ulysses / ring: degrees; their product must equal the launch's world size.
            launch: the rank's environment; default :func:`read_launch_env` (torchrun's).
            device: ``"auto"`` (``cuda:<local_rank>`` when CUDA exists, else the CPU), or a
                device string.
            timeout: collective timeout passed to ``init_process_group``.
        """
        env = launch if launch is not None else read_launch_env()
        degrees = cfg * ulysses * ring
        if degrees != env.world_size:
            raise ValueError(
                f"parallel degrees cfg={cfg} x ring={ring} x ulysses={ulysses} = {degrees} do "
                f"not match the launch's WORLD_SIZE={env.world_size}: start torchrun with "
                f"--nproc-per-node x --nnodes = {degrees} ranks, or change the degrees"
            )
        compute = _resolve_device(device, env.local_rank)
        if ulysses > 1 and env.local_world_size % ulysses:
            LOG.warning(
                "ulysses=%d does not divide the %d ranks of a node: Ulysses all-to-alls will "
                "cross nodes (the planner keeps them inside one)",
                ulysses,
                env.local_world_size,
            )
        if env.world_size == 1:
            return cls(cfg, ring, ulysses, 0, compute, None, None)
        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if compute.type == "cuda" else "gloo"
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                rank=env.rank,
                world_size=env.world_size,
                timeout=timeout,
                device_id=compute if compute.type == "cuda" else None,
            )
        elif dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise ValueError(
                f"the default process group (rank {dist.get_rank()} of "
                f"{dist.get_world_size()}) does not match the launch env (RANK={env.rank}, "
                f"WORLD_SIZE={env.world_size})"
            )
        mesh = init_device_mesh(compute.type, (cfg, ring, ulysses), mesh_dim_names=MESH_DIMS)
        span = ring * ulysses
        sequence, _ = dist.new_subgroups_by_enumeration(
            [list(range(start, start + span)) for start in range(0, env.world_size, span)]
        )
        if not isinstance(sequence, dist.ProcessGroup):
            raise RuntimeError(f"rank {env.rank} is in no sequence group of size {span}")
        return cls(cfg, ring, ulysses, env.rank, compute, mesh, sequence, owns)

    def shutdown(self) -> None:
        """Destroy the default process group if :meth:`initialize` created it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------- coordinates

    @property
    def world_size(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def sequence_size(self) -> int:
        """Ranks that split one branch's tokens: ``ring * ulysses``."""
        return self.ring * self.ulysses

    @property
    def cfg_rank(self) -> int:
        """0 runs the conditional branch, 1 the unconditional one (when ``cfg == 2``)."""
        return self.rank // self.sequence_size

    @property
    def ring_rank(self) -> int:
        return self.rank // self.ulysses % self.ring

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses

    @property
    def sequence_rank(self) -> int:
        """Index of this rank's token shard: ``ring_rank * ulysses + ulysses_rank``."""
        return self.rank % self.sequence_size

    @property
    def is_main(self) -> bool:
        """Global rank 0: writes outputs, reports progress."""
        return self.rank == 0

    def group(self, dim: str) -> dist.ProcessGroup:
        """The process group along mesh dimension ``dim`` (``cfg``, ``ring`` or ``ulysses``)."""
        if dim not in MESH_DIMS:
            raise ValueError(f"mesh dimension {dim!r} is not allowed: one of {MESH_DIMS}")
        if self.mesh is None:
            raise ValueError(f"a single-process ParallelGroups has no {dim!r} group")
        return self.mesh.get_group(dim)

    def share(self, value: T, src: int = 0) -> T:
        """Rank ``src``'s ``value`` on every rank (a picklable object, e.g. a drawn seed).

        Every rank must compute the same latents: anything drawn per process (a seed when the
        request has none) must be shared before the denoising starts.
        """
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=src, device=self.device)
        shared: T = box[0]
        return shared

    def describe(self) -> str:
        """``rank 3/8 cfg 1/2 ring 0/2 ulysses 1/2 on cuda:3``."""
        return (
            f"rank {self.rank}/{self.world_size} cfg {self.cfg_rank}/{self.cfg} ring "
            f"{self.ring_rank}/{self.ring} ulysses {self.ulysses_rank}/{self.ulysses} on "
            f"{self.device}"
        )


def _resolve_device(device: torch.device | str, local_rank: int) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        else:
            return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} is not allowed: no CUDA device is available")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(resolved)
    return resolved
