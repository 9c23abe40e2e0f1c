"""Finalizing a job one of whose commits Redis accepted but whose staged parts storage lost before they were
promoted (an S3 lifecycle rule on _staging/, an operator cleaning up): the commit is taken back and the shard runs
again, instead of the job failing on a CommitError (a resubmit used to fail the same way, for good)."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from ziya_batch import io
from ziya_batch.jobs import finalize_if_ready, submit_job
from ziya_batch.queue import JobState, ShardStats
from ziya_batch.spec import parse_spec


@pytest.fixture(autouse=True)
def _no_grace(broker):
    """A lost commit is taken back at once."""
    broker.promote_grace_s = 0.0


def _job(tmp_path, broker, lines=4):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q{i}"}) + "\n"
                                               for i in range(lines)))
    spec = parse_spec({"name": "lost", "model": {"path": "/models/x"}, "input": [str(tmp_path / "in.jsonl")],
                       "output": {"path": str(tmp_path / "out")}, "shard_size": 2,
                       "reliability": {"lease_s": 30.0, "max_retries": 2}})
    return spec, submit_job(spec, broker).job_id, io.OutputDir(spec.output.path, spec.output.format)


def _stage_and_commit(broker, out, worker, tag="", lease=None):
    """ShardCommit's first two steps (stage, Redis commit), the shard's lines written as error lines that name
    `tag`. Returns (lease, stats) for the promote."""
    lease = lease or broker.claim(worker)
    st = ShardStats(prompts_done=0, prompts_failed=2)
    st.attempt = io.new_attempt()
    recs = [{"id": f"p{2 * lease.shard.index + k}", "error": {"code": "x", "tag": tag}} for k in range(2)]
    staged = out.stage(lease.shard.index, lease.token, st.attempt, {"errors": recs})
    st.parts = {k: (p.lines, p.sha256) for k, p in staged.items()}
    assert broker.commit(lease, st)
    return lease, st


def _promote(out, lease, st):
    return out.promote(lease.shard.index, lease.token, st.attempt, st.parts, stats=st.to_dict())


def _ids(out):
    return sorted(r["id"] for r in io.read_parts(out.url, "errors"))


def test_a_shard_whose_staged_parts_were_lost_runs_again_instead_of_failing_the_job(tmp_path, broker, caplog):
    spec, job_id, out = _job(tmp_path, broker)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    lease, _ = _stage_and_commit(broker, out, "w2")          # its worker dies before the promote ...
    shutil.rmtree(tmp_path / "out" / "_staging")             # ... and its staged parts are lost
    assert broker.status(job_id).state == JobState.FINALIZING
    with caplog.at_level(logging.WARNING, logger="ziya_batch.jobs.finalize"):
        assert not finalize_if_ready(broker, job_id)
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.RUNNING and st.error is None
    assert st.shards == {"pending": 1, "leased": 0, "committed": 1, "dead": 0}
    assert st.prompts_failed == 2
    assert st.errors[0]["reason"] == "parts lost" and "nothing staged" in st.errors[0]["message"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and job_id in warned[0] and "shard 1" in warned[0] and "nothing staged" in warned[0]
    assert broker.unfinished_finalizing() == []
    # the shard runs again; its commit finalizes the job
    again, st2 = _stage_and_commit(broker, out, "w3")
    assert (again.shard.index, again.token) == (1, lease.token + 1)
    _promote(out, again, st2)
    assert finalize_if_ready(broker, job_id)
    assert broker.status(job_id).state == JobState.COMPLETED
    assert sorted(io.manifest_shards(io.read_manifest(out))) == [0, 1]
    assert _ids(out) == ["p0", "p1", "p2", "p3"]


def test_a_marker_a_slow_promoter_writes_after_the_uncommit_wins(tmp_path, broker):
    """The worker's promote was slow, not dead: it writes the marker after a finalizer took the commit back. The
    run after it keeps that marker (committed output is never replaced) and discards its own staged parts."""
    spec, job_id, out = _job(tmp_path, broker)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    slow, slow_st = _stage_and_commit(broker, out, "w2", tag="slow")
    staging = tmp_path / "out" / "_staging"
    shutil.copytree(staging, tmp_path / "aside")
    shutil.rmtree(staging)
    assert not finalize_if_ready(broker, job_id)              # taken back: the shard is pending
    shutil.copytree(tmp_path / "aside", staging)              # the slow promoter's storage catches up
    assert _promote(out, slow, slow_st).token == slow.token
    again, st2 = _stage_and_commit(broker, out, "w3", tag="rerun")
    assert _promote(out, again, st2).token == slow.token      # the existing marker, not replaced
    assert not list(staging.rglob(f"part-00001.{again.token}-*"))
    assert finalize_if_ready(broker, job_id)
    tags = {r["id"]: r["error"]["tag"] for r in io.read_parts(out.url, "errors")}
    assert tags == {"p0": "", "p1": "", "p2": "slow", "p3": "slow"}


def test_a_stale_finalizer_does_not_fail_a_job_that_left_finalizing(tmp_path, broker, monkeypatch):
    """A finalizer read the job while another caller took a commit back: the shard it finds without a commit is
    not a reason to fail the job."""
    spec, job_id, out = _job(tmp_path, broker)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    lease, _ = _stage_and_commit(broker, out, "w2")
    commits = broker.commits

    def taken_back_first(j):
        # the worker's own promote failed and took the commit back just after this finalizer was elected
        assert broker.uncommit(j, lease.shard.index, lease.token, "staged results part is gone").taken_back
        return commits(j)
    monkeypatch.setattr(broker, "commits", taken_back_first)
    assert not finalize_if_ready(broker, job_id)
    st = broker.status(job_id)
    assert st.state == JobState.RUNNING and st.error is None


def test_a_finalizer_elected_after_a_take_back_and_a_rerun_fails_a_real_failure(tmp_path, broker, monkeypatch):
    """The job went finalizing -> running -> finalizing (a take-back and the rerun's commit) just before this
    finalizer's election: it is the current finalizer, and a real failure (write_manifest raising PermissionError)
    fails the job, instead of leaving it finalizing, its election held for FINALIZE_TTL_S, with no error."""
    spec, job_id, out = _job(tmp_path, broker)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    lease, st = _stage_and_commit(broker, out, "w2")
    _promote(out, lease, st)
    begin = broker.begin_finalize

    def cycle_then_begin(j, *a, **kw):
        assert broker.uncommit(j, 1, lease.token, "lost").taken_back
        _promote(out, *_stage_and_commit(broker, out, "w3"))
        return begin(j, *a, **kw)
    monkeypatch.setattr(broker, "begin_finalize", cycle_then_begin)

    def no_permission(*a, **kw):
        raise PermissionError("write denied")
    monkeypatch.setattr(io, "write_manifest", no_permission)
    with pytest.raises(PermissionError):
        finalize_if_ready(broker, job_id)
    st = broker.status(job_id)
    assert st.state == JobState.FAILED and "PermissionError: write denied" in st.error
    assert broker.client.get(broker.keys.finalizer(job_id)) is None


def test_a_cancelled_job_leaves_the_lost_shard_out_and_a_resubmit_runs_it(tmp_path, broker):
    spec, job_id, out = _job(tmp_path, broker, lines=6)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    _stage_and_commit(broker, out, "w2")                      # shard 1: its staged parts are lost
    shutil.rmtree(tmp_path / "out" / "_staging")
    assert broker.cancel(job_id).state == JobState.CANCELLED  # shard 2 never ran
    assert finalize_if_ready(broker, job_id)
    assert sorted(io.manifest_shards(io.read_manifest(out))) == [0]
    st = broker.status(job_id)
    assert st.state == JobState.CANCELLED and st.shards["pending"] == 2 and st.shards["committed"] == 1
    assert submit_job(spec, broker).state == JobState.QUEUED
    for _ in range(2):
        _promote(out, *_stage_and_commit(broker, out, "w3"))
    assert broker.claim("w3") is None
    assert finalize_if_ready(broker, job_id)
    assert broker.status(job_id).state == JobState.COMPLETED
    assert sorted(io.manifest_shards(io.read_manifest(out))) == [0, 1, 2]
    assert _ids(out) == [f"p{i}" for i in range(6)]


def test_a_job_failed_on_lost_parts_before_recovers_when_submitted_again(tmp_path, broker):
    """A job an earlier release failed ("finalizing failed: CommitError") stayed committed in Redis with no marker
    in storage, and every resubmit failed it again; now the resubmit's finalize takes the commit back."""
    spec, job_id, out = _job(tmp_path, broker)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    _stage_and_commit(broker, out, "w2")
    shutil.rmtree(tmp_path / "out" / "_staging")
    assert broker.begin_finalize(job_id)
    broker.mark_failed(job_id, "finalizing failed: CommitError: shard 1: nothing staged under token 1")
    st = submit_job(spec, broker)
    assert st.state == JobState.RUNNING and st.shards["pending"] == 1
    _promote(out, *_stage_and_commit(broker, out, "w3"))
    assert finalize_if_ready(broker, job_id)
    assert _ids(out) == ["p0", "p1", "p2", "p3"]
