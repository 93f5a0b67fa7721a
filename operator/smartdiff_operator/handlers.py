"""The kopf handlers: thin wrappers that call the reconciler and decide about retries.

Role: register, on a kopf registry of our own (no module-level registry),

- ``create`` / ``resume`` of a ``VideoGeneration`` -> ``Reconciler.ensure``;
- every event of a Job or Pod the operator manages -> ``Reconciler.sync`` of the
  owning generation (named by an annotation), so status follows at once;
- login from the kubeconfig or the ServiceAccount; start and stop of the
  metrics server and of the periodic resync (``reconcile.PeriodicResync``).

No handler needs a finalizer (no delete handlers, timers or daemons), so a
generation is deleted -- and its children collected -- even while the
operator is down.

Errors carry the retry decision: a spec that can never run is a
``kopf.PermanentError``; a transient API error, a lost status race or a name
taken by an object being deleted is a ``kopf.TemporaryError`` with a delay;
an API error that retrying cannot fix (422, 400) is permanent.
``kopf_settings`` turns ``OperatorSettings`` into kopf's settings (progress in
our annotations, server-side label selectors for Jobs and Pods, no peering, no
CRD scanning -- so the operator's RBAC stays minimal).

Talks to: kopf; ``reconcile`` (logic), ``metrics``, ``status`` (EventSpec).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

import kopf

from smartdiff.api.videogeneration import GROUP, PLURAL, VERSION
from smartdiff_operator import names
from smartdiff_operator.kube import KubeError
from smartdiff_operator.plan import SpecError
from smartdiff_operator.reconcile import (
    ForeignObject,
    PeriodicResync,
    Reconciler,
    StatusConflict,
)
from smartdiff_operator.settings import OperatorSettings
from smartdiff_operator.status import EventSpec

LOG = logging.getLogger(__name__)
ANNOTATION_PREFIX: Final = "operator.smartdiff.io"
MANAGED: Final = {names.LABEL_MANAGED_BY: names.MANAGER}


class KopfEvents:
    """Posts Events through kopf's event queue (safe from handler threads)."""

    def post(self, obj: Mapping[str, Any], event: EventSpec) -> None:
        meta = obj.get("metadata", {})
        ref: kopf.RawBody = {
            "apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": obj.get("kind", "VideoGeneration"),
            "metadata": {
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
        }
        kopf.event(
            kopf.Body(ref), type=event.type, reason=event.reason, message=event.message[:1000]
        )


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    """kopf's settings for this operator."""
    result = kopf.OperatorSettings()
    result.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    result.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # kopf's own per-handler "succeeded" events are noise; ours are posted explicitly.
    result.posting.level = logging.WARNING
    result.posting.reporting_component = names.MANAGER
    result.peering.standalone = True
    result.scanning.disabled = True
    selector = f"{names.LABEL_MANAGED_BY}={names.MANAGER}"
    result.watching.label_selectors["batch", "v1", "jobs"] = selector
    result.watching.label_selectors["v1", "pods"] = selector
    result.execution.max_workers = 16
    return result


@contextmanager
def retry_decision(delay: float) -> Iterator[None]:
    """Turn our errors into kopf's: permanent for what cannot change, temporary otherwise."""
    try:
        yield
    except SpecError as error:
        raise kopf.PermanentError(f"{error.reason}: {error}") from None
    except (StatusConflict, ForeignObject) as error:
        raise kopf.TemporaryError(str(error), delay=max(delay, 1.0)) from None
    except KubeError as error:
        if error.status in (400, 422):
            raise kopf.PermanentError(str(error)) from None
        # Transient (5xx, 429, connection) or fixable by someone else (403 RBAC, 404 namespace).
        raise kopf.TemporaryError(str(error), delay=delay) from None


def _generation_of(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(namespace, name)`` of the generation owning a Job or Pod."""
    meta = body.get("metadata", {})
    name = (meta.get("annotations") or {}).get(names.ANNOTATION_GENERATION)
    namespace = meta.get("namespace")
    if not name or not namespace:
        return None
    return str(namespace), str(name)


def build_registry(reconciler: Reconciler) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers bound to ``reconciler``."""
    registry = kopf.OperatorRegistry()
    settings = reconciler.settings
    delay = settings.reconcile.retry_delay_seconds
    metrics = reconciler.metrics
    resync = PeriodicResync(reconciler, settings.reconcile.resync_seconds)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def start_background(**_: Any) -> None:
        port = settings.observability.metrics_port
        if port:
            metrics.serve(port, settings.observability.bind_address)
            LOG.info("metrics on %s:%d/metrics", settings.observability.bind_address, port)
        resync.start()

    @kopf.on.cleanup(registry=registry)
    def stop_background(**_: Any) -> None:
        resync.stop()
        metrics.stop()

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    def ensure(body: kopf.Body, **_: Any) -> None:
        try:
            with retry_decision(delay):
                reconciler.ensure(body)
        except kopf.TemporaryError:
            metrics.reconciles.labels("retry").inc()
            raise

    @kopf.on.event("batch", "v1", "jobs", labels=MANAGED, registry=registry)
    @kopf.on.event("v1", "pods", labels=MANAGED, registry=registry)
    def child_changed(body: kopf.Body, **_: Any) -> None:
        owner = _generation_of(body)
        if owner is None:
            return
        # Event handlers are not retried: a failure here is repaired by the next
        # event or by the periodic resync.
        try:
            reconciler.sync(*owner)
        except (KubeError, StatusConflict) as error:
            metrics.reconciles.labels("error").inc()
            LOG.warning("status of %s/%s not updated: %s", *owner, error)

    return registry
