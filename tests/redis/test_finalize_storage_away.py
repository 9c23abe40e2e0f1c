"""A finalize whose output storage does not answer (a connection refused, a time-out) leaves the job finalizing and
its election to a later try (jobs.finalize.FINALIZE_RETRY_S), instead of failing a job whose every shard is
committed; a storage error that is not the store's absence still fails it with the reason; Redis's own errors
reach the caller as they are."""
import collections
import json
import logging

import pytest
import redis

from ziya_batch import io
from ziya_batch.jobs import finalize as fin
from ziya_batch.jobs import finalize_if_ready, submit_job
from ziya_batch.queue import JobState, ShardStats
from ziya_batch.spec import parse_spec


def _committed_job(tmp_path, broker, shards=2):
    """A job whose shards are all staged, committed and promoted: only its manifest is missing."""
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q{i}"}) + "\n"
                                               for i in range(2 * shards)))
    spec = parse_spec({"name": "away", "model": {"path": "/models/x"}, "input": [str(tmp_path / "in.jsonl")],
                       "output": {"path": str(tmp_path / "out")}, "shard_size": 2})
    job_id = submit_job(spec, broker).job_id
    out = io.OutputDir(spec.output.path, spec.output.format)
    for _ in range(shards):
        lease = broker.claim("w")
        st = ShardStats(prompts_done=0, prompts_failed=2)
        st.attempt = io.new_attempt()
        recs = [{"id": f"p{2 * lease.shard.index + k}", "error": {"code": "x"}} for k in range(2)]
        st.parts = {k: (p.lines, p.sha256)
                    for k, p in out.stage(lease.shard.index, lease.token, st.attempt, {"errors": recs}).items()}
        assert broker.commit(lease, st)
        out.promote(lease.shard.index, lease.token, st.attempt, st.parts, stats=st.to_dict())
    assert broker.status(job_id).state == JobState.FINALIZING
    return job_id, out


def _manifest_fails(monkeypatch, err):
    calls = []

    def write_manifest(*a, **k):
        calls.append(1)
        raise err
    monkeypatch.setattr(io, "write_manifest", write_manifest)
    return calls


@pytest.mark.parametrize("err", [ConnectionRefusedError(111, "Connection refused"), TimeoutError("read timed out"),
                                 type("EndpointConnectionError", (Exception,), {})("could not connect")])
def test_storage_that_does_not_answer_leaves_the_job_finalizing_for_a_later_try(tmp_path, broker, monkeypatch,
                                                                                  caplog, err):
    job_id, out = _committed_job(tmp_path, broker)
    real = io.write_manifest
    calls = _manifest_fails(monkeypatch, err)
    with caplog.at_level(logging.WARNING, logger="ziya_batch.jobs.finalize"):
        assert not finalize_if_ready(broker, job_id)
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.FINALIZING and st.error is None and calls == [1]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and job_id in warned[0] and "did not answer" in warned[0]
    # the election is held for the retry wait: no other caller finalizes before it ...
    ttl = broker.client.pttl(broker.keys.finalizer(job_id))
    assert 0 < ttl <= fin.FINALIZE_RETRY_S * 1000
    assert not finalize_if_ready(broker, job_id) and calls == [1]
    assert broker.unfinished_finalizing() == []
    # ... and once it has passed (and storage answers again) the job completes with every shard
    broker.client.delete(broker.keys.finalizer(job_id))
    assert broker.unfinished_finalizing() == [job_id]
    monkeypatch.setattr(io, "write_manifest", real)
    assert finalize_if_ready(broker, job_id)
    assert broker.status(job_id).state == JobState.COMPLETED
    assert collections.Counter(r["id"] for r in io.read_parts(out.url, "errors")) == \
        collections.Counter(f"p{i}" for i in range(4))


def test_storage_that_answers_with_an_error_still_fails_the_job(tmp_path, broker, monkeypatch):
    job_id, _ = _committed_job(tmp_path, broker)
    _manifest_fails(monkeypatch, PermissionError(13, "Permission denied"))
    with pytest.raises(PermissionError):
        finalize_if_ready(broker, job_id)
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.FAILED and "finalizing failed: PermissionError" in st.error


def test_redis_errors_during_finalize_reach_the_caller_as_they_are(tmp_path, broker, monkeypatch):
    job_id, _ = _committed_job(tmp_path, broker)
    _manifest_fails(monkeypatch, redis.ConnectionError("Redis went away"))
    with pytest.raises(redis.ConnectionError):
        finalize_if_ready(broker, job_id)
    assert broker.status(job_id).state == JobState.FINALIZING      # not failed, not waiting on storage


def test_storage_that_stops_answering_after_the_job_completed_does_not_promise_a_retry(tmp_path, broker, monkeypatch,
                                                                                      caplog):
    """Clearing _staging/ comes after the manifest is written and the job marked completed: storage that does not
    answer then leaves leftovers behind, nothing to wait for. The call wrote the manifest (True), and its log does
    not say finalizing waits and tries again: nothing will."""
    job_id, _ = _committed_job(tmp_path, broker)

    def clear_staging(self):
        raise TimeoutError("read timed out")
    monkeypatch.setattr(io.OutputDir, "clear_staging", clear_staging)
    with caplog.at_level(logging.INFO, logger="ziya_batch.jobs.finalize"):
        assert finalize_if_ready(broker, job_id)
    assert broker.status(job_id).state == JobState.COMPLETED
    assert not any("trying again" in r.getMessage() for r in caplog.records)
    assert any("completed" in r.getMessage() for r in caplog.records)
