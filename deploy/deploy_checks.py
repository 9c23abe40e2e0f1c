"""Checks that deploy/ describes one consistent cluster; run `python deploy/deploy_checks.py` after editing.

Each check takes the data of `deploy_files.load_deployment()` and returns a list of problems, each
starting with the check's name in brackets. Nothing here talks to Kubernetes or AWS: it reads files.
tests/unit/test_deploy.py runs every check on the real files and on copies broken in one field.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from deploy_files import (GPU, all_command_lines, all_containers, command_line, env_of, find_object, flag_value,
                          image_tag, load_deployment, objects_of, parse_redis_conf, pod_templates, ray_containers,
                          runtime_env_vars, selects, size_bytes, ziya_invocations)
from ziya_batch.errors import SpecError
from ziya_batch.spec import parse_spec

SUBCOMMANDS = {"run", "submit", "status", "cancel", "worker", "merge-delta", "demo-model", "serve", "bench"}
API_VERSIONS = {
    "Namespace": "v1", "Secret": "v1", "ConfigMap": "v1", "Service": "v1", "PersistentVolumeClaim": "v1",
    "StatefulSet": "apps/v1", "PodDisruptionBudget": "policy/v1", "NetworkPolicy": "networking.k8s.io/v1",
    "Job": "batch/v1", "RayCluster": "ray.io/v1", "RayJob": "ray.io/v1",
}
# json tags of KubeRay's ray.io/v1 Go types (apis/ray/v1/raycluster_types.go, rayjob_types.go)
RAYCLUSTER_SPEC_KEYS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                        "autoscalerOptions", "headServiceAnnotations", "suspend"}
HEAD_GROUP_KEYS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_KEYS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                     "template", "scaleStrategy"}
RAYJOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
GPUS_PER_INSTANCE = {"p5.48xlarge": 8, "p5e.48xlarge": 8, "p4d.24xlarge": 8, "g6e.12xlarge": 4, "g6e.48xlarge": 8}
THIRD_PARTY_IMAGES = ("redis:",)  # images that are not ours and may differ from the worker image
# The oldest Kubernetes the manifests are checked against (policy/v1 budgets, Job TTLs, EKS's oldest
# standard-support release when this was written).
K8S_VERSION = "1.31.0"


# ---------------------------------------------------------------------------------------------- checks

def check_k8s_identity(d) -> list[str]:
    problems = []
    namespaces = {o["metadata"]["name"] for o in objects_of(d, "Namespace") if o.get("metadata", {}).get("name")}
    seen = set()
    for o in d["objects"]:
        kind, name = o.get("kind"), o.get("metadata", {}).get("name")
        if not o.get("apiVersion") or not kind or not name:
            problems.append(f"[k8s_identity] object without apiVersion/kind/metadata.name: {str(o)[:80]}")
            continue
        if API_VERSIONS.get(kind) != o["apiVersion"]:
            problems.append(f"[k8s_identity] {kind}/{name}: apiVersion {o['apiVersion']}, want {API_VERSIONS.get(kind)}")
        if (kind, name) in seen:
            problems.append(f"[k8s_identity] {kind}/{name} defined twice")
        seen.add((kind, name))
        if kind != "Namespace" and o["metadata"].get("namespace") not in namespaces:
            problems.append(f"[k8s_identity] {kind}/{name}: namespace {o['metadata'].get('namespace')!r} is not one of {namespaces}")
    return problems


def check_k8s_schema(d) -> list[str]:
    """Built-in objects against Kubernetes' own schemas, strictly (an unknown field is an error); the pod
    templates inside RayClusters and RayJobs are checked as PodTemplates. Needs kubernetes-validate."""
    try:
        import kubernetes_validate as kv
    except ImportError:
        return []
    docs = [(f"{o.get('kind')}/{o.get('metadata', {}).get('name')}", o) for o in d["objects"]
            if not str(o.get("apiVersion", "")).startswith("ray.io/")]
    docs += [(where, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t})
             for where, t, _ in pod_templates(d) if where.startswith(("RayCluster/", "RayJob/"))]
    problems = []
    for where, doc in docs:
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            problems.append(f"[k8s_schema] {where}: {path}: {err.message}")
        except kv.SchemaNotFoundError:
            problems.append(f"[k8s_schema] {where}: Kubernetes {K8S_VERSION} has no schema for it")
    return problems


def check_kuberay_fields(d) -> list[str]:
    problems = []
    for rc in objects_of(d, "RayCluster"):
        spec, name = rc["spec"], rc["metadata"]["name"]
        problems += [f"[kuberay_fields] RayCluster/{name}: unknown spec key {k!r}" for k in set(spec) - RAYCLUSTER_SPEC_KEYS]
        problems += [f"[kuberay_fields] RayCluster/{name}: unknown headGroupSpec key {k!r}"
                     for k in set(spec["headGroupSpec"]) - HEAD_GROUP_KEYS]
        for g in spec.get("workerGroupSpecs", []):
            problems += [f"[kuberay_fields] group {g.get('groupName')}: unknown key {k!r}" for k in set(g) - WORKER_GROUP_KEYS]
            missing = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} - set(g)
            problems += [f"[kuberay_fields] group {g.get('groupName')}: missing {k!r}" for k in sorted(missing)]
            if not missing and not g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]:
                problems.append(f"[kuberay_fields] group {g['groupName']}: want minReplicas <= replicas <= maxReplicas")
    for where, params, _, _ in ray_containers(d):
        problems += [f"[kuberay_fields] {where}: rayStartParams[{k}] must be a string" for k, v in params.items()
                     if not isinstance(v, str)]
    clusters = {rc["metadata"]["name"] for rc in objects_of(d, "RayCluster")}
    for rj in objects_of(d, "RayJob"):
        spec, name = rj["spec"], rj["metadata"]["name"]
        problems += [f"[kuberay_fields] RayJob/{name}: unknown spec key {k!r}" for k in set(spec) - RAYJOB_SPEC_KEYS]
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            problems.append(f"[kuberay_fields] RayJob/{name}: submissionMode {spec['submissionMode']!r}")
        if spec.get("clusterSelector", {}).get("ray.io/cluster") not in clusters:
            problems.append(f"[kuberay_fields] RayJob/{name}: clusterSelector names no RayCluster in {clusters}")
        if not spec.get("entrypoint"):
            problems.append(f"[kuberay_fields] RayJob/{name}: no entrypoint")
    return problems


def _ours(image: str) -> bool:
    return not image.startswith(THIRD_PARTY_IMAGES)


def check_images(d) -> list[str]:
    problems, images = [], []
    for where, _, c in all_containers(d):
        images.append((where, c.get("image", "")))
    docker = d["cluster"].get("docker", {})
    images += [(f"ray up docker.{k}", docker[k]) for k in ("image", "head_image", "worker_image") if k in docker]
    ours = {img for _, img in images if _ours(img)}
    if len(ours) != 1:
        problems.append(f"[images] want one ziya-batch image everywhere, found {sorted(ours)}")
    version = d["pyproject"]["project"]["version"]
    problems += [f"[images] {img}: tag is not the package version {version}" for img in ours if image_tag(img) != version]
    for where, _, c, _ in ray_containers(d):
        if not _ours(c.get("image", "")):
            problems.append(f"[images] {where}: Ray container runs {c.get('image')}, not the ziya-batch image")
    redis_images = {c["image"] for _, _, c in all_containers(d) if c.get("image", "").startswith("redis:")}
    head_init = " ".join(d["cluster"]["available_node_types"][d["cluster"]["head_node_type"]].get("initialization_commands", []))
    for img in redis_images:
        if img not in head_init:
            problems.append(f"[images] the ray up head runs a different Redis image than {img}")
    return problems


def _dockerfile_args(d) -> dict:
    args = {}
    for instr, rest in d["dockerfile"]:
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
    return args


def check_ray_version(d) -> list[str]:
    want = _dockerfile_args(d).get("RAY_VERSION")
    return [f"[ray_version] RayCluster/{rc['metadata']['name']}: rayVersion {rc['spec'].get('rayVersion')}, image has {want}"
            for rc in objects_of(d, "RayCluster") if rc["spec"].get("rayVersion") != want]


def _service_for_host(d, host: str):
    """The Service (and StatefulSet, for a pod name) that an in-cluster DNS name points at."""
    labels = host.split(".")
    for i in range(min(2, len(labels))):
        svc = next((s for s in objects_of(d, "Service") if s["metadata"]["name"] == labels[i]), None)
        if svc is None:
            continue
        ns = svc["metadata"].get("namespace")
        tail = labels[i + 1:]
        if tail and (tail[0] != ns or tail[1:] not in ([], ["svc"], ["svc", "cluster", "local"])):
            continue
        if i == 1:  # <statefulset>-<ordinal>.<service>: only a headless Service of that StatefulSet names pods
            sts = next((s for s in objects_of(d, "StatefulSet") if s["spec"].get("serviceName") == labels[1]), None)
            m = re.fullmatch(r"(.+)-(\d+)", labels[0])
            if not (sts and m and m.group(1) == sts["metadata"]["name"] and int(m.group(2)) < sts["spec"].get("replicas", 1)):
                continue
        return svc
    return None


def _redis_urls(d) -> list[tuple[str, str]]:
    urls = [(where, e["value"]) for where, _, c in all_containers(d)
            for name, e in env_of(c).items() if name == "ZIYA_BATCH_REDIS_URL"]
    urls += [(f"RayJob/{rj['metadata']['name']}", runtime_env_vars(rj)["ZIYA_BATCH_REDIS_URL"])
             for rj in objects_of(d, "RayJob") if "ZIYA_BATCH_REDIS_URL" in runtime_env_vars(rj)]
    return urls


def check_redis_url(d) -> list[str]:
    problems, urls = [], _redis_urls(d)
    for where, _, c, _ in ray_containers(d):
        if "ZIYA_BATCH_REDIS_URL" not in env_of(c):
            problems.append(f"[redis_url] {where}: no ZIYA_BATCH_REDIS_URL")
    if len({u for _, u in urls}) > 1:
        problems.append(f"[redis_url] different ZIYA_BATCH_REDIS_URL values: {sorted({u for _, u in urls})}")
    for where, url in urls:
        parts = urlsplit(url)
        svc = _service_for_host(d, parts.hostname or "")
        if parts.scheme != "redis" or svc is None:
            problems.append(f"[redis_url] {where}: {url} names no Service in the manifests")
        elif parts.port not in [p["port"] for p in svc["spec"]["ports"]]:
            problems.append(f"[redis_url] {where}: port {parts.port} is not a port of Service {svc['metadata']['name']}")
    return problems


def check_redis_persistence(d) -> list[str]:
    problems = []
    stss = [s for s in objects_of(d, "StatefulSet") if any(c["image"].startswith("redis:") for c in s["spec"]["template"]["spec"]["containers"])]
    if len(stss) != 1:
        return [f"[redis_persistence] want one Redis StatefulSet, found {len(stss)}"]
    sts = stss[0]
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    svc = find_object(d, "Service", sts["spec"].get("serviceName"))
    if svc is None or svc["spec"].get("clusterIP") != "None":
        problems.append(f"[redis_persistence] serviceName {sts['spec'].get('serviceName')!r} is not a headless Service")
    if not any(selects(p["spec"].get("selector", {}).get("matchLabels", {}), sts["spec"]["template"]["metadata"]["labels"])
               for p in objects_of(d, "PodDisruptionBudget")):
        problems.append("[redis_persistence] no PodDisruptionBudget selects the Redis pods")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    conf_path = next((w for w in c.get("command", []) + c.get("args", []) if w.endswith(".conf")), None)
    conf = None
    for vname, path in mounts.items():
        cm_name = volumes.get(vname, {}).get("configMap", {}).get("name")
        cm = find_object(d, "ConfigMap", cm_name) if cm_name else None
        for key, text in (cm or {}).get("data", {}).items():
            if conf_path == f"{path}/{key}":
                conf = parse_redis_conf(text)
    if conf is None:
        return problems + [f"[redis_persistence] the Redis command's config {conf_path} is no mounted ConfigMap key"]
    for key, want in (("appendonly", "yes"), ("appendfsync", "everysec"), ("maxmemory-policy", "noeviction")):
        if conf.get(key) != want:
            problems.append(f"[redis_persistence] redis.conf {key} is {conf.get(key)!r}, want {want!r}")
    data_dirs = {mounts[n] for n in claims if n in mounts}
    if conf.get("dir") not in data_dirs:
        problems.append(f"[redis_persistence] redis.conf dir {conf.get('dir')!r} is not a persistent volume mount {data_dirs}")
    limit = c.get("resources", {}).get("limits", {}).get("memory")
    if "maxmemory" not in conf or not limit or size_bytes(conf["maxmemory"]) >= size_bytes(limit):
        problems.append("[redis_persistence] maxmemory must be set below the container's memory limit")
    return problems


def check_selectors(d) -> list[str]:
    problems = []
    pods = list(pod_templates(d))
    for sts in objects_of(d, "StatefulSet"):
        if not selects(sts["spec"]["selector"].get("matchLabels", {}), sts["spec"]["template"]["metadata"].get("labels", {})):
            problems.append(f"[selectors] StatefulSet/{sts['metadata']['name']}: selector does not match its template labels")
    for svc in objects_of(d, "Service"):
        if not any(selects(svc["spec"].get("selector", {}), labels) for _, _, labels in pods):
            problems.append(f"[selectors] Service/{svc['metadata']['name']}: selector matches no pod")
    for pdb in objects_of(d, "PodDisruptionBudget"):
        if not any(selects(pdb["spec"]["selector"].get("matchLabels", {}), labels) for _, _, labels in pods):
            problems.append(f"[selectors] PodDisruptionBudget/{pdb['metadata']['name']}: selector matches no pod")
    for np in objects_of(d, "NetworkPolicy"):
        allowed = [f["podSelector"].get("matchLabels", {}) for rule in np["spec"].get("ingress", []) for f in rule.get("from", [])]
        for where, t, labels in pods:
            uses_redis = any("ZIYA_BATCH_REDIS_URL" in env_of(c) for c in t["spec"]["containers"])
            if uses_redis and not any(selects(a, labels) for a in allowed):
                problems.append(f"[selectors] {where} uses Redis but NetworkPolicy/{np['metadata']['name']} does not admit it")
    return problems


def _container_ports(t) -> dict:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}


def check_ports(d) -> list[str]:
    problems = []
    pods = list(pod_templates(d))
    for svc in objects_of(d, "Service"):
        selected = [t for _, t, labels in pods if selects(svc["spec"].get("selector", {}), labels)]
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            for t in selected:
                ports = _container_ports(t)
                number = ports.get(target) if isinstance(target, str) else target
                if number not in ports.values():
                    problems.append(f"[ports] Service/{svc['metadata']['name']} targetPort {target!r} is no container port")
                elif isinstance(target, str) and svc["spec"].get("clusterIP") == "None" and number != p["port"]:
                    problems.append(f"[ports] headless Service/{svc['metadata']['name']}: port {p['port']} != containerPort {number}")
    for rj in objects_of(d, "RayJob"):
        for words in ziya_invocations(rj["spec"].get("entrypoint", "")):
            if words and words[0] == "serve":
                port = int(flag_value(words, "--port") or 8000)
                heads = [t for _, t, labels in pods if labels.get("ray.io/node-type") == "head"]
                if not any(port in _container_ports(t).values() for t in heads):
                    problems.append(f"[ports] serve listens on {port}, which the Ray head does not expose")
    return problems


def _head_svc_address_ok(d, address: str) -> bool:
    host, _, port = address.rpartition(":")
    for rc in objects_of(d, "RayCluster"):
        head = rc["spec"]["headGroupSpec"]["template"]
        gcs = int(rc["spec"]["headGroupSpec"].get("rayStartParams", {}).get("port", 6379))
        name, ns = f"{rc['metadata']['name']}-head-svc", rc["metadata"].get("namespace")
        names = {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}
        if host in names and port.isdigit() and int(port) == gcs and gcs in _container_ports(head).values():
            return True
    return False


def check_commands(d) -> list[str]:
    problems = []
    for where, line in all_command_lines(d):
        for words in ziya_invocations(line):
            sub = words[0] if words else ""
            if sub not in SUBCOMMANDS and not sub.startswith("-"):  # --help, --version
                problems.append(f"[commands] {where}: `ziya-batch {sub}` is not a ziya-batch command")
            elif sub == "merge-delta" and not all(flag_value(words, f) for f in ("--base", "--delta", "--target")):
                problems.append(f"[commands] {where}: merge-delta needs --base, --delta and --target")
            elif sub == "worker" and where.startswith("RayCluster") and not _head_svc_address_ok(d, flag_value(words, "--address") or ""):
                problems.append(f"[commands] {where}: worker --address is not the RayCluster's head service GCS port")
    for rc in objects_of(d, "RayCluster"):
        if rc["metadata"].get("annotations", {}).get("ray.io/overwrite-container-cmd") == "true":
            for where, _, c, _ in ray_containers(d):
                if "KUBERAY_GEN_RAY_START_CMD" not in command_line(c):
                    problems.append(f"[commands] {where}: the command overrides KubeRay's but never runs $KUBERAY_GEN_RAY_START_CMD")
    # `ziya-batch run FILE` runs on the Ray head: FILE must be a key of a ConfigMap mounted there
    head_files = set()
    for where, _, c, t in ray_containers(d):
        if where.endswith("/head"):
            vols = {v["name"]: v for v in t["spec"].get("volumes", [])}
            for m in c.get("volumeMounts", []):
                cm = find_object(d, "ConfigMap", vols.get(m["name"], {}).get("configMap", {}).get("name"))
                head_files |= {f"{m['mountPath']}/{k}" for k in (cm or {}).get("data", {})}
    for rj in objects_of(d, "RayJob"):
        for words in ziya_invocations(rj["spec"].get("entrypoint", "")):
            if words and words[0] == "run" and (len(words) < 2 or words[1] not in head_files):
                problems.append(f"[commands] RayJob/{rj['metadata']['name']}: {words[1:2]} is no ConfigMap file on the head {sorted(head_files)}")
    return problems


def check_gpus(d) -> list[str]:
    problems = []
    for where, params, c, t in ray_containers(d):
        res = c.get("resources", {})
        limit, request = res.get("limits", {}).get(GPU), res.get("requests", {}).get(GPU)
        want = params.get("num-gpus", "0")
        if str(limit or 0) != want or str(request or 0) != want:
            problems.append(f"[gpus] {where}: {GPU} limit {limit} / request {request} but rayStartParams num-gpus {want}")
        shape = t["spec"].get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
        if shape and GPUS_PER_INSTANCE.get(shape) != int(want):
            problems.append(f"[gpus] {where}: {shape} has {GPUS_PER_INSTANCE.get(shape)} GPUs, the group asks {want}")
        if "resources" in params:  # KubeRay's format: '"{\"name\": 1}"'
            try:
                custom = json.loads(params["resources"][1:-1].replace("\\", ""))
                assert isinstance(custom, dict) and all(isinstance(v, int) for v in custom.values())
            except (ValueError, AssertionError):
                problems.append(f"[gpus] {where}: rayStartParams resources {params['resources']!r} is not KubeRay's format")
    for tname, nt in d["cluster"]["available_node_types"].items():
        shape = nt["node_config"].get("InstanceType")
        if shape in GPUS_PER_INSTANCE and nt["resources"].get("GPU") != GPUS_PER_INSTANCE[shape]:
            problems.append(f"[gpus] ray up {tname}: {shape} has {GPUS_PER_INSTANCE[shape]} GPUs, resources say {nt['resources'].get('GPU')}")
    return problems


def _job_spec(d):
    for cm in objects_of(d, "ConfigMap"):
        if "job.yaml" in cm.get("data", {}):
            return cm, yaml.safe_load(cm["data"]["job.yaml"])
    return None, None


def _mounted_pvc_paths(t, c) -> dict:
    vols = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in t["spec"].get("volumes", [])}
    return {m["mountPath"]: vols[m["name"]] for m in c.get("volumeMounts", []) if vols.get(m["name"])}


def check_job_spec(d) -> list[str]:
    cm, raw = _job_spec(d)
    if cm is None:
        return ["[job_spec] no ConfigMap holds job.yaml"]
    try:
        spec = parse_spec(raw, "job ConfigMap")
    except SpecError as err:
        return [f"[job_spec] {err}"]
    problems, path = [], spec.model.path or ""
    pvcs = {p["metadata"]["name"] for p in objects_of(d, "PersistentVolumeClaim")}
    for where, params, c, t in ray_containers(d):
        if where.endswith("/head"):
            continue
        mounts = _mounted_pvc_paths(t, c)
        if not any(path.startswith(mp.rstrip("/") + "/") and claim in pvcs for mp, claim in mounts.items()):
            problems.append(f"[job_spec] {where}: model.path {path} is under no mounted PVC {mounts}")
        gpus = int(params.get("num-gpus", "0"))
        if gpus % spec.model.tensor_parallel:
            problems.append(f"[job_spec] {where}: tensor_parallel {spec.model.tensor_parallel} does not divide its {gpus} GPUs")
    for where, t, c in all_containers(d):
        for words in ziya_invocations(command_line(c)):
            if words and words[0] == "merge-delta":
                target = flag_value(words, "--target") or ""
                mounts = _mounted_pvc_paths(t, c)
                if target != path or not any(target.startswith(mp.rstrip("/") + "/") for mp in mounts):
                    problems.append(f"[job_spec] {where}: merge-delta --target {target} is not model.path {path} on the PVC")
                # the init container must stage exactly what merge-delta reads
                staged = {str(a).rstrip("/") for ic in t["spec"].get("initContainers", []) for a in ic.get("command", [])
                          if any(str(a).startswith(mp.rstrip("/") + "/") for mp in _mounted_pvc_paths(t, ic))}
                for flag in ("--base", "--delta"):
                    if (flag_value(words, flag) or "").rstrip("/") not in staged:
                        problems.append(f"[job_spec] {where}: merge-delta {flag} {flag_value(words, flag)} is not staged by an init container {sorted(staged)}")
    for rj in objects_of(d, "RayJob"):
        for words in ziya_invocations(rj["spec"].get("entrypoint", "")):
            if words and words[0] == "serve":
                if flag_value(words, "--model") != path:
                    problems.append(f"[job_spec] serve --model {flag_value(words, '--model')} is not model.path {path}")
                if "://" not in (flag_value(words, "--storage") or ""):
                    problems.append("[job_spec] serve --storage must be a URL every node can read, not the head's disk")
                models = runtime_env_vars(rj).get("ZIYA_BATCH_ALLOWED_MODELS", "")
                if not any(path.startswith(p) for p in models.split(",") if p):
                    problems.append(f"[job_spec] model.path {path} is under no ZIYA_BATCH_ALLOWED_MODELS prefix ({models})")
    prefixes = {c_env["ZIYA_BATCH_ALLOWED_PREFIXES"]["value"] for _, _, c in all_containers(d)
                for c_env in [env_of(c)] if "ZIYA_BATCH_ALLOWED_PREFIXES" in c_env}
    prefixes |= {runtime_env_vars(rj)["ZIYA_BATCH_ALLOWED_PREFIXES"] for rj in objects_of(d, "RayJob")
                 if "ZIYA_BATCH_ALLOWED_PREFIXES" in runtime_env_vars(rj)}
    if len(prefixes) > 1:
        problems.append(f"[job_spec] different ZIYA_BATCH_ALLOWED_PREFIXES: {sorted(prefixes)}")
    for allowed in prefixes:
        for url in spec.input + [spec.output.path]:
            if not any(url.startswith(p) for p in allowed.split(",")):
                problems.append(f"[job_spec] {url} is under no allowed prefix ({allowed})")
    return problems


def check_references(d) -> list[str]:
    problems = []
    secrets = {s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {})) for s in objects_of(d, "Secret")}
    configmaps = {c["metadata"]["name"] for c in objects_of(d, "ConfigMap")}
    pvcs = {p["metadata"]["name"] for p in objects_of(d, "PersistentVolumeClaim")}
    for where, t, c in all_containers(d):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["key"] not in secrets.get(ref["name"], set()):
                problems.append(f"[references] {where}: env {e['name']} reads missing secret key {ref['name']}/{ref['key']}")
            if e["name"] == "ZIYA_BATCH_API_TOKEN" and not ref:
                problems.append(f"[references] {where}: ZIYA_BATCH_API_TOKEN must come from a Secret, not a literal")
        for src in c.get("envFrom", []):
            name = src.get("secretRef", {}).get("name")
            if name and name not in secrets:
                problems.append(f"[references] {where}: envFrom names missing Secret {name}")
            elif name and not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets[name]:
                problems.append(f"[references] {where}: Secret {name} lacks the S3 keys")
    for where, t, _ in pod_templates(d):
        for v in t["spec"].get("volumes", []):
            if "configMap" in v and v["configMap"]["name"] not in configmaps:
                problems.append(f"[references] {where}: volume {v['name']} names missing ConfigMap {v['configMap']['name']}")
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                problems.append(f"[references] {where}: volume {v['name']} names missing PVC")
    heads = [c for where, _, c, _ in ray_containers(d) if where.endswith("/head")]
    if not any("ZIYA_BATCH_API_TOKEN" in env_of(c) for c in heads):
        problems.append("[references] the Ray head (where serve runs) has no ZIYA_BATCH_API_TOKEN")
    return problems


def check_dockerfile(d) -> list[str]:
    problems, df = [], d["dockerfile"]
    args = _dockerfile_args(d)
    instrs = [i for i, _ in df]
    first_from = next((r for i, r in df if i == "FROM"), "")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), first_from)
    if not base.startswith("nvidia/cuda:") or not re.search(r"ubuntu24\.04|python3\.1[12]", base + " ".join(r for _, r in df)):
        problems.append(f"[dockerfile] base {base!r}: want an nvidia/cuda image with Python 3.11 or 3.12")
    torch_req = next(r for r in d["pyproject"]["project"]["dependencies"] if r.startswith("torch"))
    if args.get("TORCH_SPEC", "").replace(" ", "") != torch_req.replace(" ", ""):
        problems.append(f"[dockerfile] TORCH_SPEC {args.get('TORCH_SPEC')!r} differs from pyproject's {torch_req!r}")
    runs = [(n, r) for n, (i, r) in enumerate(df) if i == "RUN"]
    torch_at = next((n for n, r in runs if '"${TORCH_SPEC}"' in r), None)
    pkg_at = next((n for n, r in runs if re.search(r"pip install \.(\s|$)", r)), None)
    if torch_at is None or pkg_at is None or torch_at > pkg_at:
        problems.append("[dockerfile] want torch installed from TORCH_SPEC, then the package with `pip install .`")
    env = " ".join(r for i, r in df if i == "ENV")
    if not re.search(r"\bHF_HUB_OFFLINE=1\b", env):
        problems.append("[dockerfile] HF_HUB_OFFLINE=1 is not set")
    users = [r for i, r in df if i == "USER"]
    user = users[-1].split(":")[0] if users else "root"
    if user in ("root", "0"):
        problems.append("[dockerfile] the image must end as a non-root USER")
    created = any(re.search(rf"useradd\b.*--create-home\b.*\b{re.escape(user)}\b", r) for i, r in df if i == "RUN")
    workdir = [r for i, r in df if i == "WORKDIR"][-1:] or ["/"]
    if not created or workdir[0] != f"/home/{user}" or instrs.index("USER") > len(instrs) - instrs[::-1].index("WORKDIR") - 1:
        problems.append(f"[dockerfile] the final WORKDIR {workdir[0]} must be the home that useradd made for {user}")
    venv = re.search(r"python3(?:\.\d+)? -m venv (\S+)", " ".join(r for i, r in df if i == "RUN"))
    if not venv or f"{venv.group(1)}/bin" not in env:
        problems.append("[dockerfile] the virtual environment's bin (where ziya-batch is installed) is not on PATH")
    for instr in ("CMD", "ENTRYPOINT"):
        for rest in (r for i, r in df if i == instr):
            try:
                words = json.loads(rest)
            except ValueError:
                problems.append(f"[dockerfile] {instr} must be exec form (a JSON list)")
                continue
            if instr == "CMD" and (words[:1] != ["ziya-batch"] or len(words) < 2 or words[1] not in SUBCOMMANDS):
                problems.append(f"[dockerfile] CMD {words} does not run a ziya-batch command")
            if instr == "ENTRYPOINT" and Path(words[0]).name not in " ".join(r for i, r in df if i == "RUN"):
                problems.append(f"[dockerfile] ENTRYPOINT {words[0]} is not installed by the image")
    return problems


@functools.lru_cache(maxsize=1)
def _ray_schema_validator():
    """Ray's own schema for `ray up` files, read from the installed package without importing Ray."""
    spec = importlib.util.find_spec("ray")
    path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json" if spec and spec.origin else None
    if not (path and path.exists()):
        return None
    import jsonschema

    schema = json.loads(path.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def check_cluster_file(d) -> list[str]:
    problems, cfg = [], d["cluster"]
    validator = _ray_schema_validator()
    if validator is not None:
        problems += [f"[cluster_file] not a valid ray up config: {e.message}" for e in validator.iter_errors(cfg)]
    if cfg.get("provider", {}).get("type") != "aws" or not cfg["provider"].get("region"):
        problems.append("[cluster_file] provider must be aws with a region")
    types = cfg.get("available_node_types", {})
    head = types.get(cfg.get("head_node_type"))
    if head is None or head.get("resources", {}).get("GPU"):
        problems.append("[cluster_file] head_node_type must name a CPU node type")
    workers = [t for n, t in types.items() if n != cfg.get("head_node_type")]
    if not any(GPUS_PER_INSTANCE.get(t["node_config"].get("InstanceType"), 0) == 8 for t in workers):
        problems.append("[cluster_file] no 8-GPU worker node type")
    if sum(t.get("max_workers", 0) for t in workers) > cfg.get("max_workers", 0) * len(workers):
        problems.append("[cluster_file] node type max_workers exceed the cluster's max_workers")
    head_start = " ".join(cfg.get("head_start_ray_commands", []))
    gcs = re.search(r"ray start --head\b.*?--port=(\d+)", head_start)
    gcs_port = gcs.group(1) if gcs else None
    worker_start = cfg.get("worker_start_ray_commands", [])
    joined = " ".join(worker_start)
    if not re.search(rf"ray start --address=\$RAY_HEAD_IP:{gcs_port}\b", joined):
        problems.append(f"[cluster_file] workers do not `ray start` against the head's GCS port {gcs_port}")
    workers_cmd = [w for line in worker_start for w in ziya_invocations(line) if w and w[0] == "worker"]
    if not workers_cmd or flag_value(workers_cmd[0], "--address") != f"$RAY_HEAD_IP:{gcs_port}":
        problems.append("[cluster_file] workers do not run `ziya-batch worker --address $RAY_HEAD_IP:<gcs port>`")
    k8s_head_cpus = {rc["spec"]["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") for rc in objects_of(d, "RayCluster")}
    if head is not None and {str(head.get("resources", {}).get("CPU"))} != k8s_head_cpus:
        problems.append(f"[cluster_file] head CPU resource {head.get('resources')} differs from the RayCluster head's num-cpus {k8s_head_cpus}")
    init = " ".join((head or {}).get("initialization_commands", []))
    redis_port = re.search(r"redis-server\b.*?--port (\d+)", init)
    urls = re.findall(r"ZIYA_BATCH_REDIS_URL=redis://[^\s:/]+:(\d+)", joined + " " + " ".join(cfg.get("docker", {}).get("head_run_options", [])))
    if not redis_port or redis_port.group(1) == gcs_port or not urls or set(urls) != {redis_port.group(1)}:
        problems.append(f"[cluster_file] the head's Redis port must differ from the GCS port and match ZIYA_BATCH_REDIS_URL ({urls})")
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        if flag not in init:
            problems.append(f"[cluster_file] the head's Redis lacks {flag}")
    return problems


CHECKS = [check_k8s_identity, check_k8s_schema, check_kuberay_fields, check_images, check_ray_version, check_redis_url,
          check_redis_persistence, check_selectors, check_ports, check_commands, check_gpus, check_job_spec,
          check_references, check_dockerfile, check_cluster_file]



def run_checks(deployment: dict) -> list[str]:
    return [p for check in CHECKS for p in check(deployment)]


def main() -> int:
    if importlib.util.find_spec("kubernetes_validate") is None:
        print("note: `pip install kubernetes-validate` to also check the manifests against Kubernetes' schemas",
              file=sys.stderr)
    problems = run_checks(load_deployment())
    for p in problems:
        print(p)
    print(f"{len(CHECKS)} checks, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
