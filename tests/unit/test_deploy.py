"""deploy/ describes one cluster: the manifests, the `ray up` file and the Dockerfile must agree.

The checks live in deploy/deploy_checks.py (operators run it after editing). Here every check must
pass on the real files, and each must catch a copy broken in one field: a wrong tag, a wrong port, a
typo in a command, fsync `always`, ... Nothing here talks to Kubernetes or AWS.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
sys.path.insert(0, str(DEPLOY))
from deploy_checks import CHECKS  # noqa: E402
from deploy_files import GPU, objects_of, find_object, load_deployment  # noqa: E402

CHECKS_BY_NAME = {c.__name__.removeprefix("check_"): c for c in CHECKS}


@pytest.fixture(scope="module")
def deployment() -> dict:
    return load_deployment()


def _needs(check_name: str) -> None:
    if check_name == "k8s_schema":
        pytest.importorskip("kubernetes_validate")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_deploy_passes(deployment, check):
    _needs(check.__name__.removeprefix("check_"))
    assert check(deployment) == []


def test_every_artifact_is_read(deployment):
    kinds = {o["kind"] for o in deployment["objects"]}
    assert {
        "RayCluster",
        "RayJob",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Job",
    } <= kinds
    assert deployment["cluster"]["cluster_name"] and deployment["dockerfile"]


def test_ray_reads_the_raycluster_as_its_autoscaler_would(deployment):
    """Ray's own KubeRay translation accepts the CR and sees each group's GPUs and node-shape resource."""
    autoscaling = pytest.importorskip("ray.autoscaler._private.kuberay.autoscaling_config")
    for rc in objects_of(deployment, "RayCluster"):
        node_types = autoscaling._derive_autoscaling_config_from_ray_cr(copy.deepcopy(rc))["available_node_types"]
        for g in rc["spec"]["workerGroupSpecs"]:
            resources = node_types[g["groupName"]]["resources"]
            assert resources["GPU"] == int(g["rayStartParams"]["num-gpus"])
            assert any(k.startswith("ziya_node_") and v == 1 for k, v in resources.items())


def test_ray_prepares_the_cluster_file(deployment):
    """`ray up` fills in its defaults and validates the result: the file is one Ray would launch."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(copy.deepcopy(deployment["cluster"]))
    util.validate_config(prepared)
    workers = prepared["available_node_types"]["worker.h100x8"]
    assert workers["resources"]["GPU"] == 8 and workers["min_workers"] >= 1
    # nothing is installed at launch (the launcher's default head setup pip-installs boto3): the image has it all
    assert not any("pip install" in c for c in prepared["head_setup_commands"] + prepared["worker_setup_commands"])


def _set(path):
    """A mutation that sets one field, addressed by a list of keys/indexes (a callable picks the object)."""

    def apply(value):
        def mutate(d):
            node = path[0](d)
            for key in path[1:-1]:
                node = node[key]
            node[path[-1]] = value(node[path[-1]]) if callable(value) else value

        return mutate

    return apply


def _obj(kind, name):
    return lambda d: find_object(d, kind, name)


def _docker(instr, new):
    def mutate(d):
        d["dockerfile"] = [[i, new] if i == instr else [i, r] for i, r in d["dockerfile"]]

    return mutate


RC = _obj("RayCluster", "ziya-batch")
H100 = ["spec", "workerGroupSpecs", 0]
H100_C = H100 + ["template", "spec", "containers", 0]
HEAD_C = ["spec", "headGroupSpec", "template", "spec", "containers", 0]

BREAKS = [
    ("missing name", _set([_obj("Service", "ziya-batch-redis"), "metadata", "name"])(""), "k8s_identity"),
    ("old apiVersion", _set([RC, "apiVersion"])("ray.io/v1alpha1"), "k8s_identity"),
    (
        "wrong namespace",
        _set([_obj("Job", "ziya-batch-merge-delta"), "metadata", "namespace"])("default"),
        "k8s_identity",
    ),
    (
        "typo in a container field",
        _set([_obj("StatefulSet", "ziya-batch-redis"), "spec", "template", "spec", "containers", 0])(
            lambda c: {**c, "volumeMount": c["volumeMounts"]}
        ),
        "k8s_schema",
    ),
    (
        "wrong type in a Service",
        _set([_obj("Service", "ziya-batch-redis"), "spec", "ports", 0, "port"])("6379"),
        "k8s_schema",
    ),
    ("typo inside a Ray pod template", _set([RC] + H100_C)(lambda c: {**c, "resource": c["resources"]}), "k8s_schema"),
    (
        "PDB field",
        _set([_obj("PodDisruptionBudget", "ziya-batch-redis"), "spec"])(lambda sp: {**sp, "minAvailible": 1}),
        "k8s_schema",
    ),
    (
        "typo in RayJob field",
        lambda d: find_object(d, "RayJob", "ziya-batch-xian-travel-sft")["spec"].update(entryPoint="x"),
        "kuberay_fields",
    ),
    (
        "selector names no cluster",
        _set([_obj("RayJob", "ziya-batch-xian-travel-sft"), "spec", "clusterSelector", "ray.io/cluster"])("other"),
        "kuberay_fields",
    ),
    ("replicas above max", _set([RC] + H100 + ["replicas"])(99), "kuberay_fields"),
    ("worker image tag", _set([RC] + H100_C + ["image"])(lambda v: v.rsplit(":", 1)[0] + ":0.2.0"), "images"),
    ("ray up image", lambda d: d["cluster"]["docker"].update(image="registry.example.com/other:0.1.0"), "images"),
    ("rayVersion", _set([RC, "spec", "rayVersion"])("2.59.0"), "ray_version"),
    ("redis URL port", _set([RC] + HEAD_C + ["env", 0, "value"])(lambda v: v.replace(":6379", ":6380")), "redis_url"),
    (
        "redis URL host",
        _set([RC] + H100_C + ["env", 0, "value"])(lambda v: v.replace("ziya-batch-redis-0.", "redis-0.")),
        "redis_url",
    ),
    (
        "rayjob URL",
        lambda d: find_object(d, "RayJob", "ziya-batch-serve")["spec"].update(
            runtimeEnvYAML="env_vars:\n  ZIYA_BATCH_REDIS_URL: redis://nowhere:6379/0\n"
        ),
        "redis_url",
    ),
    (
        "fsync always",
        _set([_obj("ConfigMap", "ziya-batch-redis-config"), "data", "redis.conf"])(
            lambda t: t.replace("appendfsync everysec", "appendfsync always")
        ),
        "redis_persistence",
    ),
    (
        "no AOF",
        _set([_obj("ConfigMap", "ziya-batch-redis-config"), "data", "redis.conf"])(
            lambda t: t.replace("appendonly yes", "appendonly no")
        ),
        "redis_persistence",
    ),
    (
        "evicting",
        _set([_obj("ConfigMap", "ziya-batch-redis-config"), "data", "redis.conf"])(
            lambda t: t.replace("noeviction", "allkeys-lru")
        ),
        "redis_persistence",
    ),
    (
        "AOF off the volume",
        _set([_obj("ConfigMap", "ziya-batch-redis-config"), "data", "redis.conf"])(
            lambda t: t.replace("dir /data", "dir /tmp")
        ),
        "redis_persistence",
    ),
    (
        "not headless",
        lambda d: find_object(d, "Service", "ziya-batch-redis")["spec"].pop("clusterIP"),
        "redis_persistence",
    ),
    (
        "no PDB",
        lambda d: d["objects"].remove(find_object(d, "PodDisruptionBudget", "ziya-batch-redis")),
        "redis_persistence",
    ),
    (
        "sts template label",
        _set(
            [
                _obj("StatefulSet", "ziya-batch-redis"),
                "spec",
                "template",
                "metadata",
                "labels",
                "app.kubernetes.io/name",
            ]
        )("redis"),
        "selectors",
    ),
    (
        "PDB selector",
        _set([_obj("PodDisruptionBudget", "ziya-batch-redis"), "spec", "selector", "matchLabels"])({"app": "x"}),
        "selectors",
    ),
    ("worker not admitted by NetworkPolicy", _set([RC] + H100 + ["template", "metadata", "labels"])({}), "selectors"),
    ("redis service port", _set([_obj("Service", "ziya-batch-redis"), "spec", "ports", 0, "port"])(6380), "ports"),
    (
        "serve targetPort",
        _set([_obj("Service", "ziya-batch-serve"), "spec", "ports", 0, "targetPort"])("http"),
        "ports",
    ),
    (
        "serve port",
        _set([_obj("RayJob", "ziya-batch-serve"), "spec", "entrypoint"])("ziya-batch serve --host 0.0.0.0 --port 9000"),
        "ports",
    ),
    (
        "unknown subcommand",
        _set([_obj("RayJob", "ziya-batch-xian-travel-sft"), "spec", "entrypoint"])("ziya-batch start /jobs/job.yaml"),
        "commands",
    ),
    (
        "job file not mounted",
        _set([_obj("RayJob", "ziya-batch-xian-travel-sft"), "spec", "entrypoint"])("ziya-batch run /jobs/other.yaml"),
        "commands",
    ),
    (
        "worker typo",
        _set([RC] + H100_C + ["args", 0])(lambda a: a.replace("ziya-batch worker", "ziya-batch wroker")),
        "commands",
    ),
    (
        "worker address",
        _set([RC] + H100_C + ["args", 0])(
            lambda a: a.replace("head-svc.ziya-batch.svc.cluster.local:6379", "head-svc:10001")
        ),
        "commands",
    ),
    (
        "ray never started",
        _set([RC] + H100_C + ["args", 0])(lambda a: a.replace("KUBERAY_GEN_RAY_START_CMD", "RAY_CMD")),
        "commands",
    ),
    (
        "merge-delta flag",
        _set([_obj("Job", "ziya-batch-merge-delta"), "spec", "template", "spec", "containers", 0, "command", 2])(
            "--based"
        ),
        "commands",
    ),
    ("GPU limit", _set([RC] + H100_C + ["resources", "limits", GPU])("4"), "gpus"),
    ("num-gpus", _set([RC] + H100 + ["rayStartParams", "num-gpus"])("4"), "gpus"),
    ("custom resource format", _set([RC] + H100 + ["rayStartParams", "resources"])("{ziya_node_h100x8: 1}"), "gpus"),
    ("ray up GPUs", lambda d: d["cluster"]["available_node_types"]["worker.h100x8"]["resources"].update(GPU=4), "gpus"),
    (
        "model path",
        _set([_obj("ConfigMap", "ziya-batch-job"), "data", "job.yaml"])(
            lambda t: t.replace("path: /models/", "path: /weights/")
        ),
        "job_spec",
    ),
    ("PVC mount path", _set([RC] + H100_C + ["volumeMounts", 0, "mountPath"])("/weights"), "job_spec"),
    (
        "merge target",
        _set([_obj("Job", "ziya-batch-merge-delta"), "spec", "template", "spec", "containers", 0, "command", 7])(
            "/models/other"
        ),
        "job_spec",
    ),
    (
        "delta not staged",
        _set([_obj("Job", "ziya-batch-merge-delta"), "spec", "template", "spec", "initContainers", 0, "command", 6])(
            "/models/delta/"
        ),
        "job_spec",
    ),
    (
        "tensor_parallel",
        _set([_obj("ConfigMap", "ziya-batch-job"), "data", "job.yaml"])(
            lambda t: t.replace("tensor_parallel: 1", "tensor_parallel: 3")
        ),
        "job_spec",
    ),
    (
        "invalid spec",
        _set([_obj("ConfigMap", "ziya-batch-job"), "data", "job.yaml"])(lambda t: t + "shard_sise: 5\n"),
        "job_spec",
    ),
    (
        "serve model",
        _set([_obj("RayJob", "ziya-batch-serve"), "spec", "entrypoint"])(
            lambda e: e.replace("--model /models/ziya-llama-13b", "--model /models/other")
        ),
        "job_spec",
    ),
    (
        "serve storage on the head",
        _set([_obj("RayJob", "ziya-batch-serve"), "spec", "entrypoint"])(
            lambda e: e.replace("s3://my-bucket/ziya-batch-files/", "/tmp/files")
        ),
        "job_spec",
    ),
    (
        "model not allowed",
        lambda d: find_object(d, "RayJob", "ziya-batch-serve")["spec"].update(
            runtimeEnvYAML=find_object(d, "RayJob", "ziya-batch-serve")["spec"]["runtimeEnvYAML"].replace(
                "ZIYA_BATCH_ALLOWED_MODELS: /models/", "ZIYA_BATCH_ALLOWED_MODELS: /other/"
            )
        ),
        "job_spec",
    ),
    (
        "input not allowed",
        _set([_obj("ConfigMap", "ziya-batch-job"), "data", "job.yaml"])(
            lambda t: t.replace("s3://my-bucket/prompts/xian/", "s3://other-bucket/")
        ),
        "job_spec",
    ),
    ("missing secret", _set([RC] + HEAD_C + ["envFrom", 0, "secretRef", "name"])("s3-creds"), "references"),
    (
        "literal token",
        _set([RC] + HEAD_C + ["env", 1])({"name": "ZIYA_BATCH_API_TOKEN", "value": "hunter2"}),
        "references",
    ),
    (
        "missing PVC",
        _set([_obj("PersistentVolumeClaim", "ziya-batch-models"), "metadata", "name"])("models"),
        "references",
    ),
    ("worker as root", _set([RC] + H100 + ["template", "spec", "securityContext", "runAsUser"])(0), "pod_security"),
    (
        "submitter without a user",
        lambda d: find_object(d, "RayJob", "ziya-batch-serve")["spec"]["submitterPodTemplate"]["spec"].pop(
            "securityContext"
        ),
        "pod_security",
    ),
    (
        "privileged merge",
        _set([_obj("Job", "ziya-batch-merge-delta"), "spec", "template", "spec", "containers", 0])(
            lambda c: {**c, "securityContext": {"privileged": True}}
        ),
        "pod_security",
    ),
    ("root user", _docker("USER", "root"), "dockerfile"),
    ("CMD", _docker("CMD", '["ziya-batch", "start"]'), "dockerfile"),
    ("shell-form CMD", _docker("CMD", "ziya-batch worker"), "dockerfile"),
    ("WORKDIR", lambda d: d["dockerfile"].append(["WORKDIR", "/app"]), "dockerfile"),
    (
        "torch range",
        lambda d: d["dockerfile"].__setitem__(slice(None), [[i, r.replace("<2.15", "<3")] for i, r in d["dockerfile"]]),
        "dockerfile",
    ),
    (
        "online hub",
        lambda d: d["dockerfile"].__setitem__(
            slice(None), [[i, r.replace("HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE=0")] for i, r in d["dockerfile"]]
        ),
        "dockerfile",
    ),
    (
        "CPU base",
        lambda d: d["dockerfile"].__setitem__(
            slice(None), [[i, r.replace("nvidia/cuda:13.0.0-runtime", "ubuntu:24.04")] for i, r in d["dockerfile"]]
        ),
        "dockerfile",
    ),
    ("unknown ray up key", lambda d: d["cluster"].update(head_node="x"), "cluster_file"),
    (
        "worker joins wrong port",
        lambda d: d["cluster"].update(
            worker_start_ray_commands=[
                c.replace("$RAY_HEAD_IP:6379", "$RAY_HEAD_IP:6380") for c in d["cluster"]["worker_start_ray_commands"]
            ]
        ),
        "cluster_file",
    ),
    (
        "redis on the GCS port",
        lambda d: d["cluster"]["available_node_types"]["head.cpu"].update(
            initialization_commands=[
                c.replace("--port 6380", "--port 6379")
                for c in d["cluster"]["available_node_types"]["head.cpu"]["initialization_commands"]
            ]
        ),
        "cluster_file",
    ),
    (
        "ray up head schedules replicas",
        lambda d: d["cluster"]["available_node_types"]["head.cpu"].update(resources={}),
        "cluster_file",
    ),
    (
        "ray up Redis evicts",
        lambda d: d["cluster"]["available_node_types"]["head.cpu"].update(
            initialization_commands=[
                c.replace("noeviction", "allkeys-lru")
                for c in d["cluster"]["available_node_types"]["head.cpu"]["initialization_commands"]
            ]
        ),
        "cluster_file",
    ),
]


@pytest.mark.parametrize("mutate,check_name", [(m, c) for _, m, c in BREAKS], ids=[n for n, _, _ in BREAKS])
def test_a_broken_copy_is_caught(deployment, mutate, check_name):
    _needs(check_name)
    broken = copy.deepcopy(deployment)
    mutate(broken)
    problems = CHECKS_BY_NAME[check_name](broken)
    assert any(p.startswith(f"[{check_name}]") for p in problems), problems
