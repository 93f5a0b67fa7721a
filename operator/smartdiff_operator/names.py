"""Deterministic names, labels and annotations of the objects a generation owns.

Role: one place that derives every child's name from the ``VideoGeneration``'s
name, so each reconcile step is idempotent (a second create finds the first
object) and an operator restart never makes a duplicate. Names are DNS-label safe
and short enough for the hostnames of an Indexed Job's pods
(``<job>-<index>``); a long or dotted generation name is cut and given a hash of
the full name, so two generations never share a child name.

Talks to: nothing (stdlib only). Used by ``manifests``, ``status`` and ``handlers``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

GROUP_PREFIX: Final = "smartdiff.io"
LABEL_APP: Final = "app.kubernetes.io/name"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_GENERATION: Final = f"{GROUP_PREFIX}/videogeneration"
ANNOTATION_GENERATION: Final = f"{GROUP_PREFIX}/videogeneration"
ANNOTATION_GENERATION_UID: Final = f"{GROUP_PREFIX}/videogeneration-uid"
LABEL_JOB_NAME: Final = "batch.kubernetes.io/job-name"
LABEL_CONTROLLER_UID: Final = "batch.kubernetes.io/controller-uid"
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"

APP: Final = "smart-diffusion"
COMPONENT: Final = "runtime"
MANAGER: Final = "smartdiff-operator"
CONTAINER: Final = "runtime"

# An Indexed Job's pod hostname is "<job>-<index>" and must be a DNS label (63).
JOB_NAME_MAX: Final = 52
DNS_LABEL_MAX: Final = 63
_HASH_LEN: Final = 8


def shorten(text: str, limit: int) -> str:
    """``text`` as a DNS label of at most ``limit`` characters, deterministically.

    Dots become dashes; if that changed anything or the result is too long, the
    name is cut and ends in ``-`` plus 8 hex digits of the SHA-256 of ``text``.
    """
    label = text.lower().replace(".", "-")
    if label == text and len(label) <= limit:
        return label
    digest = hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]
    head = label[: limit - _HASH_LEN - 1].rstrip("-")
    return f"{head}-{digest}" if head else digest


@dataclass(frozen=True)
class ChildNames:
    """Names of the objects one generation owns (all in its namespace).

    Attributes:
        job: the Job (also the label value that selects its pods).
        service: the headless Service of a multi-node run (a DNS-1035 label).
        service_account: the runtime pods' own ServiceAccount.
        role: the Role that lets them read this generation and patch its status.
        role_binding: binds ``role`` to ``service_account``.
    """

    job: str
    service: str
    service_account: str
    role: str
    role_binding: str

    @classmethod
    def of(cls, generation: str) -> ChildNames:
        """The names for the generation named ``generation``."""
        job = shorten(generation, JOB_NAME_MAX)
        # A Service name must start with a letter (DNS-1035); a generation's may not.
        service_base = job if job[0].isalpha() else f"vg-{job}"
        service = shorten(f"{service_base}-workers", DNS_LABEL_MAX)
        runtime = shorten(f"{generation}-runtime", DNS_LABEL_MAX)
        return cls(
            job=job,
            service=service,
            service_account=runtime,
            role=runtime,
            role_binding=runtime,
        )


def common_labels(job_name: str) -> dict[str, str]:
    """Labels on every child object (and the pods), selecting them by generation."""
    return {
        LABEL_APP: APP,
        LABEL_COMPONENT: COMPONENT,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_GENERATION: job_name,
    }
