"""Checks of the worker image's Dockerfile and of the `ray up` cluster file (see deploy_checks.py)."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

from deploy_files import (
    GPUS_PER_INSTANCE,
    SUBCOMMANDS,
    flag_value,
    objects_of,
    ziya_invocations,
)


def dockerfile_args(d) -> dict:
    args = {}
    for instr, rest in d["dockerfile"]:
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
    return args


def check_dockerfile(d) -> list[str]:
    problems, df = [], d["dockerfile"]
    args = dockerfile_args(d)
    instrs = [i for i, _ in df]
    first_from = next((r for i, r in df if i == "FROM"), "")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), first_from)
    if not base.startswith("nvidia/cuda:") or not re.search(
        r"ubuntu24\.04|python3\.1[12]", base + " ".join(r for _, r in df)
    ):
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
    if (
        not created
        or workdir[0] != f"/home/{user}"
        or instrs.index("USER") > len(instrs) - instrs[::-1].index("WORKDIR") - 1
    ):
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
    k8s_head_cpus = {
        rc["spec"]["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") for rc in objects_of(d, "RayCluster")
    }
    if head is not None and {str(head.get("resources", {}).get("CPU"))} != k8s_head_cpus:
        problems.append(
            f"[cluster_file] head CPU resource {head.get('resources')} differs from the RayCluster head's num-cpus {k8s_head_cpus}"
        )
    init = " ".join((head or {}).get("initialization_commands", []))
    redis_port = re.search(r"redis-server\b.*?--port (\d+)", init)
    urls = re.findall(
        r"ZIYA_BATCH_REDIS_URL=redis://[^\s:/]+:(\d+)",
        joined + " " + " ".join(cfg.get("docker", {}).get("head_run_options", [])),
    )
    if not redis_port or redis_port.group(1) == gcs_port or not urls or set(urls) != {redis_port.group(1)}:
        problems.append(
            f"[cluster_file] the head's Redis port must differ from the GCS port and match ZIYA_BATCH_REDIS_URL ({urls})"
        )
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        if flag not in init:
            problems.append(f"[cluster_file] the head's Redis lacks {flag}")
    return problems
