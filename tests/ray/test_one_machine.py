"""One machine, every command, no Redis URL anywhere (issue 19), through real processes: two `run`s sharing the
home's one private redis-server, `status` after them and after that server was killed, its password; `serve`
alone completing an HTTP job and an OpenAI batch; `worker --address auto` joining a `ray start --head`."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis
import requests
import yaml

from tests.processes import answers_ok, child_env, stop_process, wait_for
from ziya_batch.queue.server import free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _env(home: Path, **extra) -> dict:
    env = child_env(ZIYA_BATCH_HOME=str(home), **extra)
    for name in ("ZIYA_BATCH_REDIS_URL", "RAY_ADDRESS"):
        env.pop(name, None)
    return env


def cli(env: dict, *args, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ziya_batch.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout_s)


def popen(env: dict, *args, logs: Path = None) -> subprocess.Popen:
    """The command in the background; with `logs`, its stdout and stderr go to logs.out / logs.err (a
    long-running command must not block on a full pipe)."""
    if logs is None:
        out = err = subprocess.PIPE
    else:
        out, err = open(f"{logs}.out", "w"), open(f"{logs}.err", "w")
    return subprocess.Popen([sys.executable, "-m", "ziya_batch.cli", *args], stdout=out, stderr=err, text=True,
                            env=env, start_new_session=True)


def _tail(logs: Path) -> str:
    return Path(f"{logs}.err").read_text()[-2000:]


def _job(tmp_path: Path, model, name: str, n: int) -> Path:
    inp = tmp_path / f"{name}.jsonl"
    inp.write_text("".join(json.dumps({"id": f"{name}{i}", "prompt": f"你好 {i}"}) + "\n" for i in range(n)))
    job = tmp_path / f"{name}.yaml"
    job.write_text(yaml.safe_dump({"name": name, "model": {"path": str(model)}, "input": [str(inp)],
                                   "sampling": {"max_new_tokens": 3, "seed": 1}, "shard_size": 4,
                                   "output": {"path": str(tmp_path / f"{name}-out")}}))
    return job


def _state(home: Path) -> dict:
    return json.loads((home / "redis" / "server.json").read_text())


@pytest.fixture
def home(tmp_path):
    """A ZIYA_BATCH_HOME of the test's own; its private redis-server is stopped afterwards."""
    path = tmp_path / "home"
    yield path
    cli(_env(path), "redis", "stop", "--force", timeout_s=60)


def test_two_runs_share_one_server_and_status_finds_their_jobs_after_it_restarts(tmp_path, demo_model, home):
    env = _env(home)
    runs = [popen(env, "run", str(_job(tmp_path, demo_model, name, 6)), "--quiet", "--cpu") for name in ("a", "b")]
    outs = [r.communicate(timeout=480) for r in runs]
    for r, (out, err) in zip(runs, outs):
        assert r.returncode == 0, err[-2000:]
        assert ": completed" in out
    password = (home / "redis" / "password").read_text().strip()
    port = _state(home)["url"].rsplit(":", 1)[1].split("/")[0]
    for _, err in outs:
        # one server for both, shown with its password masked
        assert f"private redis-server at redis://:***@127.0.0.1:{port}/0" in err and password not in err
    for name in ("password", "redis.conf", "server.json"):
        assert stat.S_IMODE((home / "redis" / name).stat().st_mode) == 0o600, name

    listed = json.loads(cli(env, "status", "--json").stdout)
    assert sorted((j["name"], j["state"], j["prompts_done"]) for j in listed) == [("a", "completed", 6),
                                                                                   ("b", "completed", 6)]
    table = cli(env, "status")
    assert table.returncode == 0 and all(j["job_id"] in table.stdout for j in listed)
    job_a = next(j["job_id"] for j in listed if j["name"] == "a")
    one = cli(env, "status", job_a)
    assert one.returncode == 0 and job_a in one.stdout and "completed" in one.stdout

    # no password, no queue
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=int(port), socket_timeout=5).get("zb:jobs")
    refused = cli(env, "status", "--redis-url", f"redis://127.0.0.1:{port}/0")
    assert refused.returncode == 3 and refused.stderr.count("\n") == 1 and "password" in refused.stderr
    wrong = cli(env, "status", "--redis-url", f"redis://:not-it@127.0.0.1:{port}/0")
    assert wrong.returncode == 3 and "not-it" not in wrong.stderr and "redis://:***@" in wrong.stderr

    # the server dies; the next command starts it again from its AOF (everysec: let the last second reach disk)
    time.sleep(1.5)
    old_pid = _state(home)["pid"]
    os.kill(old_pid, signal.SIGKILL)
    again = json.loads(cli(env, "status", job_a, "--json").stdout)
    assert again["state"] == "completed" and again["prompts_done"] == 6 and again["note"] is None
    assert _state(home)["pid"] != old_pid
    assert cli(env, "redis", "status").stdout.startswith(f"running: pid {_state(home)['pid']} at redis://:***@")


def test_serve_alone_runs_an_http_job_and_an_openai_batch(tmp_path, demo_model, home):
    import openai

    token = "one-machine-token-0123456789"
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    env = _env(home, ZIYA_BATCH_API_TOKEN=token, ZIYA_BATCH_ALLOWED_PREFIXES=str(data),
               ZIYA_BATCH_MODEL=str(demo_model))
    logs = tmp_path / "serve"
    server = popen(env, "serve", "--port", str(port), "--cpu", logs=logs)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        def up():
            assert server.poll() is None, _tail(logs)
            return answers_ok(f"{base}/healthz")
        wait_for(up, 120, 0.5, what="serve to answer /healthz")
        (data / "in.jsonl").write_text("".join(json.dumps({"id": f"h{i}", "prompt": "写诗"}) + "\n" for i in range(5)))
        spec = {"name": "http", "model": {"path": str(demo_model)}, "input": [str(data / "in.jsonl")],
                "sampling": {"max_new_tokens": 3}, "output": {"path": str(data / "out")}, "shard_size": 2}
        job_id = requests.post(f"{base}/v1/jobs", json=spec, headers=auth).json()["id"]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0)
        body = lambda i: {"model": "ziya", "messages": [{"role": "user", "content": f"你好 {i}"}], "max_tokens": 3}  # noqa: E731
        lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body(i)}
                 for i in range(3)]
        upload = client.files.create(file=("b.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()),
                                     purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        # nothing but `serve` runs: its own replica takes both
        st = wait_for(lambda: (lambda s: s if s["state"] in ("completed", "failed") else None)(
            requests.get(f"{base}/v1/jobs/{job_id}", headers=auth).json()), 240, 0.5, what="the HTTP job")
        assert st["state"] == "completed" and st["prompts_done"] == 5 and st["note"] is None
        done = wait_for(lambda: (lambda b: b if b.status in ("completed", "failed", "expired") else None)(
            client.batches.retrieve(batch.id)), 240, 0.5, what="the OpenAI batch")
        assert done.status == "completed" and done.request_counts.completed == 3
        out = client.files.content(done.output_file_id).text.splitlines()
        assert sorted(json.loads(x)["custom_id"] for x in out) == ["r0", "r1", "r2"]
        # the same jobs, from the command line on the same home
        assert job_id in cli(env, "status").stdout
    finally:
        stop_process(server)


def test_worker_address_auto_joins_the_local_head(tmp_path, demo_model, home):
    # a head of the test's own, found through a Ray temp dir of its own (other clusters may run on this host);
    # RAY_AUTH_MODE left unset, as a user would: the head uses ~/.ray/auth_token when there is one
    ray_tmp = tempfile.mkdtemp(prefix="zbr", dir="/tmp")          # short: Ray's socket paths are length-limited
    env = _env(home, RAY_TMPDIR=ray_tmp)
    env.pop("RAY_AUTH_MODE", None)
    port = free_port()
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                             "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        wait_for(lambda: os.path.exists(os.path.join(ray_tmp, "ray", "ray_current_cluster")), 90, 0.5, what="the head")
        job_id = cli(env, "submit", str(_job(tmp_path, demo_model, "w", 5))).stdout.strip()
        note = json.loads(cli(env, "status", job_id, "--json").stdout)["note"]
        assert note.startswith("no live worker serves tensor_parallel 1 jobs")
        logs = tmp_path / "worker"
        worker = popen(env, "worker", "--address", "auto", logs=logs)

        def finished():
            assert worker.poll() is None, _tail(logs)
            return json.loads(cli(env, "status", job_id, "--json").stdout)["state"] == "completed"
        wait_for(finished, 300, every_s=2, what="the worker to run the job")
        # a spec in Redis asking for remote model code: this worker was not started allowing it, so it refuses
        remote = _job(tmp_path, demo_model, "rc", 2)
        remote.write_text(remote.read_text().replace("model:\n", "model:\n  trust_remote_code: true\n"))
        rc_id = cli(env, "submit", str(remote)).stdout.strip()
        note = wait_for(lambda: json.loads(cli(env, "status", rc_id, "--json").stdout)["note"] or None, 120, every_s=2,
                     what="the refusal of remote code")
        assert "could load this job's engine" in note and "--allow-remote-code" in note
        assert json.loads(cli(env, "status", rc_id, "--json").stdout)["prompts_done"] == 0
        out = Path(f"{logs}.out").read_text()
        assert out.startswith("serving the queue at redis://:***@127.0.0.1:") and f":{port}; Ctrl-C stops" in out, out
    finally:
        for proc in (worker, head):
            if proc is not None:
                stop_process(proc, signal.SIGINT if proc is worker else signal.SIGTERM)
        subprocess.run(["rm", "-rf", ray_tmp])


def test_worker_with_no_cluster_says_so_in_one_line(tmp_path, home):
    ray_tmp = tempfile.mkdtemp(prefix="zbr", dir="/tmp")
    env = _env(home, RAY_TMPDIR=ray_tmp)
    r = cli(env, "worker", "--address", "127.0.0.1:1")
    subprocess.run(["rm", "-rf", ray_tmp])
    # (another cluster with a node on this host is named instead: also one line)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "127.0.0.1:1" in r.stderr, r.stderr
