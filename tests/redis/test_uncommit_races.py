"""Taking a commit back (Broker.uncommit, from jobs/finalize.py) against the promoters of that commit that may still be
at work (the worker's own promote beside a finalizer's: by design, both promote one accepted token), against
storage that loses every attempt, and against storage errors that are not losses. Each test interleaves the steps
by hand, with the promoter paused at the step named; the output must hold each input id exactly once, as one
attempt wrote it, or the job must stop (failed, or waiting) with its output untouched."""
from __future__ import annotations

import collections
import json
import threading
import time

import pytest

import ziya_batch.io.parts as parts_mod
from ziya_batch import io
from ziya_batch.jobs import finalize_if_ready, submit_job
from ziya_batch.queue import JobState, ShardStats
from ziya_batch.spec import parse_spec

GRACE_S = 0.3


def _job(tmp_path, broker, lines=2, shard_size=2, max_retries=2):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q{i}"}) + "\n"
                                               for i in range(lines)))
    spec = parse_spec({"name": "races", "model": {"path": "/models/x"}, "input": [str(tmp_path / "in.jsonl")],
                       "output": {"path": str(tmp_path / "out")}, "shard_size": shard_size,
                       "reliability": {"lease_s": 30.0, "max_retries": max_retries}})
    return spec, submit_job(spec, broker).job_id, io.OutputDir(spec.output.path, spec.output.format)


def _stage_commit(broker, out, lease, ok_ids, failed_ids, tag):
    """ShardCommit's stage + Redis commit: `ok_ids` as results, `failed_ids` as error lines."""
    st = ShardStats(prompts_done=len(ok_ids), prompts_failed=len(failed_ids))
    st.attempt = io.new_attempt()
    recs = {"results": [{"id": i, "tag": tag} for i in ok_ids],
            "errors": [{"id": i, "error": {"code": "x", "tag": tag}} for i in failed_ids]}
    staged = out.stage(lease.shard.index, lease.token, st.attempt, recs)
    st.parts = {k: (p.lines, p.sha256) for k, p in staged.items()}
    assert broker.commit(lease, st)
    return st


def _promote(out, lease, st):
    return out.promote(lease.shard.index, lease.token, st.attempt, st.parts, st.to_dict())


def _ids(out):
    c = collections.Counter(r["id"] for r in io.read_parts(out.url, "results"))
    c.update(r["id"] for r in io.read_parts(out.url, "errors"))
    return c


def _tags(out):
    return {r.get("tag") or r["error"]["tag"] for kind in ("results", "errors") for r in io.read_parts(out.url, kind)}


class PausedPromote:
    """OutputDir.promote of one commit in a thread (the worker's own promote), paused at `at`: 'move' (about to move
    the results part: its errors part is moved already), 'intent_check' (every part moved, about to check the intent)
    or 'marker_put' (checked, about to write the marker)."""

    def __init__(self, monkeypatch, out, lease, st, at):
        self.paused, self.go, self.result = threading.Event(), threading.Event(), None
        results = out._staged("results", 0, lease.token, st.attempt, "jsonl")
        intent, marker = out._intent(0, lease.token, st.attempt), out._marker(0)
        real_move, real_absent, real_put = parts_mod.move_atomic, parts_mod.absent_fresh, parts_mod.put_atomic

        def gate(hit):
            if hit and threading.current_thread() is self.thread:
                self.paused.set()
                assert self.go.wait(20)

        def move(fs, src, dst):
            gate(at == "move" and src == results)
            return real_move(fs, src, dst)

        def absent(fs, path):
            gate(at == "intent_check" and path == intent)
            return real_absent(fs, path)

        def put(fs, path, data):
            gate(at == "marker_put" and path == marker)
            return real_put(fs, path, data)
        monkeypatch.setattr(parts_mod, "move_atomic", move)
        monkeypatch.setattr(parts_mod, "absent_fresh", absent)
        monkeypatch.setattr(parts_mod, "put_atomic", put)

        def run():
            try:
                self.result = _promote(out, lease, st)
            except Exception as err:  # noqa: BLE001 - the test looks at it
                self.result = err
        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.paused.wait(20)

    def resume(self):
        self.go.set()
        self.thread.join(20)
        return self.result


def _t1_stalled(tmp_path, broker, monkeypatch, at, grace_s, lost="intent"):
    """Job of one shard whose T1 is staged and committed (p0 ok, p1 failed), its own promote paused `at`
    (PausedPromote), and then part of its staging lost: the intent, or the results part. Returns (job_id, out,
    lease, stats, stalled)."""
    broker.promote_grace_s = grace_s
    _, job_id, out = _job(tmp_path, broker)
    w1 = broker.claim("w1")
    st1 = _stage_commit(broker, out, w1, ["p0"], ["p1"], "T1")
    stalled = PausedPromote(monkeypatch, out, w1, st1, at)
    staging = tmp_path / "out" / "_staging"
    if lost == "intent":
        (staging / f"part-00000.{w1.token}-{st1.attempt}.json").unlink()
    else:
        (staging / "results" / f"part-00000.{w1.token}-{st1.attempt}.jsonl").unlink()
    return job_id, out, w1, st1, stalled


@pytest.mark.parametrize("at,fault", [("move", "intent_lost"), ("move", "part_lost"),
                                      ("intent_check", "intent_lost")])
def test_a_promoter_of_the_taken_back_commit_that_resumes_after_the_rerun_changes_nothing(tmp_path, broker,
                                                                                           monkeypatch, at, fault):
    """The worker's promote of T1 stalls past the grace; storage lost part of T1's staging meanwhile; the finalizer
    discards the rest and takes the commit back; T2 runs and is promoted; then T1's promoter carries on. It finds
    nothing to move, or no intent, and writes nothing: the output is T2's, whole."""
    job_id, out, w1, _, stalled = _t1_stalled(tmp_path, broker, monkeypatch, at, GRACE_S,
                                              "intent" if fault == "intent_lost" else "results")
    time.sleep(GRACE_S)
    assert not finalize_if_ready(broker, job_id)
    assert broker.status(job_id).state == JobState.RUNNING              # taken back
    assert not list((tmp_path / "out" / "_staging").rglob(f"part-00000.{w1.token}-*"))
    # the rerun: T2 gets the opposite outcome per line (p0 failed, p1 ok), commits and promotes in full
    w2 = broker.claim("w2")
    assert w2.shard.index == 0 and w2.token == w1.token + 1
    st2 = _stage_commit(broker, out, w2, ["p1"], ["p0"], "T2")
    assert _promote(out, w2, st2).token == w2.token
    late = stalled.resume()
    assert isinstance(late, io.CommitError), late
    assert out.read_marker(0).token == w2.token
    assert finalize_if_ready(broker, job_id)
    assert io.verify_output(out.url) == []
    assert _ids(out) == collections.Counter(["p0", "p1"]) and _tags(out) == {"T2"}
    st = broker.status(job_id)
    assert (st.state, st.prompts_done, st.prompts_failed, st.retries) == (JobState.COMPLETED, 1, 1, 1)


def test_a_promoter_paused_before_its_marker_write_is_waited_for(tmp_path, broker, monkeypatch):
    """Storage lost T1's intent after T1's promoter checked it and before it wrote the marker. Within the grace the
    finalizer takes nothing back: the promoter finishes, and the job completes with T1's output."""
    job_id, out, w1, _, stalled = _t1_stalled(tmp_path, broker, monkeypatch, "marker_put", 300.0)
    assert not finalize_if_ready(broker, job_id)
    assert broker.status(job_id).state == JobState.FINALIZING and broker.commits(job_id)[0][0] == w1.token
    assert stalled.resume().token == w1.token
    broker.client.delete(broker.keys.finalizer(job_id))      # the finalizer's election ends with the grace
    assert finalize_if_ready(broker, job_id)
    assert io.verify_output(out.url) == []
    assert _ids(out) == collections.Counter(["p0", "p1"]) and _tags(out) == {"T1"}
    assert broker.status(job_id).retries == 0


@pytest.mark.xfail(strict=True, reason="the window storage without conditional writes leaves: a promoter stalled "
                                       "longer than the grace between its intent check and its marker write")
def test_a_promoter_stalled_past_the_grace_before_its_marker_write(tmp_path, broker, monkeypatch):
    job_id, out, _, _, stalled = _t1_stalled(tmp_path, broker, monkeypatch, "marker_put", 0.0)
    assert not finalize_if_ready(broker, job_id)
    w2 = broker.claim("w2")
    _promote(out, w2, _stage_commit(broker, out, w2, ["p1"], ["p0"], "T2"))
    stalled.resume()                                         # T1's marker over T2's, naming T2's parts
    assert finalize_if_ready(broker, job_id)
    assert io.verify_output(out.url) == []


@pytest.mark.parametrize("where", ["worker", "finalizer"])
def test_a_transient_commit_error_is_not_lost_data(tmp_path, broker, monkeypatch, where):
    """fs.exists answering False once (fsspec's AbstractFileSystem.exists returns False for any exception: a
    timeout, a 503) fails a promote although every staged object is intact. The worker's promote leaves the commit
    to the finalizer; the finalizer's asks storage, finds it all there and promotes again. Nothing is taken back."""
    broker.promote_grace_s = 0.0
    spec, job_id, out = _job(tmp_path, broker)
    lease = broker.claim("w")
    st = _stage_commit(broker, out, lease, ["p0", "p1"], [], "T1")
    real_exists, once = parts_mod.exists_fresh, []

    def flaky_exists(fs, path):
        if not once:
            once.append(path)
            return False
        return real_exists(fs, path)
    monkeypatch.setattr(parts_mod, "exists_fresh", flaky_exists)
    if where == "worker":
        with pytest.raises(io.CommitError, match="part is gone"):
            _promote(out, lease, st)                         # ShardCommit logs it and reports the shard not done
    assert finalize_if_ready(broker, job_id)
    assert once
    s = broker.status(job_id, detail=True)
    assert (s.state, s.retries, s.errors) == (JobState.COMPLETED, 0, ())
    assert out.read_marker(0).token == lease.token
    assert _ids(out) == collections.Counter(["p0", "p1"]) and io.verify_output(out.url) == []


@pytest.mark.parametrize("max_retries", [0, 2])
def test_parts_lost_on_every_attempt_fail_the_job_after_max_retries_reruns(tmp_path, broker, max_retries):
    """Storage that loses every attempt's staged parts (a 0-day lifecycle rule on _staging/, a cleanup job): each
    loss runs the shard again, counted in the job's retries, until there have been max_retries re-runs; the next
    loss fails the job, naming the staging folder."""
    broker.promote_grace_s = 0.0
    spec, job_id, out = _job(tmp_path, broker, max_retries=max_retries)
    rounds = 0
    for _ in range(10):
        lease = broker.claim("w")
        if lease is None:
            break
        rounds += 1
        _stage_commit(broker, out, lease, ["p0", "p1"], [], "x")
        for p in (tmp_path / "out" / "_staging").rglob(f"part-00000.{lease.token}-*"):
            p.unlink()                       # lost before the promote
        assert not finalize_if_ready(broker, job_id)
    st = broker.status(job_id, detail=True)
    assert rounds == max_retries + 1
    assert st.state == JobState.FAILED and st.retries == max_retries
    times = "once" if rounds == 1 else f"{rounds} times"
    assert st.error == (f"shard 0: its staged parts disappeared from storage {times} before they could be promoted; "
                        f"check lifecycle rules or cleanup jobs on {tmp_path / 'out'}/_staging/")
    assert [e["outcome"] for e in st.errors] == ["failed"] + ["retry"] * max_retries
    assert io.read_manifest(out) is None and io.committed_shards(out.url) == {}


def test_hostile_uncommit_arguments_are_refused_or_bounded(tmp_path, broker):
    """An unknown job, a repeated uncommit, a huge reason, a token that is not a number."""
    broker.promote_grace_s = 0.0
    assert broker.uncommit("0123456789abcdef", 0, 1, "x").outcome == "refused"
    assert not broker.client.exists(broker.keys.job("0123456789abcdef"))      # no zombie job hash
    spec, job_id, out = _job(tmp_path, broker)
    lease = broker.claim("w")
    st = _stage_commit(broker, out, lease, ["p0", "p1"], [], "a")
    assert broker.uncommit(job_id, 0, "1; DROP", "x").outcome == "refused"
    assert broker.uncommit(job_id, -1, lease.token, "x").outcome == "refused"
    assert broker.uncommit(job_id, 0, lease.token, "r" * 5_000_000, st.attempt, "c").outcome == "retry"
    assert broker.uncommit(job_id, 0, lease.token, "again", st.attempt).outcome == "refused"
    assert len(broker.status(job_id, detail=True).errors[0]["message"]) == 2000
    h = broker.client.hgetall(broker.keys.job(job_id))
    assert (h["n_committed"], h["n_pending"], h["prompts_done"]) == ("0", "1", "0")


def test_a_real_worker_whose_parts_are_always_lost_fails_the_job_after_max_retries(tmp_path, demo_model, broker,
                                                                                     monkeypatch):
    """End to end: a Worker (demo model) against storage that loses every staged attempt of shard 0; its finalize
    sweep takes each commit back, until the job fails."""
    from ziya_batch.work import worker as worker_module
    from ziya_batch.work.worker import Worker

    monkeypatch.setattr(worker_module, "FINALIZE_SWEEP_S", 0.0)
    broker.promote_grace_s = 0.0
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q {i}"}) + "\n" for i in range(2)))
    out = tmp_path / "out"
    spec = parse_spec({"name": "loop", "model": {"path": str(demo_model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 2, "seed": 1}, "output": {"path": str(out)},
                       "shard_size": 2, "reliability": {"max_retries": 1}})
    job_id = submit_job(spec, broker).job_id
    commit, generated = broker.commit, []

    def commit_then_lose(lease, stats):
        ok = commit(lease, stats)
        generated.append(lease.token)
        for p in out.glob(f"_staging/**/part-00000.{lease.token}-*"):
            p.unlink()
        return ok
    monkeypatch.setattr(broker, "commit", commit_then_lose)
    w = Worker(broker, worker_id="w", device="cpu")
    for _ in range(12):
        w.run_once()
    st = broker.status(job_id)
    assert generated == [1, 2]
    assert st.state == JobState.FAILED and st.retries == 1
    assert st.error.startswith("shard 0: its staged parts disappeared from storage 2 times")
