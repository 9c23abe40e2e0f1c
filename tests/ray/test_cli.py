"""The ziya-batch command as a user runs it: submit, status --json, cancel, and one-line errors."""
import json
import subprocess
import sys

import yaml

from tests.processes import child_env
from ziya_batch import io


def cli(*args, env_extra=None):
    env = child_env(**(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "ziya_batch.cli", *args], capture_output=True, text=True,
                           env=env, timeout=120)


def _job(tmp_path, inputs, model="m"):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump({"name": "cli", "model": {"path": str(model)}, "input": inputs,
                                 "output": {"path": str(tmp_path / "out")}, "shard_size": 5}))
    return p


def test_submit_status_cancel(tmp_path, redis_url, demo_model):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"a{i}", "prompt": "hi"}) + "\n" for i in range(23)))
    job = _job(tmp_path, [str(inp)], demo_model)
    r = cli("submit", str(job), "--redis-url", redis_url)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert cli("submit", str(job), "--redis-url", redis_url).stdout.strip() == job_id   # same spec, same job
    st = json.loads(cli("status", job_id, "--json", "--redis-url", redis_url).stdout)
    assert st["job_id"] == job_id and st["state"] == "queued" and st["prompts_total"] == 23
    assert st["shards_total"] == 5 and st["shards"]["pending"] == 5
    listed = json.loads(cli("status", "--json", "--redis-url", redis_url).stdout)
    assert [j["job_id"] for j in listed] == [job_id]
    table = cli("status", "--redis-url", redis_url)
    assert table.returncode == 0 and job_id in table.stdout
    r = cli("cancel", job_id, "--redis-url", redis_url)
    assert r.returncode == 0 and "cancelled" in r.stdout, r.stdout + r.stderr
    manifest = io.read_manifest(str(tmp_path / "out"))
    assert manifest is not None and manifest["summary"]["state"] == "cancelled" and manifest["parts"] == {}


def test_a_resubmit_with_other_run_settings_is_the_same_job_and_says_what_changed(tmp_path, redis_url, demo_model):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"a{i}", "prompt": "hi"}) + "\n" for i in range(7)))
    job = _job(tmp_path, [str(inp)], demo_model)
    first = cli("submit", str(job), "--redis-url", redis_url)
    assert first.returncode == 0 and "resumed" not in first.stderr, first.stderr
    spec = yaml.safe_load(job.read_text())
    spec["engine"] = {"max_num_seqs": 8, "gpu_memory_fraction": 0.5}
    spec["model"]["tensor_parallel"] = 2
    job.write_text(yaml.safe_dump(spec))
    again = cli("submit", str(job), "--redis-url", redis_url)
    assert again.returncode == 0 and again.stdout.strip() == first.stdout.strip(), again.stderr
    assert ("resumed with model.tensor_parallel: 1 -> 2; engine.max_num_seqs: 256 -> 8; "
            "engine.gpu_memory_fraction: 0.9 -> 0.5") in again.stderr
    spec["sampling"] = {"temperature": 0.3}                       # what the job writes: another job, refused
    job.write_text(yaml.safe_dump(spec))
    other = cli("submit", str(job), "--redis-url", redis_url)
    assert other.returncode != 0 and other.stderr.count("\n") == 1 and "holds the parts of another job" in other.stderr


def test_unknown_job_and_missing_inputs_are_one_line_errors(tmp_path, redis_url):
    r = cli("status", "nosuchjob", "--redis-url", redis_url)
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "no job nosuchjob" in r.stderr
    r = cli("cancel", "nosuchjob", "--redis-url", redis_url)
    assert r.returncode == 4 and "Traceback" not in r.stderr
    job = _job(tmp_path, [str(tmp_path / "a.jsonl"), str(tmp_path / "b*.jsonl")])
    r = cli("submit", str(job), "--redis-url", redis_url)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "a.jsonl" in r.stderr and "b*.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_no_redis_configured_and_none_to_start_says_how(tmp_path):
    # without a URL the home's private redis-server is used (tests/ray/test_one_machine.py); here there is no
    # redis-server binary to start it with
    job = _job(tmp_path, ["x.jsonl"])
    env = child_env(PATH=str(tmp_path / "empty"), ZIYA_BATCH_HOME=str(tmp_path / "home"))
    env.pop("ZIYA_BATCH_REDIS_URL", None)
    r = subprocess.run([sys.executable, "-m", "ziya_batch.cli", "submit", str(job)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "redis-server is not installed" in r.stderr and "ZIYA_BATCH_REDIS_URL" in r.stderr


def test_missing_model_directory_is_refused_at_submit(tmp_path, redis_url):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "hi"}\n')
    r = cli("submit", str(_job(tmp_path, [str(inp)], tmp_path / "nomodel")), "--redis-url", redis_url)
    assert r.returncode == 2 and "model.path" in r.stderr and "demo-model" in r.stderr


def test_an_empty_input_completes_at_submit(tmp_path, redis_url, demo_model):
    inp = tmp_path / "empty.jsonl"
    inp.write_text("\n\n")
    r = cli("submit", str(_job(tmp_path, [str(inp)], demo_model)), "--redis-url", redis_url)
    assert r.returncode == 0, r.stderr
    st = json.loads(cli("status", r.stdout.strip(), "--json", "--redis-url", redis_url).stdout)
    assert st["state"] == "completed" and st["prompts_total"] == 0
    assert io.read_manifest(str(tmp_path / "out"))["summary"]["state"] == "completed"


def test_worker_refuses_a_preload_job_of_another_shape(tmp_path, redis_url, demo_model):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "tp2", "model": {"path": str(demo_model), "tensor_parallel": 2},
                                   "input": [str(inp)], "output": {"path": str(tmp_path / "out")}}))
    r = cli("submit", str(job), "--redis-url", redis_url)
    assert r.returncode == 0, r.stderr
    assert "tensor_parallel 2" in r.stderr                  # nobody serves that shape yet: said at submit
    r = cli("worker", "--job", r.stdout.strip(), "--redis-url", redis_url)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "tensor_parallel 2" in r.stderr and "Traceback" not in r.stderr
