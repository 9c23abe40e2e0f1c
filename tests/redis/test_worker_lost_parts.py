"""A worker whose staged parts storage loses between its Redis commit and its promote leaves the commit standing; the
job's finalizer takes it back once the grace after the commit has passed (found by the workers' finalize sweep),
the shard runs again (here on the same worker), nothing is marked failed, and the job completes with every input
line exactly once."""
import collections
import json
import logging

from ziya_batch import io
from ziya_batch.jobs import submit_job
from ziya_batch.queue import JobState
from ziya_batch.spec import parse_spec
from ziya_batch.work import worker as worker_module
from ziya_batch.work.worker import Worker


def test_staged_parts_lost_before_the_promote_are_generated_again(tmp_path, demo_model, broker, monkeypatch,
                                                                   caplog):
    monkeypatch.setattr(worker_module, "FINALIZE_SWEEP_S", 0.0)
    inp = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) for i in range(6)] + ["{not json"]
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    spec = parse_spec({"name": "lost", "model": {"path": str(demo_model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 2, "seed": 1}, "output": {"path": str(out)},
                       "shard_size": 3})
    job_id = submit_job(spec, broker).job_id
    commit, lost = broker.commit, []

    def commit_then_lose_parts(lease, stats):
        ok = commit(lease, stats)
        if ok and lease.shard.index == 1 and not lost:
            # the staged parts (not the intent) are gone between the Redis commit and the promote
            lost.extend(out.glob(f"_staging/*/part-00001.{lease.token}-*"))
            for path in lost:
                path.unlink()
        return ok
    monkeypatch.setattr(broker, "commit", commit_then_lose_parts)
    w = Worker(broker, worker_id="w", device="cpu")
    with caplog.at_level(logging.WARNING):
        w.run_until_idle()
        assert lost
        # within the grace (PROMOTE_GRACE_S) a promote of the commit may still be under way: it stands
        st = broker.status(job_id, detail=True)
        assert st.state == JobState.FINALIZING and st.errors == ()
        assert broker.commits(job_id)[1][0] == 1
        # the grace passes (here: made 0), and with it the finalizer's election; the sweep takes the commit back
        broker.promote_grace_s = 0.0
        broker.client.delete(broker.keys.finalizer(job_id))
        w.run_until_idle()
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.COMPLETED and st.error is None
    assert (st.prompts_done, st.prompts_failed, st.retries) == (6, 1, 1)
    assert [e["reason"] for e in st.errors] == ["parts lost"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    warned = [r.getMessage() for r in caplog.records if "shard 1" in r.getMessage() or "/1:" in r.getMessage()]
    assert len(warned) == 3, warned
    assert "could not be moved into place" in warned[0] and "part is gone" in warned[0]        # the worker
    assert "it runs again in" in warned[1] and warned[2].endswith("it runs again")             # the finalizer
    manifest = io.read_manifest(str(out))
    assert sorted(io.manifest_shards(manifest)) == [0, 1, 2]
    assert json.loads((out / "_committed" / "part-00001.json").read_text())["token"] == 2
    ids = collections.Counter(r["id"] for r in io.read_parts(str(out), "results"))
    ids.update(r["id"] for r in io.read_parts(str(out), "errors"))
    # one sample per line (n = 1): each input line once, in results/ or (the bad line, named by its place) in errors/
    assert ids == collections.Counter([f"p{i}" for i in range(6)] + [f"{inp}:7"])


def test_a_storage_error_in_the_workers_promote_leaves_the_parts_to_the_finalizer(tmp_path, demo_model, broker,
                                                                                monkeypatch, caplog):
    """Storage refuses the worker's promote (an OSError, not a loss): the commit stands, nothing is marked failed or
    run again, and the workers' finalize sweep promotes the staged parts once storage answers."""
    monkeypatch.setattr(worker_module, "FINALIZE_SWEEP_S", 0.0)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "out"
    spec = parse_spec({"name": "flaky", "model": {"path": str(demo_model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 2, "seed": 1}, "output": {"path": str(out)},
                       "shard_size": 3})
    job_id = submit_job(spec, broker).job_id
    promote, refused = io.OutputDir.promote, []

    def promote_refused_once(self, index, *args, **kw):
        if index == 1 and not refused:
            refused.append(index)
            raise OSError(5, "Input/output error")
        return promote(self, index, *args, **kw)
    monkeypatch.setattr(io.OutputDir, "promote", promote_refused_once)
    w = Worker(broker, worker_id="w", device="cpu")
    with caplog.at_level(logging.WARNING):
        w.run_until_idle()
    assert refused == [1]
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.COMPLETED and st.error is None and st.errors == ()
    assert (st.prompts_done, st.prompts_failed, st.retries) == (6, 0, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    warned = [r.getMessage() for r in caplog.records if "/1:" in r.getMessage()]
    assert len(warned) == 1 and "OSError" in warned[0] and "could not be moved into place" in warned[0], warned
    assert json.loads((out / "_committed" / "part-00001.json").read_text())["token"] == 1
    ids = collections.Counter(r["id"] for r in io.read_parts(str(out), "results"))
    assert ids == collections.Counter(f"p{i}" for i in range(6)) and not list(io.read_parts(str(out), "errors"))
