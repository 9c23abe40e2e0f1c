"""An output path's parts belong to one job: a changed spec cannot adopt an unfinished job's committed parts,
and a cancelled job's manifest lists every part committed before the cancel took hold. The demo model on the
CPU, a real Redis, local output; each test checks the exact output ids."""
import json

import pytest

from ziya_batch import io
from ziya_batch.errors import SpecError
from ziya_batch.jobs import finalize_if_ready, submit_job
from ziya_batch.queue import JobState
from ziya_batch.work.worker import Worker
from ziya_batch.spec import parse_spec


def _spec(tmp_path, model, shard_size, n_lines=12):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(n_lines)))
    return parse_spec({"name": "own", "model": {"path": str(model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 4, "ignore_eos": True, "seed": 1},
                       "output": {"path": str(tmp_path / "out")}, "shard_size": shard_size})


@pytest.mark.parametrize("forget_first", [True, False])
def test_a_changed_spec_cannot_take_an_unfinished_jobs_parts(tmp_path, demo_model, broker, forget_first):
    """Job A (shard_size 2) commits 2 of its 6 shards and stops; the same spec with shard_size 4 to the same
    path is refused (it would count A's parts 0-1, lines p0-p3, as its own shards 0-1, lines p0-p7), whether
    Redis still has A or not; A itself resumes and completes with every id once."""
    a = _spec(tmp_path, demo_model, 2)
    job_a = submit_job(a, broker).job_id
    worker = Worker(broker, device="cpu", max_in_flight=1)
    worker.run_once()
    worker.run_once()
    assert sorted(io.committed_shards(str(tmp_path / "out"))) == [0, 1]
    if forget_first:
        broker.delete_job(job_a)
    with pytest.raises(SpecError, match="holds the parts of another job"):
        submit_job(_spec(tmp_path, demo_model, 4), broker)
    assert submit_job(a, broker).job_id == job_a
    Worker(broker, device="cpu").run_until_idle()
    assert broker.status(job_a).state == JobState.COMPLETED
    ids = [r["id"] for r in io.read_parts(str(tmp_path / "out"), "results")]
    assert ids == [f"p{i}" for i in range(12)]


@pytest.mark.parametrize("forget_first", [True, False])
def test_a_job_resumed_with_other_engine_settings_keeps_its_parts_and_runs_with_them(tmp_path, demo_model, broker,
                                                                                      forget_first, monkeypatch):
    """The resume after an out-of-memory: job A commits 2 of its 6 shards and stops; the same spec with a lower
    gpu_memory_fraction and max_num_seqs is job A (whether Redis still has it or not), the stored spec takes
    the new settings, and the job completes with every id once. (tensor_parallel is one of those settings too,
    tests/unit/test_spec.py; this worker runs no tensor-parallel replicas.)"""
    a = _spec(tmp_path, demo_model, 2)
    job_a = submit_job(a, broker).job_id
    worker = Worker(broker, device="cpu", max_in_flight=1)
    worker.run_once()
    worker.run_once()
    if forget_first:
        broker.delete_job(job_a)
    retuned = a.model_copy(update={"engine": a.engine.model_copy(update={"gpu_memory_fraction": 0.6,
                                                                         "max_num_seqs": 8})})
    st = submit_job(retuned, broker)
    assert st.job_id == job_a and st.shards["committed"] == 2
    stored = broker.get_spec(job_a)
    assert (stored.engine.max_num_seqs, stored.engine.gpu_memory_fraction) == (8, 0.6)
    # the worker that ran the first shards still holds the spec it read; it reads the job's spec again once that
    # is SPEC_REREAD_S old, and its next shards run with the new settings
    assert worker.spec_for(job_a).engine.max_num_seqs == a.engine.max_num_seqs
    monkeypatch.setattr("ziya_batch.work.worker.SPEC_REREAD_S", 0.0)
    assert worker.spec_for(job_a).engine.max_num_seqs == 8
    worker.max_in_flight = 4
    worker.run_until_idle()
    assert worker.models.holds(stored) and not worker.models.holds(a)     # the engine built with them
    assert broker.status(job_a).state == JobState.COMPLETED
    ids = [r["id"] for r in io.read_parts(str(tmp_path / "out"), "results")]
    assert ids == [f"p{i}" for i in range(12)]


def test_a_job_an_earlier_release_started_resumes_under_its_id(tmp_path, demo_model, broker, monkeypatch):
    """Releases until 2026-11-29 hashed every field into the job id (legacy_identity): a job one of them started
    and left unfinished resumes under that id, from Redis or from the parts in storage alone."""
    from ziya_batch.spec import JobSpec

    a = _spec(tmp_path, demo_model, 2)
    with monkeypatch.context() as m:
        m.setattr(JobSpec, "identity", JobSpec.legacy_identity)      # the earlier release
        old_id = submit_job(a, broker).job_id
        Worker(broker, device="cpu", max_in_flight=1).run_once()
    assert old_id == a.legacy_identity() != a.identity()
    # with other run settings too, while Redis holds the job (its stored spec has this spec's identity) ...
    retuned = a.model_copy(update={"engine": a.engine.model_copy(update={"max_num_seqs": 8})})
    changes = []
    st = submit_job(retuned, broker, changes=changes)
    assert changes == ["engine.max_num_seqs: 256 -> 8"]
    assert st.job_id == old_id and st.shards["committed"] == 1
    for forget in (False, True):
        if forget:
            broker.delete_job(old_id)       # ... and with the spec it was started with, from storage alone
        st = submit_job(a, broker)
        assert st.job_id == old_id and st.shards["committed"] == 1
    Worker(broker, device="cpu").run_until_idle()
    assert broker.status(old_id).state == JobState.COMPLETED
    assert io.read_manifest(str(tmp_path / "out"))["job_id"] == old_id
    ids = [r["id"] for r in io.read_parts(str(tmp_path / "out"), "results")]
    assert ids == [f"p{i}" for i in range(12)]
    assert submit_job(a, broker).job_id == old_id                    # completed: found again, not rerun


def test_a_cancelled_job_resubmitted_with_other_run_settings_reopens_with_them(tmp_path, demo_model, broker):
    a = _spec(tmp_path, demo_model, 2)
    job = submit_job(a, broker).job_id
    Worker(broker, device="cpu", max_in_flight=1).run_once()
    broker.cancel(job)
    retuned = a.model_copy(update={"engine": a.engine.model_copy(update={"gpu_memory_fraction": 0.5})})
    changes = []
    st = submit_job(retuned, broker, changes=changes)
    assert changes == ["engine.gpu_memory_fraction: 0.9 -> 0.5"]
    assert st.job_id == job and st.state == JobState.QUEUED and st.shards["committed"] == 1
    assert broker.get_spec(job).engine.gpu_memory_fraction == 0.5
    Worker(broker, device="cpu").run_until_idle()
    assert [r["id"] for r in io.read_parts(str(tmp_path / "out"), "results")] == [f"p{i}" for i in range(12)]
    changes = []
    submit_job(a, broker, changes=changes)
    assert changes == []                                             # completed: nothing to resume


def test_a_cancelled_jobs_manifest_lists_a_part_committed_as_the_cancel_took_hold(tmp_path, demo_model, broker):
    """The cancel arrives while the last running shard works; its commit moves the job to cancelled, and a
    finalize call (the `run` watcher, `ziya-batch cancel`, another worker) lands before the worker promotes
    the part: the manifest still lists that part, and the worker's own finalize call leaves it right."""
    spec = _spec(tmp_path, demo_model, 2, n_lines=4)
    job = submit_job(spec, broker).job_id
    worker = Worker(broker, device="cpu", max_in_flight=1)
    worker.run_once()                                   # shard 0 committed and promoted
    commit = broker.commit

    def cancel_then_commit(lease, stats):
        broker.cancel(job)
        ok = commit(lease, stats)
        assert broker.status(job).state == JobState.CANCELLED
        finalize_if_ready(broker, job)                  # before the worker promotes shard 1
        return ok
    broker.commit = cancel_then_commit
    worker.run_once()
    broker.commit = commit
    finalize_if_ready(broker, job)
    manifest = io.read_manifest(str(tmp_path / "out"))
    assert io.manifest_shards(manifest) == {0, 1}
    assert [r["id"] for r in io.read_parts(str(tmp_path / "out"), "results")] == ["p0", "p1", "p2", "p3"]


def test_two_workers_granted_one_token_by_a_redis_that_lost_writes_keep_their_own_staged_parts(tmp_path, demo_model,
                                                                                              broker):
    """Redis loses its last second of writes (a claim), so the shard's next claim gets the same token again:
    two live workers hold token 1. Each stages under its own attempt id, as Worker._finish does; the one whose
    commit Redis refuses discards only its own attempt, and the other's promote finds its parts: the job
    completes with the accepted worker's output, once."""
    from ziya_batch.queue import ShardStats

    spec = _spec(tmp_path, demo_model, 2, n_lines=2)
    job = submit_job(spec, broker).job_id
    keys = broker.client.keys(f"{broker.keys.prefix}:*")
    snapshot = {k: broker.client.dump(k) for k in keys}
    first = broker.claim("w1")
    for k in broker.client.keys(f"{broker.keys.prefix}:*"):      # the crash: the AOF replay lacks that claim
        broker.client.delete(k)
    for k, v in snapshot.items():
        broker.client.restore(k, 0, v)
    second = broker.claim("w2")
    assert first.token == second.token

    out = str(tmp_path / "out")

    def stage(who):
        attempt = io.new_attempt()
        recs = {"results": [{"id": f"p{i}", "sample_index": 0, "response": who} for i in range(2)], "errors": []}
        staged = io.stage_shard(out, 0, first.token, recs, attempt=attempt)
        return ShardStats(prompts_done=2, parts={k: (p.lines, p.sha256) for k, p in staged.items()}, attempt=attempt)
    s1, s2 = stage("w1"), stage("w2")
    assert broker.commit(second, s2)
    assert not broker.commit(first, s1)
    io.discard_staged(out, 0, first.token, s1.attempt)
    io.promote_shard(out, 0, second.token, s2.parts, stats=s2.to_dict(), attempt=s2.attempt)
    finalize_if_ready(broker, job)
    assert broker.status(job).state == JobState.COMPLETED
    assert [(r["id"], r["response"]) for r in io.read_parts(out, "results")] == [("p0", "w2"), ("p1", "w2")]


def test_a_completed_job_whose_output_was_deleted_runs_again(tmp_path, demo_model, broker):
    """Submitting a completed job's spec again is a no-op while its output is there; once the output has been
    deleted it runs again and writes every id (it reported completed and wrote nothing)."""
    import shutil

    spec = _spec(tmp_path, demo_model, 2, n_lines=4)
    job = submit_job(spec, broker).job_id
    Worker(broker, device="cpu").run_until_idle()
    assert broker.status(job).state == JobState.COMPLETED
    assert submit_job(spec, broker).state == JobState.COMPLETED          # output there: nothing to do
    shutil.rmtree(tmp_path / "out")
    assert submit_job(spec, broker).state != JobState.COMPLETED
    Worker(broker, device="cpu").run_until_idle()
    assert broker.status(job).state == JobState.COMPLETED
    assert [r["id"] for r in io.read_parts(str(tmp_path / "out"), "results")] == ["p0", "p1", "p2", "p3"]


def test_a_submit_opens_the_output_filesystem_once(tmp_path, demo_model, broker, monkeypatch):
    """submit_job turns output.path into a filesystem once and hands that OutputDir down (job id, owner checks,
    the claim, the committed parts), for a new job and for a resume alike."""
    from ziya_batch.io import parts

    opened = []
    real = parts.open_output_fs
    monkeypatch.setattr(parts, "open_output_fs", lambda url: opened.append(url) or real(url))
    spec = _spec(tmp_path, demo_model, 4)
    job = submit_job(spec, broker).job_id
    assert opened == [str(tmp_path / "out")]
    assert io.output_owner(str(tmp_path / "out")) == job
    Worker(broker, device="cpu", max_in_flight=1).run_once()          # one part committed, then a resume
    opened.clear()
    broker.delete_job(job)
    assert submit_job(spec, broker).job_id == job and opened == [str(tmp_path / "out")]
    assert broker.status(job).shards["committed"] == 1
