"""Reconcile one ``VideoGeneration``: fixed order, idempotent steps, status from observation.

Role: the operator's logic between the kopf handlers (thin, in ``handlers``) and
the pure parts (``plan``, ``manifests``, ``status``), in KubeRay's order:

1. ``ensure``: validate (an invalid spec gets a Failed status and a Warning
   event, then ``SpecError`` -- never retried); create the desired objects in
   order, each create being a no-op when the object exists (deterministic names:
   a restarted operator finds its Job instead of making another); never for a
   generation that already finished (its Job may be gone after its TTL).
2. ``sync``: read the generation, its Job and Pods; compute the status; write
   the operator-owned fields only if they changed, with ``resourceVersion`` as a
   precondition (a lost race re-reads and recomputes); post an Event for each
   transition; count it in the metrics.

3. ``PeriodicResync``: a safety net, like controller-runtime's sync period --
   every ``reconcile.resync_seconds`` a background thread syncs every unfinished
   generation, repairing a status whose triggering event failed to write it.
   (A kopf timer would do the same but puts a finalizer on every generation,
   which blocks its deletion whenever the operator is down.)

Errors: ``SpecError`` (will never work) and ``KubeError`` (``transient`` says
whether a retry may help) reach the handlers, which turn them into kopf's
``PermanentError`` / ``TemporaryError``.

Talks to: the API server through ``kube.KubeApi``; Events through an
``EventSink``; ``metrics``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from smartdiff.api.topology import Topology
from smartdiff_operator import names
from smartdiff_operator.kube import KubeApi, KubeError
from smartdiff_operator.manifests import objects_for_plan
from smartdiff_operator.metrics import OperatorMetrics
from smartdiff_operator.plan import SpecError, plan_manifest
from smartdiff_operator.settings import OperatorSettings
from smartdiff_operator.status import (
    TERMINAL_PHASES,
    EventSpec,
    Observation,
    compute_status,
    parse_status,
    status_patch,
    transition_events,
)

LOG = logging.getLogger(__name__)


class EventSink(Protocol):
    """Posts a Kubernetes Event about an object."""

    def post(self, obj: Mapping[str, Any], event: EventSpec) -> None: ...


class StatusConflict(RuntimeError):
    """Status writes kept losing races with other writers; retry later."""


class ForeignObject(RuntimeError):
    """A child's name is taken by an object another owner controls; retry later."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Reconciler:
    """Ensures children and status of generations.

    Args:
        settings: operator settings.
        api: API access.
        metrics: the operator's metrics.
        events: where Events go.
        clock: the current time (UTC, aware); injectable for tests.
    """

    settings: OperatorSettings
    api: KubeApi
    metrics: OperatorMetrics
    events: EventSink
    clock: Callable[[], datetime] = _utcnow

    def ensure(self, body: Mapping[str, Any]) -> None:
        """Create what is missing for the generation ``body``, then sync its status.

        Raises:
            SpecError: the spec can never run (its Failed status is written first).
            KubeError: an API call failed.
            ForeignObject: a child's name is taken by someone else's object.
        """
        meta = body.get("metadata", {})
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        if parse_status(body.get("status")).phase in TERMINAL_PHASES:
            self.sync(namespace, name)
            return
        try:
            generation_plan = plan_manifest(body, self.settings.models)
        except SpecError as error:
            self.metrics.rejected.labels(error.reason).inc()
            self.metrics.reconciles.labels("invalid").inc()
            self.sync(namespace, name)
            raise
        uid = str(meta.get("uid"))
        for manifest in objects_for_plan(generation_plan, self.settings):
            kind = str(manifest["kind"])
            child = str(manifest["metadata"]["name"])
            if self.api.create(manifest):
                self.metrics.objects_created.labels(kind).inc()
                if kind == "Job":
                    self.metrics.jobs_created.inc()
                    self.events.post(
                        body,
                        EventSpec(
                            "Normal",
                            "JobCreated",
                            f"created Job {child} ({generation_plan.topology.nodes} pod(s) x "
                            f"{generation_plan.topology.gpus_per_node} GPU(s), "
                            f"{generation_plan.topology.summary})",
                        ),
                    )
            elif kind == "Job":
                existing = self.api.get("Job", namespace, child)
                if existing is not None and not _owned_by(existing, uid):
                    raise ForeignObject(
                        f"Job {namespace}/{child} exists but is not owned by VideoGeneration "
                        f"{name} (uid {uid}); it may be an old one still being deleted"
                    )
        self.metrics.reconciles.labels("ok").inc()
        self.sync(namespace, name)

    def observe(self, vg: Mapping[str, Any]) -> Observation:
        """Read the Job and Pods of ``vg`` and judge its spec."""
        meta = vg.get("metadata", {})
        namespace, name, uid = (str(meta.get(k)) for k in ("namespace", "name", "uid"))
        child = names.ChildNames.of(name)
        job = self.api.get("Job", namespace, child.job)
        if job is not None and not _owned_by(job, uid):
            job = None
        topology: Topology | None
        try:
            topology = plan_manifest(vg, self.settings.models).topology
        except SpecError as error:
            if job is None:
                return Observation(job_name=child.job, invalid=(error.reason, str(error)))
            # Valid when its Job was made (the catalog changed since): follow the Job.
            stored = parse_status(vg.get("status")).topology
            topology = stored.to_topology() if stored is not None else None
        pods = (
            self.api.list_objects("Pod", namespace, f"{names.LABEL_JOB_NAME}={child.job}")
            if job is not None
            else []
        )
        return Observation(job_name=child.job, job=job, pods=pods, topology=topology)

    def sync(self, namespace: str, name: str) -> None:
        """Recompute and (if changed) write the status of one generation.

        Raises:
            KubeError: an API call failed.
            StatusConflict: every attempt lost a race with another status writer.
        """
        for _ in range(self.settings.reconcile.status_conflict_retries):
            vg = self.api.get("VideoGeneration", namespace, name)
            if vg is None:
                return  # deleted; the garbage collector removes its children
            observation = self.observe(vg)
            before = parse_status(vg.get("status"))
            after = compute_status(vg, observation, self.clock())
            patch = status_patch(vg.get("status"), after)
            if patch is None:
                return
            try:
                self.api.patch_status(
                    namespace,
                    name,
                    patch,
                    resource_version=vg.get("metadata", {}).get("resourceVersion"),
                )
            except KubeError as error:
                if error.conflict:
                    self.metrics.status_conflicts.inc()
                    continue
                raise
            self.metrics.status_writes.inc()
            self._record_transition(vg, before.phase, after.phase)
            for event in transition_events(before, after):
                self.events.post(vg, event)
            return
        raise StatusConflict(
            f"status of VideoGeneration {namespace}/{name} changed under every one of "
            f"{self.settings.reconcile.status_conflict_retries} writes"
        )

    def _record_transition(
        self, vg: Mapping[str, Any], before: str | None, after: str | None
    ) -> None:
        if after is None or after == before:
            return
        self.metrics.transitions.labels(after).inc()
        LOG.info(
            "VideoGeneration %s/%s: %s -> %s",
            vg.get("metadata", {}).get("namespace"),
            vg.get("metadata", {}).get("name"),
            before or "(new)",
            after,
        )
        if after in TERMINAL_PHASES:
            created = vg.get("metadata", {}).get("creationTimestamp")
            if created:
                start = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
                seconds = max(0.0, (self.clock() - start).total_seconds())
                self.metrics.duration.labels(after).observe(seconds)


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


class PeriodicResync:
    """Syncs every unfinished generation every ``interval`` seconds, in a thread.

    Args:
        reconciler: does the syncing.
        interval: seconds between two passes.
    """

    def __init__(self, reconciler: Reconciler, interval: float) -> None:
        self.reconciler = reconciler
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """One pass; returns how many generations were synced."""
        namespaces = self.reconciler.settings.namespaces or (None,)
        synced = 0
        for namespace in namespaces:
            for vg in self.reconciler.api.list_generations(namespace):
                if parse_status(vg.get("status")).phase in TERMINAL_PHASES:
                    continue
                meta = vg.get("metadata", {})
                try:
                    self.reconciler.sync(str(meta.get("namespace")), str(meta.get("name")))
                    synced += 1
                except (KubeError, StatusConflict) as error:
                    LOG.warning(
                        "resync of %s/%s failed: %s", meta.get("namespace"), meta.get("name"), error
                    )
        return synced

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except KubeError as error:
                LOG.warning("resync pass failed: %s", error)

    def start(self) -> None:
        """Start the background thread (once)."""
        if self._thread is not None:
            raise RuntimeError("resync already started")
        self._thread = threading.Thread(target=self._loop, name="resync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
