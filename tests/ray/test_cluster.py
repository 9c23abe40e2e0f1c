"""Two Ray nodes on one machine (`ray start --head`, then `ray start --address` with its own logical GPU):
replicas run on both; killing the second node mid-job still completes it with the exact output."""
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ziya_batch import io
from ziya_batch.queue import Broker

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    port = _free_port()
    # a throwaway cluster on loopback: no token, and a dead node is noticed within seconds
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {**os.environ, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "RAY_health_check_initial_delay_ms": "1000"}
    env.pop("RAY_ADDRESS", None)
    # a temp dir of its own: other Ray users on this machine must not find (and join) this cluster
    temp_dir = f"/tmp/zb-ray-{port}"
    # both nodes in sessions of their own (--block), so the test stops exactly its own processes
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=1", "--include-dashboard=false",
                             "--disable-usage-stats", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    second = None
    try:
        import ray
        deadline = time.time() + 90
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                assert time.time() < deadline and head.poll() is None, "the head node never came up"
                time.sleep(1)
        # the second node in a session of its own, so killing its process group is a node dying
        second = subprocess.Popen([RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                                   "--num-cpus=1", "--num-gpus=1", "--block"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.time() < deadline, "second node never joined"
            time.sleep(0.5)
        yield address, second
    finally:
        import ray
        ray.shutdown()
        for node in (second, head):
            if node is not None and node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        subprocess.run(["rm", "-rf", temp_dir])


def test_replicas_on_both_nodes_and_a_node_dying(tmp_path, demo_model, redis_url, two_nodes):
    import ray

    from ziya_batch.runtime.local import run_job

    address, second = two_nodes
    second_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and not n.get("IsHeadNode", False)
                       and n["NodeID"] != ray.get_runtime_context().get_node_id())
    inp = tmp_path / "in.jsonl"
    ids = [f"q{i}" for i in range(240)]
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"tell me about {i}"}) + "\n" for i in ids))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "two-nodes", "model": {"path": str(demo_model)}, "input": [str(inp)],
        "sampling": {"max_new_tokens": 4, "n": 1, "seed": 1}, "output": {"path": str(tmp_path / "out")},
        "shard_size": 8, "reliability": {"lease_s": 4.0, "max_retries": 5}}))
    broker = Broker.from_url(redis_url)
    seen_nodes = set()
    killed = threading.Event()

    def watch():
        # once both nodes' replicas have committed work, kill the second node
        while not killed.is_set():
            for w in broker.workers():
                seen_nodes.add((w.get("info") or {}).get("node_id"))
            if second_node in seen_nodes and len(io.committed_shards(str(tmp_path / "out"))) >= 4:
                os.killpg(second.pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    code = run_job(str(job), redis_url=redis_url, ray_address=address, progress=False)
    killed.set()
    assert code == 0
    assert second_node in seen_nodes and len(seen_nodes - {None}) == 2
    assert second.poll() is not None, "the second node was never killed mid-job"
    results = list(io.read_parts(str(tmp_path / "out"), "results"))
    assert collections.Counter(r["id"] for r in results) == collections.Counter(ids)
