"""The examples users copy, and the generated CRD reference, are right.

Every ``examples/*.yaml`` VideoGeneration validates with the pydantic models, is
planned by the operator with the chart's default model catalog into the topology
its comments promise, and is accepted by the real API server with the CRD applied
(server-side dry-run); what the server returns (defaults filled in) validates
again. The GitOps examples install this chart with values its schema accepts.
``docs/crd-reference.md`` is what ``hack/gen-crd-docs.py`` makes of the CRD.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_support import CHART, REPO, one, operator_env, render
from conftest import Kubectl
from smartdiff.api.videogeneration import VideoGeneration
from smartdiff_operator.manifests import desired_objects
from smartdiff_operator.settings import OperatorSettings

EXAMPLES = REPO / "examples"
VIDEO_EXAMPLES = sorted(EXAMPLES.glob("*.yaml"))
NAMES = [path.stem for path in VIDEO_EXAMPLES]


def load(path: Path) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return dict(doc)


def as_read_from_the_server(manifest: dict[str, Any], namespace: str = "videos") -> dict[str, Any]:
    meta = {**manifest["metadata"], "namespace": namespace, "uid": "0000-uid", "generation": 1}
    return {**manifest, "metadata": meta}


@pytest.fixture(scope="module")
def chart_settings(tmp_path_factory: pytest.TempPathFactory) -> OperatorSettings:
    """The operator's settings as the chart configures them by default."""
    docs = render(tmp_path_factory.mktemp("chart"))
    return OperatorSettings.from_env(operator_env(docs))


def test_the_promised_examples_exist() -> None:
    assert {"video", "multi-gpu", "multi-node", "teacache", "kueue"} <= set(NAMES)
    assert (EXAMPLES / "gitops" / "argocd-application.yaml").is_file()
    assert (EXAMPLES / "gitops" / "flux-helmrelease.yaml").is_file()


@pytest.mark.parametrize("path", VIDEO_EXAMPLES, ids=NAMES)
def test_example_validates_and_the_operator_plans_it(
    path: Path, chart_settings: OperatorSettings
) -> None:
    manifest = load(path)
    vg = VideoGeneration.from_manifest(manifest, source=str(path))
    assert vg.name == manifest["metadata"]["name"]
    assert "namespace" not in manifest["metadata"], "examples take the namespace from -n"
    objects = desired_objects(
        VideoGeneration.from_manifest(as_read_from_the_server(manifest)), chart_settings
    )
    assert objects[-1]["kind"] == "Job"


def job_of(path: Path, settings: OperatorSettings) -> tuple[dict[str, Any], list[str]]:
    manifest = as_read_from_the_server(load(path))
    objects = desired_objects(VideoGeneration.from_manifest(manifest), settings)
    return objects[-1], [obj["kind"] for obj in objects]


def test_examples_show_what_their_comments_say(chart_settings: OperatorSettings) -> None:
    job, kinds = job_of(EXAMPLES / "multi-gpu.yaml", chart_settings)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert job["spec"]["completions"] == 1 and "Service" not in kinds
    assert container["command"][container["command"].index("--nproc-per-node") + 1] == "4"

    job, kinds = job_of(EXAMPLES / "multi-node.yaml", chart_settings)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert "Service" in kinds
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "--rdzv-endpoint" in container["command"]

    job, _ = job_of(EXAMPLES / "kueue.yaml", chart_settings)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"

    # No resources.gpus: the chart catalog's defaultGpus for TI2V-5B (1).
    ti2v = VideoGeneration.from_manifest(load(EXAMPLES / "wan22-ti2v.yaml"))
    assert ti2v.spec.resources.gpus is None
    job, _ = job_of(EXAMPLES / "wan22-ti2v.yaml", chart_settings)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "SMARTDIFF_GPUS", "value": "1"} in container["env"]

    teacache = VideoGeneration.from_manifest(load(EXAMPLES / "teacache.yaml"))
    assert teacache.spec.acceleration.cache.policy == "teacache"


@pytest.mark.parametrize("path", VIDEO_EXAMPLES, ids=NAMES)
def test_example_is_accepted_by_the_api_server(
    path: Path, kubectl: Kubectl, namespace: str
) -> None:
    from operator_support import apply_crd

    apply_crd(kubectl)
    proc = kubectl.run("apply", "--dry-run=server", "-n", namespace, "-f", str(path), "-o", "json")
    served = json.loads(proc.stdout)
    assert served["metadata"]["namespace"] == namespace
    # The server's defaults (every field filled in) still validate with our models.
    vg = VideoGeneration.from_manifest(
        {key: served[key] for key in ("apiVersion", "kind", "metadata", "spec")}
    )
    assert vg.spec == VideoGeneration.from_manifest(load(path)).spec
    # A dry run creates nothing.
    assert kubectl.get("vg", "-n", namespace)["items"] == []


def gitops_values() -> dict[str, dict[str, Any]]:
    argo = load(EXAMPLES / "gitops" / "argocd-application.yaml")
    flux_docs = list(
        yaml.safe_load_all((EXAMPLES / "gitops" / "flux-helmrelease.yaml").read_text())
    )
    release = next(d for d in flux_docs if d["kind"] == "HelmRelease")
    source = next(d for d in flux_docs if d["kind"] == "GitRepository")
    assert argo["spec"]["source"]["path"] == str(CHART.relative_to(REPO))
    assert release["spec"]["chart"]["spec"]["chart"] == str(CHART.relative_to(REPO))
    assert release["spec"]["chart"]["spec"]["sourceRef"]["name"] == source["metadata"]["name"]
    assert release["spec"]["install"]["crds"] == release["spec"]["upgrade"]["crds"]
    return {
        "argocd": argo["spec"]["source"]["helm"]["valuesObject"],
        "flux": release["spec"]["values"],
    }


@pytest.mark.parametrize("tool", ["argocd", "flux"])
def test_gitops_example_values_render_the_chart(tool: str, tmp_path: Path) -> None:
    docs = render(tmp_path, gitops_values()[tool])
    settings = OperatorSettings.from_env(operator_env(docs))
    assert settings.models.get("wan2.1-t2v-14b").weights == "pvc://wan-weights/Wan2.1-T2V-14B/"  # type: ignore[union-attr]
    assert settings.storage.s3_endpoint == "https://s3.us-east-1.amazonaws.com"
    assert one(docs, "Deployment")["spec"]["replicas"] == 1


def test_crd_reference_is_generated_from_the_crd() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "gen-crd-docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (REPO / "docs" / "crd-reference.md").read_text()
    crd = yaml.safe_load((REPO / "crds" / "smartdiff.io_videogenerations.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for name in spec["properties"]:
        assert f"| `spec.{name}` |" in text, name
    assert "frames must be 4n+1" in text and "spec is immutable" in text
