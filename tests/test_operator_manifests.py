"""``desired_objects`` and the operator's pure parts: Jobs, Services, RBAC, names, settings.

No cluster here: these tests pin the shape of what the operator creates for 1, 4
and 16 GPUs (one pod; one pod of 4; an Indexed Job of two 8-GPU pods behind a
headless Service with torchrun's c10d rendezvous on pod 0), Kueue, scheduling
constraints and deterministic names. The cluster tests apply the same manifests
to the real API server.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from operator_support import make_generation
from smartdiff import worker
from smartdiff.api import podenv
from smartdiff.api.topology import Topology
from smartdiff_operator import manifests, names, rbac
from smartdiff_operator.plan import SpecError, parse, plan
from smartdiff_operator.settings import (
    ModelCatalog,
    ModelEntry,
    OperatorSettings,
    RuntimeSettings,
    SettingsError,
    StorageSettings,
    WeightsCacheSettings,
)

SETTINGS = OperatorSettings()


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [o["kind"] for o in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {o["kind"]: o for o in objects}


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container_of(job)["env"]}


def test_one_gpu_is_one_pod_running_torchrun_with_its_own_identity() -> None:
    vg = make_generation(resources={"gpus": 1})
    objects = manifests.desired_objects(vg, SETTINGS)
    assert [o["kind"] for o in objects] == ["ServiceAccount", "Role", "RoleBinding", "Job"]
    job = by_kind(objects)["Job"]
    spec = job["spec"]
    assert spec["completions"] == spec["parallelism"] == 1
    assert "completionMode" not in spec and "suspend" not in spec
    assert spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "cat-surfing-runtime"
    assert "subdomain" not in pod
    container = container_of(job)
    assert container["command"] == [
        "torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "1",
        "-m", "smartdiff.worker",
    ]  # fmt: skip
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == {"nvidia.com/gpu": "1"}
    # NCCL's shared memory: a memory-backed emptyDir on /dev/shm.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    # Every object is owned by the generation (controller), so deletion cascades.
    for obj in objects:
        assert obj["metadata"]["namespace"] == "videos"
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "smartdiff.io/v1alpha1",
                "kind": "VideoGeneration",
                "name": "cat-surfing",
                "uid": "0d6c7a1e-1111-4222-8333-444455556666",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert obj["metadata"]["labels"][names.LABEL_MANAGED_BY] == "smartdiff-operator"


def test_worker_environment_comes_from_the_downward_api_and_the_secret() -> None:
    vg = make_generation(output={"uri": "s3://videos/out/", "credentialsSecret": "s3-creds"})
    settings = OperatorSettings(runtime=RuntimeSettings(extra_env=(("NCCL_DEBUG", "WARN"),)))
    job = by_kind(manifests.desired_objects(vg, settings))["Job"]
    env = env_of(job)
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_GENERATION] == "cat-surfing"
    assert annotations[names.ANNOTATION_GENERATION_UID] == vg.metadata["uid"]
    name_path = env[worker.ENV_NAME]["valueFrom"]["fieldRef"]["fieldPath"]
    assert name_path == "metadata.annotations['smartdiff.io/videogeneration']"
    assert env[worker.ENV_NAMESPACE]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env[worker.ENV_POD]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    secret_keys = {
        name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e
        and "secretKeyRef" in e["valueFrom"]
    }  # fmt: skip
    assert secret_keys["AWS_ACCESS_KEY_ID"] == {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert secret_keys["AWS_SECRET_ACCESS_KEY"]["name"] == "s3-creds"
    assert secret_keys["AWS_ENDPOINT_URL_S3"]["optional"] is True
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "WARN"}
    # Every SMARTDIFF_* variable the operator sets is one the worker knows (smartdiff.api.podenv).
    known = {v for k, v in vars(podenv).items() if k.startswith("ENV_")}
    assert {name for name in env if name.startswith("SMARTDIFF_")} <= known
    assert {podenv.ENV_NAME, podenv.ENV_NAMESPACE, podenv.ENV_UID, podenv.ENV_GPUS} <= set(env)


def job_gpus(job: dict[str, Any]) -> tuple[str, str, str]:
    """(torchrun --nproc-per-node, the GPU limit, SMARTDIFF_GPUS) of a one-pod Job."""
    container = container_of(job)
    command = container["command"]
    per_node = command[command.index("--nproc-per-node") + 1]
    return (
        per_node,
        container["resources"]["limits"]["nvidia.com/gpu"],
        env_of(job)[manifests.ENV_GPUS]["value"],
    )


def test_a_spec_without_gpus_gets_the_catalogs_default() -> None:
    model = {"name": "wan2.1-t2v-14b"}
    catalog = OperatorSettings(
        models=ModelCatalog((ModelEntry("wan2.1-t2v-14b", num_heads=40, default_gpus=4),))
    )
    vg = make_generation(model=model)
    assert vg.spec.resources.gpus is None
    objects = manifests.desired_objects(vg, catalog)
    job = by_kind(objects)["Job"]
    assert job_gpus(job) == ("4", "4", "4")
    assert job["spec"]["completions"] == 1 and "Service" not in by_kind(objects)
    assert plan(vg, catalog.models).topology == Topology(1, 4, 2, 2, 1)
    # The spec's own count wins over the default.
    two = by_kind(manifests.desired_objects(make_generation(model=model, resources={"gpus": 2}),
                                            catalog))["Job"]  # fmt: skip
    assert job_gpus(two) == ("2", "2", "2")
    # No defaultGpus: one GPU.
    plain = OperatorSettings(models=ModelCatalog((ModelEntry("wan2.1-t2v-14b", num_heads=40),)))
    assert job_gpus(by_kind(manifests.desired_objects(vg, plain))["Job"]) == ("1", "1", "1")
    # A default beyond one node spans nodes like an explicit count.
    wide = OperatorSettings(
        models=ModelCatalog((ModelEntry("wan2.1-t2v-14b", num_heads=40, default_gpus=16),))
    )
    spread = make_generation(model=model, resources={"gpusPerNode": 8})
    wide_objects = by_kind(manifests.desired_objects(spread, wide))
    assert wide_objects["Job"]["spec"]["completions"] == 2 and "Service" in wide_objects
    assert env_of(wide_objects["Job"])[manifests.ENV_GPUS]["value"] == "16"


def test_default_catalog_serves_wan22_with_default_gpus() -> None:
    catalog = SETTINGS.models
    expected = {
        "wan2.1-t2v-1.3b": (12, 1),
        "wan2.1-t2v-14b": (40, 4),
        "wan2.2-t2v-a14b": (40, 4),
        "wan2.2-ti2v-5b": (24, 1),
    }
    for name, (heads, gpus) in expected.items():
        entry = catalog.get(name)
        assert entry is not None and (entry.num_heads, entry.default_gpus) == (heads, gpus)
    ti2v = catalog.get("wan2.2-ti2v-5b")
    assert ti2v is not None and ti2v.spatial_compression == 16
    vg = make_generation(model={"name": "wan2.2-t2v-a14b"})
    assert job_gpus(by_kind(manifests.desired_objects(vg, SETTINGS))["Job"])[0] == "4"
    # TI2V-5B's 16x VAE: 64x64x1 is 4 tokens, too few for 16 GPUs (8 context ranks).
    small = {"width": 64, "height": 64, "frames": 1}
    for name, ok in (("wan2.1-t2v-1.3b", True), ("wan2.2-ti2v-5b", False)):
        vg = make_generation(model={"name": name}, video=small, resources={"gpus": 16})
        if ok:
            assert manifests.desired_objects(vg, SETTINGS)
        else:
            with pytest.raises(SpecError, match="tokens=4") as err:
                manifests.desired_objects(vg, SETTINGS)
            assert err.value.reason == "ImpossibleTopology"


def test_an_impossible_default_names_the_models_default() -> None:
    catalog = OperatorSettings(
        models=ModelCatalog((ModelEntry("wan2.1-t2v-14b", num_heads=40, default_gpus=12),))
    )
    vg = make_generation(model={"name": "wan2.1-t2v-14b"}, resources={"gpusPerNode": 8})
    with pytest.raises(SpecError, match=r"12 GPUs \(resources.gpus unset") as err:
        manifests.desired_objects(vg, catalog)
    assert err.value.reason == "ImpossibleTopology"


def test_four_gpus_on_one_node_plan_cfg_and_ulysses() -> None:
    vg = make_generation(resources={"gpus": 4})
    plan_objects = manifests.desired_objects(vg, SETTINGS)
    job = by_kind(plan_objects)["Job"]
    command = container_of(job)["command"]
    assert command[command.index("--nproc-per-node") + 1] == "4"
    assert "--rdzv-backend" not in command
    assert container_of(job)["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert job["spec"]["completions"] == 1


def test_sixteen_gpus_over_two_nodes_is_an_indexed_job_with_c10d_rendezvous() -> None:
    vg = make_generation(
        name="big-run",
        resources={"gpus": 16, "gpusPerNode": 8, "gpuResourceName": "nvidia.com/gpu"},
        backoffLimit=1,
    )
    objects = manifests.desired_objects(vg, SETTINGS)
    assert [o["kind"] for o in objects] == [
        "ServiceAccount", "Role", "RoleBinding", "Service", "Job",
    ]  # fmt: skip
    service, job = by_kind(objects)["Service"], by_kind(objects)["Job"]
    assert service["metadata"]["name"] == "big-run-workers"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {names.LABEL_GENERATION: "big-run"}
    assert service["spec"]["ports"][0]["port"] == 29400
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 2  # one retry of the whole two-pod group
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "big-run-workers"
    assert spec["template"]["metadata"]["labels"][names.LABEL_GENERATION] == "big-run"
    container = container_of(job)
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert container["ports"] == [{"name": "rendezvous", "containerPort": 29400, "protocol": "TCP"}]
    assert container["command"] == [
        "torchrun", "--nnodes", "2", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "big-run-0.big-run-workers.videos.svc:29400",
        "--rdzv-id", vg.metadata["uid"],
        "--max-restarts", "0",
        "-m", "smartdiff.worker",
    ]  # fmt: skip


def test_kueue_queue_label_and_a_suspended_job() -> None:
    job = by_kind(manifests.desired_objects(make_generation(queueName="gpu-queue"), SETTINGS))[
        "Job"
    ]
    assert job["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    plain = by_kind(manifests.desired_objects(make_generation(), SETTINGS))["Job"]
    assert names.KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"]
    assert "suspend" not in plain["spec"]


def test_scheduling_constraints_deadline_ttl_and_memory() -> None:
    vg = make_generation(
        resources={
            "gpus": 2,
            "gpuResourceName": "amd.com/gpu",
            "nodeSelector": {"gpu.product": "MI300X"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
                {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
            ],
            "memory": "64Gi",
        },
        activeDeadlineSeconds=3600,
        backoffLimit=3,
        ttlSecondsAfterFinished=600,
    )
    settings = OperatorSettings(runtime=RuntimeSettings(node_selector=(("pool", "gpu"),)))
    job = by_kind(manifests.desired_objects(vg, settings))["Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu", "gpu.product": "MI300X"}
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
        {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
    ]
    assert container_of(job)["resources"]["limits"] == {"amd.com/gpu": "2", "memory": "64Gi"}
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["backoffLimit"] == 3
    assert job["spec"]["ttlSecondsAfterFinished"] == 600


def test_pvc_weights_are_mounted_read_only() -> None:
    vg = make_generation(model={"name": "wan2.1-t2v-14b", "weights": "pvc://models/wan/14b"})
    job = by_kind(manifests.desired_objects(vg, SETTINGS))["Job"]
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["weights"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mounts = {m["name"]: m for m in container_of(job)["volumeMounts"]}
    assert mounts["weights"] == {
        "name": "weights", "mountPath": "/mnt/weights/models", "readOnly": True,
    }  # fmt: skip
    env = env_of(job)
    assert env[worker.ENV_WEIGHTS_URI]["value"] == "pvc://models/wan/14b"
    assert worker.resolve_weights("pvc://models/wan/14b", worker.Path("/mnt/weights")) == (
        worker.Path("/mnt/weights/models/wan/14b")
    )


S3_WEIGHTS = {"name": "wan2.1-t2v-1.3b", "weights": "s3://models/Wan2.1-T2V-1.3B/"}


def cache_settings(**cache: Any) -> OperatorSettings:
    return OperatorSettings(storage=StorageSettings(weights_cache=WeightsCacheSettings(**cache)))


def pod_parts(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(volumes, mounts, env)`` of a Job's pod, each by name."""
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container_of(job)["volumeMounts"]}
    return volumes, mounts, env_of(job)


def test_s3_weights_get_the_node_local_cache_on_a_host_path() -> None:
    from smartdiff.io.s3_cache import CACHE_ENV

    vg = make_generation(model=S3_WEIGHTS)
    job = by_kind(manifests.desired_objects(vg, SETTINGS))["Job"]
    volumes, mounts, env = pod_parts(job)
    cache = "/var/cache/smart-diffusion/weights"
    assert volumes["weights-cache"] == {
        "name": "weights-cache", "hostPath": {"path": cache, "type": "DirectoryOrCreate"},
    }  # fmt: skip
    assert mounts["weights-cache"] == {"name": "weights-cache", "mountPath": cache}
    # The runtime's cache reads the variable the operator sets.
    assert podenv.ENV_WEIGHTS_CACHE == CACHE_ENV
    assert env[CACHE_ENV] == {"name": CACHE_ENV, "value": cache}
    assert env[podenv.ENV_WEIGHTS_URI]["value"] == "s3://models/Wan2.1-T2V-1.3B/"
    assert "weights" not in volumes and podenv.ENV_WEIGHTS_ROOT not in env
    # The weights come with the output Secret's credentials.
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    # No fsGroup: a hostPath is not relabelled; the platform makes it writable for 65532.
    assert "fsGroup" not in job["spec"]["template"]["spec"]["securityContext"]
    # Weights read in place get no cache.
    for model in ({"name": "wan2.1-t2v-14b", "weights": "pvc://models/wan/14b"}, None):
        other = make_generation(**({"model": model} if model else {}))
        volumes, mounts, env = pod_parts(by_kind(manifests.desired_objects(other, SETTINGS))["Job"])
        assert "weights-cache" not in volumes and "weights-cache" not in mounts
        assert CACHE_ENV not in env


def test_the_weights_cache_may_be_a_claim_an_empty_dir_or_disabled() -> None:
    vg = make_generation(model=S3_WEIGHTS)
    settings = cache_settings(kind="pvc", claim_name="weights-cache", mount_path="/cache")
    job = by_kind(manifests.desired_objects(vg, settings))["Job"]
    volumes, mounts, env = pod_parts(job)
    assert volumes["weights-cache"] == {
        "name": "weights-cache", "persistentVolumeClaim": {"claimName": "weights-cache"},
    }  # fmt: skip
    assert mounts["weights-cache"] == {"name": "weights-cache", "mountPath": "/cache"}
    assert env[podenv.ENV_WEIGHTS_CACHE]["value"] == "/cache"
    security = job["spec"]["template"]["spec"]["securityContext"]
    assert (security["fsGroup"], security["fsGroupChangePolicy"]) == (65532, "OnRootMismatch")

    job = by_kind(manifests.desired_objects(vg, cache_settings(kind="emptyDir")))["Job"]
    volumes, mounts, env = pod_parts(job)
    assert volumes["weights-cache"] == {"name": "weights-cache", "emptyDir": {}}
    assert env[podenv.ENV_WEIGHTS_CACHE]["value"] == "/var/cache/smart-diffusion/weights"
    assert "fsGroup" not in job["spec"]["template"]["spec"]["securityContext"]

    job = by_kind(manifests.desired_objects(vg, cache_settings(kind="disabled")))["Job"]
    volumes, mounts, env = pod_parts(job)
    assert "weights-cache" not in volumes and "weights-cache" not in mounts
    assert podenv.ENV_WEIGHTS_CACHE not in env


def test_weights_cache_settings_name_the_bad_value() -> None:
    for cache, message in (
        ({"kind": "nfs"}, "storage.weightsCache.type='nfs' is not allowed"),
        ({"kind": "pvc"}, "storage.weightsCache.claimName=None is not allowed"),
        ({"kind": "pvc", "claim_name": "Cache"}, "claimName='Cache'"),
        ({"host_path": "var/cache"}, "storage.weightsCache.hostPath='var/cache'"),
        ({"mount_path": "/"}, "storage.weightsCache.mountPath='/'"),
        ({"fs_group": -1}, "storage.weightsCache.fsGroup=-1"),
    ):
        with pytest.raises(SettingsError, match=message):
            WeightsCacheSettings(**cache)
    settings = OperatorSettings.from_env(
        {
            "SMARTDIFF_WEIGHTS_CACHE_TYPE": "pvc",
            "SMARTDIFF_WEIGHTS_CACHE_CLAIM": "weights-cache",
            "SMARTDIFF_WEIGHTS_CACHE_MOUNT_PATH": "/cache",
            "SMARTDIFF_WEIGHTS_CACHE_FS_GROUP": "1000",
        }
    )
    assert settings.storage.weights_cache == WeightsCacheSettings(
        kind="pvc", claim_name="weights-cache", mount_path="/cache", fs_group=1000
    )
    assert OperatorSettings.from_env({}).storage.weights_cache == WeightsCacheSettings()
    with pytest.raises(SettingsError, match="SMARTDIFF_WEIGHTS_CACHE_TYPE='nfs'"):
        OperatorSettings.from_env({"SMARTDIFF_WEIGHTS_CACHE_TYPE": "nfs"})


def test_the_runtime_role_grants_only_its_own_generation() -> None:
    objects = by_kind(manifests.desired_objects(make_generation(), SETTINGS))
    assert objects["Role"]["rules"] == [
        {
            "apiGroups": ["smartdiff.io"],
            "resources": ["videogenerations"],
            "verbs": ["get"],
            "resourceNames": ["cat-surfing"],
        },
        {
            "apiGroups": ["smartdiff.io"],
            "resources": ["videogenerations/status"],
            "verbs": ["patch"],
            "resourceNames": ["cat-surfing"],
        },
    ]
    binding = objects["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cat-surfing-runtime",
    }  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cat-surfing-runtime", "namespace": "videos"}
    ]
    # The operator holds every permission it grants (RBAC forbids escalation).
    operator = [r.to_manifest() for r in rbac.OPERATOR_RULES]
    for rule in objects["Role"]["rules"]:
        assert any(
            set(rule["resources"]) <= set(o["resources"]) and set(rule["verbs"]) <= set(o["verbs"])
            for o in operator
        ), rule
    # Nothing in the operator's rules reads Secrets.
    assert not any("secrets" in r["resources"] for r in operator)


def test_names_are_deterministic_dns_labels_and_distinct() -> None:
    vg = make_generation()
    assert manifests.desired_objects(vg, SETTINGS) == manifests.desired_objects(
        copy.deepcopy(vg), SETTINGS
    )
    long_a = "a" * 60 + ".first"
    long_b = "a" * 60 + ".second"
    names_a, names_b = names.ChildNames.of(long_a), names.ChildNames.of(long_b)
    assert names_a.job != names_b.job
    assert len(names_a.job) <= names.JOB_NAME_MAX and "." not in names_a.job
    assert names_a == names.ChildNames.of(long_a)
    assert names.ChildNames.of("7-up").service == "vg-7-up-workers"  # DNS-1035: a letter first
    for value in (names_a.service, names_a.service_account):
        assert len(value) <= 63 and "." not in value


def test_plan_rejects_unknown_models_and_impossible_topologies_naming_the_field() -> None:
    with pytest.raises(SpecError, match=r"spec\.model\.name='wan9-t2v' is not allowed") as err:
        manifests.desired_objects(make_generation(model={"name": "wan9-t2v"}), SETTINGS)
    assert err.value.reason == "UnknownModel"
    tiny_video = {"width": 16, "height": 16, "frames": 1}
    with pytest.raises(SpecError, match=r"spec\.resources\.gpus") as err:
        manifests.desired_objects(
            make_generation(video=tiny_video, resources={"gpus": 4}), SETTINGS
        )
    assert err.value.reason == "ImpossibleTopology"
    # An explicit Ulysses degree that does not divide the model's 12 heads runs: the runtime
    # splits heads unevenly (2,2,2,2,1,1,1,1), so the operator plans it.
    explicit = {"mode": "explicit", "ulysses": 8}
    objects = manifests.desired_objects(
        make_generation(parallelism=explicit, resources={"gpus": 8}), SETTINGS
    )
    job = next(o for o in objects if o["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    catalog = OperatorSettings(models=ModelCatalog((ModelEntry("wan9-t2v", num_heads=8),)))
    assert manifests.desired_objects(make_generation(model={"name": "wan9-t2v"}), catalog)


def test_parse_names_every_bad_field() -> None:
    body = make_generation().to_manifest()
    body["spec"]["video"]["frames"] = 80
    body["spec"]["sampling"]["steps"] = "many"
    with pytest.raises(SpecError) as err:
        parse(body)
    assert err.value.reason == "InvalidSpec"
    assert "spec.video.frames" in str(err.value) and "spec.sampling.steps" in str(err.value)


def test_settings_from_env_and_their_errors() -> None:
    settings = OperatorSettings.from_env(
        {
            "SMARTDIFF_RUNTIME_IMAGE": "registry.local/runtime:1",
            "SMARTDIFF_RUNTIME_NODE_SELECTOR": "pool=gpu,zone=a",
            "SMARTDIFF_MODELS": '[{"name": "m1", "numHeads": 4, "weights": "pvc://w/m1"},'
            ' {"name": "m2", "numHeads": 24, "defaultGpus": 2, "spatialCompression": 16}]',
            "SMARTDIFF_METRICS_PORT": "9100",
            "SMARTDIFF_NAMESPACES": "a, b",
        }
    )
    assert settings.runtime.image == "registry.local/runtime:1"
    assert settings.runtime.node_selector == (("pool", "gpu"), ("zone", "a"))
    assert settings.models.models == (
        ModelEntry("m1", 4, "pvc://w/m1"),
        ModelEntry("m2", 24, default_gpus=2, spatial_compression=16),
    )
    assert settings.observability.metrics_port == 9100
    assert settings.namespaces == ("a", "b")
    for env, message in (
        ({"SMARTDIFF_METRICS_PORT": "lots"}, "SMARTDIFF_METRICS_PORT='lots' is not allowed"),
        ({"SMARTDIFF_RUNTIME_SHM_SIZE": "big"}, "runtime.shmSize='big' is not allowed"),
        ({"SMARTDIFF_MODELS": "[1]"}, "SMARTDIFF_MODELS=1 is not allowed"),
        (
            {"SMARTDIFF_MODELS": '[{"name": "m", "numHeads": 2, "defaultGpus": 0}]'},
            r"models\[m\].defaultGpus=0 is not allowed",
        ),
        (
            {"SMARTDIFF_MODELS": '[{"name": "m", "numHeads": 2, "spatialCompression": 12}]'},
            r"models\[m\].spatialCompression=12 is not allowed: one of 8, 16",
        ),
        (
            {"SMARTDIFF_MODELS": '[{"name": "m", "numHeads": 2, "gpus": 2}]'},
            "defaultGpus",
        ),
        ({"SMARTDIFF_RUNTIME_IMAGE_PULL_POLICY": "Sometimes"}, "IMAGE_PULL_POLICY='Sometimes'"),
    ):
        with pytest.raises(SettingsError, match=message):
            OperatorSettings.from_env(env)


def test_rbac_renders_for_the_chart(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert rbac.main(["--namespace", "platform"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
    assert docs[1]["rules"] == [rule.to_manifest() for rule in rbac.OPERATOR_RULES]
    assert docs[2]["subjects"] == [
        {"kind": "ServiceAccount", "name": "smartdiff-operator", "namespace": "platform"}
    ]


def test_the_entry_point_refuses_bad_settings_naming_the_variable() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "smartdiff_operator"],
        env={"SMARTDIFF_LIVENESS_PORT": "-1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "observability.livenessPort=-1 is not allowed" in proc.stderr
