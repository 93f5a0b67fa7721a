"""Least-privilege RBAC rules of the operator and of runtime pods, as Python data.

Role: the single source of the permissions both components need, so the Helm
chart renders exactly the rules the tests prove sufficient (``python -m
smartdiff_operator.rbac`` prints the operator's ClusterRole, ServiceAccount and
binding as YAML).

- The operator watches ``VideoGeneration`` objects and the Jobs and Pods it
  owns, creates each generation's Job (and headless Service), the runtime pods'
  ServiceAccount, Role and RoleBinding, writes status and posts Events. It never
  reads Secrets: pods take S3 credentials from a Secret by reference.
- A runtime pod may ``get`` its own ``VideoGeneration`` and ``patch`` that one
  object's ``status`` -- nothing else (a Role per generation, with
  ``resourceNames``). The operator can grant this because it holds both
  permissions itself (RBAC forbids granting more than one holds).

Talks to: nothing (stdlib and ``names``). Used by ``manifests`` and the tests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from smartdiff_operator import names

API_GROUP: Final = "smartdiff.io"
PLURAL: Final = "videogenerations"
OPERATOR_NAME: Final = "smartdiff-operator"


@dataclass(frozen=True)
class Rule:
    """One ``PolicyRule`` of a Role or ClusterRole."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    resource_names: tuple[str, ...] = ()

    def to_manifest(self) -> dict[str, Any]:
        """The ``rules[]`` entry."""
        rule: dict[str, Any] = {
            "apiGroups": list(self.api_groups),
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }
        if self.resource_names:
            rule["resourceNames"] = list(self.resource_names)
        return rule


OPERATOR_RULES: Final = (
    Rule((API_GROUP,), (PLURAL,), ("get", "list", "watch", "patch")),
    Rule((API_GROUP,), (f"{PLURAL}/status",), ("patch",)),
    # blockOwnerDeletion on children needs this where OwnerReferencesPermissionEnforcement runs.
    Rule((API_GROUP,), (f"{PLURAL}/finalizers",), ("update",)),
    Rule(("batch",), ("jobs",), ("get", "list", "watch", "create")),
    Rule(("",), ("pods",), ("get", "list", "watch")),
    Rule(("",), ("services", "serviceaccounts"), ("get", "create")),
    Rule(("rbac.authorization.k8s.io",), ("roles", "rolebindings"), ("get", "create")),
    Rule(("", "events.k8s.io"), ("events",), ("create", "patch")),
)
"""What the operator's ServiceAccount may do, cluster-wide."""


def runtime_rules(generation: str) -> tuple[Rule, ...]:
    """What the runtime pods of the generation named ``generation`` may do."""
    return (
        Rule((API_GROUP,), (PLURAL,), ("get",), (generation,)),
        Rule((API_GROUP,), (f"{PLURAL}/status",), ("patch",), (generation,)),
    )


def operator_objects(
    namespace: str, *, name: str = OPERATOR_NAME, labels: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The operator's ServiceAccount, ClusterRole and ClusterRoleBinding."""
    meta_labels = {
        names.LABEL_APP: names.APP,
        names.LABEL_COMPONENT: "operator",
        **(labels or {}),
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "labels": meta_labels},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": meta_labels},
            "rules": [rule.to_manifest() for rule in OPERATOR_RULES],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": meta_labels},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the operator's RBAC objects as a YAML stream."""
    import yaml

    parser = argparse.ArgumentParser(
        prog="python -m smartdiff_operator.rbac", description=main.__doc__
    )
    parser.add_argument("--namespace", default="smartdiff-system", help="operator namespace")
    parser.add_argument("--name", default=OPERATOR_NAME, help="ServiceAccount/ClusterRole name")
    args = parser.parse_args(argv)
    docs = operator_objects(args.namespace, name=args.name)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
