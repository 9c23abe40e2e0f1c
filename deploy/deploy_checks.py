"""Checks that deploy/ describes one consistent cluster; run `python deploy/deploy_checks.py` after editing.

Each check takes the data of `deploy_files.load_deployment()` and returns a list of problems, each
starting with the check's name in brackets. Nothing here talks to Kubernetes or AWS: it reads files.
The checks of single objects are in deploy_checks_k8s.py, those of the Dockerfile and the `ray up`
file in deploy_checks_hosts.py; here are the ones that tie files together. tests/unit/test_deploy.py
runs every check on the real files and on copies broken in one field.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from urllib.parse import urlsplit

import yaml

from deploy_files import (
    GPU,
    GPUS_PER_INSTANCE,
    SUBCOMMANDS,
    all_command_lines,
    all_containers,
    command_line,
    env_of,
    find_object,
    flag_value,
    image_tag,
    load_deployment,
    objects_of,
    ray_containers,
    runtime_env_vars,
    ziya_invocations,
)
from deploy_checks_hosts import check_cluster_file, check_dockerfile, dockerfile_args
from deploy_checks_k8s import (
    check_k8s_identity,
    check_k8s_schema,
    check_kuberay_fields,
    check_pod_security,
    check_ports,
    check_redis_persistence,
    check_references,
    check_selectors,
    container_ports,
)
from ziya_batch.errors import SpecError
from ziya_batch.spec import parse_spec

THIRD_PARTY_IMAGES = ("redis:",)  # images that are not ours and may differ from the worker image


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
    problems += [
        f"[images] {img}: tag is not the package version {version}" for img in ours if image_tag(img) != version
    ]
    for where, _, c, _ in ray_containers(d):
        if not _ours(c.get("image", "")):
            problems.append(f"[images] {where}: Ray container runs {c.get('image')}, not the ziya-batch image")
    redis_images = {c["image"] for _, _, c in all_containers(d) if c.get("image", "").startswith("redis:")}
    head_init = " ".join(
        d["cluster"]["available_node_types"][d["cluster"]["head_node_type"]].get("initialization_commands", [])
    )
    for img in redis_images:
        if img not in head_init:
            problems.append(f"[images] the ray up head runs a different Redis image than {img}")
    return problems


def check_ray_version(d) -> list[str]:
    want = dockerfile_args(d).get("RAY_VERSION")
    return [
        f"[ray_version] RayCluster/{rc['metadata']['name']}: rayVersion {rc['spec'].get('rayVersion')}, image has {want}"
        for rc in objects_of(d, "RayCluster")
        if rc["spec"].get("rayVersion") != want
    ]


def _service_for_host(d, host: str):
    """The Service (and StatefulSet, for a pod name) that an in-cluster DNS name points at."""
    labels = host.split(".")
    for i in range(min(2, len(labels))):
        svc = next((s for s in objects_of(d, "Service") if s["metadata"]["name"] == labels[i]), None)
        if svc is None:
            continue
        ns = svc["metadata"].get("namespace")
        tail = labels[i + 1 :]
        if tail and (tail[0] != ns or tail[1:] not in ([], ["svc"], ["svc", "cluster", "local"])):
            continue
        if i == 1:  # <statefulset>-<ordinal>.<service>: only a headless Service of that StatefulSet names pods
            sts = next((s for s in objects_of(d, "StatefulSet") if s["spec"].get("serviceName") == labels[1]), None)
            m = re.fullmatch(r"(.+)-(\d+)", labels[0])
            if not (
                sts and m and m.group(1) == sts["metadata"]["name"] and int(m.group(2)) < sts["spec"].get("replicas", 1)
            ):
                continue
        return svc
    return None


def _redis_urls(d) -> list[tuple[str, str]]:
    urls = [
        (where, e["value"])
        for where, _, c in all_containers(d)
        for name, e in env_of(c).items()
        if name == "ZIYA_BATCH_REDIS_URL"
    ]
    urls += [
        (f"RayJob/{rj['metadata']['name']}", runtime_env_vars(rj)["ZIYA_BATCH_REDIS_URL"])
        for rj in objects_of(d, "RayJob")
        if "ZIYA_BATCH_REDIS_URL" in runtime_env_vars(rj)
    ]
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
            problems.append(
                f"[redis_url] {where}: port {parts.port} is not a port of Service {svc['metadata']['name']}"
            )
    return problems


def _head_svc_address_ok(d, address: str) -> bool:
    host, _, port = address.rpartition(":")
    for rc in objects_of(d, "RayCluster"):
        head = rc["spec"]["headGroupSpec"]["template"]
        gcs = int(rc["spec"]["headGroupSpec"].get("rayStartParams", {}).get("port", 6379))
        name, ns = f"{rc['metadata']['name']}-head-svc", rc["metadata"].get("namespace")
        names = {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}
        if host in names and port.isdigit() and int(port) == gcs and gcs in container_ports(head).values():
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
            elif (
                sub == "worker"
                and where.startswith("RayCluster")
                and not _head_svc_address_ok(d, flag_value(words, "--address") or "")
            ):
                problems.append(f"[commands] {where}: worker --address is not the RayCluster's head service GCS port")
    for rc in objects_of(d, "RayCluster"):
        if rc["metadata"].get("annotations", {}).get("ray.io/overwrite-container-cmd") == "true":
            for where, _, c, _ in ray_containers(d):
                if "KUBERAY_GEN_RAY_START_CMD" not in command_line(c):
                    problems.append(
                        f"[commands] {where}: the command overrides KubeRay's but never runs $KUBERAY_GEN_RAY_START_CMD"
                    )
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
                problems.append(
                    f"[commands] RayJob/{rj['metadata']['name']}: {words[1:2]} is no ConfigMap file on the head {sorted(head_files)}"
                )
    return problems


def check_gpus(d) -> list[str]:
    problems = []
    for where, params, c, t in ray_containers(d):
        res = c.get("resources", {})
        limit, request = res.get("limits", {}).get(GPU), res.get("requests", {}).get(GPU)
        want = params.get("num-gpus", "0")
        if str(limit or 0) != want or str(request or 0) != want:
            problems.append(
                f"[gpus] {where}: {GPU} limit {limit} / request {request} but rayStartParams num-gpus {want}"
            )
        shape = t["spec"].get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
        if shape and GPUS_PER_INSTANCE.get(shape) != int(want):
            problems.append(f"[gpus] {where}: {shape} has {GPUS_PER_INSTANCE.get(shape)} GPUs, the group asks {want}")
        if "resources" in params:  # KubeRay's format: '"{\"name\": 1}"'
            try:
                custom = json.loads(params["resources"][1:-1].replace("\\", ""))
                assert isinstance(custom, dict) and all(isinstance(v, int) for v in custom.values())
            except (ValueError, AssertionError):
                problems.append(
                    f"[gpus] {where}: rayStartParams resources {params['resources']!r} is not KubeRay's format"
                )
    for tname, nt in d["cluster"]["available_node_types"].items():
        shape = nt["node_config"].get("InstanceType")
        if shape in GPUS_PER_INSTANCE and nt["resources"].get("GPU") != GPUS_PER_INSTANCE[shape]:
            problems.append(
                f"[gpus] ray up {tname}: {shape} has {GPUS_PER_INSTANCE[shape]} GPUs, resources say {nt['resources'].get('GPU')}"
            )
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
            problems.append(
                f"[job_spec] {where}: tensor_parallel {spec.model.tensor_parallel} does not divide its {gpus} GPUs"
            )
    for where, t, c in all_containers(d):
        for words in ziya_invocations(command_line(c)):
            if words and words[0] == "merge-delta":
                target = flag_value(words, "--target") or ""
                mounts = _mounted_pvc_paths(t, c)
                if target != path or not any(target.startswith(mp.rstrip("/") + "/") for mp in mounts):
                    problems.append(
                        f"[job_spec] {where}: merge-delta --target {target} is not model.path {path} on the PVC"
                    )
                # the init container must stage exactly what merge-delta reads
                staged = {
                    str(a).rstrip("/")
                    for ic in t["spec"].get("initContainers", [])
                    for a in ic.get("command", [])
                    if any(str(a).startswith(mp.rstrip("/") + "/") for mp in _mounted_pvc_paths(t, ic))
                }
                for flag in ("--base", "--delta"):
                    if (flag_value(words, flag) or "").rstrip("/") not in staged:
                        problems.append(
                            f"[job_spec] {where}: merge-delta {flag} {flag_value(words, flag)} is not staged by an init container {sorted(staged)}"
                        )
    for rj in objects_of(d, "RayJob"):
        for words in ziya_invocations(rj["spec"].get("entrypoint", "")):
            if words and words[0] == "serve":
                if flag_value(words, "--model") != path:
                    problems.append(f"[job_spec] serve --model {flag_value(words, '--model')} is not model.path {path}")
                if "://" not in (flag_value(words, "--storage") or ""):
                    problems.append("[job_spec] serve --storage must be a URL every node can read, not the head's disk")
                models = runtime_env_vars(rj).get("ZIYA_BATCH_ALLOWED_MODELS", "")
                if not any(path.startswith(p) for p in models.split(",") if p):
                    problems.append(
                        f"[job_spec] model.path {path} is under no ZIYA_BATCH_ALLOWED_MODELS prefix ({models})"
                    )
    prefixes = {
        c_env["ZIYA_BATCH_ALLOWED_PREFIXES"]["value"]
        for _, _, c in all_containers(d)
        for c_env in [env_of(c)]
        if "ZIYA_BATCH_ALLOWED_PREFIXES" in c_env
    }
    prefixes |= {
        runtime_env_vars(rj)["ZIYA_BATCH_ALLOWED_PREFIXES"]
        for rj in objects_of(d, "RayJob")
        if "ZIYA_BATCH_ALLOWED_PREFIXES" in runtime_env_vars(rj)
    }
    if len(prefixes) > 1:
        problems.append(f"[job_spec] different ZIYA_BATCH_ALLOWED_PREFIXES: {sorted(prefixes)}")
    for allowed in prefixes:
        for url in spec.input + [spec.output.path]:
            if not any(url.startswith(p) for p in allowed.split(",")):
                problems.append(f"[job_spec] {url} is under no allowed prefix ({allowed})")
    return problems


CHECKS = [
    check_k8s_identity,
    check_k8s_schema,
    check_kuberay_fields,
    check_images,
    check_ray_version,
    check_redis_url,
    check_redis_persistence,
    check_selectors,
    check_ports,
    check_commands,
    check_gpus,
    check_job_spec,
    check_references,
    check_pod_security,
    check_dockerfile,
    check_cluster_file,
]


def run_checks(deployment: dict) -> list[str]:
    return [p for check in CHECKS for p in check(deployment)]


def main() -> int:
    if importlib.util.find_spec("kubernetes_validate") is None:
        print(
            "note: `pip install kubernetes-validate` to also check the manifests against Kubernetes' schemas",
            file=sys.stderr,
        )
    problems = run_checks(load_deployment())
    for p in problems:
        print(p)
    print(f"{len(CHECKS)} checks, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
