"""Validate a ``VideoGeneration`` beyond its schema and plan how it runs.

Role: the checks the API server cannot do, before anything is created: the
manifest parses with the API models (a defence against an older CRD), the model
is one the platform serves, and the GPUs can be split for that model and video
(the shared, torch-free topology planner). The GPU count is resolved here, once:
``spec.resources.gpus``, else the catalog's ``defaultGpus`` for the model, else 1
(``smartdiff.api.topology.resolve_gpus``); the Job hands it to the pods. The result is
a ``GenerationPlan`` (topology, model entry, effective weights URI) or a ``SpecError`` whose reason
becomes the ``Failed`` condition's reason and whose message names the field.

Talks to: ``smartdiff.api`` (models, planner) and ``settings`` (model catalog). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from smartdiff.api.topology import Topology
from smartdiff.api.videogeneration import ManifestError, VideoGeneration
from smartdiff_operator.settings import ModelCatalog, ModelEntry

REASON_INVALID: Final = "InvalidSpec"
REASON_UNKNOWN_MODEL: Final = "UnknownModel"
REASON_TOPOLOGY: Final = "ImpossibleTopology"


class SpecError(ValueError):
    """A spec that can never run; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class GenerationPlan:
    """How a valid generation runs.

    Attributes:
        generation: the validated resource.
        model: its catalog entry.
        topology: nodes x GPUs per node and the parallel degrees.
        weights: weights URI (the spec's, else the catalog's default; None: none needed).
    """

    generation: VideoGeneration
    model: ModelEntry
    topology: Topology
    weights: str | None


def parse(manifest: Mapping[str, Any]) -> VideoGeneration:
    """The validated resource, or ``SpecError`` (InvalidSpec) naming every bad field."""
    body = {
        key: manifest[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in manifest
    }
    try:
        return VideoGeneration.from_manifest(body, source="spec")
    except ManifestError as error:
        problems = "; ".join(
            f"spec: {p}" if not p.startswith("spec") else p for p in error.problems
        )
        raise SpecError(REASON_INVALID, problems) from None


def plan(generation: VideoGeneration, catalog: ModelCatalog) -> GenerationPlan:
    """Check the model and plan the topology.

    Raises:
        SpecError: an unknown model or GPUs that cannot be split for it.
    """
    spec = generation.spec
    model = catalog.get(spec.model.name)
    if model is None:
        raise SpecError(
            REASON_UNKNOWN_MODEL,
            f"spec.model.name={spec.model.name!r} is not allowed: this platform serves "
            f"{', '.join(repr(name) for name in catalog.names)}",
        )
    try:
        topology = spec.plan_topology(
            model.num_heads,
            default_gpus=model.default_gpus,
            spatial_compression=model.spatial_compression,
            # The runtime splits heads unevenly (12 heads over Ulysses 8: 2,2,2,2,1,1,1,1).
            uneven_heads=True,
        )
    except ValueError as error:
        field = "spec.parallelism" if spec.parallelism.mode == "explicit" else "spec.resources.gpus"
        if spec.resources.gpus is not None:
            gpus = f"resources.gpus={spec.resources.gpus}"
        else:
            gpus = f"{spec.resolved_gpus(model.default_gpus)} GPUs (resources.gpus unset: the "
            gpus += "model's default)"
        raise SpecError(
            REASON_TOPOLOGY,
            f"{field}: {gpus} cannot run model "
            f"{model.name!r} ({model.num_heads} heads) at {spec.video.width}x"
            f"{spec.video.height}x{spec.video.frames}: {error}",
        ) from None
    return GenerationPlan(
        generation=generation,
        model=model,
        topology=topology,
        weights=spec.model.weights or model.weights,
    )


def plan_manifest(manifest: Mapping[str, Any], catalog: ModelCatalog) -> GenerationPlan:
    """``parse`` then ``plan``."""
    return plan(parse(manifest), catalog)
