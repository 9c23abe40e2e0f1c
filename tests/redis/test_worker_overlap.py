"""A Worker keeps its engine busy across shard boundaries: the next shard's lines join the batch before the
shard in front of it commits. The demo model on the CPU, a real Redis, local output; each test checks the
exact output ids, in line order."""
import collections
import json
import time

import pytest

from ziya_batch import io
from ziya_batch.jobs import submit_job
from ziya_batch.queue import JobState
from ziya_batch.work.worker import Worker
from ziya_batch.spec import parse_spec

N_LINES, SHARD_SIZE, N = 40, 8, 2


def _submit(tmp_path, model, broker, lease_s=30.0):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(N_LINES)))
    # ignore_eos: every line takes all 8 steps, so a shard is still generating when the next one joins
    spec = parse_spec({"name": "overlap", "model": {"path": str(model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 8, "ignore_eos": True, "n": N, "seed": 3},
                       "output": {"path": str(tmp_path / "out")}, "shard_size": SHARD_SIZE,
                       "reliability": {"lease_s": lease_s}, "engine": {"max_num_seqs": 32}})
    return submit_job(spec, broker).job_id


def _spy_queue(monkeypatch, broker):
    """Record claims and commits in order: ("claim"|"commit", shard index, token)."""
    events, leases = [], {}
    claim, commit = broker.claim, broker.commit

    def spy_claim(worker_id, **kw):
        lease = claim(worker_id, **kw)
        if lease is not None:
            events.append(("claim", lease.shard.index, lease.token))
            leases.setdefault(lease.shard.index, lease)
        return lease

    def spy_commit(lease, stats):
        events.append(("commit", lease.shard.index, lease.token))
        return commit(lease, stats)

    monkeypatch.setattr(broker, "claim", spy_claim)
    monkeypatch.setattr(broker, "commit", spy_commit)
    return events, leases


def _assert_output(out, failed=()):
    """Every line but `failed` generated N times, in line order; `failed` as generation_failed errors."""
    results = list(io.read_parts(str(out), "results"))
    assert [(r["id"], r["sample_index"]) for r in results] == \
        [(f"p{i}", s) for i in range(N_LINES) if f"p{i}" not in failed for s in range(N)]
    errors = list(io.read_parts(str(out), "errors"))
    assert collections.Counter((e["id"], e["error"]["code"]) for e in errors) == \
        collections.Counter({(i, "generation_failed"): 1 for i in failed})


def _in_flight_peak(events) -> int:
    held, peak = set(), 0
    for kind, index, token in events:
        (held.add if kind == "claim" else held.discard)((index, token))
        peak = max(peak, len(held))
    return peak


@pytest.mark.parametrize("max_in_flight", [2, 1])
def test_next_shard_is_claimed_before_the_first_commits(tmp_path, demo_model, broker, monkeypatch, max_in_flight):
    job_id = _submit(tmp_path, demo_model, broker)
    events, _ = _spy_queue(monkeypatch, broker)
    Worker(broker, device="cpu", max_in_flight=max_in_flight).run_until_idle()
    assert broker.status(job_id).state == JobState.COMPLETED
    if max_in_flight == 2:
        assert events.index(("claim", 1, 1)) < events.index(("commit", 0, 1))
    else:                           # one shard at a time, as before: the control that the spy can tell
        assert events.index(("claim", 1, 1)) > events.index(("commit", 0, 1))
    assert _in_flight_peak(events) == max_in_flight
    assert sorted(e for e in events if e[0] == "commit") == [("commit", i, 1) for i in range(N_LINES // SHARD_SIZE)]
    _assert_output(tmp_path / "out")


def test_lost_lease_aborts_only_its_shard(tmp_path, demo_model, broker, monkeypatch, expire):
    job_id = _submit(tmp_path, demo_model, broker, lease_s=1.0)
    events, leases = _spy_queue(monkeypatch, broker)
    worker = Worker(broker, device="cpu")
    engine = worker.models.engine(broker.get_spec(job_id))
    fired, aborted = [], []
    step, abort = engine.step, engine.abort

    def spy_step():
        if not fired and set(leases) == {0, 1}:       # both shards' lines in the engine: shard 0 loses its lease
            fired.append(True)
            expire(broker, leases[0])
            assert broker.reap() == [(job_id, 0, "retry")]
            time.sleep(1.0)                            # its heartbeat (every lease_s/3) finds the lease gone
        return step()

    def spy_abort(request_id):
        aborted.append(request_id.split(":", 1)[0])
        abort(request_id)

    monkeypatch.setattr(engine, "step", spy_step)
    monkeypatch.setattr(engine, "abort", spy_abort)
    worker.run_until_idle()
    assert aborted == [f"{job_id}/0/1"] * SHARD_SIZE       # shard 0's requests, and nothing else
    assert ("commit", 0, 1) not in events and ("commit", 1, 1) in events
    commits = broker.commits(job_id)
    assert commits[0][0] == 2 and commits[1][0] == 1           # shard 0 was redone under a new lease
    assert broker.status(job_id).state == JobState.COMPLETED
    _assert_output(tmp_path / "out")


def test_failing_step_with_two_shards_in_flight_isolates_the_line(tmp_path, demo_model, broker, monkeypatch):
    job_id = _submit(tmp_path, demo_model, broker)
    poison = 12                                    # shard 1's fourth line (p11)
    worker = Worker(broker, device="cpu")
    engine = worker.models.engine(broker.get_spec(job_id))
    shards_at_failure = []
    step = engine.step

    def spy_step():
        held = [s.request_id for s in list(engine.scheduler.running) + list(engine.scheduler.waiting)]
        if any(int(r.rsplit(":", 1)[1]) == poison for r in held):
            shards_at_failure.append(len({r.split(":", 1)[0] for r in held}))
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step()

    monkeypatch.setattr(engine, "step", spy_step)
    worker.run_until_idle()
    assert shards_at_failure[0] == 2               # it failed with shards 0 and 1 in the engine together
    assert broker.status(job_id).state == JobState.COMPLETED
    _assert_output(tmp_path / "out", failed=["p11"])
    assert not engine.has_unfinished()
