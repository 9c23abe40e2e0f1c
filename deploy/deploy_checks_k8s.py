"""Checks of deploy/k8s one object at a time: API versions and schemas, KubeRay fields, selectors,
ports, references, and the Redis that must keep its data (see deploy_checks.py)."""

from __future__ import annotations

from deploy_files import (
    all_containers,
    env_of,
    find_object,
    flag_value,
    objects_of,
    parse_redis_conf,
    pod_templates,
    ray_containers,
    selects,
    size_bytes,
    ziya_invocations,
)

API_VERSIONS = {
    "Namespace": "v1",
    "Secret": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "StatefulSet": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "Job": "batch/v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
}
# json tags of KubeRay's ray.io/v1 Go types (apis/ray/v1/raycluster_types.go, rayjob_types.go)
RAYCLUSTER_SPEC_KEYS = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
}
HEAD_GROUP_KEYS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_KEYS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
}
RAYJOB_SPEC_KEYS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
# The oldest Kubernetes the manifests are checked against (policy/v1 budgets, Job TTLs, EKS's oldest
# standard-support release when this was written).
K8S_VERSION = "1.31.0"


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
            problems.append(
                f"[k8s_identity] {kind}/{name}: apiVersion {o['apiVersion']}, want {API_VERSIONS.get(kind)}"
            )
        if (kind, name) in seen:
            problems.append(f"[k8s_identity] {kind}/{name} defined twice")
        seen.add((kind, name))
        if kind != "Namespace" and o["metadata"].get("namespace") not in namespaces:
            problems.append(
                f"[k8s_identity] {kind}/{name}: namespace {o['metadata'].get('namespace')!r} is not one of {namespaces}"
            )
    return problems


def check_k8s_schema(d) -> list[str]:
    """Built-in objects against Kubernetes' own schemas, strictly (an unknown field is an error); the pod
    templates inside RayClusters and RayJobs are checked as PodTemplates. Needs kubernetes-validate."""
    try:
        import kubernetes_validate as kv
    except ImportError:
        return []
    docs = [
        (f"{o.get('kind')}/{o.get('metadata', {}).get('name')}", o)
        for o in d["objects"]
        if not str(o.get("apiVersion", "")).startswith("ray.io/")
    ]
    docs += [
        (where, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t})
        for where, t, _ in pod_templates(d)
        if where.startswith(("RayCluster/", "RayJob/"))
    ]
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
        problems += [
            f"[kuberay_fields] RayCluster/{name}: unknown spec key {k!r}" for k in set(spec) - RAYCLUSTER_SPEC_KEYS
        ]
        problems += [
            f"[kuberay_fields] RayCluster/{name}: unknown headGroupSpec key {k!r}"
            for k in set(spec["headGroupSpec"]) - HEAD_GROUP_KEYS
        ]
        for g in spec.get("workerGroupSpecs", []):
            problems += [
                f"[kuberay_fields] group {g.get('groupName')}: unknown key {k!r}" for k in set(g) - WORKER_GROUP_KEYS
            ]
            missing = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} - set(g)
            problems += [f"[kuberay_fields] group {g.get('groupName')}: missing {k!r}" for k in sorted(missing)]
            if not missing and not g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]:
                problems.append(f"[kuberay_fields] group {g['groupName']}: want minReplicas <= replicas <= maxReplicas")
    for where, params, _, _ in ray_containers(d):
        problems += [
            f"[kuberay_fields] {where}: rayStartParams[{k}] must be a string"
            for k, v in params.items()
            if not isinstance(v, str)
        ]
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


def check_redis_persistence(d) -> list[str]:
    problems = []
    stss = [
        s
        for s in objects_of(d, "StatefulSet")
        if any(c["image"].startswith("redis:") for c in s["spec"]["template"]["spec"]["containers"])
    ]
    if len(stss) != 1:
        return [f"[redis_persistence] want one Redis StatefulSet, found {len(stss)}"]
    sts = stss[0]
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    svc = find_object(d, "Service", sts["spec"].get("serviceName"))
    if svc is None or svc["spec"].get("clusterIP") != "None":
        problems.append(f"[redis_persistence] serviceName {sts['spec'].get('serviceName')!r} is not a headless Service")
    if not any(
        selects(p["spec"].get("selector", {}).get("matchLabels", {}), sts["spec"]["template"]["metadata"]["labels"])
        for p in objects_of(d, "PodDisruptionBudget")
    ):
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
        problems.append(
            f"[redis_persistence] redis.conf dir {conf.get('dir')!r} is not a persistent volume mount {data_dirs}"
        )
    limit = c.get("resources", {}).get("limits", {}).get("memory")
    if "maxmemory" not in conf or not limit or size_bytes(conf["maxmemory"]) >= size_bytes(limit):
        problems.append("[redis_persistence] maxmemory must be set below the container's memory limit")
    return problems


def check_selectors(d) -> list[str]:
    problems = []
    pods = list(pod_templates(d))
    for sts in objects_of(d, "StatefulSet"):
        if not selects(
            sts["spec"]["selector"].get("matchLabels", {}), sts["spec"]["template"]["metadata"].get("labels", {})
        ):
            problems.append(
                f"[selectors] StatefulSet/{sts['metadata']['name']}: selector does not match its template labels"
            )
    for svc in objects_of(d, "Service"):
        if not any(selects(svc["spec"].get("selector", {}), labels) for _, _, labels in pods):
            problems.append(f"[selectors] Service/{svc['metadata']['name']}: selector matches no pod")
    for pdb in objects_of(d, "PodDisruptionBudget"):
        if not any(selects(pdb["spec"]["selector"].get("matchLabels", {}), labels) for _, _, labels in pods):
            problems.append(f"[selectors] PodDisruptionBudget/{pdb['metadata']['name']}: selector matches no pod")
    for np in objects_of(d, "NetworkPolicy"):
        allowed = [
            f["podSelector"].get("matchLabels", {})
            for rule in np["spec"].get("ingress", [])
            for f in rule.get("from", [])
        ]
        for where, t, labels in pods:
            uses_redis = any("ZIYA_BATCH_REDIS_URL" in env_of(c) for c in t["spec"]["containers"])
            if uses_redis and not any(selects(a, labels) for a in allowed):
                problems.append(
                    f"[selectors] {where} uses Redis but NetworkPolicy/{np['metadata']['name']} does not admit it"
                )
    return problems


def container_ports(t) -> dict:
    return {
        p.get("name", str(p["containerPort"])): p["containerPort"]
        for c in t["spec"]["containers"]
        for p in c.get("ports", [])
    }


def check_ports(d) -> list[str]:
    problems = []
    pods = list(pod_templates(d))
    for svc in objects_of(d, "Service"):
        selected = [t for _, t, labels in pods if selects(svc["spec"].get("selector", {}), labels)]
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            for t in selected:
                ports = container_ports(t)
                number = ports.get(target) if isinstance(target, str) else target
                if number not in ports.values():
                    problems.append(
                        f"[ports] Service/{svc['metadata']['name']} targetPort {target!r} is no container port"
                    )
                elif isinstance(target, str) and svc["spec"].get("clusterIP") == "None" and number != p["port"]:
                    problems.append(
                        f"[ports] headless Service/{svc['metadata']['name']}: port {p['port']} != containerPort {number}"
                    )
    for rj in objects_of(d, "RayJob"):
        for words in ziya_invocations(rj["spec"].get("entrypoint", "")):
            if words and words[0] == "serve":
                port = int(flag_value(words, "--port") or 8000)
                heads = [t for _, t, labels in pods if labels.get("ray.io/node-type") == "head"]
                if not any(port in container_ports(t).values() for t in heads):
                    problems.append(f"[ports] serve listens on {port}, which the Ray head does not expose")
    return problems


def check_references(d) -> list[str]:
    problems = []
    secrets = {
        s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {})) for s in objects_of(d, "Secret")
    }
    configmaps = {c["metadata"]["name"] for c in objects_of(d, "ConfigMap")}
    pvcs = {p["metadata"]["name"] for p in objects_of(d, "PersistentVolumeClaim")}
    for where, t, c in all_containers(d):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["key"] not in secrets.get(ref["name"], set()):
                problems.append(
                    f"[references] {where}: env {e['name']} reads missing secret key {ref['name']}/{ref['key']}"
                )
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
                problems.append(
                    f"[references] {where}: volume {v['name']} names missing ConfigMap {v['configMap']['name']}"
                )
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                problems.append(f"[references] {where}: volume {v['name']} names missing PVC")
    heads = [c for where, _, c, _ in ray_containers(d) if where.endswith("/head")]
    if not any("ZIYA_BATCH_API_TOKEN" in env_of(c) for c in heads):
        problems.append("[references] the Ray head (where serve runs) has no ZIYA_BATCH_API_TOKEN")
    return problems


def check_pod_security(d) -> list[str]:
    """Every pod runs as a named non-root uid: the image's user for ours, the image's own for Redis."""
    problems = []
    for where, t, _ in pod_templates(d):
        ctx = t["spec"].get("securityContext", {})
        if ctx.get("runAsNonRoot") is not True or not ctx.get("runAsUser"):
            problems.append(f"[pod_security] {where}: want securityContext runAsNonRoot: true and a non-zero runAsUser")
        for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]:
            if c.get("securityContext", {}).get("runAsUser") == 0 or c.get("securityContext", {}).get("privileged"):
                problems.append(f"[pod_security] {where}/{c['name']}: runs as root or privileged")
    return problems
