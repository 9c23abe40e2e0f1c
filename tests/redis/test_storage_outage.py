"""Storage that does not answer while a worker reads a shard's input or writes its parts (an S3 endpoint down, a
connection cut, a time-out) gives the shard back untried: no retry is counted, nothing is dead-lettered, and once the
store answers again the job completes with every prompt generated. Before, each such failure counted against
reliability.max_retries, and an outage of a few seconds turned whole shards into retries_exhausted error lines. The
demo model on the CPU, a real Redis, local output with the outage injected; exact output ids."""
import collections
import json
import time

from ziya_batch import io
from ziya_batch.jobs import submit_job
from ziya_batch.queue import JobState
from ziya_batch.spec import parse_spec
from ziya_batch.work import failures
from ziya_batch.work.worker import Worker


def _job(tmp_path, model, broker, name, ids, max_retries=1, priority=0, max_new_tokens=3):
    """A job of one line a record id (`ids`), in shards of two, writing to tmp_path/out-NAME."""
    inp = tmp_path / f"{name}.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n" for i in ids))
    return submit_job(parse_spec({
        "name": name, "model": {"path": str(model)}, "input": [str(inp)], "priority": priority,
        "sampling": {"max_new_tokens": max_new_tokens, "ignore_eos": True, "seed": 1},
        "output": {"path": str(tmp_path / f"out-{name}")}, "shard_size": 2,
        "reliability": {"max_retries": max_retries}}), broker).job_id



def test_a_storage_outage_uses_no_retries_and_loses_no_prompt(tmp_path, demo_model, broker, monkeypatch):
    job = _job(tmp_path, demo_model, broker, "outage", [f"p{i}" for i in range(6)])
    monkeypatch.setattr(failures, "STORAGE_RETRY_S", 0.01)
    monkeypatch.setattr(failures, "STORAGE_RETRY_MAX_S", 0.05)
    reads, stages = [], []
    real_read, real_stage = io.read_shard, io.OutputDir.stage

    def read_shard(ref, *a, **k):
        reads.append(ref.index)
        if len(reads) <= 4:               # more failures in a row than max_retries allows
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_read(ref, *a, **k)

    def stage(self, *a, **k):
        stages.append(a[0])
        if len(stages) <= 3:
            raise type("ReadTimeoutError", (Exception,), {})('Read timeout on endpoint URL: "http://s3/b"')
        return real_stage(self, *a, **k)
    monkeypatch.setattr(io, "read_shard", read_shard)
    monkeypatch.setattr(io.OutputDir, "stage", stage)
    w = Worker(broker, worker_id="w", device="cpu")
    deadline = time.monotonic() + 120
    while broker.status(job).state != JobState.COMPLETED:
        assert time.monotonic() < deadline, broker.status(job, detail=True)
        if not w.run_once():
            time.sleep(0.02)              # the pause after each failure, and the given-back shards' backoff
    st = broker.status(job, detail=True)
    assert st.retries == 0 and st.dead_shards == 0 and st.prompts_failed == 0 and st.prompts_done == 6
    assert len(reads) >= 4 + 3 and len(stages) == 3 + 3
    given = [e for e in st.errors if e["reason"] == "given back"]
    assert given and all("storage did not answer on w: " in e["message"] for e in given)
    assert any("ConnectionResetError" in e["message"] for e in given)
    assert any("ReadTimeoutError" in e["message"] for e in given)
    (info,) = [i for i in broker.worker_infos() if i.worker_id == "w"]
    assert info.cannot_load == {}         # the engine was never the trouble: `ziya-batch run` does not stop
    got = collections.Counter(r["id"] for r in io.read_parts(str(tmp_path / "out-outage"), "results"))
    assert got == collections.Counter(f"p{i}" for i in range(6))
    assert list(io.read_parts(str(tmp_path / "out-outage"), "errors")) == []


def test_a_dead_lettered_shard_whose_input_store_does_not_answer_goes_back_instead_of_losing_its_ids(
        tmp_path, demo_model, broker, monkeypatch):
    """A dead-letter shard reads its input back for its lines' ids (dead_letter_failures). Where the input is gone
    for good it writes made-up ids (file:line); storage that only did not answer is no such case: the shard goes
    back untried, still dead, and its error lines carry the records' own ids once the store answers."""
    job = _job(tmp_path, demo_model, broker, "outage-dead", ["rec-0", "rec-1"], max_retries=0)
    assert broker.fail(broker.claim("doomed-worker"), "worker killed") == "dead"
    monkeypatch.setattr(failures, "STORAGE_RETRY_S", 0.01)
    monkeypatch.setattr(failures, "STORAGE_RETRY_MAX_S", 0.05)
    real_read, reads = io.read_shard, []

    def read_shard(ref, *a, **k):
        reads.append(ref.index)
        if len(reads) == 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_read(ref, *a, **k)
    monkeypatch.setattr(io, "read_shard", read_shard)
    w = Worker(broker, worker_id="w", device="cpu")
    deadline = time.monotonic() + 30
    while not reads:
        assert time.monotonic() < deadline
        w.run_once()
        time.sleep(0.02)
    st = broker.status(job, detail=True)
    assert st.state != JobState.COMPLETED and st.dead_shards == 1, st
    assert any(e["reason"] == "given back" and "ConnectionResetError" in e["message"] for e in st.errors)
    while broker.status(job).state != JobState.COMPLETED:
        assert time.monotonic() < deadline, broker.status(job, detail=True)
        if not w.run_once():
            time.sleep(0.02)
    errs = list(io.read_parts(str(tmp_path / "out-outage-dead"), "errors"))
    assert sorted(r["id"] for r in errs) == ["rec-0", "rec-1"]
    assert all("could not be read back" not in json.dumps(r) for r in errs)


def test_a_job_whose_store_is_away_pauses_alone_and_other_jobs_run_on(tmp_path, demo_model, broker, monkeypatch):
    away = _job(tmp_path, demo_model, broker, "away", [f"away{i}" for i in range(4)], priority=5, max_new_tokens=2)
    fine = _job(tmp_path, demo_model, broker, "fine", [f"fine{i}" for i in range(4)], max_new_tokens=2)
    # the job whose store is away (higher priority) is claimed first
    monkeypatch.setattr(failures, "STORAGE_RETRY_S", 30.0)
    staged = collections.Counter()
    real_stage = io.OutputDir.stage

    def stage(self, *a, **k):
        staged[self.url] += 1
        if "out-away" in self.url:
            raise ConnectionRefusedError(111, "Connection refused")
        return real_stage(self, *a, **k)
    monkeypatch.setattr(io.OutputDir, "stage", stage)
    w = Worker(broker, worker_id="w", device="cpu", max_in_flight=1)
    deadline = time.monotonic() + 120
    while broker.status(fine).state != JobState.COMPLETED:
        assert time.monotonic() < deadline, broker.status(fine, detail=True)
        if not w.run_once():
            time.sleep(0.02)
    # the away job's first shard was generated once and given back; within its pause none of its shards is claimed
    assert sum(n for url, n in staged.items() if "out-away" in url) == 1
    st = broker.status(away, detail=True)
    assert st.state != JobState.COMPLETED and st.retries == 0 and st.dead_shards == 0 and st.prompts_failed == 0
    assert broker.status(fine, detail=True).retries == 0
    got = collections.Counter(r["id"] for r in io.read_parts(str(tmp_path / "out-fine"), "results"))
    assert got == collections.Counter(f"fine{i}" for i in range(4))
