"""A job whose shards are all committed but that nobody finalizes is finished by any worker's loop: the worker that
committed the last shard died before it wrote the manifest (between its Redis commit and its promote), or the
finalizer died and its election expired. Before, in a cluster (submit + workers) such a job stayed `finalizing`
with no manifest until someone resubmitted it."""
from __future__ import annotations

import json

from ziya_batch import io
from ziya_batch.jobs import finalize_if_ready, submit_job
from ziya_batch.queue import JobState, ShardStats
from ziya_batch.spec import parse_spec
from ziya_batch.work import worker as worker_module
from ziya_batch.work.worker import Worker


def _job(tmp_path, broker):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q{i}"}) + "\n"
                                               for i in range(4)))
    spec = parse_spec({"name": "sweep", "model": {"path": "/models/x"}, "input": [str(tmp_path / "in.jsonl")],
                       "output": {"path": str(tmp_path / "out")}, "shard_size": 2,
                       "reliability": {"lease_s": 30.0, "max_retries": 2}})
    return spec, submit_job(spec, broker).job_id, io.OutputDir(spec.output.path, spec.output.format)


def _commit(broker, out, job_id, worker, promote: bool) -> None:
    """ShardCommit's steps (stage, Redis commit, promote, finalize), stopping after the Redis commit where the
    worker is killed there."""
    lease = broker.claim(worker)
    st = ShardStats(prompts_done=0, prompts_failed=2)
    st.attempt = io.new_attempt()
    recs = [{"id": f"p{2 * lease.shard.index + k}", "error": {"code": "x"}} for k in range(2)]
    staged = out.stage(lease.shard.index, lease.token, st.attempt, {"errors": recs})
    st.parts = {k: (p.lines, p.sha256) for k, p in staged.items()}
    assert broker.commit(lease, st)
    if promote:
        out.promote(lease.shard.index, lease.token, st.attempt, st.parts, stats=st.to_dict())
        assert not finalize_if_ready(broker, job_id)      # the other shard is still open


def test_a_job_whose_last_committer_died_is_finalized_by_another_worker(tmp_path, broker, monkeypatch):
    spec, job_id, out = _job(tmp_path, broker)
    _commit(broker, out, job_id, "w1", promote=True)
    _commit(broker, out, job_id, "w2", promote=False)        # killed after its Redis commit: nobody finalizes
    assert broker.status(job_id).state == JobState.FINALIZING
    assert broker.unfinished_finalizing() == [job_id]
    w3 = Worker(broker, worker_id="w3", device="cpu")
    assert not w3.run_once()                                 # nothing to claim; the sweep finalizes
    assert broker.status(job_id).state == JobState.COMPLETED
    manifest = io.read_manifest(out)
    assert sorted(io.manifest_shards(manifest)) == [0, 1]
    ids = sorted(r["id"] for r in io.read_parts(out.url, "errors"))
    assert ids == ["p0", "p1", "p2", "p3"]
    assert broker.unfinished_finalizing() == []


def test_a_finalizer_that_died_is_replaced_once_its_election_expires(tmp_path, broker, monkeypatch):
    spec, job_id, out = _job(tmp_path, broker)
    _commit(broker, out, job_id, "w1", promote=True)
    _commit(broker, out, job_id, "w2", promote=False)
    assert broker.begin_finalize(job_id)                     # the finalizer elected now dies
    monkeypatch.setattr(worker_module, "FINALIZE_SWEEP_S", 0.0)
    w3 = Worker(broker, worker_id="w3", device="cpu")
    w3.run_once()
    assert broker.status(job_id).state == JobState.FINALIZING    # its election holds (FINALIZE_TTL_S) ...
    broker.client.delete(broker.keys.finalizer(job_id))          # ... until it expires
    w3.run_once()
    assert broker.status(job_id).state == JobState.COMPLETED
    assert sorted(io.manifest_shards(io.read_manifest(out))) == [0, 1]
