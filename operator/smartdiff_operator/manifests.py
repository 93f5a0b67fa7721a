"""``desired_objects``: the Kubernetes objects one ``VideoGeneration`` should own.

Role: a pure function from a validated resource and the operator settings to
manifests (plain dicts), in creation order:

1. a ServiceAccount, Role and RoleBinding for the runtime pods (read this
   generation, patch its status -- see ``rbac``);
2. beyond one node, a headless Service giving pod 0 a stable DNS name for
   torchrun's c10d rendezvous;
3. the Job: up to one node, one pod with N GPUs running
   ``torchrun --nproc-per-node N -m smartdiff.worker``; beyond one node an
   Indexed Job of M pods, each with the GPUs of one node, joined through the
   rendezvous on pod 0.

Every object has a deterministic name (``names.ChildNames``) and an
ownerReference to the generation, so deletion cascades and creating twice is
harmless. The Job carries the GPU resource, node selector, tolerations, S3
credentials from a Secret (by reference), a memory-backed ``/dev/shm`` for NCCL,
``pvc://`` weights read-only, the node-local cache for ``s3://`` weights
(``settings.WeightsCacheSettings``: a hostPath, a PVC or an emptyDir),
the deadline, backoff and TTL, and, with a Kueue queue, the queue label and
``suspend: true`` (Kueue unsuspends it on admission). Evictions and preemptions
do not count against ``backoffLimit`` (a pod failure policy).

Talks to: ``plan`` (topology), ``names``, ``rbac``, ``settings``. No API calls.
"""

from __future__ import annotations

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
    ENV_WEIGHTS_CACHE,
    ENV_WEIGHTS_ROOT,
    ENV_WEIGHTS_URI,
)
from smartdiff.api.videogeneration import API_VERSION, KIND, VideoGeneration
from smartdiff_operator import names, rbac
from smartdiff_operator.plan import GenerationPlan, plan
from smartdiff_operator.settings import OperatorSettings

SHM_VOLUME: Final = "dshm"
OUTPUT_VOLUME: Final = "output"
WEIGHTS_VOLUME: Final = "weights"
WEIGHTS_CACHE_VOLUME: Final = "weights-cache"

# The pod environment names (ENV_*) come from smartdiff.api.podenv, shared with the worker.
# Keys read from the credentials Secret: (key, required).
SECRET_KEYS: Final = (
    ("AWS_ACCESS_KEY_ID", True),
    ("AWS_SECRET_ACCESS_KEY", True),
    ("AWS_SESSION_TOKEN", False),
    ("AWS_ENDPOINT_URL_S3", False),
    ("AWS_ENDPOINT_URL", False),
    ("AWS_REGION", False),
)


def desired_objects(vg: VideoGeneration, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The manifests ``vg`` should own, in creation order (pure, deterministic).

    Raises:
        SpecError: ``vg`` can never run (unknown model, impossible topology).
        ValueError: ``vg`` has no name or uid (it was not read from the API server).
    """
    return objects_for_plan(plan(vg, settings.models), settings)


def objects_for_plan(
    generation_plan: GenerationPlan, settings: OperatorSettings
) -> list[dict[str, Any]]:
    """``desired_objects`` for an already computed plan."""
    vg = generation_plan.generation
    uid = str(vg.metadata.get("uid") or "")
    if not vg.name or not uid:
        raise ValueError(
            f"metadata.name={vg.name!r}, metadata.uid={uid!r}: desired_objects needs a "
            "VideoGeneration read from the API server (with a name and a uid)"
        )
    child = names.ChildNames.of(vg.name)
    labels = names.common_labels(child.job)
    owner = owner_reference(vg.name, uid)
    objects = _runtime_identity(vg, child, labels, owner)
    if generation_plan.topology.nodes > 1:
        objects.append(_headless_service(vg, child, labels, owner, settings))
    objects.append(_job(generation_plan, child, labels, owner, settings))
    return objects


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """The controller ownerReference to a VideoGeneration."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(
    name: str, vg: VideoGeneration, labels: dict[str, str], owner: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": vg.namespace,
        "labels": dict(labels),
        "annotations": {names.ANNOTATION_GENERATION: vg.name},
        "ownerReferences": [dict(owner)],
    }


def _runtime_identity(
    vg: VideoGeneration,
    child: names.ChildNames,
    labels: dict[str, str],
    owner: dict[str, Any],
) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(child.service_account, vg, labels, owner),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(child.role, vg, labels, owner),
            "rules": [rule.to_manifest() for rule in rbac.runtime_rules(vg.name)],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(child.role_binding, vg, labels, owner),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": child.role,
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": child.service_account,
                    "namespace": vg.namespace,
                }
            ],
        },
    ]


def _headless_service(
    vg: VideoGeneration,
    child: names.ChildNames,
    labels: dict[str, str],
    owner: dict[str, Any],
    settings: OperatorSettings,
) -> dict[str, Any]:
    port = settings.runtime.rendezvous_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(child.service, vg, labels, owner),
        "spec": {
            "clusterIP": "None",
            # Pod 0 must resolve before it is Ready: torchrun waits there for the others.
            "publishNotReadyAddresses": True,
            "selector": {names.LABEL_GENERATION: child.job},
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def rendezvous_endpoint(vg: VideoGeneration, child: names.ChildNames, port: int) -> str:
    """``host:port`` of pod 0 of a multi-node run (its hostname under the headless Service)."""
    return f"{child.job}-0.{child.service}.{vg.namespace}.svc:{port}"


def torchrun_command(
    generation_plan: GenerationPlan, child: names.ChildNames, settings: OperatorSettings
) -> list[str]:
    """The container command: torchrun over the GPUs of one pod, joined across pods."""
    topology = generation_plan.topology
    per_pod = str(topology.gpus_per_node)
    module = ["-m", settings.runtime.module]
    if topology.nodes == 1:
        return ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", per_pod, *module]
    endpoint = rendezvous_endpoint(
        generation_plan.generation, child, settings.runtime.rendezvous_port
    )
    return [
        "torchrun",
        "--nnodes",
        str(topology.nodes),
        "--nproc-per-node",
        per_pod,
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        str(generation_plan.generation.metadata["uid"]),
        # A failed rank fails the pod; the Job (backoffLimit) restarts the whole group.
        "--max-restarts",
        "0",
        *module,
    ]


def _env(generation_plan: GenerationPlan, settings: OperatorSettings) -> list[dict[str, Any]]:
    vg = generation_plan.generation

    def field_ref(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    env: list[dict[str, Any]] = [
        {
            "name": ENV_NAME,
            "valueFrom": field_ref(f"metadata.annotations['{names.ANNOTATION_GENERATION}']"),
        },
        {"name": ENV_NAMESPACE, "valueFrom": field_ref("metadata.namespace")},
        {
            "name": ENV_UID,
            "valueFrom": field_ref(f"metadata.annotations['{names.ANNOTATION_GENERATION_UID}']"),
        },
        {"name": ENV_POD, "valueFrom": field_ref("metadata.name")},
        {"name": ENV_NODE, "valueFrom": field_ref("spec.nodeName")},
        {"name": ENV_OUTPUT_DIR, "value": settings.runtime.output_dir},
        {"name": ENV_GPUS, "value": str(generation_plan.topology.gpus)},
        {
            "name": ENV_PROGRESS_INTERVAL,
            "value": f"{settings.runtime.progress_interval_seconds:g}",
        },
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if generation_plan.weights is not None:
        env.append({"name": ENV_WEIGHTS_URI, "value": generation_plan.weights})
        if generation_plan.weights.startswith("pvc://"):
            env.append({"name": ENV_WEIGHTS_ROOT, "value": settings.runtime.weights_mount})
    if _weights_cache(generation_plan, settings):
        cache = settings.storage.weights_cache
        env.append({"name": ENV_WEIGHTS_CACHE, "value": cache.mount_path})
    if settings.storage.s3_endpoint is not None:
        env.append({"name": ENV_S3_ENDPOINT, "value": settings.storage.s3_endpoint})
    if settings.storage.s3_region is not None:
        env.append({"name": ENV_S3_REGION, "value": settings.storage.s3_region})
    secret = vg.spec.output.credentials_secret
    if secret is not None:
        for key, required in SECRET_KEYS:
            ref: dict[str, Any] = {"name": secret, "key": key}
            if not required:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    env.extend({"name": key, "value": value} for key, value in settings.runtime.extra_env)
    return env


def _weights_cache(generation_plan: GenerationPlan, settings: OperatorSettings) -> bool:
    """Whether the pod gets the node-local weights cache: s3:// weights, cache not disabled."""
    weights = generation_plan.weights
    return (
        weights is not None
        and weights.startswith("s3://")
        and settings.storage.weights_cache.kind != "disabled"
    )


def _weights_cache_volume(settings: OperatorSettings) -> dict[str, Any]:
    cache = settings.storage.weights_cache
    volume: dict[str, Any] = {"name": WEIGHTS_CACHE_VOLUME}
    if cache.kind == "hostPath":
        # Created root-owned by the kubelet when missing: the platform provides it writable
        # for the runtime's uid 65532 (docs/install.md).
        volume["hostPath"] = {"path": cache.host_path, "type": "DirectoryOrCreate"}
    elif cache.kind == "pvc":
        volume["persistentVolumeClaim"] = {"claimName": cache.claim_name}
    else:
        volume["emptyDir"] = {}
    return volume


def _volumes(
    generation_plan: GenerationPlan, settings: OperatorSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(volumes, volumeMounts)``: /dev/shm in memory, the output folder, pvc:// weights,
    the weights cache for s3:// weights."""
    volumes: list[dict[str, Any]] = [
        {
            "name": SHM_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": settings.runtime.shm_size},
        },
        {"name": OUTPUT_VOLUME, "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        {"name": OUTPUT_VOLUME, "mountPath": settings.runtime.output_dir},
    ]
    weights = generation_plan.weights
    if weights is not None and weights.startswith("pvc://"):
        claim = weights.removeprefix("pvc://").partition("/")[0]
        volumes.append(
            {
                "name": WEIGHTS_VOLUME,
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
        mounts.append(
            {
                "name": WEIGHTS_VOLUME,
                "mountPath": f"{settings.runtime.weights_mount}/{claim}",
                "readOnly": True,
            }
        )
    if _weights_cache(generation_plan, settings):
        volumes.append(_weights_cache_volume(settings))
        mounts.append(
            {"name": WEIGHTS_CACHE_VOLUME, "mountPath": settings.storage.weights_cache.mount_path}
        )
    return volumes, mounts


def _container(
    generation_plan: GenerationPlan,
    child: names.ChildNames,
    settings: OperatorSettings,
    mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    spec = generation_plan.generation.spec
    topology = generation_plan.topology
    gpus = str(topology.gpus_per_node)
    amounts: dict[str, str] = {spec.resources.gpu_resource_name: gpus}
    if spec.resources.memory is not None:
        amounts["memory"] = spec.resources.memory
    container: dict[str, Any] = {
        "name": names.CONTAINER,
        "image": settings.runtime.image,
        "imagePullPolicy": settings.runtime.image_pull_policy,
        "command": torchrun_command(generation_plan, child, settings),
        "env": _env(generation_plan, settings),
        "resources": {"limits": dict(amounts), "requests": dict(amounts)},
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if topology.nodes > 1:
        port = settings.runtime.rendezvous_port
        container["ports"] = [{"name": "rendezvous", "containerPort": port, "protocol": "TCP"}]
    return container


def _job(
    generation_plan: GenerationPlan,
    child: names.ChildNames,
    labels: dict[str, str],
    owner: dict[str, Any],
    settings: OperatorSettings,
) -> dict[str, Any]:
    vg = generation_plan.generation
    spec = vg.spec
    nodes = generation_plan.topology.nodes
    volumes, mounts = _volumes(generation_plan, settings)
    pod_annotations = {
        names.ANNOTATION_GENERATION: vg.name,
        names.ANNOTATION_GENERATION_UID: str(vg.metadata["uid"]),
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": child.service_account,
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "containers": [_container(generation_plan, child, settings, mounts)],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": settings.runtime.run_as_non_root,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    cache = settings.storage.weights_cache
    if cache.kind == "pvc" and _weights_cache(generation_plan, settings):
        # The claim's files belong to the runtime's group; relabel only a new volume.
        pod_spec["securityContext"]["fsGroup"] = cache.fs_group
        pod_spec["securityContext"]["fsGroupChangePolicy"] = "OnRootMismatch"
    node_selector = {**dict(settings.runtime.node_selector), **spec.resources.node_selector}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [t.to_json_dict() for t in spec.resources.tolerations]
    if settings.runtime.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [
            {"name": secret} for secret in settings.runtime.image_pull_secrets
        ]
    if nodes > 1:
        pod_spec["subdomain"] = child.service

    job_labels = dict(labels)
    if spec.queue_name is not None:
        job_labels[names.KUEUE_QUEUE_LABEL] = spec.queue_name
    meta = _meta(child.job, vg, job_labels, owner)
    meta["annotations"][names.ANNOTATION_GENERATION_UID] = str(vg.metadata["uid"])
    job_spec: dict[str, Any] = {
        "completions": nodes,
        "parallelism": nodes,
        # Every attempt of a multi-node run may fail all of its pods at once.
        "backoffLimit": spec.backoff_limit * nodes,
        # A pod evicted or preempted (not failed by its own doing) does not count
        # against backoffLimit.
        "podFailurePolicy": {
            "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
        },
        "podReplacementPolicy": "Failed",
        "template": {
            "metadata": {"labels": dict(labels), "annotations": pod_annotations},
            "spec": pod_spec,
        },
    }
    if nodes > 1:
        job_spec["completionMode"] = "Indexed"
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    if spec.queue_name is not None:
        job_spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
