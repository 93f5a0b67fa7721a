"""The in-pod worker's reporting, without a cluster: throttled progress, conditions,
termination messages the operator understands, configuration errors.

The end-to-end test (test_operator_e2e.py) runs the same worker against the real
API server and S3; here the API is a recording stand-in so the throttling and the
conflict retry can be driven step by step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from operator_support import make_generation
from smartdiff import worker
from smartdiff.api import podenv
from smartdiff.api.status import OutputStatus, TimingsStatus
from smartdiff_operator.status import runtime_report


class Conflict(Exception):
    status = 409


class RecordingObjects:
    """Records status patches of a CustomObjectsApi; raises 409 ``conflicts`` times."""

    def __init__(self, stored: dict[str, Any], conflicts: int = 0) -> None:
        self.stored = stored
        self.conflicts = conflicts
        self.patches: list[dict[str, Any]] = []

    def get_namespaced_custom_object(self, *args: str) -> dict[str, Any]:
        assert args == ("smartdiff.io", "v1alpha1", "videos", "videogenerations", "cat-surfing")
        return json.loads(json.dumps(self.stored))

    def patch_namespaced_custom_object_status(
        self, *args: Any, _content_type: str
    ) -> dict[str, Any]:
        assert _content_type == "application/merge-patch+json"
        body = args[-1]
        if self.conflicts:
            self.conflicts -= 1
            raise Conflict("the object has been modified")
        self.patches.append(body)
        return self.stored


def stored_generation() -> dict[str, Any]:
    body = make_generation().to_manifest()
    body["metadata"]["resourceVersion"] = "41"
    body["status"] = {
        "phase": "Running",
        "conditions": [
            {
                "type": "Running",
                "status": "True",
                "reason": "PodsRunning",
                "message": "",
                "lastTransitionTime": "2026-03-01T12:00:00Z",
            }
        ],
    }
    return body


def test_progress_is_throttled_and_the_last_step_always_written() -> None:
    objects = RecordingObjects(stored_generation())
    times = iter([0.0, 0.5, 1.0, 2.1, 2.2, 2.3])
    reporter = worker.StatusReporter(
        objects, "videos", "cat-surfing", 2.0, clock=lambda: next(times)
    )
    for step in range(1, 7):
        reporter.progress(step, 6)
    written = [p["status"]["progress"] for p in objects.patches]
    assert written == [
        {"step": 1, "totalSteps": 6, "display": "1/6"},
        {"step": 4, "totalSteps": 6, "display": "4/6"},
        {"step": 6, "totalSteps": 6, "display": "6/6"},
    ]
    assert reporter.progress_writes == 3


def test_output_and_the_uploaded_condition_survive_a_conflict() -> None:
    objects = RecordingObjects(stored_generation())
    reporter = worker.StatusReporter(objects, "videos", "cat-surfing", 2.0)
    output = OutputStatus.model_validate(
        {"uri": "s3://videos/generated/videos/cat-surfing.mp4", "bytes": 10, "sha256": "a" * 64}
    )
    reporter.succeeded(output, TimingsStatus(load_seconds=1.5))
    first, condition_patch = objects.patches
    assert first["status"]["output"]["bytes"] == 10
    assert first["status"]["timings"] == {"loadSeconds": 1.5}
    # The condition write carries resourceVersion and keeps the operator's conditions.
    assert condition_patch["metadata"] == {"resourceVersion": "41"}
    kinds = [(c["type"], c["status"], c["reason"]) for c in condition_patch["status"]["conditions"]]
    assert kinds == [("Running", "True", "PodsRunning"), ("Uploaded", "True", "Uploaded")]

    retried = RecordingObjects(stored_generation(), conflicts=2)
    worker.StatusReporter(retried, "videos", "cat-surfing", 2.0).set_condition(
        "Uploaded", "False", "UploadFailed", "kept at /out/cat.mp4"
    )
    assert len(retried.patches) == 1 and retried.conflicts == 0


def test_the_termination_message_is_what_the_operator_reads(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    worker.write_termination_message(path, "UploadFailed", "upload failed; kept at /x.mp4" * 500)
    assert len(path.read_bytes()) < 4096  # the kubelet's limit
    reason, message = runtime_report(path.read_text())  # type: ignore[misc]
    assert reason == "UploadFailed" and message.startswith("upload failed; kept at /x.mp4")
    assert runtime_report("Traceback (most recent call last): ...") is None
    assert runtime_report('{"reason": "not a reason!", "message": ""}') is None


def test_configuration_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(worker.WorkerFailure, match="SMARTDIFF_VG_NAME") as err:
        worker.WorkerConfig.from_env({"SMARTDIFF_VG_NAMESPACE": "videos"})
    assert (err.value.reason, err.value.exit_code) == ("InvalidRequest", 2)
    env = {"SMARTDIFF_VG_NAME": "a", "SMARTDIFF_VG_NAMESPACE": "b"}
    with pytest.raises(worker.WorkerFailure, match="SMARTDIFF_PROGRESS_INTERVAL_SECONDS='soon'"):
        worker.WorkerConfig.from_env({**env, "SMARTDIFF_PROGRESS_INTERVAL_SECONDS": "soon"})
    config = worker.WorkerConfig.from_env({**env, "RANK": "1", "WORLD_SIZE": "2"})
    assert (config.rank, config.world_size, config.uid) == (1, 2, None)


def test_weights_uris_reach_the_backend_in_the_form_it_loads() -> None:
    root = Path("/mnt/weights")
    assert worker.resolve_weights(None, root) is None
    assert worker.resolve_weights("file:///models/wan", root) == Path("/models/wan")
    assert worker.resolve_weights("pvc://models/wan/14b", root) == root / "models" / "wan" / "14b"
    # s3:// goes to the backend as is: it downloads into $SMARTDIFF_WEIGHTS_CACHE.
    assert worker.resolve_weights("s3://models/Wan2.1-T2V-1.3B/", root) == (
        "s3://models/Wan2.1-T2V-1.3B/"
    )
    for bad, message in (
        ("s3://Bad_Bucket/wan/", "weights: 's3://Bad_Bucket/wan/'"),
        ("pvc://models/../etc", r"pvc://models/\.\./etc"),
        ("file://relative/wan", "file://relative/wan"),
        ("http://example.com/wan", "unknown scheme"),
    ):
        with pytest.raises(worker.WorkerFailure, match=message) as err:
            worker.resolve_weights(bad, root)
        assert (err.value.reason, err.value.exit_code) == ("InvalidRequest", 2), bad


class DeniedS3:
    """A boto3 S3 client whose every listing is refused, as a wrong Secret would be."""

    def get_paginator(self, operation: str) -> Any:
        from botocore.exceptions import ClientError

        error = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}
        raise ClientError(error, "ListObjectsV2")


def test_a_failed_weights_download_is_weights_unavailable_and_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smartdiff.engine.engine import Engine
    from smartdiff.io.weights import resolve_weights_uri

    uri = "s3://models/Wan2.1-T2V-1.3B/"
    monkeypatch.setenv(podenv.ENV_WEIGHTS_CACHE, str(tmp_path / "cache"))
    loaded: list[object] = []

    def from_params(model: Any, system: Any, weights_path: Any = None, **_: Any) -> Any:
        # What Backend.from_params does with the URI, against an S3 that refuses the listing.
        loaded.append(weights_path)
        return resolve_weights_uri(weights_path, client=DeniedS3())

    monkeypatch.setattr(Engine, "from_params", staticmethod(from_params))
    stored = stored_generation()
    stored["spec"]["model"] = {"name": "wan2.1-t2v-1.3b", "weights": uri}
    reporter = worker.StatusReporter(RecordingObjects(stored), "videos", "cat-surfing", 2.0)
    env = {"SMARTDIFF_VG_NAME": "cat-surfing", "SMARTDIFF_VG_NAMESPACE": "videos"}
    config = worker.WorkerConfig.from_env({**env, "SMARTDIFF_DEVICE": "cpu"})
    with pytest.raises(worker.WorkerFailure) as err:
        worker.run(config, reporter)
    assert loaded == [uri]
    assert (err.value.reason, err.value.exit_code) == ("WeightsUnavailable", 1)
    assert uri in str(err.value) and "AccessDenied" in str(err.value)


def test_without_api_access_the_worker_exits_with_a_reason(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("not-a-real-token")
    termination = tmp_path / "termination-log"
    code = worker.main(
        {
            "SMARTDIFF_VG_NAME": "cat-surfing",
            "SMARTDIFF_VG_NAMESPACE": "videos",
            "SMARTDIFF_KUBE_SERVER": "https://127.0.0.1:9",  # discard port: refused
            "SMARTDIFF_KUBE_TOKEN_FILE": str(token),
            "SMARTDIFF_TERMINATION_MESSAGE_PATH": str(termination),
        }
    )
    assert code == 1
    report = json.loads(termination.read_text())
    assert report["reason"] == "ApiUnavailable"
    assert "videos/cat-surfing" in report["message"]


def test_the_worker_plans_with_the_gpu_count_the_operator_resolved() -> None:
    """A spec without resources.gpus: the worker takes the operator's count, not 1."""
    from smartdiff_operator import manifests
    from smartdiff_operator.settings import ModelCatalog, ModelEntry, OperatorSettings

    settings = OperatorSettings(
        models=ModelCatalog((ModelEntry("wan-tiny-random", num_heads=2, default_gpus=2),))
    )
    vg = make_generation(
        model={"name": "wan-tiny-random"}, video={"width": 64, "height": 64, "frames": 5}
    )
    assert vg.spec.resources.gpus is None
    job = next(o for o in manifests.desired_objects(vg, settings) if o["kind"] == "Job")
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env[worker.ENV_GPUS] == "2"
    base = {"SMARTDIFF_VG_NAME": vg.name, "SMARTDIFF_VG_NAMESPACE": vg.namespace}
    config = worker.WorkerConfig.from_env(
        {**base, worker.ENV_GPUS: "2", "RANK": "0", "WORLD_SIZE": "2", "SMARTDIFF_DEVICE": "cpu"}
    )
    assert config.gpus == 2
    _, _, system, _ = worker._request(vg.to_manifest(), config)
    assert (system.cfg, system.ulysses, system.ring) == (2, 1, 1)
    # Without the operator's count the spec plans one rank, and torchrun's two disagree.
    alone = worker.WorkerConfig.from_env({**base, "WORLD_SIZE": "2", "SMARTDIFF_DEVICE": "cpu"})
    with pytest.raises(worker.WorkerFailure, match="plans 1 ranks") as err:
        worker._request(vg.to_manifest(), alone)
    assert err.value.reason == "InvalidRequest"
    with pytest.raises(worker.WorkerFailure, match="SMARTDIFF_GPUS='many'"):
        worker.WorkerConfig.from_env({**base, worker.ENV_GPUS: "many"})
