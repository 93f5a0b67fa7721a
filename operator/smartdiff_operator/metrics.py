"""Prometheus metrics of the operator, on their own registry and HTTP port.

Role: counters and histograms that say what the operator does -- reconciles by
result, Jobs created, status writes, phase transitions, rejected specs and the
time from creation to a final phase -- served at ``/metrics`` by
``prometheus_client``'s threaded HTTP server. The registry belongs to one
``OperatorMetrics`` object (no module-level collectors), so tests and several
operators in one process never share counters.

Talks to: ``prometheus_client``. Fed by ``handlers``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)


@dataclass
class _Server:
    server: WSGIServer
    thread: threading.Thread


class OperatorMetrics:
    """The operator's collectors on a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter(
            "smartdiff_operator_reconciles",
            "Reconciles of VideoGenerations by result (ok, invalid, retry, error)",
            ["result"],
            registry=self.registry,
        )
        self.jobs_created = Counter(
            "smartdiff_operator_jobs_created",
            "Jobs created for VideoGenerations",
            registry=self.registry,
        )
        self.objects_created = Counter(
            "smartdiff_operator_objects_created",
            "Child objects created, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.status_writes = Counter(
            "smartdiff_operator_status_writes",
            "Status patches written (only when the computed status changed)",
            registry=self.registry,
        )
        self.status_conflicts = Counter(
            "smartdiff_operator_status_conflicts",
            "Status writes that lost a race (409) and were recomputed",
            registry=self.registry,
        )
        self.transitions = Counter(
            "smartdiff_operator_phase_transitions",
            "Phase transitions of VideoGenerations, by new phase",
            ["phase"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "smartdiff_operator_rejected_specs",
            "VideoGenerations rejected by the operator, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "smartdiff_operator_generation_duration_seconds",
            "Seconds from creation to a final phase, by phase",
            ["phase"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._server: _Server | None = None

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Start serving ``/metrics`` on ``address:port`` (in a daemon thread)."""
        if self._server is not None:
            raise RuntimeError("metrics are already served")
        server, thread = start_http_server(port, addr=address, registry=self.registry)
        self._server = _Server(server, thread)

    def stop(self) -> None:
        """Stop the HTTP server, if running."""
        if self._server is not None:
            self._server.server.shutdown()
            self._server.server.server_close()
            self._server.thread.join(timeout=5)
            self._server = None
