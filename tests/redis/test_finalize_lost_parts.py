"""Finalizing a job one of whose commits Redis accepted but whose staged parts storage lost before they were
promoted (an S3 lifecycle rule on _staging/, an operator cleaning up): once the grace after the commit has passed,
the finalizer takes the commit back and the shard runs again, instead of the job failing on a CommitError (a
resubmit used to fail the same way, for good). Only storage's positive answer that the parts are gone does that:
any other failure to promote fails the job as before."""
from __future__ import annotations

import json
import logging
import shutil
import time

import pytest

import ziya_batch.io.parts as parts_mod
from ziya_batch import io
from ziya_batch.jobs import finalize_if_ready, submit_job
from ziya_batch.queue import JobState, ShardStats
from ziya_batch.spec import parse_spec


@pytest.fixture(autouse=True)
def _no_grace(broker):
    """A lost commit is taken back at once, except in the test of the grace."""
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
    lease, lost = _stage_and_commit(broker, out, "w2")       # its worker dies before the promote ...
    shutil.rmtree(tmp_path / "out" / "_staging")             # ... and its staged parts are lost
    assert broker.status(job_id).state == JobState.FINALIZING
    with caplog.at_level(logging.WARNING, logger="ziya_batch.jobs.finalize"):
        assert not finalize_if_ready(broker, job_id)
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.RUNNING and st.error is None
    assert st.shards == {"pending": 1, "leased": 0, "committed": 1, "dead": 0}
    assert st.prompts_failed == 2
    assert st.errors[0]["reason"] == "parts lost"
    intent = f"_staging/part-00001.{lease.token}-{lost.attempt}.json"
    assert st.errors[0]["message"] == f"shard 1 token {lease.token}: its intent {intent} is gone"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and job_id in warned[0] and "shard 1" in warned[0] and "intent" in warned[0]
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
    """A marker of the taken-back commit written after the take-back (storage gave the discarded staging back, or
    a promoter stalled past the grace) and before the re-run's promote: the re-run keeps it (committed output is
    never replaced) and discards its own staged parts, so the output is still one attempt's, whole."""
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
    """A finalizer stalled past its election (FINALIZE_TTL_S) while the next one took a commit back: the shard it
    finds without a commit is not a reason to fail the job."""
    spec, job_id, out = _job(tmp_path, broker)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    lease, _ = _stage_and_commit(broker, out, "w2")
    commits = broker.commits

    def taken_back_first(j):
        # the finalizer elected after this one's election expired took the commit back
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
    """A cancelled job has no elected finalizer: its manifest leaves the shard out, and the commit stands until the
    finalizer of the resubmitted job takes it back."""
    spec, job_id, out = _job(tmp_path, broker, lines=6)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    lost, _ = _stage_and_commit(broker, out, "w2")            # shard 1: its staged parts are lost
    shutil.rmtree(tmp_path / "out" / "_staging")
    assert broker.cancel(job_id).state == JobState.CANCELLED  # shard 2 never ran
    assert finalize_if_ready(broker, job_id)
    assert sorted(io.manifest_shards(io.read_manifest(out))) == [0]
    st = broker.status(job_id)
    assert st.state == JobState.CANCELLED and st.shards["pending"] == 1 and st.shards["committed"] == 2
    assert broker.commits(job_id)[1][0] == lost.token
    assert submit_job(spec, broker).state == JobState.QUEUED
    _promote(out, *_stage_and_commit(broker, out, "w3"))      # shard 2; its commit finalizes ...
    assert not finalize_if_ready(broker, job_id)              # ... and takes shard 1's commit back
    again, st2 = _stage_and_commit(broker, out, "w3")
    assert again.shard.index == 1
    _promote(out, again, st2)
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


def test_a_lost_commit_is_taken_back_only_after_the_grace_and_the_sweep_tries_again_then(tmp_path, broker,
                                                                                          caplog):
    broker.promote_grace_s = 1.0
    spec, job_id, out = _job(tmp_path, broker)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    lease, st = _stage_and_commit(broker, out, "w2")
    (tmp_path / "out" / "_staging" / f"part-00001.{lease.token}-{st.attempt}.json").unlink()   # the intent is lost
    with caplog.at_level(logging.WARNING, logger="ziya_batch.jobs.finalize"):
        assert not finalize_if_ready(broker, job_id)
    # a promote of it may still be under way: the commit stands, what is left of its staging is gone, and the
    # finalizer's election ends with the grace, for the sweep
    st1 = broker.status(job_id, detail=True)
    assert st1.state == JobState.FINALIZING and st1.error is None and st1.errors == ()
    assert broker.commits(job_id)[1][0] == lease.token
    assert not list((tmp_path / "out" / "_staging").rglob("part-00001.*"))
    assert 0 < broker.client.pttl(broker.keys.finalizer(job_id)) <= 1000
    assert broker.unfinished_finalizing() == []
    assert any("runs again in 1 s" in r.getMessage() for r in caplog.records)
    time.sleep(1.05)
    assert broker.unfinished_finalizing() == [job_id]
    assert not finalize_if_ready(broker, job_id)
    st2 = broker.status(job_id, detail=True)
    assert st2.state == JobState.RUNNING and st2.shards["pending"] == 1 and st2.retries == 1
    assert "its intent" in st2.errors[0]["message"]
    again, st3 = _stage_and_commit(broker, out, "w3")
    _promote(out, again, st3)
    assert finalize_if_ready(broker, job_id)
    assert _ids(out) == ["p0", "p1", "p2", "p3"]


def test_a_staged_part_lost_with_its_intent_left_is_taken_back(tmp_path, broker):
    """A lifecycle rule deletes the oldest objects first: the parts, staged before the intent."""
    spec, job_id, out = _job(tmp_path, broker)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    lease, st = _stage_and_commit(broker, out, "w2")
    (tmp_path / "out" / "_staging" / "errors" / f"part-00001.{lease.token}-{st.attempt}.jsonl").unlink()
    assert not finalize_if_ready(broker, job_id)
    s = broker.status(job_id, detail=True)
    assert s.state == JobState.RUNNING and "its staged errors part is gone" in s.errors[0]["message"]
    assert not list((tmp_path / "out" / "_staging").rglob("part-00001.*"))
    _promote(out, *_stage_and_commit(broker, out, "w3"))
    assert finalize_if_ready(broker, job_id)
    assert _ids(out) == ["p0", "p1", "p2", "p3"]


def test_staged_parts_that_differ_from_the_commit_fail_the_job_and_are_not_taken_back(tmp_path, broker):
    """A mismatch is no loss: running the shard again would hide a bug."""
    spec, job_id, out = _job(tmp_path, broker)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    lease = broker.claim("w2")
    st = ShardStats(prompts_done=0, prompts_failed=2, attempt=io.new_attempt())
    out.stage(1, lease.token, st.attempt, {"errors": [{"id": "p2", "error": {"code": "x"}}]})
    st.parts = {"errors": (2, "0" * 64)}
    assert broker.commit(lease, st)
    with pytest.raises(io.CommitError, match="staged parts differ"):
        finalize_if_ready(broker, job_id)
    s = broker.status(job_id, detail=True)
    assert s.state == JobState.FAILED and "finalizing failed: CommitError" in s.error and "differ" in s.error
    assert s.shards["committed"] == 2 and s.retries == 0 and s.errors == ()


@pytest.mark.parametrize("where", ["promote", "check"])
def test_a_storage_error_fails_the_job_and_takes_nothing_back(tmp_path, broker, monkeypatch, where):
    """Only "not found" is evidence of a loss; a refused permission, a timeout or a 503 is not: where the promote
    (reading the intent) or the check after it (OutputDir.staged_loss, on a staged part) meets one, the job fails
    as before, its commit and staging untouched."""
    from fsspec.implementations.local import LocalFileSystem

    spec, job_id, out = _job(tmp_path, broker)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    lease, st = _stage_and_commit(broker, out, "w2")
    if where == "promote":
        denied, real = out._intent(1, lease.token, st.attempt), parts_mod.read_bytes

        def read_denied(fs, path, *a):
            if path == denied:
                raise PermissionError(13, "Access Denied", path)
            return real(fs, path, *a)
        monkeypatch.setattr(parts_mod, "read_bytes", read_denied)
    else:
        # fsspec's exists() answers False for it: the promote fails on a "gone" part the check cannot confirm
        denied, real_info = out._staged("errors", 1, lease.token, st.attempt, "jsonl"), LocalFileSystem.info

        def info_denied(fs, path, **kw):
            if path == denied:
                raise PermissionError(13, "Access Denied", path)
            return real_info(fs, path, **kw)
        monkeypatch.setattr(LocalFileSystem, "info", info_denied)
    with pytest.raises(PermissionError) as raised:
        finalize_if_ready(broker, job_id)
    # the check's error, not the promote's CommitError, where the promote got as far as the parts
    assert any(f.name == ("promote" if where == "promote" else "absent_fresh") for f in raised.traceback)
    s = broker.status(job_id, detail=True)
    assert s.state == JobState.FAILED and "PermissionError" in s.error
    assert broker.commits(job_id)[1][0] == lease.token and s.errors == ()
    assert len(list((tmp_path / "out" / "_staging").rglob(f"part-00001.{lease.token}-*"))) == 2  # errors + intent


def test_the_finalizer_stops_at_the_first_commit_it_takes_back(tmp_path, broker):
    """The take-back ends its election: it promotes nothing more, and the next commit's finalizer sees to the rest."""
    spec, job_id, out = _job(tmp_path, broker, lines=6)
    _promote(out, *_stage_and_commit(broker, out, "w1"))
    _stage_and_commit(broker, out, "w2")
    _stage_and_commit(broker, out, "w2")
    shutil.rmtree(tmp_path / "out" / "_staging")              # shards 1 and 2 lost theirs
    assert not finalize_if_ready(broker, job_id)
    st = broker.status(job_id)
    assert st.state == JobState.RUNNING and (st.shards["pending"], st.shards["committed"]) == (1, 2)
    for shard in (1, 2):
        again, st2 = _stage_and_commit(broker, out, "w3")
        assert again.shard.index == shard
        _promote(out, again, st2)
        assert finalize_if_ready(broker, job_id) is (shard == 2)
    assert broker.status(job_id).retries == 2
    assert _ids(out) == [f"p{i}" for i in range(6)]
