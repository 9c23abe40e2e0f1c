"""Reading deploy/: the Kubernetes manifests, the `ray up` cluster file and the Dockerfile, as plain data.

The data is one dict (`load_deployment`) so that checks and tests can work on, and break, copies of it:
{"objects": [every Kubernetes object], "cluster": the ray up file, "dockerfile": [[INSTR, args], ...],
"pyproject": pyproject.toml}. The walkers below find the pods, containers and commands in it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEPLOY = Path(__file__).resolve().parent
GPU = "nvidia.com/gpu"
# The commands of the README's command table: the only words allowed after `ziya-batch`.
SUBCOMMANDS = {"run", "submit", "status", "cancel", "worker", "merge-delta", "demo-model", "serve", "bench"}
# GPUs of the instance types the manifests and the cluster file may name
GPUS_PER_INSTANCE = {"p5.48xlarge": 8, "p5e.48xlarge": 8, "p4d.24xlarge": 8, "g6e.12xlarge": 4, "g6e.48xlarge": 8}


# ---------------------------------------------------------------------------------------------- loading


def parse_dockerfile(text: str) -> list[list[str]]:
    """[[INSTRUCTION, rest-of-line], ...] with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # a comment inside a continued RUN does not end it
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        full = (buf + stripped).strip()
        buf = ""
        word, _, rest = full.partition(" ")
        out.append([word.upper(), rest.strip()])
    return out


def load_deployment(deploy_dir: Path = DEPLOY) -> dict:
    objects = []
    # the secrets' example sits outside k8s/ so that `kubectl apply -f deploy/k8s/` never overwrites real ones
    for path in sorted((deploy_dir / "k8s").glob("*.yaml")) + [deploy_dir / "secrets.example.yaml"]:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append(doc)
    return {
        "objects": objects,
        "cluster": yaml.safe_load((deploy_dir / "ray-cluster-aws.yaml").read_text()),
        "dockerfile": parse_dockerfile((deploy_dir / "Dockerfile").read_text()),
        "pyproject": tomllib.loads((deploy_dir.parent / "pyproject.toml").read_text()),
    }


# ---------------------------------------------------------------------------------------------- helpers


def objects_of(d, kind):
    return [o for o in d["objects"] if isinstance(o, dict) and o.get("kind") == kind]


def find_object(d, kind, name):
    found = [o for o in objects_of(d, kind) if o.get("metadata", {}).get("name") == name]
    return found[0] if found else None


def pod_templates(d):
    """(where, pod template, labels the pod will carry) for every pod the manifests make."""
    for kind in ("StatefulSet", "Job"):
        for o in objects_of(d, kind):
            t = o["spec"]["template"]
            yield f"{kind}/{o['metadata']['name']}", t, dict(t.get("metadata", {}).get("labels", {}))
    for rc in objects_of(d, "RayCluster"):
        name, spec = rc["metadata"]["name"], rc["spec"]
        t = spec["headGroupSpec"]["template"]
        labels = {**t.get("metadata", {}).get("labels", {}), "ray.io/cluster": name, "ray.io/node-type": "head"}
        yield f"RayCluster/{name}/head", t, labels
        for g in spec.get("workerGroupSpecs", []):
            t = g["template"]
            labels = {
                **t.get("metadata", {}).get("labels", {}),
                "ray.io/cluster": name,
                "ray.io/node-type": "worker",
                "ray.io/group": g.get("groupName"),
            }
            yield f"RayCluster/{name}/{g.get('groupName')}", t, labels
    for rj in objects_of(d, "RayJob"):
        t = rj["spec"].get("submitterPodTemplate")
        if t:
            yield f"RayJob/{rj['metadata']['name']}/submitter", t, dict(t.get("metadata", {}).get("labels", {}))


def all_containers(d):
    for where, t, labels in pod_templates(d):
        for c in t["spec"].get("initContainers", []) + t["spec"].get("containers", []):
            yield where, t, c


def ray_containers(d):
    """(where, rayStartParams, container, pod template) for the Ray container of each group."""
    for rc in objects_of(d, "RayCluster"):
        spec = rc["spec"]
        groups = [("head", spec["headGroupSpec"])] + [(g.get("groupName"), g) for g in spec.get("workerGroupSpecs", [])]
        for gname, g in groups:
            t = g["template"]
            yield f"RayCluster/{rc['metadata']['name']}/{gname}", g.get("rayStartParams", {}), t["spec"]["containers"][
                0
            ], t


def env_of(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def command_line(container) -> str:
    return " ".join(str(x) for x in container.get("command", []) + container.get("args", []))


def runtime_env_vars(rayjob) -> dict:
    return (yaml.safe_load(rayjob["spec"].get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})


def image_tag(image: str) -> str:
    return image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else "latest"


def size_bytes(quantity: str) -> int:
    """Kubernetes (4Gi, 500M) and redis.conf (3gb, 100mb) sizes in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(quantity).strip())
    if not m:
        raise ValueError(f"not a size: {quantity!r}")
    units = {
        "": 1,
        "k": 1000,
        "m": 1000**2,
        "g": 1000**3,
        "t": 1000**4,
        "ki": 1024,
        "mi": 1024**2,
        "gi": 1024**3,
        "ti": 1024**4,
        "kb": 1024,
        "mb": 1024**2,
        "gb": 1024**3,
    }
    return int(float(m.group(1)) * units[m.group(2).lower()])


def parse_redis_conf(text: str) -> dict:
    conf = {}
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if parts:
            conf[parts[0].lower()] = " ".join(parts[1:])
    return conf


def flag_value(words: list[str], name: str):
    """Value of --name VALUE or --name=VALUE in a word list."""
    for i, w in enumerate(words):
        if w == name and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None


def ziya_invocations(text: str) -> list[list[str]]:
    """Each `ziya-batch SUB ...` in a shell line, as words up to the next shell separator."""
    out = []
    for m in re.finditer(r"(?<![\w./-])ziya-batch\s+(\S+)", text):
        rest = re.split(r"\s*(?:&&|\|\||;|\||>|&)\s*", text[m.start() :])[0]
        try:
            words = shlex.split(rest)
        except ValueError:  # an unbalanced quote further on: plain words are enough to name the command
            words = rest.split()
        out.append(words[1:])
    return out


def all_command_lines(d) -> list[tuple[str, str]]:
    lines = [(where, command_line(c)) for where, _, c in all_containers(d)]
    lines += [(f"RayJob/{rj['metadata']['name']}", rj["spec"].get("entrypoint", "")) for rj in objects_of(d, "RayJob")]
    cluster = d["cluster"]
    for key in (
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "initialization_commands",
    ):
        lines += [(f"ray up/{key}", c) for c in cluster.get(key, [])]
    for tname, nt in cluster.get("available_node_types", {}).items():
        for key in ("initialization_commands", "worker_setup_commands"):
            lines += [(f"ray up/{tname}/{key}", c) for c in nt.get(key, [])]
    for instr, rest in d["dockerfile"]:
        if instr in ("CMD", "ENTRYPOINT"):
            try:
                lines.append((f"Dockerfile {instr}", " ".join(json.loads(rest))))
            except ValueError:  # shell form; check_dockerfile reports it
                lines.append((f"Dockerfile {instr}", rest))
    return lines
