"""Two Ray nodes on one machine (`ray start --head`, then `ray start --address` with its own logical GPU):
replicas run on both; killing the second node mid-job still completes it with the exact output."""
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml

from tests.processes import child_env
from ziya_batch import io
from ziya_batch.queue.server import free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
HERE = Path(__file__).resolve().parent


def _wait_nodes(address, env, n, timeout_s=90):
    probe = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        r = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise AssertionError(f"the cluster never had {n} live nodes")


@pytest.fixture
def two_nodes(tmp_path):
    port = free_port()
    # a throwaway cluster on loopback, with a temp dir of its own so no other Ray user on this machine finds
    # it; no token; a dead node is noticed within seconds
    temp_dir = f"/tmp/zb-ray-{port}"
    env = child_env(RAY_AUTH_MODE="disabled", RAY_health_check_period_ms="1000",
                    RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000")
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{port}"
    nodes = []
    try:
        # each node in a session of its own (--block): killing its process group is that node dying
        nodes.append(subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
             "--num-cpus=2", "--num-gpus=1", "--include-dashboard=false", "--disable-usage-stats", "--block"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_nodes(address, env, 1)
        nodes.append(subprocess.Popen(
            [RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=1",
             "--block"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_nodes(address, env, 2)
        yield address, nodes[1], env
    finally:
        for node in reversed(nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        subprocess.run(["rm", "-rf", temp_dir])


def test_replicas_on_both_nodes_and_a_node_dying(tmp_path, demo_model, redis_url, two_nodes):
    address, second, env = two_nodes
    inp = tmp_path / "in.jsonl"
    ids = [f"q{i}" for i in range(240)]
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"tell me about {i}"}) + "\n" for i in ids))
    job = tmp_path / "job.yaml"
    out = tmp_path / "out"
    job.write_text(yaml.safe_dump({
        "name": "two-nodes", "model": {"path": str(demo_model)}, "input": [str(inp)],
        "sampling": {"max_new_tokens": 4, "n": 1, "seed": 1}, "output": {"path": str(out)},
        "shard_size": 8, "reliability": {"lease_s": 4.0, "max_retries": 5}}))
    result = tmp_path / "result.json"
    driver = subprocess.run([sys.executable, str(HERE / "cluster_driver.py"), address, redis_url, str(job), str(out),
                             str(second.pid), str(result)], env=env, capture_output=True, text=True, timeout=420)
    assert driver.returncode == 0, driver.stderr[-3000:]
    res = json.loads(result.read_text())
    assert res["code"] == 0
    assert res["killed"], "the second node was never killed mid-job"
    assert res["second_node"] in res["nodes_seen"] and len(res["nodes_seen"]) == 2
    assert second.wait(10) is not None
    results = list(io.read_parts(str(out), "results"))
    assert collections.Counter(r["id"] for r in results) == collections.Counter(ids)


@contextlib.contextmanager
def _ray_head(env: dict, num_gpus: int, wait_env: Optional[dict] = None):
    """A `ray start --head --block` on a free port of 127.0.0.1 with its own temp dir, up once its node is listed
    (asked with wait_env, else env); yields its address; SIGKILLed with its children and its dir removed after."""
    port = free_port()
    temp_dir = f"/tmp/zb-ray-{port}"
    address = f"127.0.0.1:{port}"
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
         "--num-cpus=2", f"--num-gpus={num_gpus}", "--include-dashboard=false", "--disable-usage-stats", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_nodes(address, wait_env or env, 1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        subprocess.run(["rm", "-rf", temp_dir])


@pytest.fixture
def head_node():
    env = child_env(RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    with _ray_head(env, num_gpus=0) as address:
        yield address, env


def _submit(tmp_path, zb, demo_model, redis_url, env, name, ids, prompt, sampling):
    """Writes a JSONL of `ids` and a job spec, `ziya-batch submit`s it; returns (job id, output dir)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": prompt.format(i)}) + "\n" for i in ids))
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": name, "model": {"path": str(demo_model)}, "input": [str(inp)],
                                   "sampling": sampling, "output": {"path": str(out)}, "shard_size": 8}))
    sub = subprocess.run([zb, "submit", str(job), "--redis-url", redis_url], env=env, capture_output=True, text=True,
                         timeout=120)
    assert sub.returncode == 0, sub.stderr
    return sub.stdout.strip().splitlines()[-1], out


def _wait_completed(zb, job_id, redis_url, env, worker, timeout_s=300):
    """Polls `ziya-batch status` until the job completes (or the worker exits); asserts it completed."""
    deadline = time.time() + timeout_s
    state = None
    while time.time() < deadline and worker.poll() is None:
        st = subprocess.run([zb, "status", job_id, "--json", "--redis-url", redis_url], env=env,
                            capture_output=True, text=True)
        state = json.loads(st.stdout)["state"] if st.returncode == 0 else None
        if state == "completed":
            break
        time.sleep(2)
    assert state == "completed", (state, worker.poll())


def test_worker_command_serves_a_submitted_job_and_stops_on_sigterm(tmp_path, demo_model, redis_url, head_node):
    """`ziya-batch submit` queues a job nobody serves; `ziya-batch worker --address` on a node of the cluster
    starts its replica, which runs the job to completion; SIGTERM stops the command cleanly."""
    address, env = head_node
    zb = str(Path(sys.executable).with_name("ziya-batch"))
    ids = [f"w{i}" for i in range(30)]
    job_id, out = _submit(tmp_path, zb, demo_model, redis_url, env, "worker-cmd", ids, "what is {}?",
                          {"max_new_tokens": 4, "seed": 3})
    # RAY_ADDRESS names the head: this host already is a node of it, so the command serves from that node
    worker = subprocess.Popen([zb, "worker", "--address", address, "--redis-url", redis_url],
                              env={**env, "RAY_ADDRESS": address}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        _wait_completed(zb, job_id, redis_url, env, worker)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        log = worker.stdout.read()
        assert "serving the queue" in log
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    results = list(io.read_parts(str(out), "results"))
    assert collections.Counter(r["id"] for r in results) == collections.Counter(ids)


def test_worker_that_starts_its_own_node_stops_only_that_node(tmp_path, demo_model, redis_url, head_node):
    """`ziya-batch worker --address --start-node` starts a node of its own (with a logical GPU) on a host that
    already runs the head, serves a job from it, and on SIGTERM stops that node only: the head keeps running
    (`ray stop` would have killed it too)."""
    address, env = head_node
    zb = str(Path(sys.executable).with_name("ziya-batch"))
    ids = [f"own{i}" for i in range(24)]
    job_id, out = _submit(tmp_path, zb, demo_model, redis_url, env, "own-node", ids, "name {}",
                          {"max_new_tokens": 3, "seed": 5})
    worker = subprocess.Popen([zb, "worker", "--address", address, "--redis-url", redis_url, "--num-gpus", "1",
                               "--start-node"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        _wait_nodes(address, env, 2, timeout_s=120)
        _wait_completed(zb, job_id, redis_url, env, worker)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(90) == 0
        log = worker.stdout.read()
        assert "started by this command" in log, log[-2000:]
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    _wait_nodes(address, env, 1)          # the head answers, and only the worker's node is gone
    results = list(io.read_parts(str(out), "results"))
    assert collections.Counter(r["id"] for r in results) == collections.Counter(ids)


def test_a_killed_worker_takes_the_node_it_started_with_it(redis_url, head_node):
    """SIGKILL leaves the worker no time to stop its node: the node's `ray start` gets SIGTERM from the kernel
    when its parent dies (PR_SET_PDEATHSIG) and shuts the node down; no orphan node is left serving nothing."""
    address, env = head_node
    zb = str(Path(sys.executable).with_name("ziya-batch"))
    worker = subprocess.Popen([zb, "worker", "--address", address, "--redis-url", redis_url, "--num-gpus", "0",
                               "--start-node"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_nodes(address, env, 2, timeout_s=120)
    finally:
        worker.kill()
        worker.wait()
    _wait_nodes(address, env, 1, timeout_s=90)


def test_run_against_a_head_that_requires_rays_token(tmp_path, demo_model, redis_url):
    """README's cluster path from the head's host: `ray start --head` where ~/.ray/auth_token exists (any earlier
    `ziya-batch run` writes one) requires the token, and `run --address` must send it as `worker` does: it
    connected without it and ended in a traceback after Ray's retries."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("z" * 32)
    env = child_env(HOME=str(home))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    with _ray_head(env, num_gpus=1, wait_env={**env, "RAY_AUTH_MODE": "token"}) as address:
        ids = [f"t{i}" for i in range(20)]
        inp = tmp_path / "in.jsonl"
        inp.write_text("".join(json.dumps({"id": i, "prompt": f"say {i}"}) + "\n" for i in ids))
        out = tmp_path / "out"
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump({"name": "token", "model": {"path": str(demo_model)}, "input": [str(inp)],
                                       "sampling": {"max_new_tokens": 3, "seed": 1}, "output": {"path": str(out)},
                                       "shard_size": 8}))
        zb = str(Path(sys.executable).with_name("ziya-batch"))
        run = subprocess.run([zb, "run", str(job), "--address", address, "--redis-url", redis_url, "--quiet"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    results = list(io.read_parts(str(out), "results"))
    assert collections.Counter(r["id"] for r in results) == collections.Counter(ids)
