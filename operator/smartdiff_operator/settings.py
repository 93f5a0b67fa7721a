"""The operator's settings: one frozen dataclass of grouped sub-dataclasses.

Role: everything the operator needs to know that is not in a ``VideoGeneration``
-- the runtime image and how its pods are shaped, the model catalog (heads for the
topology planner, default weights), the platform's S3 endpoint and the node-local
cache of ``s3://`` weights, observability ports and reconcile timing.
``OperatorSettings.from_env`` reads them from ``SMARTDIFF_*`` environment variables
(the Helm chart sets those); every field has a default that works on a local cluster.
Each value is checked on construction and an error names the field (or the environment
variable), the bad value and what is allowed.

Talks to: nothing (stdlib, ``smartdiff.api.checks`` and ``topology`` constants). Read by
``manifests`` (pod shape), ``handlers`` (catalog, timing) and ``__main__``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from smartdiff.api import checks
from smartdiff.api.topology import WAN22_SPATIAL_COMPRESSION, WAN_SPATIAL_COMPRESSION

PullPolicy = Literal["Always", "IfNotPresent", "Never"]
WeightsCacheType = Literal["hostPath", "pvc", "emptyDir", "disabled"]
WEIGHTS_CACHE_TYPES: Final = ("hostPath", "pvc", "emptyDir", "disabled")
DEFAULT_WEIGHTS_CACHE: Final = "/var/cache/smart-diffusion/weights"
RUNTIME_GID: Final = 65532  # the runtime image's user and group (Dockerfile)
SPATIAL_COMPRESSIONS: Final = (WAN_SPATIAL_COMPRESSION, WAN22_SPATIAL_COMPRESSION)
PULL_POLICIES: Final = ("Always", "IfNotPresent", "Never")
_QUANTITY = re.compile(checks.QUANTITY_PATTERN)
_K8S_NAME = re.compile(checks.K8S_NAME_PATTERN)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_MODEL_KEYS: Final = ("name", "numHeads", "weights", "defaultGpus", "spatialCompression")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SettingsError(ValueError):
    """A setting has a value that is not allowed; the message names it."""


def _fail(name: str, value: object, allowed: str) -> SettingsError:
    return SettingsError(f"{name}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class ModelEntry:
    """One model the platform serves.

    Args:
        name: model config name as in ``spec.model.name`` (``wan2.1-t2v-1.3b``).
        num_heads: attention heads of its transformer (the topology planner splits them).
        weights: default weights URI when a manifest leaves ``spec.model.weights`` unset.
        default_gpus: GPUs a generation gets when its manifest leaves
            ``spec.resources.gpus`` unset; None means 1.
        spatial_compression: the VAE's spatial compression, for the sequence length the
            planner checks (8: Wan2.1 VAE; 16: the Wan2.2 VAE of TI2V-5B).
    """

    name: str
    num_heads: int
    weights: str | None = None
    default_gpus: int | None = None
    spatial_compression: int = WAN_SPATIAL_COMPRESSION

    def __post_init__(self) -> None:
        if not re.match(checks.MODEL_NAME_PATTERN, self.name):
            raise _fail("models[].name", self.name, "a model name such as wan2.1-t2v-1.3b")
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise _fail(f"models[{self.name}].numHeads", self.num_heads, "an integer >= 1")
        if self.weights is not None and not re.match(checks.WEIGHTS_URI_PATTERN, self.weights):
            raise _fail(
                f"models[{self.name}].weights", self.weights, "an s3://, pvc:// or file:/// URI"
            )
        if self.default_gpus is not None and (
            not isinstance(self.default_gpus, int)
            or isinstance(self.default_gpus, bool)
            or not 1 <= self.default_gpus <= checks.MAX_GPUS
        ):
            raise _fail(
                f"models[{self.name}].defaultGpus",
                self.default_gpus,
                f"an integer in [1, {checks.MAX_GPUS}] (or unset: 1 GPU)",
            )
        if self.spatial_compression not in SPATIAL_COMPRESSIONS:
            raise _fail(
                f"models[{self.name}].spatialCompression",
                self.spatial_compression,
                f"one of {', '.join(map(str, SPATIAL_COMPRESSIONS))}",
            )


# Default GPU counts: the 1.3B and TI2V-5B models fit one H200 at their official sizes;
# the 14B and A14B transformers (40 heads) run on 4 (CFG 2 x Ulysses 2), where one 14B
# forward at 720p takes ~3.3 s instead of ~12 s on one GPU.
DEFAULT_MODELS: Final = (
    ModelEntry("wan2.1-t2v-1.3b", num_heads=12, default_gpus=1),
    ModelEntry("wan2.1-t2v-14b", num_heads=40, default_gpus=4),
    ModelEntry("wan2.2-t2v-a14b", num_heads=40, default_gpus=4),
    ModelEntry(
        "wan2.2-ti2v-5b",
        num_heads=24,
        default_gpus=1,
        spatial_compression=WAN22_SPATIAL_COMPRESSION,
    ),
    ModelEntry("wan-tiny-random", num_heads=2),
)


@dataclass(frozen=True)
class ModelCatalog:
    """The models the platform serves; a manifest naming another model is rejected.

    Args:
        models: the entries, unique by name.
    """

    models: tuple[ModelEntry, ...] = DEFAULT_MODELS

    def __post_init__(self) -> None:
        names = [entry.name for entry in self.models]
        if not names:
            raise _fail("models", [], "at least one model")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise _fail("models", repeated, "each model name once")

    @property
    def names(self) -> tuple[str, ...]:
        """The known model names, in catalog order."""
        return tuple(entry.name for entry in self.models)

    def get(self, name: str) -> ModelEntry | None:
        """The entry named ``name``, if any."""
        return next((entry for entry in self.models if entry.name == name), None)


@dataclass(frozen=True)
class RuntimeSettings:
    """How runtime pods look.

    Args:
        image: the runtime container image (CUDA PyTorch + ``smartdiff[runtime]``).
        image_pull_policy: ``Always``, ``IfNotPresent`` or ``Never``.
        image_pull_secrets: names of Secrets (in the generation's namespace) to pull with.
        module: the Python module torchrun starts on every rank.
        rendezvous_port: c10d rendezvous port on pod 0 of a multi-node run.
        shm_size: size limit of the ``/dev/shm`` memory volume NCCL uses (a quantity).
        output_dir: where the pod writes the MP4 before uploading it (an emptyDir).
        weights_mount: where ``pvc://`` weights claims are mounted (read-only).
        progress_interval_seconds: least time between two progress patches of a pod.
        node_selector: node labels every runtime pod requires (added to the spec's).
        extra_env: additional environment variables of the runtime container.
        run_as_non_root: require a non-root runtime user.
    """

    image: str = "ghcr.io/smart-diffusion/runtime:0.1.0"
    image_pull_policy: PullPolicy = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    module: str = "smartdiff.worker"
    rendezvous_port: int = 29400
    shm_size: str = "16Gi"
    output_dir: str = "/var/lib/smartdiff/output"
    weights_mount: str = "/mnt/weights"
    progress_interval_seconds: float = 2.0
    node_selector: tuple[tuple[str, str], ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    run_as_non_root: bool = True

    def __post_init__(self) -> None:
        if not self.image or any(ch.isspace() for ch in self.image):
            raise _fail("runtime.image", self.image, "a container image reference")
        if self.image_pull_policy not in PULL_POLICIES:
            raise _fail(
                "runtime.imagePullPolicy", self.image_pull_policy, f"one of {PULL_POLICIES}"
            )
        for secret in self.image_pull_secrets:
            if not _K8S_NAME.match(secret):
                raise _fail("runtime.imagePullSecrets[]", secret, "a Secret name")
        if not _MODULE.match(self.module):
            raise _fail("runtime.module", self.module, "a dotted Python module name")
        if not 1 <= self.rendezvous_port <= 65535:
            raise _fail("runtime.rendezvousPort", self.rendezvous_port, "a port in [1, 65535]")
        if not _QUANTITY.match(self.shm_size):
            raise _fail("runtime.shmSize", self.shm_size, "a quantity such as 16Gi")
        for name, path in (("outputDir", self.output_dir), ("weightsMount", self.weights_mount)):
            if not path.startswith("/"):
                raise _fail(f"runtime.{name}", path, "an absolute path")
        if not self.progress_interval_seconds >= 0:
            raise _fail(
                "runtime.progressIntervalSeconds", self.progress_interval_seconds, "a number >= 0"
            )
        for key, _ in self.extra_env:
            if not _ENV_NAME.match(key):
                raise _fail("runtime.extraEnv", key, "an environment variable name")


@dataclass(frozen=True)
class WeightsCacheSettings:
    """The node-local cache runtime pods download ``s3://`` weights into.

    Mounted only in pods whose weights are ``s3://`` (``pvc://`` and ``file://`` weights are
    read in place), at ``mount_path``, which the pod gets as ``SMARTDIFF_WEIGHTS_CACHE``.
    Pods on one node share it: the runtime's cache (``smartdiff.io.s3_cache``) is safe for
    concurrent fillers, so the second run on a node loads without downloading.

    Args:
        kind: ``hostPath`` (``host_path`` on the node, type ``DirectoryOrCreate``; the
            platform must make it writable for uid/gid 65532, since a folder the kubelet
            creates is root-owned; Pod Security ``baseline`` forbids hostPath volumes),
            ``pvc`` (the claim ``claim_name`` in the generation's namespace, shared by the
            pods that mount it; the pod gets ``fs_group``), ``emptyDir`` (a per-pod folder:
            every run downloads again) or ``disabled`` (nothing mounted, nothing set: the
            runtime's default ``~/.cache/smart-diffusion/weights``, or ``runtime.extraEnv``).
        host_path: the node's folder for ``hostPath``.
        claim_name: the PersistentVolumeClaim for ``pvc``.
        mount_path: where the cache is mounted in the runtime container.
        fs_group: the pod's ``fsGroup`` with ``pvc`` (the runtime image's group, 65532), so
            the volume is writable; no other kind sets it.
    """

    kind: WeightsCacheType = "hostPath"
    host_path: str = DEFAULT_WEIGHTS_CACHE
    claim_name: str | None = None
    mount_path: str = DEFAULT_WEIGHTS_CACHE
    fs_group: int = RUNTIME_GID

    def __post_init__(self) -> None:
        if self.kind not in WEIGHTS_CACHE_TYPES:
            raise _fail(
                "storage.weightsCache.type", self.kind, f"one of {', '.join(WEIGHTS_CACHE_TYPES)}"
            )
        for name, path in (("hostPath", self.host_path), ("mountPath", self.mount_path)):
            if not path.startswith("/") or path.rstrip("/") == "":
                raise _fail(f"storage.weightsCache.{name}", path, "an absolute path below /")
        if self.kind == "pvc" and (self.claim_name is None or not _K8S_NAME.match(self.claim_name)):
            raise _fail(
                "storage.weightsCache.claimName",
                self.claim_name,
                "a PersistentVolumeClaim name (required with type pvc)",
            )
        if isinstance(self.fs_group, bool) or not isinstance(self.fs_group, int):
            raise _fail("storage.weightsCache.fsGroup", self.fs_group, "an integer >= 0")
        if self.fs_group < 0:
            raise _fail("storage.weightsCache.fsGroup", self.fs_group, "an integer >= 0")


@dataclass(frozen=True)
class StorageSettings:
    """The platform's object storage.

    Args:
        s3_endpoint: S3 endpoint URL given to runtime pods (``AWS_ENDPOINT_URL``);
            None means AWS itself. A credentials Secret may override it with
            ``AWS_ENDPOINT_URL_S3``. ``s3://`` weights are read from the same endpoint with
            the same credentials (the output Secret's, else the pod's own identity).
        s3_region: signing region given to runtime pods; None leaves it to boto3.
        weights_cache: the node-local cache of ``s3://`` weights.
    """

    s3_endpoint: str | None = None
    s3_region: str | None = None
    weights_cache: WeightsCacheSettings = field(default_factory=WeightsCacheSettings)

    def __post_init__(self) -> None:
        if self.s3_endpoint is not None and not re.match(r"^https?://[^/\s]+", self.s3_endpoint):
            raise _fail("storage.s3Endpoint", self.s3_endpoint, "an http(s)://host[:port] URL")


@dataclass(frozen=True)
class ReconcileSettings:
    """Timing of reconciliation.

    Args:
        resync_seconds: interval of the safety-net status resync of unfinished
            generations (status normally follows Job and Pod events at once).
        status_conflict_retries: re-reads after a status write lost a race (409).
        retry_delay_seconds: delay kopf waits before retrying a handler after a
            transient API error.
    """

    resync_seconds: float = 30.0
    status_conflict_retries: int = 5
    retry_delay_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not self.resync_seconds > 0:
            raise _fail("reconcile.resyncSeconds", self.resync_seconds, "a number > 0")
        if self.status_conflict_retries < 1:
            raise _fail(
                "reconcile.statusConflictRetries", self.status_conflict_retries, "an integer >= 1"
            )
        if not self.retry_delay_seconds >= 0:
            raise _fail("reconcile.retryDelaySeconds", self.retry_delay_seconds, "a number >= 0")


@dataclass(frozen=True)
class ObservabilitySettings:
    """Health and metrics endpoints.

    Args:
        metrics_port: port of the Prometheus ``/metrics`` endpoint; 0 disables it.
        liveness_port: port of kopf's liveness endpoint ``/healthz``; 0 disables it.
        bind_address: address both endpoints listen on.
        log_level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
    """

    metrics_port: int = 8000
    liveness_port: int = 8080
    bind_address: str = "0.0.0.0"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for name, port in (
            ("metricsPort", self.metrics_port),
            ("livenessPort", self.liveness_port),
        ):
            if not 0 <= port <= 65535:
                raise _fail(f"observability.{name}", port, "a port in [0, 65535] (0: disabled)")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise _fail(
                "observability.logLevel", self.log_level, "one of DEBUG, INFO, WARNING, ERROR"
            )

    @property
    def liveness_endpoint(self) -> str | None:
        """The URL kopf serves its liveness probe on, or None when disabled."""
        if self.liveness_port == 0:
            return None
        return f"http://{self.bind_address}:{self.liveness_port}/healthz"


@dataclass(frozen=True)
class OperatorSettings:
    """All settings of the operator.

    Args:
        runtime: the shape of runtime pods.
        models: the model catalog.
        storage: the platform's S3 endpoint and the node-local cache of ``s3://`` weights.
        reconcile: reconcile timing.
        observability: health and metrics endpoints.
        namespaces: namespaces to serve; empty means the whole cluster.
    """

    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    models: ModelCatalog = field(default_factory=ModelCatalog)
    storage: StorageSettings = field(default_factory=StorageSettings)
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    namespaces: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for namespace in self.namespaces:
            if not _K8S_NAME.match(namespace):
                raise _fail("namespaces[]", namespace, "a namespace name")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorSettings:
        """Settings from ``SMARTDIFF_*`` variables; unset ones keep their defaults.

        Raises:
            SettingsError: a variable has a bad value; the message names the variable.
        """
        reader = _EnvReader(env)
        defaults = RuntimeSettings()
        try:
            runtime = RuntimeSettings(
                image=reader.text("SMARTDIFF_RUNTIME_IMAGE", defaults.image),
                image_pull_policy=reader.choice(
                    "SMARTDIFF_RUNTIME_IMAGE_PULL_POLICY", defaults.image_pull_policy
                ),
                image_pull_secrets=reader.names("SMARTDIFF_RUNTIME_IMAGE_PULL_SECRETS"),
                module=reader.text("SMARTDIFF_RUNTIME_MODULE", defaults.module),
                rendezvous_port=reader.integer(
                    "SMARTDIFF_RUNTIME_RENDEZVOUS_PORT", defaults.rendezvous_port
                ),
                shm_size=reader.text("SMARTDIFF_RUNTIME_SHM_SIZE", defaults.shm_size),
                output_dir=reader.text("SMARTDIFF_RUNTIME_OUTPUT_DIR", defaults.output_dir),
                weights_mount=reader.text(
                    "SMARTDIFF_RUNTIME_WEIGHTS_MOUNT", defaults.weights_mount
                ),
                progress_interval_seconds=reader.number(
                    "SMARTDIFF_RUNTIME_PROGRESS_INTERVAL_SECONDS",
                    defaults.progress_interval_seconds,
                ),
                node_selector=reader.pairs("SMARTDIFF_RUNTIME_NODE_SELECTOR"),
                extra_env=reader.pairs("SMARTDIFF_RUNTIME_EXTRA_ENV"),
                run_as_non_root=reader.boolean(
                    "SMARTDIFF_RUNTIME_RUN_AS_NON_ROOT", defaults.run_as_non_root
                ),
            )
            models = reader.models("SMARTDIFF_MODELS")
            cache_defaults = WeightsCacheSettings()
            weights_cache = WeightsCacheSettings(
                kind=reader.cache_type("SMARTDIFF_WEIGHTS_CACHE_TYPE", cache_defaults.kind),
                host_path=reader.text(
                    "SMARTDIFF_WEIGHTS_CACHE_HOST_PATH", cache_defaults.host_path
                ),
                claim_name=env.get("SMARTDIFF_WEIGHTS_CACHE_CLAIM") or None,
                mount_path=reader.text(
                    "SMARTDIFF_WEIGHTS_CACHE_MOUNT_PATH", cache_defaults.mount_path
                ),
                fs_group=reader.integer(
                    "SMARTDIFF_WEIGHTS_CACHE_FS_GROUP", cache_defaults.fs_group
                ),
            )
            storage = StorageSettings(
                s3_endpoint=env.get("SMARTDIFF_S3_ENDPOINT") or None,
                s3_region=env.get("SMARTDIFF_S3_REGION") or None,
                weights_cache=weights_cache,
            )
            reconcile = ReconcileSettings(
                resync_seconds=reader.number("SMARTDIFF_RESYNC_SECONDS", 30.0),
                status_conflict_retries=reader.integer("SMARTDIFF_STATUS_CONFLICT_RETRIES", 5),
                retry_delay_seconds=reader.number("SMARTDIFF_RETRY_DELAY_SECONDS", 5.0),
            )
            observability = ObservabilitySettings(
                metrics_port=reader.integer("SMARTDIFF_METRICS_PORT", 8000),
                liveness_port=reader.integer("SMARTDIFF_LIVENESS_PORT", 8080),
                bind_address=reader.text("SMARTDIFF_BIND_ADDRESS", "0.0.0.0"),
                log_level=reader.text("SMARTDIFF_LOG_LEVEL", "INFO").upper(),
            )
            return cls(
                runtime=runtime,
                models=models,
                storage=storage,
                reconcile=reconcile,
                observability=observability,
                namespaces=reader.names("SMARTDIFF_NAMESPACES"),
            )
        except SettingsError as error:
            raise SettingsError(f"operator settings from the environment: {error}") from None


@dataclass(frozen=True)
class _EnvReader:
    """Typed access to environment variables; errors name the variable."""

    env: Mapping[str, str]

    def text(self, name: str, default: str) -> str:
        return self.env.get(name) or default

    def choice(self, name: str, default: PullPolicy) -> PullPolicy:
        value = self.env.get(name) or default
        if value not in PULL_POLICIES:
            raise _fail(name, value, f"one of {', '.join(PULL_POLICIES)}")
        return value  # type: ignore[return-value]  # checked against the Literal's values

    def cache_type(self, name: str, default: WeightsCacheType) -> WeightsCacheType:
        value = self.env.get(name) or default
        if value not in WEIGHTS_CACHE_TYPES:
            raise _fail(name, value, f"one of {', '.join(WEIGHTS_CACHE_TYPES)}")
        return value  # type: ignore[return-value]  # checked against the Literal's values

    def integer(self, name: str, default: int) -> int:
        value = self.env.get(name)
        if not value:
            return default
        try:
            return int(value)
        except ValueError:
            raise _fail(name, value, "an integer") from None

    def number(self, name: str, default: float) -> float:
        value = self.env.get(name)
        if not value:
            return default
        try:
            return float(value)
        except ValueError:
            raise _fail(name, value, "a number") from None

    def boolean(self, name: str, default: bool) -> bool:
        value = self.env.get(name)
        if not value:
            return default
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise _fail(name, value, "true or false")

    def names(self, name: str) -> tuple[str, ...]:
        value = self.env.get(name) or ""
        return tuple(part.strip() for part in value.split(",") if part.strip())

    def pairs(self, name: str) -> tuple[tuple[str, str], ...]:
        """``KEY=VALUE,KEY2=VALUE2`` -> ``(("KEY", "VALUE"), ...)``."""
        result = []
        for part in self.names(name):
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise _fail(name, part, "comma-separated KEY=VALUE pairs")
            result.append((key, value))
        return tuple(result)

    def models(self, name: str) -> ModelCatalog:
        """A JSON list of ``{"name", "numHeads", "weights", "defaultGpus",
        "spatialCompression"}`` objects (the last three optional)."""
        value = self.env.get(name)
        if not value:
            return ModelCatalog()
        try:
            raw: Any = json.loads(value)
        except json.JSONDecodeError as error:
            raise _fail(name, value[:80], f"a JSON list of models ({error.msg})") from None
        if not isinstance(raw, list):
            raise _fail(name, value[:80], 'a JSON list such as [{"name": ..., "numHeads": 12}]')
        entries = []
        for item in raw:
            if not isinstance(item, dict) or set(item) - set(_MODEL_KEYS):
                raise _fail(name, item, f"objects with keys {', '.join(map(repr, _MODEL_KEYS))}")
            entries.append(
                ModelEntry(
                    name=str(item.get("name", "")),
                    num_heads=item.get("numHeads", 0),
                    weights=item.get("weights"),
                    default_gpus=item.get("defaultGpus"),
                    spatial_compression=item.get("spatialCompression", WAN_SPATIAL_COMPRESSION),
                )
            )
        return ModelCatalog(tuple(entries))
