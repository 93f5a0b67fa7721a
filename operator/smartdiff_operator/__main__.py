"""``python -m smartdiff_operator``: run the operator until SIGTERM or SIGINT.

Role: the entry point of the operator image. Reads ``OperatorSettings`` from the
environment (``SMARTDIFF_*``; see ``settings``), connects with ``$KUBECONFIG`` or
the pod's ServiceAccount, and runs kopf with our registry: cluster-wide, or only
in ``SMARTDIFF_NAMESPACES``; liveness at ``:SMARTDIFF_LIVENESS_PORT/healthz``,
metrics at ``:SMARTDIFF_METRICS_PORT/metrics``.

Talks to: ``settings``, ``kube``, ``metrics``, ``reconcile``, ``handlers``, kopf.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import kopf

from smartdiff_operator.handlers import KopfEvents, build_registry, kopf_settings
from smartdiff_operator.kube import KubeApi
from smartdiff_operator.metrics import OperatorMetrics
from smartdiff_operator.reconcile import Reconciler
from smartdiff_operator.settings import OperatorSettings, SettingsError


def main(env: Mapping[str, str] | None = None) -> int:
    """Run the operator; returns the process exit code."""
    try:
        settings = OperatorSettings.from_env(os.environ if env is None else env)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.observability.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    reconciler = Reconciler(
        settings=settings,
        api=KubeApi.from_environment(),
        metrics=OperatorMetrics(),
        events=KopfEvents(),
    )
    try:
        kopf.run(
            registry=build_registry(reconciler),
            settings=kopf_settings(settings),
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=settings.observability.liveness_endpoint,
            standalone=True,
        )
    finally:
        reconciler.metrics.stop()
        reconciler.api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
