"""Test support for the Helm chart: the pinned helm binary, rendering, and env resolution.

- ``helm`` runs the pinned helm (``hack/tools.sh path helm``, built once and cached).
- ``render`` runs ``helm template`` with a values mapping and returns the documents.
- ``operator_env`` resolves the rendered operator Deployment's environment (plain
  values and ``configMapKeyRef`` into the rendered ConfigMaps), as a kubelet would, so
  tests can hand it to ``OperatorSettings.from_env`` or to a running operator.

Talks to: helm (subprocess); reads the chart under ``charts/smart-diffusion``.
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "smart-diffusion"
TOOLS = REPO / "hack" / "tools.sh"
KUBE_VERSION = "v1.36.3"  # the local control plane's; helm template has no server to ask


@functools.cache
def helm_binary() -> str:
    out = subprocess.run(
        [str(TOOLS), "path", "helm"], check=True, capture_output=True, text=True, timeout=1800
    )
    return out.stdout.strip()


def helm(
    *args: str, kubeconfig: str | None = None, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run helm; with ``check`` a failure raises with helm's error output."""
    command = [helm_binary(), *args]
    if kubeconfig is not None:
        command += ["--kubeconfig", kubeconfig]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def values_file(directory: Path, values: Mapping[str, Any], name: str = "values.json") -> Path:
    """``values`` written as a file for ``helm -f`` (JSON is YAML)."""
    path = directory / name
    path.write_text(json.dumps(values))
    return path


def render_text(
    tmp_path: Path,
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "sd",
    namespace: str = "smartdiff-system",
    extra: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart (without its CRDs) with ``values``."""
    args = ["template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    if values:
        args += ["-f", str(values_file(tmp_path, values))]
    return helm(*args, *extra, check=check)


def render(
    tmp_path: Path,
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "sd",
    namespace: str = "smartdiff-system",
) -> list[dict[str, Any]]:
    """The rendered documents (empty ones dropped)."""
    text = render_text(tmp_path, values, release=release, namespace=namespace).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def operator_env(docs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The operator container's environment, with ConfigMap references resolved."""
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    config_maps = {
        doc["metadata"]["name"]: doc.get("data", {}) for doc in by_kind(docs, "ConfigMap")
    }
    env: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        ref = entry["valueFrom"]["configMapKeyRef"]
        env[entry["name"]] = config_maps[ref["name"]][ref["key"]]
    return env
