"""The VideoGeneration resource: loading manifests, rejections, conversions, status."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from smartdiff.api.params import CachePolicy, SystemParams, UserParams
from smartdiff.api.status import (
    Condition,
    OutputStatus,
    ProgressStatus,
    TopologyStatus,
    VideoGenerationStatus,
    upsert_condition,
)
from smartdiff.api.topology import Topology
from smartdiff.api.videogeneration import ManifestError, VideoGeneration, VideoGenerationSpec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "video.yaml"
DELETE = object()

BASE: dict[str, Any] = {
    "apiVersion": "smartdiff.io/v1alpha1",
    "kind": "VideoGeneration",
    "metadata": {"name": "demo", "namespace": "videos"},
    "spec": {"prompt": "a cat surfing", "output": {"uri": "s3://bucket/out/"}},
}


def _patched(patch: dict[str, Any]) -> dict[str, Any]:
    """BASE with ``patch`` deep-merged (``DELETE`` removes a key)."""

    def merge(target: dict[str, Any], changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is DELETE:
                target.pop(key, None)
            elif isinstance(value, dict) and isinstance(target.get(key), dict):
                merge(target[key], value)
            else:
                target[key] = value

    manifest = copy.deepcopy(BASE)
    merge(manifest, patch)
    return manifest


def test_unset_gpus_mean_the_models_default() -> None:
    """No default in the spec: the catalog's count (or 1) applies, the spec's count wins."""
    spec = VideoGeneration.from_manifest(BASE).spec
    assert spec.resources.gpus is None
    assert "gpus" not in VideoGeneration.from_manifest(BASE).to_manifest()["spec"]["resources"]
    assert spec.resolved_gpus() == 1 and spec.resolved_gpus(4) == 4
    assert spec.plan_topology(num_heads=40) == Topology(1, 1, 1, 1, 1)
    assert spec.plan_topology(num_heads=40, default_gpus=4) == Topology(1, 4, 2, 2, 1)
    two = VideoGeneration.from_manifest(_patched({"spec": {"resources": {"gpus": 2}}})).spec
    assert two.plan_topology(num_heads=40, default_gpus=4) == Topology(1, 2, 2, 1, 1)
    # Explicit degrees without a count are checked against the resolved count, not here.
    explicit = {"parallelism": {"mode": "explicit", "cfg": 2, "ulysses": 2}}
    spec = VideoGeneration.from_manifest(_patched({"spec": explicit})).spec
    assert spec.plan_topology(num_heads=40, default_gpus=4) == Topology(1, 4, 2, 2, 1)
    with pytest.raises(ValueError, match="does not match gpus=1"):
        spec.plan_topology(num_heads=40)
    # gpusPerNode alone is fine; the resolved count is checked against it when planned.
    per_node = _patched({"spec": {"resources": {"gpusPerNode": 8}}})
    assert VideoGeneration.from_manifest(per_node).spec.resources.gpus is None


def test_tokens_follow_the_vae_compression() -> None:
    video = {"width": 1280, "height": 704, "frames": 121}
    spec = VideoGeneration.from_manifest(_patched({"spec": {"video": video}})).spec
    assert spec.tokens == 4 * spec.tokens_for(16) == 4 * 27280
    # 64x64x1: 16 tokens at 8x, 4 at 16x; 16 GPUs are 8 context ranks (CFG 2 x 8).
    small = {"width": 64, "height": 64, "frames": 1}
    spec = VideoGeneration.from_manifest(_patched({"spec": {"video": small}})).spec
    assert spec.plan_topology(num_heads=2, default_gpus=16).world_size == 16
    with pytest.raises(ValueError, match="too many for tokens=4"):
        spec.plan_topology(num_heads=2, default_gpus=16, spatial_compression=16)


def test_example_manifest_loads_and_converts() -> None:
    video = VideoGeneration.from_yaml_file(EXAMPLE)
    assert video.name == "cat-surfing" and video.namespace == "default"
    spec = video.spec
    assert spec.model.name == "wan2.1-t2v-1.3b"
    params = spec.to_user_params()
    assert params.prompt.startswith("A cat") and params.seed == 42 and params.do_cfg
    topology = spec.plan_topology(num_heads=12)
    assert topology == Topology(1, 1, 1, 1, 1)
    assert spec.to_system_params(topology) == SystemParams()
    assert spec.output.object_uri(video.namespace, video.name) == (
        "s3://videos/generated/default/cat-surfing.mp4"
    )


def test_spec_defaults_match_user_params() -> None:
    from_spec = VideoGenerationSpec.model_validate(BASE["spec"]).to_user_params()
    assert from_spec == UserParams(prompt="a cat surfing")


def test_full_spec_round_trips_through_json_names() -> None:
    manifest = _patched(
        {
            "spec": {
                "model": {"name": "wan2.1-t2v-14b", "weights": "pvc://wan-weights/14b"},
                "negativePrompt": "blurry",
                "video": {"width": 1280, "height": 720, "frames": 121, "fps": 24},
                "sampling": {
                    "steps": 40,
                    "guidanceScale": 6,
                    "shift": 3.0,
                    "solver": "dpm++",
                    "seed": 7,
                },
                "acceleration": {
                    "attention": "sdpa-cudnn",
                    "cache": {"policy": "teacache", "threshold": 0.2},
                    "memoryLevel": 1,
                    "dtype": "float16",
                },
                "resources": {
                    "gpus": 16,
                    "gpusPerNode": 8,
                    "gpuResourceName": "nvidia.com/gpu",
                    "nodeSelector": {"nvidia.com/gpu.product": "H200"},
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "memory": "256Gi",
                },
                "parallelism": {"mode": "explicit", "cfg": 2, "ulysses": 4, "ring": 2},
                "output": {"uri": "s3://bucket/a/video.mp4", "credentialsSecret": "s3-creds"},
                "queueName": "gpu-queue",
                "activeDeadlineSeconds": 3600,
                "backoffLimit": 1,
                "ttlSecondsAfterFinished": 600,
            }
        }
    )
    video = VideoGeneration.from_manifest(manifest)
    assert VideoGeneration.from_manifest(video.to_manifest()) == video
    spec = video.spec
    assert spec.sampling.guidance_scale == 6.0 and spec.resources.nodes(16) == 2
    assert spec.resources.gpus_per_pod(16) == 8
    topology = spec.plan_topology(num_heads=40)
    assert topology == Topology(2, 8, 2, 4, 2)
    system = spec.to_system_params(topology, device="cuda:1")
    assert (system.dtype, system.attention, system.memory_level) == ("float16", "sdpa-cudnn", 1)
    assert system.world_size == 16 and system.device == "cuda:1"
    assert spec.to_user_params().cache == CachePolicy(policy="teacache", threshold=0.2)
    assert spec.output.object_key("videos", "demo") == "a/video.mp4"
    assert spec.tokens == 75600 * 31 // 21


# (id, patch, path in the message, fragments of the message)
BAD_MANIFESTS: list[tuple[str, dict[str, Any], str, list[str]]] = [
    ("frames 80", {"spec": {"video": {"frames": 80}}}, "spec.video.frames", ["80", "4n+1"]),
    ("width 830", {"spec": {"video": {"width": 830}}}, "spec.video.width", ["830", "16"]),
    ("height 8", {"spec": {"video": {"height": 8}}}, "spec.video.height", ["8", "16"]),
    ("fps 0", {"spec": {"video": {"fps": 0}}}, "spec.video.fps", ["fps=0", "1 and 120"]),
    ("frames str", {"spec": {"video": {"frames": "81"}}}, "spec.video.frames", ["'81'", "integer"]),
    ("no prompt", {"spec": {"prompt": DELETE}}, "spec.prompt", ["required"]),
    ("blank prompt", {"spec": {"prompt": "  "}}, "spec.prompt", ["non-whitespace"]),
    ("prompt int", {"spec": {"prompt": 5}}, "spec.prompt", ["prompt=5", "string"]),
    ("steps 0", {"spec": {"sampling": {"steps": 0}}}, "spec.sampling.steps", ["steps=0"]),
    (
        "guidance 51",
        {"spec": {"sampling": {"guidanceScale": 51}}},
        "spec.sampling.guidanceScale",
        ["guidanceScale=51", "at most 50"],
    ),
    ("shift 0", {"spec": {"sampling": {"shift": 0}}}, "spec.sampling.shift", ["greater than 0"]),
    (
        "unknown solver",
        {"spec": {"sampling": {"solver": "ddim"}}},
        "spec.sampling.solver",
        ["'ddim'", "'unipc', 'dpm++', 'euler'"],
    ),
    ("seed -1", {"spec": {"sampling": {"seed": -1}}}, "spec.sampling.seed", ["seed=-1"]),
    (
        "negative deadline",
        {"spec": {"activeDeadlineSeconds": -5}},
        "spec.activeDeadlineSeconds",
        ["activeDeadlineSeconds=-5", "at least 1"],
    ),
    ("backoff -1", {"spec": {"backoffLimit": -1}}, "spec.backoffLimit", ["backoffLimit=-1"]),
    (
        "negative ttl",
        {"spec": {"ttlSecondsAfterFinished": -1}},
        "spec.ttlSecondsAfterFinished",
        ["at least 0"],
    ),
    (
        "weights scheme",
        {"spec": {"model": {"weights": "http://example.com/wan"}}},
        "spec.model.weights",
        ["'http://example.com/wan'", "s3://", "pvc://", "file://"],
    ),
    ("model name", {"spec": {"model": {"name": "../x"}}}, "spec.model.name", ["'../x'"]),
    (
        "explicit product",
        {"spec": {"resources": {"gpus": 8}, "parallelism": {"mode": "explicit", "cfg": 2}}},
        "spec.parallelism",
        ["'cfg': 2", "= 2 must equal resources.gpus=8"],
    ),
    (
        "cfg without guidance",
        {
            "spec": {
                "resources": {"gpus": 2},
                "sampling": {"guidanceScale": 1.0},
                "parallelism": {"mode": "explicit", "cfg": 2},
            }
        },
        "spec.parallelism.cfg",
        ["classifier-free guidance", "guidanceScale=1.0"],
    ),
    (
        "degrees in auto mode",
        {"spec": {"parallelism": {"ulysses": 2}}},
        "spec.parallelism.mode",
        ["mode='auto'", "explicit"],
    ),
    (
        "cfg 3",
        {"spec": {"parallelism": {"mode": "explicit", "cfg": 3}}},
        "spec.parallelism.cfg",
        ["cfg=3"],
    ),
    ("gpus 0", {"spec": {"resources": {"gpus": 0}}}, "spec.resources.gpus", ["gpus=0"]),
    (
        "gpus per node",
        {"spec": {"resources": {"gpus": 12, "gpusPerNode": 8}}},
        "spec.resources.gpus",
        ["gpus=12", "gpusPerNode=8", "8 or 16"],
    ),
    ("memory", {"spec": {"resources": {"memory": "lots"}}}, "spec.resources.memory", ["'lots'"]),
    (
        "toleration seconds",
        {"spec": {"resources": {"tolerations": [{"key": "k", "tolerationSeconds": 5}]}}},
        "spec.resources.tolerations[0].tolerationSeconds",
        ["NoExecute"],
    ),
    (
        "toleration effect",
        {"spec": {"resources": {"tolerations": [{"key": "k", "effect": "Never"}]}}},
        "spec.resources.tolerations[0].effect",
        ["'Never'", "NoSchedule"],
    ),
    (
        "node selector value",
        {"spec": {"resources": {"nodeSelector": {"gpu": 1}}}},
        "spec.resources.nodeSelector.gpu",
        ["gpu=1", "string"],
    ),
    (
        "attention",
        {"spec": {"acceleration": {"attention": "xformers"}}},
        "spec.acceleration.attention",
        ["'xformers'", "'sdpa'"],
    ),
    (
        "threshold without cache",
        {"spec": {"acceleration": {"cache": {"threshold": 0.1}}}},
        "spec.acceleration.cache.threshold",
        ["0.1", "policy is 'none'"],
    ),
    ("no output", {"spec": {"output": DELETE}}, "spec.output", ["required"]),
    (
        "output scheme",
        {"spec": {"output": {"uri": "https://bucket/x.mp4"}}},
        "spec.output.uri",
        ["'https://bucket/x.mp4'", "s3://bucket/key"],
    ),
    (
        "secret name",
        {"spec": {"output": {"credentialsSecret": "My_Secret"}}},
        "spec.output.credentialsSecret",
        ["'My_Secret'", "Kubernetes object name"],
    ),
    ("queue name", {"spec": {"queueName": "Q_1"}}, "spec.queueName", ["'Q_1'"]),
    (
        "unknown field",
        {"spec": {"video": {"lenght": 5}}},
        "spec.video.lenght",
        ["unknown field", "width, height, frames, fps"],
    ),
    ("no spec", {"spec": DELETE}, "spec", ["required"]),
    ("wrong kind", {"kind": "Job"}, "kind", ["'Job'", "VideoGeneration"]),
    (
        "wrong apiVersion",
        {"apiVersion": "smartdiff.io/v1"},
        "apiVersion",
        ["'smartdiff.io/v1'", "smartdiff.io/v1alpha1"],
    ),
]


@pytest.mark.parametrize(
    ("patch", "path", "fragments"),
    [case[1:] for case in BAD_MANIFESTS],
    ids=[case[0] for case in BAD_MANIFESTS],
)
def test_bad_manifests_are_rejected_naming_the_field(
    patch: dict[str, Any], path: str, fragments: list[str]
) -> None:
    with pytest.raises(ManifestError) as caught:
        VideoGeneration.from_manifest(_patched(patch), source="bad.yaml")
    error = caught.value
    assert len(error.problems) == 1, error.problems
    problem = error.problems[0]
    assert problem.startswith(f"{path}: ") or problem.startswith(f"{path}="), problem
    for fragment in fragments:
        assert fragment in problem, problem
    assert str(error).startswith("bad.yaml: ")


def test_several_problems_are_listed_together() -> None:
    manifest = _patched({"spec": {"video": {"frames": 80, "width": 830}, "prompt": DELETE}})
    with pytest.raises(ManifestError) as caught:
        VideoGeneration.from_manifest(manifest, source="m.yaml")
    text = str(caught.value)
    assert text.startswith("m.yaml: 3 problems")
    for path in ("spec.video.frames", "spec.video.width", "spec.prompt"):
        assert f"  - {path}: " in text


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("spec: [", "not valid YAML at line"),
        ("", "exactly one YAML document, found 0"),
        ("a: 1\n---\nb: 2\n", "found 2"),
        ("- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_unusable_files(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "video.yaml"
    path.write_text(content)
    with pytest.raises(ManifestError, match="video.yaml: ") as caught:
        VideoGeneration.from_yaml_file(path)
    assert fragment in str(caught.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        VideoGeneration.from_yaml_file(tmp_path / "missing.yaml")


def test_output_prefix_and_key() -> None:
    spec = VideoGenerationSpec.model_validate(BASE["spec"])
    assert spec.output.bucket == "bucket" and spec.output.is_prefix
    assert spec.output.object_uri("ns", "v1") == "s3://bucket/out/ns/v1.mp4"


def test_status_from_api_server_json() -> None:
    status = {
        "phase": "Running",
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "Denoising",
                "message": "step 12 of 50",
                "lastTransitionTime": "2025-01-02T03:04:05Z",
                "observedGeneration": 1,
            }
        ],
        "topology": {"nodes": 1, "gpusPerNode": 4, "cfg": 2, "ulysses": 2, "ring": 1},
        "progress": {"step": 12, "totalSteps": 50},
        "output": {"uri": "s3://bkt/k.mp4", "bytes": 1234, "sha256": "ab" * 32},
        "timings": {"loadSeconds": 3.5, "denoiseSeconds": 20},
        "jobName": "demo-abc12",
        "startTime": "2025-01-02T03:04:00Z",
    }
    manifest = _patched({"status": status})
    video = VideoGeneration.from_manifest(manifest)
    assert video.status is not None
    assert video.status.progress is not None and video.status.progress.display == "12/50"
    assert video.status.topology is not None and video.status.topology.summary == "cfg2xu2"
    assert video.status.output is not None and video.status.output.size_bytes == 1234
    dumped = video.to_manifest()["status"]
    assert dumped["progress"]["display"] == "12/50"
    assert dumped["conditions"][0]["lastTransitionTime"] == "2025-01-02T03:04:05Z"
    assert dumped["output"]["bytes"] == 1234
    assert VideoGeneration.from_manifest(video.to_manifest()) == video


def test_status_derived_fields_cannot_disagree() -> None:
    progress = ProgressStatus.model_validate({"step": 3, "totalSteps": 10, "display": "9/9"})
    assert progress.display == "3/10"
    topology = TopologyStatus.from_topology(Topology(2, 8, 2, 8, 1))
    assert topology.summary == "cfg2xu8" and topology.to_topology() == Topology(2, 8, 2, 8, 1)


@pytest.mark.parametrize(
    ("model", "data", "fragment"),
    [
        (ProgressStatus, {"step": 51, "totalSteps": 50}, "step=51"),
        (TopologyStatus, {"nodes": 1, "gpusPerNode": 4, "cfg": 2, "ulysses": 1, "ring": 1}, "4"),
        (OutputStatus, {"uri": "s3://bkt/k", "sha256": "XYZ"}, "sha256='XYZ'"),
        (VideoGenerationStatus, {"phase": "Done"}, "phase='Done'"),
        (VideoGenerationStatus, {"jobName": "Bad_Name"}, "jobName='Bad_Name'"),
    ],
)
def test_status_rejections(model: type[Any], data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        model.model_validate(data)


def _condition(status: str, when: datetime, reason: str = "Reason") -> Condition:
    return Condition(type="Ready", status=status, reason=reason, last_transition_time=when)


def test_upsert_condition_keeps_transition_time_when_status_unchanged() -> None:
    first = datetime(2025, 1, 1, tzinfo=UTC)
    later = datetime(2025, 1, 2, tzinfo=UTC)
    other = Condition(type="Failed", status="False", reason="NoError", last_transition_time=first)
    conditions = [other, _condition("False", first)]
    same = upsert_condition(conditions, _condition("False", later, reason="StillWaiting"))
    assert same[0] == other and same[1].last_transition_time == first
    assert same[1].reason == "StillWaiting"
    flipped = upsert_condition(conditions, _condition("True", later))
    assert flipped[1].last_transition_time == later
    added = upsert_condition([other], _condition("True", later))
    assert [c.type for c in added] == ["Failed", "Ready"]
    with pytest.raises(ValueError, match="repeated"):
        VideoGenerationStatus(conditions=[other, other])


def test_yaml_round_trip_of_manifest() -> None:
    video = VideoGeneration.from_yaml_file(EXAMPLE)
    again = VideoGeneration.from_yaml(yaml.safe_dump(video.to_manifest()))
    assert again == video


def test_api_package_imports_neither_torch_nor_kopf() -> None:
    code = (
        "import sys\n"
        "import smartdiff.api.crd, smartdiff.api.videogeneration, smartdiff.api.topology\n"
        "heavy = sorted(m for m in ('torch', 'kopf', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    runtime = str(REPO / "runtime")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([runtime, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
