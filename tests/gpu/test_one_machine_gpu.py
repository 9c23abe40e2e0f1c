"""`ziya-batch serve` on a GPU machine with nothing else started (issue 19): it runs one replica per local GPU
itself, and a job submitted over HTTP completes on them. No Redis URL anywhere: the private redis-server of a
temporary ZIYA_BATCH_HOME."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch

from tests.processes import answers_ok, child_env, stop_process, wait_for


def _missing_packages() -> list[str]:
    """The service packages this test needs that are not installed (a GPU image may lack them). Without the redis
    client, `import redis` finds tests/redis as a namespace package: told by a missing attribute."""
    missing = []
    for name, attr in (("redis", "Redis"), ("ray", "init"), ("requests", "post")):
        try:
            if not hasattr(importlib.import_module(name), attr):
                missing.append(name)
        except ImportError:
            missing.append(name)
    return missing


pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(torch.cuda.is_available() and bool(_missing_packages()),
                                 reason=f"needs the service packages installed: {', '.join(_missing_packages())}")]


def _cli(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "ziya_batch.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, **kw)


def test_serve_runs_replicas_on_every_local_gpu(tmp_path):
    import requests

    from ziya_batch.queue import Broker
    from ziya_batch.queue.server import free_port
    from ziya_batch.tools.demo_model import write_demo_model

    model = write_demo_model(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jsonl").write_text("".join(json.dumps({"id": f"g{i}", "prompt": f"你好 {i}"}) + "\n"
                                           for i in range(64)))
    token, port, home = "gpu-one-machine-token-0123456789", free_port(), tmp_path / "home"
    env = child_env(ZIYA_BATCH_HOME=str(home), ZIYA_BATCH_API_TOKEN=token, ZIYA_BATCH_ALLOWED_PREFIXES=str(tmp_path))
    for name in ("ZIYA_BATCH_REDIS_URL", "RAY_ADDRESS"):
        env.pop(name, None)
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "ziya_batch.cli", "serve", "--port", str(port), "--model",
                               str(model)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        def up():
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            return answers_ok(f"{base}/healthz")
        wait_for(up, 180, 1, what="serve to answer /healthz")
        spec = {"name": "gpu", "model": {"path": str(model)}, "input": [str(data / "in.jsonl")],
                "sampling": {"max_new_tokens": 16, "n": 2}, "output": {"path": str(data / "out")}, "shard_size": 4}
        job_id = requests.post(f"{base}/v1/jobs", json=spec, headers=auth).json()["id"]
        st = wait_for(lambda: (lambda s: s if s["state"] in ("completed", "failed") else None)(
            requests.get(f"{base}/v1/jobs/{job_id}", headers=auth).json()), 300, 1, what="the job")
        assert st["state"] == "completed" and st["prompts_done"] == 64 and st["samples"] == 128
        url = json.loads((home / "redis" / "server.json").read_text())["url"]
        devices = [w.info.get("device", "") for w in Broker.from_url(url).worker_infos()]
        # one replica per GPU, each on its GPU (none on the CPU)
        assert len(devices) == torch.cuda.device_count() and all(d != "cpu" for d in devices), devices
    finally:
        stop_process(server, timeout_s=90)
        _cli(env, "redis", "stop", "--force")
