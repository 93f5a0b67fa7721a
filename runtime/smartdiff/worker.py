"""``python -m smartdiff.worker``: the in-pod entry point that torchrun starts on every rank.

Role: run the ``VideoGeneration`` this pod was created for and report back.

1. Rank 0 reads its own ``VideoGeneration`` (name and namespace come from the
   downward API, see ``WorkerConfig``) with the pod's ServiceAccount, which may
   read that one object and patch its status -- nothing else. Other ranks get
   the manifest from rank 0 (only rank 0 talks to the API server).
2. The spec becomes the engine's ``UserParams`` and ``SystemParams`` (the same
   topology planner as the operator's, with the GPU count the operator resolved:
   ``SMARTDIFF_GPUS`` when the spec leaves ``resources.gpus`` unset); the engine
   loads the weights (``resolve_weights``: a ``file://`` or ``pvc://`` folder, or an
   ``s3://`` prefix every rank fills into the node-local cache ``SMARTDIFF_WEIGHTS_CACHE``
   together; a failed download is ``WeightsUnavailable``, retried by the Job) and
   generates the video.
3. Rank 0 patches ``status.progress`` while denoising (at most once per
   ``SMARTDIFF_PROGRESS_INTERVAL_SECONDS``, and always the last step), encodes
   the MP4, uploads it to S3 (retried), then writes ``status.output``,
   ``status.timings`` and the ``Uploaded`` condition.
4. On failure rank 0 writes the reason to the container's termination message
   (JSON ``{"reason", "message"}``, which the operator turns into the
   ``Failed`` condition); a failed upload also sets ``Uploaded=False`` with
   reason ``UploadFailed`` and the path of the kept file. Then it exits
   non-zero: 2 for a request that can never run, 1 otherwise.

Off-cluster (tests, debugging) the API server is given explicitly:
``SMARTDIFF_KUBECONFIG``, or ``SMARTDIFF_KUBE_SERVER`` + ``SMARTDIFF_KUBE_TOKEN_FILE``
(+ ``SMARTDIFF_KUBE_CA_FILE``); in a pod the mounted ServiceAccount token is used.
``SMARTDIFF_DEV_MODEL`` swaps in another model (e.g. ``wan-tiny-random``) with
that model's default size and steps, for CPU test runs; it is logged loudly.

Talks to: the API server (``kubernetes`` client), the engine, ``smartdiff.io``
(MP4, S3). Never kopf, never the operator.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from smartdiff.api.podenv import (
    ENV_GPUS,
    ENV_NAME,
    ENV_NAMESPACE,
    ENV_NODE,
    ENV_OUTPUT_DIR,
    ENV_POD,
    ENV_PROGRESS_INTERVAL,
    ENV_S3_ENDPOINT,
    ENV_S3_REGION,
    ENV_UID,
    ENV_WEIGHTS_ROOT,
    ENV_WEIGHTS_URI,
)
from smartdiff.api.status import Condition, OutputStatus, ProgressStatus, TimingsStatus
from smartdiff.api.topology import Topology
from smartdiff.api.videogeneration import GROUP, PLURAL, VERSION, VideoGeneration

LOG = logging.getLogger("smartdiff.worker")

# Set by the operator through the pod spec: the ENV_* names of smartdiff.api.podenv.
# Optional, for runs outside a pod and for tests.
ENV_KUBECONFIG: Final = "SMARTDIFF_KUBECONFIG"
ENV_KUBE_SERVER: Final = "SMARTDIFF_KUBE_SERVER"
ENV_KUBE_TOKEN_FILE: Final = "SMARTDIFF_KUBE_TOKEN_FILE"
ENV_KUBE_CA_FILE: Final = "SMARTDIFF_KUBE_CA_FILE"
ENV_TERMINATION_PATH: Final = "SMARTDIFF_TERMINATION_MESSAGE_PATH"
ENV_DEV_MODEL: Final = "SMARTDIFF_DEV_MODEL"
ENV_DEVICE: Final = "SMARTDIFF_DEVICE"
ENV_DTYPE: Final = "SMARTDIFF_DTYPE"
ENV_UPLOAD_ATTEMPTS: Final = "SMARTDIFF_UPLOAD_ATTEMPTS"
ENV_UPLOAD_BACKOFF: Final = "SMARTDIFF_UPLOAD_BACKOFF_SECONDS"

EXIT_RETRYABLE: Final = 1
EXIT_PERMANENT: Final = 2
TERMINATION_MESSAGE_MAX: Final = 3800  # the kubelet keeps at most 4096 bytes
UPLOADED: Final = "Uploaded"
MERGE_PATCH: Final = "application/merge-patch+json"


class WorkerFailure(Exception):
    """The run failed; ``reason`` is a CamelCase condition reason, ``exit_code`` 1 or 2."""

    def __init__(self, reason: str, message: str, exit_code: int = EXIT_RETRYABLE) -> None:
        super().__init__(message)
        self.reason = reason
        self.exit_code = exit_code


@dataclass(frozen=True)
class WorkerConfig:
    """What the worker reads from its environment.

    Attributes:
        name / namespace / uid: the VideoGeneration to run (downward API).
        pod / node: where this worker runs (for messages).
        output_dir: where the MP4 is written before upload (kept on failure).
        weights_uri: weights to load (the spec's or the platform's default).
        weights_root: where ``pvc://`` claims are mounted.
        progress_interval: least seconds between two progress patches.
        termination_path: the container's termination message file.
        dev_model: model swapped in for test runs (None in production).
        device / dtype: overrides of the engine's device and dtype.
        s3_endpoint / s3_region: from the credentials Secret (``AWS_ENDPOINT_URL_S3``,
            ``AWS_ENDPOINT_URL``, ``AWS_REGION``), else the platform's defaults.
        upload_attempts / upload_backoff: retries of the upload.
        rank / world_size: this process's rank among ``world_size`` (torchrun).
        gpus: the GPU count the operator resolved for the run (``SMARTDIFF_GPUS``: the
            spec's, else the model catalog's default); None outside the operator's pods.
    """

    name: str
    namespace: str
    uid: str | None
    pod: str
    node: str
    output_dir: Path
    weights_uri: str | None
    weights_root: Path
    progress_interval: float
    termination_path: Path
    dev_model: str | None
    device: str
    dtype: str | None
    s3_endpoint: str | None
    s3_region: str | None
    upload_attempts: int
    upload_backoff: float
    rank: int
    world_size: int
    gpus: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerConfig:
        """Read and check the environment; errors name the variable."""
        missing = [name for name in (ENV_NAME, ENV_NAMESPACE) if not env.get(name)]
        if missing:
            raise WorkerFailure(
                "InvalidRequest",
                f"{', '.join(missing)} not set: the worker needs the VideoGeneration's name "
                "and namespace (the operator sets them through the downward API)",
                EXIT_PERMANENT,
            )

        def count(name: str) -> int | None:
            value = env.get(name)
            if not value:
                return None
            try:
                return int(value)
            except ValueError:
                raise WorkerFailure(
                    "InvalidRequest", f"{name}={value!r} is not an integer", EXIT_PERMANENT
                ) from None

        def number(name: str, default: float) -> float:
            try:
                return float(env.get(name) or default)
            except ValueError:
                raise WorkerFailure(
                    "InvalidRequest", f"{name}={env[name]!r} is not a number", EXIT_PERMANENT
                ) from None

        return cls(
            name=env[ENV_NAME],
            namespace=env[ENV_NAMESPACE],
            uid=env.get(ENV_UID) or None,
            pod=env.get(ENV_POD) or os.uname().nodename,
            node=env.get(ENV_NODE) or "?",
            output_dir=Path(env.get(ENV_OUTPUT_DIR) or "/tmp/smartdiff-output"),
            weights_uri=env.get(ENV_WEIGHTS_URI) or None,
            weights_root=Path(env.get(ENV_WEIGHTS_ROOT) or "/mnt/weights"),
            progress_interval=number(ENV_PROGRESS_INTERVAL, 2.0),
            termination_path=Path(env.get(ENV_TERMINATION_PATH) or "/dev/termination-log"),
            dev_model=env.get(ENV_DEV_MODEL) or None,
            device=env.get(ENV_DEVICE) or "auto",
            dtype=env.get(ENV_DTYPE) or None,
            # The credentials Secret's endpoint and region win over the platform's.
            s3_endpoint=env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or env.get(ENV_S3_ENDPOINT)
            or None,
            s3_region=env.get("AWS_REGION")
            or env.get("AWS_DEFAULT_REGION")
            or env.get(ENV_S3_REGION)
            or None,
            upload_attempts=int(number(ENV_UPLOAD_ATTEMPTS, 4)),
            upload_backoff=number(ENV_UPLOAD_BACKOFF, 1.0),
            rank=int(env.get("RANK") or 0),
            world_size=int(env.get("WORLD_SIZE") or 1),
            gpus=count(ENV_GPUS),
        )


def api_client(env: Mapping[str, str]) -> Any:
    """A ``kubernetes`` ApiClient: explicit kubeconfig or token from env, else in-cluster."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if env.get(ENV_KUBECONFIG):
        config.load_kube_config(config_file=env[ENV_KUBECONFIG], client_configuration=configuration)
    elif env.get(ENV_KUBE_SERVER):
        token_file = env.get(ENV_KUBE_TOKEN_FILE)
        if not token_file:
            raise WorkerFailure(
                "InvalidRequest",
                f"{ENV_KUBE_SERVER} is set but {ENV_KUBE_TOKEN_FILE} is not",
                EXIT_PERMANENT,
            )
        configuration.host = env[ENV_KUBE_SERVER]
        token = Path(token_file).read_text().strip()
        configuration.api_key = {"authorization": f"Bearer {token}"}
        if env.get(ENV_KUBE_CA_FILE):
            configuration.ssl_ca_cert = env[ENV_KUBE_CA_FILE]
    else:
        config.load_incluster_config(client_configuration=configuration)
    # kubernetes 36's loaders store the token as api_key["authorization"], but its
    # generated auth_settings send only api_key["BearerToken"]: copy it on every
    # request (the in-cluster token rotates).
    loader_hook = configuration.refresh_api_key_hook

    def refresh(cfg: Any) -> None:
        if loader_hook is not None:
            loader_hook(cfg)
        if cfg.api_key.get("authorization"):
            cfg.api_key["BearerToken"] = cfg.api_key["authorization"]

    configuration.refresh_api_key_hook = refresh
    refresh(configuration)
    return client.ApiClient(configuration)


class StatusReporter:
    """Rank 0's window on its VideoGeneration: read it, patch its status.

    Args:
        objects: a ``kubernetes.client.CustomObjectsApi`` authorized as the runtime
            ServiceAccount (see ``from_api_client``).
        namespace / name: the VideoGeneration.
        interval: least seconds between two progress patches.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        objects: Any,
        namespace: str,
        name: str,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._objects = objects
        self.namespace = namespace
        self.name = name
        self.interval = interval
        self._clock = clock
        self._last_progress: float | None = None
        self.progress_writes = 0

    @classmethod
    def from_api_client(
        cls, api: Any, namespace: str, name: str, interval: float
    ) -> StatusReporter:
        """A reporter over a ``kubernetes`` ApiClient (see ``api_client``)."""
        from kubernetes import client

        return cls(client.CustomObjectsApi(api), namespace, name, interval)

    def read(self) -> dict[str, Any]:
        """The VideoGeneration as stored."""
        result: dict[str, Any] = self._objects.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name
        )
        return result

    def _patch(self, body: Mapping[str, Any]) -> None:
        self._objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, self.name, body, _content_type=MERGE_PATCH
        )

    def progress(self, step: int, total: int) -> None:
        """Patch ``status.progress`` unless the last patch is younger than ``interval``."""
        now = self._clock()
        recent = self._last_progress is not None and now - self._last_progress < self.interval
        if recent and step < total:
            return
        progress = ProgressStatus(step=step, total_steps=total).to_json_dict()
        try:
            self._patch({"status": {"progress": progress}})
        except Exception as error:  # noqa: BLE001 - progress is best effort
            LOG.warning("progress %d/%d not written: %s", step, total, error)
            return
        self._last_progress = now
        self.progress_writes += 1

    def succeeded(self, output: OutputStatus, timings: TimingsStatus) -> None:
        """Write ``output`` and ``timings``, and ``Uploaded=True``."""
        self._patch(
            {"status": {"output": output.to_json_dict(), "timings": timings.to_json_dict()}}
        )
        self.set_condition(UPLOADED, "True", "Uploaded", f"uploaded to {output.uri}")

    def set_condition(self, condition_type: str, status: str, reason: str, message: str) -> None:
        """Upsert one condition, with ``resourceVersion`` so no concurrent write is lost."""
        for _ in range(5):
            current = self.read()
            stored = (current.get("status") or {}).get("conditions") or []
            conditions = [c for c in stored if c.get("type") != condition_type]
            previous = next((c for c in stored if c.get("type") == condition_type), None)
            now = datetime.now(UTC).replace(microsecond=0)
            condition = Condition(
                type=condition_type,
                status=status,  # type: ignore[arg-type]
                reason=reason,
                message=message[:4000],
                last_transition_time=now,
                observed_generation=current.get("metadata", {}).get("generation"),
            ).to_json_dict()
            if previous is not None and previous.get("status") == status:
                condition["lastTransitionTime"] = previous.get("lastTransitionTime")
            conditions.append(condition)
            body = {
                "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                "status": {"conditions": conditions},
            }
            try:
                self._patch(body)
                return
            except Exception as error:
                if getattr(error, "status", None) != 409:
                    raise
        raise RuntimeError(f"condition {condition_type} not written: kept conflicting (409)")


def write_termination_message(path: Path, reason: str, message: str) -> None:
    """The JSON the operator reads from the pod's terminated state."""
    text = json.dumps({"reason": reason, "message": message[:TERMINATION_MESSAGE_MAX]})
    try:
        path.write_text(text)
    except OSError as error:
        LOG.error("termination message not written to %s: %s", path, error)


def resolve_weights(uri: str | None, root: Path) -> str | Path | None:
    """What the backend loads for a weights URI (it checks the folder and downloads S3).

    ``file:///p`` -> ``p``; ``pvc://claim/p`` -> ``root/claim/p`` (the operator mounts the
    claim at ``root/claim``); ``s3://bucket/prefix/`` -> the URI itself, which the backend
    downloads into the node-local cache (``$SMARTDIFF_WEIGHTS_CACHE``, mounted by the
    operator). A URI of another form can never load: ``InvalidRequest``, exit 2.
    """
    if uri is None:
        return None
    allowed = "allowed: file:///absolute/path, pvc://claim/path or s3://bucket/prefix/"
    if uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if not path.startswith("/"):
            raise WorkerFailure(
                "InvalidRequest", f"weights={uri!r} is not allowed; {allowed}", EXIT_PERMANENT
            )
        return Path(path)
    if uri.startswith("pvc://"):
        claim, _, inner = uri.removeprefix("pvc://").partition("/")
        if not claim or ".." in inner.split("/"):
            raise WorkerFailure(
                "InvalidRequest",
                f"weights={uri!r} is not allowed: no claim or a '..' segment; {allowed}",
                EXIT_PERMANENT,
            )
        return root / claim / inner
    if uri.startswith("s3://"):
        from smartdiff.io.s3 import S3Location

        try:
            S3Location.parse(uri, field="weights")
        except ValueError as error:
            raise WorkerFailure("InvalidRequest", str(error), EXIT_PERMANENT) from error
        return uri
    raise WorkerFailure(
        "InvalidRequest", f"weights={uri!r} has an unknown scheme; {allowed}", EXIT_PERMANENT
    )


def share_manifest(manifest: dict[str, Any] | None, config: WorkerConfig) -> dict[str, Any]:
    """Rank 0's manifest on every rank (a torch.distributed broadcast when world > 1)."""
    if config.world_size == 1:
        assert manifest is not None
        return manifest
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        # One default group for both: gloo for this CPU object broadcast, NCCL for the
        # ParallelGroups' CUDA collectives later (ParallelGroups.initialize reuses it).
        if torch.cuda.is_available() and config.device != "cpu":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
    box: list[Any] = [manifest]
    dist.broadcast_object_list(box, src=0)
    shared: dict[str, Any] = box[0]
    return shared


def run(config: WorkerConfig, reporter: StatusReporter | None) -> dict[str, Any]:
    """Generate, encode and (rank 0) upload; returns what was reported. Raises WorkerFailure."""
    manifest = None
    if reporter is not None:
        try:
            manifest = reporter.read()
        except Exception as error:  # noqa: BLE001 - 403, 404, connection: all end the run
            raise WorkerFailure(
                "ApiUnavailable",
                f"cannot read VideoGeneration {config.namespace}/{config.name}: {error}",
            ) from error
    manifest = share_manifest(manifest, config)
    uid = manifest.get("metadata", {}).get("uid")
    if config.uid is not None and uid != config.uid:
        raise WorkerFailure(
            "InvalidRequest",
            f"VideoGeneration {config.namespace}/{config.name} has uid {uid}, this pod was made "
            f"for uid {config.uid} (the resource was re-created)",
            EXIT_PERMANENT,
        )
    generation, user, system, model = _request(manifest, config)
    weights_uri = config.weights_uri or generation.spec.model.weights
    weights = resolve_weights(weights_uri, config.weights_root)
    if weights is not None and model.random_weights:
        weights = None

    from smartdiff.engine.engine import Engine
    from smartdiff.engine.task import TaskStatus
    from smartdiff.io.s3_cache import WeightsDownloadError

    def on_step(_task: object, step: int, total: int) -> None:
        if reporter is not None:
            reporter.progress(step, total)

    groups = None
    if config.world_size > 1:
        from smartdiff.parallel.groups import ParallelGroups

        groups = ParallelGroups.from_degrees(system, device=system.device)
    try:
        engine = Engine.from_params(
            model, system, weights_path=weights, on_step=on_step, groups=groups
        )
    except WeightsDownloadError as error:
        # S3 unreachable, denied, throttled or a corrupt copy: another attempt may succeed
        # (the cache keeps what was fetched; the Job's backoffLimit retries).
        raise WorkerFailure(
            "WeightsUnavailable", f"downloading weights {weights_uri}: {error}"
        ) from error
    except (ValueError, FileNotFoundError, OSError) as error:
        raise WorkerFailure("LoadFailed", f"loading {model.name}: {error}") from error
    task = engine.submit(user)
    engine.run_until_idle()
    if task.status is not TaskStatus.SUCCEEDED:
        raise WorkerFailure("GenerationFailed", f"generation {task.status.value}: {task.error}")
    if config.rank != 0:
        return {}
    return _deliver(generation, task, engine.backend.load_seconds, config, reporter)


def _request(manifest: Mapping[str, Any], config: WorkerConfig) -> tuple[Any, Any, Any, Any]:
    """``(VideoGeneration, UserParams, SystemParams, ModelConfig)``; InvalidRequest if bad."""
    from smartdiff.api.params import UserParams
    from smartdiff.engine.request import check_request
    from smartdiff.models.registry import load_model_config

    try:
        body = {k: manifest[k] for k in ("apiVersion", "kind", "metadata", "spec")}
        generation = VideoGeneration.from_manifest(body, source=f"{config.namespace}/{config.name}")
        user = generation.spec.to_user_params()
        model = load_model_config(config.dev_model or user.model)
        if config.dev_model is not None:
            LOG.warning(
                "DEV MODEL OVERRIDE: running %s with its default size and steps instead of %s "
                "(%s=%s); the video is NOT what the spec asks for",
                model.name,
                user.model,
                ENV_DEV_MODEL,
                config.dev_model,
            )
            defaults = model.defaults.as_request_fields()
            defaults.pop("negative_prompt", None)
            fields = {**user.model_dump(), **defaults, "model": model.name, "cache": user.cache}
            user = UserParams(**fields)
            topology = Topology(nodes=1, gpus_per_node=1, cfg=1, ulysses=1, ring=1)
        else:
            # The operator's resolved count (not re-derived here): used when the spec has none.
            topology = generation.spec.plan_topology(
                model.dit.num_heads,
                default_gpus=config.gpus,
                spatial_compression=model.vae.spatial_compression,
            )
        if topology.world_size != config.world_size:
            raise ValueError(
                f"the spec plans {topology.world_size} ranks ({topology.summary}) but torchrun "
                f"started {config.world_size}"
            )
        system = generation.spec.to_system_params(topology, device=config.device)
        if config.dtype is not None:
            system = system.model_copy(update={"dtype": config.dtype})
        check_request(user, model)
    except (KeyError, ValueError) as error:
        raise WorkerFailure("InvalidRequest", str(error), EXIT_PERMANENT) from error
    return generation, user, system, model


def _deliver(
    generation: VideoGeneration,
    task: Any,
    load_seconds: float,
    config: WorkerConfig,
    reporter: StatusReporter | None,
) -> dict[str, Any]:
    from smartdiff.engine.generator import to_uint8_frames
    from smartdiff.io.s3 import UploadConfig, UploadError, upload_file
    from smartdiff.io.video import write_mp4

    config.output_dir.mkdir(parents=True, exist_ok=True)
    path = config.output_dir / f"{config.name}.mp4"
    start = time.perf_counter()
    try:
        video = write_mp4(to_uint8_frames(task.video), path, fps=task.params.fps)
    except Exception as error:  # noqa: BLE001 - any encoder failure is EncodeFailed
        raise WorkerFailure("EncodeFailed", f"writing {path}: {error}") from error
    encode_seconds = time.perf_counter() - start
    uri = generation.spec.output.object_uri(config.namespace, config.name)
    start = time.perf_counter()
    try:
        result = upload_file(
            video.path,
            uri,
            endpoint_url=config.s3_endpoint,
            region=config.s3_region,
            config=UploadConfig(
                attempts=config.upload_attempts,
                backoff_initial_s=config.upload_backoff,
                backoff_max_s=max(config.upload_backoff, 1.0) * 8,
                connect_timeout_s=5.0,
            ),
        )
    except (UploadError, ValueError) as error:
        message = (
            f"{error}; the video was kept at {video.path} on pod {config.pod} (node {config.node})"
        )
        if reporter is not None:
            _best_effort(lambda: reporter.set_condition(UPLOADED, "False", "UploadFailed", message))
        raise WorkerFailure("UploadFailed", message) from error
    output = OutputStatus.model_validate(
        {"uri": result.uri, "bytes": result.bytes, "sha256": result.sha256}
    )
    timings = TimingsStatus(
        load_seconds=round(load_seconds, 3),
        encode_seconds=round(task.timings.get("encode", 0.0), 3),
        denoise_seconds=round(task.timings.get("denoise", 0.0), 3),
        decode_seconds=round(task.timings.get("decode", 0.0) + encode_seconds, 3),
        upload_seconds=round(time.perf_counter() - start, 3),
    )
    if reporter is not None:
        for attempt in range(1, 6):
            try:
                reporter.succeeded(output, timings)
                break
            except Exception as error:  # noqa: BLE001 - retried, then a failure
                if attempt == 5:
                    raise WorkerFailure(
                        "ReportFailed",
                        f"uploaded {result.uri} but could not write the status: {error}",
                    ) from error
                time.sleep(attempt)
    LOG.info("uploaded %s (%d bytes, sha256 %s)", result.uri, result.bytes, result.sha256)
    return {"output": output.to_json_dict(), "timings": timings.to_json_dict()}


def _best_effort(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as error:  # noqa: BLE001 - reporting must not mask the real failure
        LOG.warning("status not written: %s", error)


def main(env: Mapping[str, str] | None = None) -> int:
    """Run one generation; returns the exit code (0, 1 retryable, 2 permanent)."""
    env = os.environ if env is None else env
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    termination = Path(env.get(ENV_TERMINATION_PATH) or "/dev/termination-log")
    rank = int(env.get("RANK") or 0)
    try:
        config = WorkerConfig.from_env(env)
        reporter = None
        if config.rank == 0:
            try:
                reporter = StatusReporter.from_api_client(
                    api_client(env), config.namespace, config.name, config.progress_interval
                )
            except (OSError, ValueError) as error:
                raise WorkerFailure("ApiUnavailable", f"no API access: {error}") from error
        reported = run(config, reporter)
    except WorkerFailure as failure:
        LOG.error("%s: %s", failure.reason, failure)
        if rank == 0:
            write_termination_message(termination, failure.reason, str(failure))
        return failure.exit_code
    except Exception as error:  # noqa: BLE001 - anything else is a retryable failure
        LOG.exception("worker failed")
        if rank == 0:
            write_termination_message(
                termination, "WorkerError", f"{type(error).__name__}: {error}"
            )
        return EXIT_RETRYABLE
    if rank == 0:
        LOG.info("done: %s", json.dumps(reported))
    return 0


if __name__ == "__main__":
    sys.exit(main())
