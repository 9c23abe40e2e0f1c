"""Fault tests with real processes. Each ends by checking the exact multiset of output ids: nothing lost,
nothing duplicated. Workers are real OS processes running the production Worker (tests/ray/fault_worker.py
injects one fault each); Redis is a real private redis-server with AOF."""
import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.processes import child_env, wait_for
from ziya_batch import io
from ziya_batch.jobs import submit_job
from ziya_batch.queue import Broker, JobState, PrivateRedis
from ziya_batch.spec import load_spec

pytestmark = pytest.mark.slow


def make_job(tmp_path, model, n_lines=60, shard_size=10, lease_s=3.0, max_retries=3, poison_text=None):
    inp = tmp_path / "in.jsonl"
    ids = [f"p{i}" for i in range(n_lines)]
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n" for i in ids))
    spec = {"name": "faults", "model": {"path": str(model)}, "input": [str(inp)],
            "sampling": {"max_new_tokens": 2, "n": 2, "seed": 3}, "output": {"path": str(tmp_path / "out")},
            "shard_size": shard_size, "reliability": {"lease_s": lease_s, "max_retries": max_retries},
            "engine": {"max_num_seqs": 32}}
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p, ids


def spawn(cmd, serve=False):
    env = child_env()
    if serve:
        env["FAULT_WORKER_SERVE"] = "1"
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def finish(broker, job_id, cmd, timeout_s=180):
    """Serve with a clean worker process until the job completes."""
    w = spawn(cmd, serve=True)
    try:
        wait_for(lambda: broker.status(job_id).state == JobState.COMPLETED, timeout_s, what="job completion")
    finally:
        stop(w)


def assert_exact_output(out: Path, ids, n=2, errors=()):
    results = list(io.read_parts(str(out), "results"))
    assert collections.Counter((r["id"], r["sample_index"]) for r in results) == \
        collections.Counter({(i, s): 1 for i in ids for s in range(n)})
    errs = list(io.read_parts(str(out), "errors"))
    assert collections.Counter(e["id"] for e in errs) == collections.Counter(errors)
    manifest = json.loads((out / "manifest.json").read_text())
    for rows in manifest["parts"].values():
        for part in rows:
            import hashlib
            assert hashlib.sha256((out / part["path"]).read_bytes()).hexdigest() == part["sha256"]
    return manifest


def leased(broker, job_id):
    return broker.shard_counts(job_id).get("leased", 0)


def committed(broker, job_id):
    return broker.shard_counts(job_id).get("committed", 0)


def test_sigkill_worker_mid_shard(tmp_path, demo_model, redis_url, fault_worker_cmd):
    job, ids = make_job(tmp_path, demo_model)
    broker = Broker.from_url(redis_url)
    job_id = submit_job(load_spec(job), broker).job_id
    w = spawn(fault_worker_cmd(redis_url))
    wait_for(lambda: leased(broker, job_id) >= 1, what="a leased shard")
    w.send_signal(signal.SIGKILL)
    w.wait()
    finish(broker, job_id, fault_worker_cmd(redis_url))
    assert_exact_output(tmp_path / "out", ids)
    st = broker.status(job_id)
    assert st.retries >= 1 and st.lease_expiries >= 1       # the killed worker's lease ran out


@pytest.mark.parametrize("fault", ["die_after_stage", "die_after_commit"])
def test_worker_dies_between_part_and_ack(tmp_path, demo_model, redis_url, fault_worker_cmd, fault):
    job, ids = make_job(tmp_path, demo_model)
    broker = Broker.from_url(redis_url)
    job_id = submit_job(load_spec(job), broker).job_id
    w = spawn(fault_worker_cmd(redis_url, fault))
    assert w.wait(120) == -signal.SIGKILL
    if fault == "die_after_commit":
        assert committed(broker, job_id) == 1 and not io.committed_shards(str(tmp_path / "out"))
    else:
        assert committed(broker, job_id) == 0
    finish(broker, job_id, fault_worker_cmd(redis_url))
    assert_exact_output(tmp_path / "out", ids)


def test_paused_worker_past_its_lease_cannot_commit(tmp_path, demo_model, redis_url, fault_worker_cmd):
    job, ids = make_job(tmp_path, demo_model, n_lines=20, shard_size=20, lease_s=2.0)
    broker = Broker.from_url(redis_url)
    job_id = submit_job(load_spec(job), broker).job_id
    a = spawn(fault_worker_cmd(redis_url))
    wait_for(lambda: leased(broker, job_id) == 1, what="worker A's lease")
    a.send_signal(signal.SIGSTOP)
    time.sleep(5)                                   # well past the 2 s lease
    finish(broker, job_id, fault_worker_cmd(redis_url))
    manifest_before = (tmp_path / "out" / "manifest.json").read_bytes()
    a.send_signal(signal.SIGCONT)                   # A wakes with a stale lease and tries to go on
    a.wait(120)
    assert_exact_output(tmp_path / "out", ids)
    assert (tmp_path / "out" / "manifest.json").read_bytes() == manifest_before
    marker = io.committed_shards(str(tmp_path / "out"))[0]
    assert marker.token >= 2                         # the second owner's parts, not A's


def test_sigkill_redis_mid_job_and_restart_from_aof(tmp_path, demo_model, redis_server, fault_worker_cmd):
    job, ids = make_job(tmp_path, demo_model, n_lines=80, shard_size=8)
    broker = Broker.from_url(redis_server.url)
    job_id = submit_job(load_spec(job), broker).job_id
    workers = [spawn(fault_worker_cmd(redis_server.url), serve=True) for _ in range(2)]
    try:
        wait_for(lambda: committed(broker, job_id) >= 2, what="two committed shards")
        port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
        os.kill(redis_server.pid, signal.SIGKILL)
        time.sleep(2)
        restarted = PrivateRedis(redis_server.base_dir, port=port)
        assert restarted.start() == redis_server.url and not restarted.reused
        redis_server.pid = restarted.pid
        wait_for(lambda: broker.status(job_id).state == JobState.COMPLETED, 240, what="completion after restart")
    finally:
        for w in workers:
            stop(w)
    assert_exact_output(tmp_path / "out", ids)


def _stopped(proc) -> bool:
    with open(f"/proc/{proc.pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_redis_away_when_a_worker_commits_is_waited_out(tmp_path, demo_model, redis_server, fault_worker_cmd):
    # max_retries 0: a shard counted as failed once is dead-lettered, its prompts written as error lines
    job, ids = make_job(tmp_path, demo_model, n_lines=20, shard_size=10, lease_s=5.0, max_retries=0)
    broker = Broker.from_url(redis_server.url)
    job_id = submit_job(load_spec(job), broker).job_id
    w = spawn(fault_worker_cmd(redis_server.url, "stop_after_stage"), serve=True)
    try:
        wait_for(lambda: _stopped(w), 120, every_s=0.05, what="the worker stopped between staging and committing")
        port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
        os.kill(redis_server.pid, signal.SIGKILL)
        w.send_signal(signal.SIGCONT)               # its commit meets a Redis that does not answer
        time.sleep(2)
        restarted = PrivateRedis(redis_server.base_dir, port=port)
        assert restarted.start() == redis_server.url and not restarted.reused
        redis_server.pid = restarted.pid
        wait_for(lambda: broker.status(job_id).state.is_finished(), 120, what="the job's end")
    finally:
        stop(w)
    # the same worker committed both shards once Redis answered: nothing counted as failed, nothing run twice
    st = broker.status(job_id)
    assert st.state == JobState.COMPLETED and st.retries == 0 and st.lease_expiries == 0 and st.dead_shards == 0
    assert_exact_output(tmp_path / "out", ids, n=2)
    assert {m.token for m in io.committed_shards(str(tmp_path / "out")).values()} == {1}


def test_redis_failing_over_when_a_worker_commits_is_waited_out(tmp_path, demo_model, redis_server,
                                                                fault_worker_cmd):
    # the worker's Redis is demoted to a replica (as a failover does to the old primary) while its commit is due:
    # writes answer READONLY until it is primary again. max_retries 0: a shard counted as failed is dead-lettered
    import redis

    from ziya_batch.queue.server import free_port

    job, ids = make_job(tmp_path, demo_model, n_lines=20, shard_size=10, lease_s=5.0, max_retries=0)
    broker = Broker.from_url(redis_server.url)
    admin = redis.Redis.from_url(redis_server.url)
    job_id = submit_job(load_spec(job), broker).job_id
    w = spawn(fault_worker_cmd(redis_server.url, "stop_after_stage"), serve=True)
    try:
        wait_for(lambda: _stopped(w), 120, every_s=0.05, what="the worker stopped between staging and committing")
        admin.replicaof("127.0.0.1", free_port())   # a primary nobody answers at: writes refused, data kept
        w.send_signal(signal.SIGCONT)               # its commit meets READONLY
        time.sleep(2)
        admin.replicaof("NO", "ONE")
        wait_for(lambda: broker.status(job_id).state.is_finished(), 120, what="the job's end")
    finally:
        stop(w)
        admin.replicaof("NO", "ONE")
    st = broker.status(job_id)
    assert st.state == JobState.COMPLETED and st.retries == 0 and st.lease_expiries == 0 and st.dead_shards == 0
    assert_exact_output(tmp_path / "out", ids, n=2)
    assert {m.token for m in io.committed_shards(str(tmp_path / "out")).values()} == {1}


def test_sigkill_run_and_run_again(tmp_path, demo_model):
    job, ids = make_job(tmp_path, demo_model, n_lines=120, shard_size=10)
    env = child_env(ZIYA_BATCH_HOME=str(tmp_path / "home"))
    env.pop("ZIYA_BATCH_REDIS_URL", None)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "ziya_batch.cli", "run", str(job), "--quiet"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    out = tmp_path / "out"
    try:
        wait_for(lambda: len(io.committed_shards(str(out))) >= 2, 240, what="two committed shards")
    finally:
        os.killpg(first.pid, signal.SIGKILL)      # the run process and the local Ray it started
        first.wait()
    assert not (out / "manifest.json").exists()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    server = PrivateRedis(tmp_path / "home" / "redis")
    try:
        assert second.returncode == 0, second.stderr[-2000:]
        assert "completed" in second.stdout
        assert_exact_output(out, ids)
    finally:
        server.start()
        server.stop()


def test_poison_line_that_kills_the_worker_process(tmp_path, demo_model, redis_url, fault_worker_cmd):
    job, ids = make_job(tmp_path, demo_model, n_lines=30, shard_size=10, lease_s=2.0, max_retries=3)
    broker = Broker.from_url(redis_url)
    job_id = submit_job(load_spec(job), broker).job_id
    poison_line = 14                                 # shard 1, line 4 within it
    deadline = time.time() + 300
    deaths = 0
    while broker.status(job_id).state != JobState.COMPLETED:
        assert time.time() < deadline, "job never completed"
        w = spawn(fault_worker_cmd(redis_url, "exit_on_poison", str(poison_line)), serve=True)
        while w.poll() is None and broker.status(job_id).state != JobState.COMPLETED:
            time.sleep(0.2)
        stop(w)
        deaths += w.returncode == 3
    assert deaths >= 2                               # the whole-shard attempt, then the line alone
    good = [i for i in ids if i != f"p{poison_line - 1}"]
    assert_exact_output(tmp_path / "out", good, errors=[f"p{poison_line - 1}"])
    err = next(io.read_parts(str(tmp_path / "out"), "errors"))
    assert err["error"]["code"] == "retries_exhausted" and err["line"] == poison_line


def test_two_workers_racing(tmp_path, demo_model, redis_url, fault_worker_cmd):
    job, ids = make_job(tmp_path, demo_model, n_lines=64, shard_size=4)
    broker = Broker.from_url(redis_url)
    job_id = submit_job(load_spec(job), broker).job_id
    ws = [spawn(fault_worker_cmd(redis_url), serve=True) for _ in range(2)]
    try:
        wait_for(lambda: broker.status(job_id).state == JobState.COMPLETED, 240, what="completion")
    finally:
        for w in ws:
            stop(w)
    assert_exact_output(tmp_path / "out", ids)
