"""The topology planner: how many nodes, and which parallel degrees, for a request.

Role: a pure, torch-free function shared by the operator (which sizes the Job and
writes ``status.topology``) and the runtime (which builds its device mesh from the
same answer). Given the GPUs a ``VideoGeneration`` asks for, how many fit on one
node, the transformer's head count, the sequence length and whether CFG runs, it
returns a ``Topology``: ``nodes x gpus_per_node`` GPUs split as ``cfg x ring x
ulysses`` (outermost to innermost in rank order).

Rank layout: rank = (cfg_index * ring + ring_index) * ulysses + ulysses_index, so a
Ulysses group is ``ulysses`` consecutive ranks. The planner keeps every Ulysses
group inside one node (its all-to-all is the heaviest collective), lets ring
attention (point-to-point, overlappable) cross nodes, and puts the two CFG branches
(one gather per step) outermost.

Auto planning, in order of preference:
1. CFG parallel (``cfg=2``) when CFG runs and the GPU count is even;
2. Ulysses over the largest degree that divides the context ranks, fits a node and
   divides the head count (an even head split);
3. ring attention over the remaining factor.

How many GPUs: ``resolve_gpus`` -- the spec's ``resources.gpus`` if set, else the
model catalog's default for the model, else 1. The operator resolves it once and
hands the count to the pods, so the runtime plans with the same number.

Explicit degrees are checked instead of planned. An uneven head split (a Ulysses
degree not dividing, or exceeding, the head count) is accepted only when the
runtime supports it (``uneven_heads``). Impossible requests raise ``ValueError``
naming the fields, their values and what would work.
Talks to: nothing (stdlib only).
"""

from __future__ import annotations

from dataclasses import dataclass

from smartdiff.api import checks

# Wan2.1 VAE (and Wan2.2 A14B): 4x in time, 8x in space; transformer patch (t, h, w) =
# (1, 2, 2). The Wan2.2 VAE of TI2V-5B compresses 16x in space (4x fewer tokens).
WAN_TEMPORAL_COMPRESSION = 4
WAN_SPATIAL_COMPRESSION = 8
WAN22_SPATIAL_COMPRESSION = 16
WAN_PATCH = (1, 2, 2)
DEFAULT_GPUS = 1


def resolve_gpus(requested: int | None, model_default: int | None) -> int:
    """The GPU count a generation runs on (the single place this is decided).

    Args:
        requested: ``spec.resources.gpus``; None when the manifest leaves it out.
        model_default: the model catalog's ``defaultGpus`` for the model; None if unset.

    Returns:
        ``requested`` if set, else ``model_default`` if set, else 1.

    Raises:
        ValueError: the chosen value is not an integer in [1, MAX_GPUS].
    """
    for name, value in (("resources.gpus", requested), ("defaultGpus", model_default)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is not allowed: must be an integer")
        if not 1 <= value <= checks.MAX_GPUS:
            raise ValueError(f"{name}={value} is not allowed: must be in [1, {checks.MAX_GPUS}]")
        return value
    return DEFAULT_GPUS


@dataclass(frozen=True)
class ParallelDegrees:
    """Requested degrees of the three parallel dimensions (explicit parallelism)."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def world_size(self) -> int:
        """``cfg * ulysses * ring``."""
        return self.cfg * self.ulysses * self.ring


@dataclass(frozen=True)
class Topology:
    """Where the ranks of one generation run and how they split the work.

    Args:
        nodes: number of nodes (pods) the run spans.
        gpus_per_node: GPUs used on each node (the same on all nodes).
        cfg: CFG-parallel degree (1 or 2).
        ulysses: Ulysses context-parallel degree (all-to-all over heads).
        ring: ring-attention context-parallel degree.
    """

    nodes: int
    gpus_per_node: int
    cfg: int
    ulysses: int
    ring: int

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "ulysses", "ring"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Topology {name}={value!r} is not allowed: must be an int >= 1")
        if self.cfg not in (1, 2):
            raise ValueError(f"Topology cfg={self.cfg!r} is not allowed: cfg must be 1 or 2")
        if self.cfg * self.ulysses * self.ring != self.nodes * self.gpus_per_node:
            raise ValueError(
                f"Topology cfg={self.cfg} x ulysses={self.ulysses} x ring={self.ring} = "
                f"{self.world_size} ranks does not match nodes={self.nodes} x "
                f"gpus_per_node={self.gpus_per_node} = {self.nodes * self.gpus_per_node} GPUs"
            )

    @property
    def world_size(self) -> int:
        """Number of ranks: ``cfg * ulysses * ring``."""
        return self.cfg * self.ulysses * self.ring

    @property
    def gpus(self) -> int:
        """Number of GPUs: ``nodes * gpus_per_node``."""
        return self.nodes * self.gpus_per_node

    @property
    def summary(self) -> str:
        """A short label for printer columns: ``cfg2xu2``, ``u4xr2``, ``single``."""
        return degrees_summary(self.cfg, self.ulysses, self.ring)


def degrees_summary(cfg: int, ulysses: int, ring: int) -> str:
    """``cfg2xu2``-style label of parallel degrees; ``single`` when all are 1."""
    parts = [
        f"{label}{degree}"
        for label, degree in (("cfg", cfg), ("u", ulysses), ("r", ring))
        if degree > 1
    ]
    return "x".join(parts) if parts else "single"


def video_tokens(
    *,
    width: int,
    height: int,
    frames: int,
    temporal_compression: int = WAN_TEMPORAL_COMPRESSION,
    spatial_compression: int = WAN_SPATIAL_COMPRESSION,
    patch: tuple[int, int, int] = WAN_PATCH,
) -> int:
    """Transformer sequence length of a video (Wan defaults: 832x480x81 -> 32760).

    ``spatial_compression`` is the VAE's: 8 for the Wan2.1 VAE, 16 for Wan2.2 TI2V-5B's.
    """
    latent_frames = (frames - 1) // temporal_compression + 1
    latent_height = height // spatial_compression
    latent_width = width // spatial_compression
    return (latent_frames // patch[0]) * (latent_height // patch[1]) * (latent_width // patch[2])


def plan_topology(
    *,
    gpus: int,
    gpus_per_node: int | None,
    num_heads: int,
    tokens: int,
    do_cfg: bool,
    explicit: ParallelDegrees | None = None,
    uneven_heads: bool = True,
) -> Topology:
    """Plan (or, with ``explicit``, check) the topology of one generation.

    Args:
        gpus: total GPUs (``resolve_gpus`` of ``spec.resources.gpus`` and the catalog).
        gpus_per_node: most GPUs one node offers (``spec.resources.gpusPerNode``);
            None means all GPUs are on one node.
        num_heads: attention heads of the transformer (Wan2.1 1.3B: 12, 14B: 40).
        tokens: transformer sequence length (see ``video_tokens``).
        do_cfg: whether classifier-free guidance runs (guidance scale > 1).
        explicit: degrees to check instead of planning (``parallelism.mode: explicit``).
        uneven_heads: whether the runtime accepts a Ulysses degree that does not
            divide (or exceeds) ``num_heads``; auto planning never needs it.

    Raises:
        ValueError: the request cannot run; the message names the fields.
    """
    _check_positive(gpus=gpus, num_heads=num_heads, tokens=tokens)
    nodes, per_node = _node_layout(gpus, gpus_per_node)
    if explicit is not None:
        _check_explicit(explicit, gpus, num_heads, tokens, do_cfg, uneven_heads)
        return Topology(nodes, per_node, explicit.cfg, explicit.ulysses, explicit.ring)

    cfg = 2 if do_cfg and gpus % 2 == 0 else 1
    context = gpus // cfg
    if tokens < context:
        raise ValueError(
            f"gpus={gpus} is too many for tokens={tokens}: the sequence is split over "
            f"{context} context-parallel ranks and each needs at least one token; "
            f"use at most {tokens * cfg} GPUs"
        )
    ulysses = max(
        degree
        for degree in _divisors(context)
        if per_node % degree == 0 and num_heads % degree == 0
    )
    return Topology(nodes, per_node, cfg, ulysses, context // ulysses)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value} is not allowed: {name} must be >= 1")
    if values.get("gpus", 1) > checks.MAX_GPUS:
        raise ValueError(
            f"gpus={values['gpus']} is not allowed: gpus must be at most {checks.MAX_GPUS}"
        )


def _node_layout(gpus: int, gpus_per_node: int | None) -> tuple[int, int]:
    """``(nodes, gpus per node)``: one node if it fits, else equal shares of full nodes."""
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ValueError(
            f"gpus_per_node={gpus_per_node} is not allowed: gpus_per_node must be >= 1"
        )
    if gpus_per_node is None or gpus <= gpus_per_node:
        return 1, gpus
    if gpus % gpus_per_node != 0:
        lower = gpus // gpus_per_node * gpus_per_node
        raise ValueError(
            f"gpus={gpus} is not a multiple of gpus_per_node={gpus_per_node}: a run that "
            f"spans nodes uses every GPU of each node; use {lower} or "
            f"{lower + gpus_per_node} GPUs"
        )
    return gpus // gpus_per_node, gpus_per_node


def _check_explicit(
    degrees: ParallelDegrees,
    gpus: int,
    num_heads: int,
    tokens: int,
    do_cfg: bool,
    uneven_heads: bool,
) -> None:
    if degrees.cfg not in (1, 2):
        raise ValueError(f"parallelism cfg={degrees.cfg} is not allowed: cfg must be 1 or 2")
    for name, value in (("ulysses", degrees.ulysses), ("ring", degrees.ring)):
        if value < 1:
            raise ValueError(f"parallelism {name}={value} is not allowed: {name} must be >= 1")
    if degrees.world_size != gpus:
        raise ValueError(
            f"parallelism cfg={degrees.cfg} x ulysses={degrees.ulysses} x "
            f"ring={degrees.ring} = {degrees.world_size} does not match gpus={gpus}: "
            "the product of the explicit degrees must equal the GPU count"
        )
    if degrees.cfg == 2 and not do_cfg:
        raise ValueError(
            "parallelism cfg=2 is not allowed without classifier-free guidance "
            "(guidance scale <= 1 runs one branch): use cfg=1 or a guidance scale > 1"
        )
    if num_heads % degrees.ulysses != 0 and not uneven_heads:
        usable = [d for d in _divisors(num_heads) if d <= degrees.ulysses]
        raise ValueError(
            f"parallelism ulysses={degrees.ulysses} does not divide num_heads={num_heads} "
            f"and this runtime needs an even head split: use one of {usable}"
        )
    context = degrees.ulysses * degrees.ring
    if tokens < context:
        raise ValueError(
            f"parallelism ulysses={degrees.ulysses} x ring={degrees.ring} = {context} "
            f"context-parallel ranks is too many for tokens={tokens}: each rank needs "
            "at least one token"
        )


def _divisors(value: int) -> list[int]:
    return [candidate for candidate in range(1, value + 1) if value % candidate == 0]
