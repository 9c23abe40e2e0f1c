"""A job forgotten (`ziya-batch forget`) and submitted again, end to end with a CPU worker on the demo model: a
completed one is recorded completed from its manifest at once, running nothing and reading no input, even where
its commit markers are gone; `ziya-batch run` of its spec exits 0 without starting anything; a cancelled one resumes
from the parts it committed and ends with every line exactly once."""
from __future__ import annotations

import calendar
import collections
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.processes import child_env
from ziya_batch import io, jobs
from ziya_batch.jobs import submit_job
from ziya_batch.queue import Broker, JobState
from ziya_batch.spec import load_spec
from ziya_batch.work.worker import Worker

LINES = 12


def _job(tmp_path: Path, model: Path) -> Path:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"f{i}", "prompt": f"写一句关于{i}的话"}) + "\n" for i in range(LINES)))
    spec = {"name": "forget-me", "model": {"path": str(model)}, "input": [str(inp)], "shard_size": 3,
            "sampling": {"max_new_tokens": 4, "seed": 1}, "output": {"path": str(tmp_path / "out")}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


def _files(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of the output with its bytes and modification time (what a run that wrote anything changes)."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file()}


def _run(broker: Broker, job: Path) -> str:
    job_id = submit_job(load_spec(job), broker).job_id
    Worker(broker, device="cpu").run_until_idle()
    assert broker.status(job_id).state == JobState.COMPLETED
    return job_id


def _forgotten_completed(tmp_path, demo_model, redis_url):
    broker = Broker.from_url(redis_url)
    job = _job(tmp_path, demo_model)
    job_id = _run(broker, job)
    first = broker.status(job_id)
    assert jobs.forget_job(broker, job_id).state == "completed"
    assert broker.find_job(job_id) is None
    return broker, job, job_id, first


def test_a_completed_job_submitted_again_after_forget_runs_nothing(tmp_path, demo_model, redis_url):
    broker, job, job_id, first = _forgotten_completed(tmp_path, demo_model, redis_url)
    out = tmp_path / "out"
    before = _files(out)
    (tmp_path / "in.jsonl").unlink()            # its input is gone too: nothing may read it

    status = submit_job(load_spec(job), broker)
    assert status.job_id == job_id and status.state == JobState.COMPLETED
    assert (status.prompts_done, status.prompts_failed, status.samples, status.output_tokens, status.shards_total) == \
        (first.prompts_done, first.prompts_failed, first.samples, first.output_tokens, first.shards_total)
    assert status.prompts_total == LINES and status.shards == {"pending": 0, "leased": 0, "committed": 4, "dead": 0}
    manifest = io.read_manifest(str(out))
    written = calendar.timegm(time.strptime(manifest["written_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert status.finished_at == written                                          # finished when its manifest says
    assert broker.client.hlen(broker.keys.shards(job_id)) == 0                    # no shard records: nothing to run
    assert Worker(broker, device="cpu").run_until_idle() == 0
    assert _files(out) == before                                                  # not a byte or a time changed
    assert [s.job_id for s in broker.list_jobs()] == [job_id]
    assert submit_job(load_spec(job), broker).state == JobState.COMPLETED        # and again: found as it is
    assert jobs.forget_job(broker, job_id).shards == 4                            # a restored job is forgotten too
    assert broker.find_job(job_id) is None


def test_commit_markers_gone_still_runs_nothing(tmp_path, demo_model, redis_url):
    """The manifest is the truth: without _committed/ the job used to be rebuilt from markers it no longer had, and
    every shard ran again, writing over the committed parts."""
    broker, job, job_id, _ = _forgotten_completed(tmp_path, demo_model, redis_url)
    out = tmp_path / "out"
    shutil.rmtree(out / "_committed")
    before = _files(out)
    assert submit_job(load_spec(job), broker).state == JobState.COMPLETED
    assert Worker(broker, device="cpu").run_until_idle() == 0
    assert _files(out) == before
    assert io.verify_output(str(out)) == []


def test_run_after_forget_exits_0_at_once(tmp_path, demo_model, redis_url):
    broker, job, job_id, _ = _forgotten_completed(tmp_path, demo_model, redis_url)
    before = _files(tmp_path / "out")
    p = subprocess.run([sys.executable, "-m", "ziya_batch.cli", "run", str(job), "--redis-url", redis_url, "--quiet"],
                       capture_output=True, text=True, timeout=300, env=child_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"job {job_id}: completed" in p.stdout and f"  prompts   {LINES} done" in p.stdout
    assert "ray" not in p.stderr.lower()          # no Ray started: nothing to run
    assert _files(tmp_path / "out") == before


def test_a_cancelled_job_forgotten_resumes_from_its_committed_parts(tmp_path, demo_model, redis_url):
    broker = Broker.from_url(redis_url)
    job = _job(tmp_path, demo_model)
    job_id = submit_job(load_spec(job), broker).job_id
    Worker(broker, device="cpu", max_in_flight=1,
           on_shard_done=lambda j, i: broker.cancel(j)).run_until_idle()     # cancelled after its first commit
    status = broker.status(job_id)
    assert status.state == JobState.CANCELLED and 1 <= status.shards["committed"] < 4
    out = tmp_path / "out"
    kept = {p: v for p, v in _files(out).items() if p.startswith("results/")}
    assert jobs.forget_job(broker, job_id).state == "cancelled"

    again = submit_job(load_spec(job), broker)
    assert again.job_id == job_id and again.state == JobState.QUEUED
    assert again.shards["committed"] == status.shards["committed"]              # from its commit markers
    Worker(broker, device="cpu").run_until_idle()
    assert broker.status(job_id).state == JobState.COMPLETED
    now = _files(out)
    assert all(now[p] == v for p, v in kept.items())                             # the parts it had stayed as they were
    ids = collections.Counter(r["id"] for r in io.read_parts(str(out), "results"))
    assert ids == collections.Counter({f"f{i}": 1 for i in range(LINES)})
