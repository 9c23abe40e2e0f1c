"""A finalize that raises after a worker's commit (the output's storage broken, a marker unreadable) does not stop
the worker: it logs it and serves on (the exception ended run_once, and with it the replica)."""
import collections
import json
import logging

from ziya_batch import io, jobs
from ziya_batch.jobs import submit_job
from ziya_batch.spec import parse_spec
from ziya_batch.work.worker import Worker


def test_a_finalize_error_does_not_stop_the_worker(tmp_path, demo_model, broker, monkeypatch, caplog):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(6)))
    spec = parse_spec({"name": "fin", "model": {"path": str(demo_model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 2, "seed": 1}, "output": {"path": str(tmp_path / "out")},
                       "shard_size": 2})
    job_id = submit_job(spec, broker).job_id
    real, calls = jobs.finalize_if_ready, []

    def broken(b, job):
        calls.append(job)
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(jobs, "finalize_if_ready", broken)
    with caplog.at_level(logging.ERROR):
        Worker(broker, worker_id="w", device="cpu").run_until_idle()
    assert calls == [job_id] * 3 and "finalizing failed (OSError" in caplog.text
    assert broker.shard_counts(job_id)["committed"] == 3
    monkeypatch.setattr(jobs, "finalize_if_ready", real)
    assert real(broker, job_id)
    got = collections.Counter(r["id"] for r in io.read_parts(str(tmp_path / "out"), "results"))
    assert got == collections.Counter(f"p{i}" for i in range(6))
