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
    return job_id, _commit_every_shard(broker, job_id)


def _commit_every_shard(broker, job_id):
    """Claims, stages, commits and promotes each shard of the job as error lines (ids p0, p1, ...), and returns its
    OutputDir; the job is finalizing then."""
    spec = broker.get_spec(job_id)
    out = io.OutputDir(spec.output.path, spec.output.format)
    while (lease := broker.claim("w")) is not None:
        n = lease.shard.num_lines
        st = ShardStats(prompts_done=0, prompts_failed=n)
        st.attempt = io.new_attempt()
        recs = [{"id": f"p{n * lease.shard.index + k}", "error": {"code": "x"}} for k in range(n)]
        st.parts = {k: (p.lines, p.sha256)
                    for k, p in out.stage(lease.shard.index, lease.token, st.attempt, {"errors": recs}).items()}
        assert broker.commit(lease, st)
        out.promote(lease.shard.index, lease.token, st.attempt, st.parts, stats=st.to_dict())
    assert broker.status(job_id).state == JobState.FINALIZING
    return out


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


# what botocore raises for an S3 endpoint that does not answer (unreachable() knows it by its name)
ConnectTimeoutError = type("ConnectTimeoutError", (Exception,), {})


def _store_away(monkeypatch):
    """The output store stops answering: listing its markers and writing the manifest time out. Returns the switch
    (away["on"] = False brings it back)."""
    away = {"on": True}
    committed_shards, write_manifest = io.OutputDir.committed_shards, io.write_manifest

    def listing(self):
        if away["on"]:
            raise ConnectTimeoutError(f'Connect timeout on endpoint URL: "{self.url}/_markers/"')
        return committed_shards(self)

    def writing(*a, **k):
        if away["on"]:
            raise ConnectTimeoutError("Connect timeout on endpoint URL: manifest.json")
        return write_manifest(*a, **k)
    monkeypatch.setattr(io.OutputDir, "committed_shards", listing)
    monkeypatch.setattr(io, "write_manifest", writing)
    return away


def _next_try_now(broker, job_id):
    """The retry wait is over (as FINALIZE_RETRY_S later): the next caller may be elected."""
    broker.client.delete(broker.keys.finalizer(job_id))


def test_status_says_why_finalizing_waits_until_the_store_answers_again(tmp_path, broker, monkeypatch):
    """The reason was only in the finalizing process's log; every status showed `finalizing` and nothing else, for
    as long as the outage lasted."""
    from ziya_batch.jobs import waiting_note

    job_id, out = _committed_job(tmp_path, broker)
    away = _store_away(monkeypatch)
    before = broker.server_time_s()
    assert not finalize_if_ready(broker, job_id)
    st = broker.status(job_id)
    w = st.finalize_wait
    assert st.state == JobState.FINALIZING and st.error is None and w is not None
    # every prompt is done: no time to completion is known (status showed ETA 0m00s for as long as it waited)
    assert st.prompts_per_s > 0 and st.eta_s is None and st.to_dict()["eta_s"] is None
    assert w.reason == f'{out.url}: ConnectTimeoutError: Connect timeout on endpoint URL: "{out.url}/_markers/"'
    assert w.tries == 1 and w.since == w.at and before - 1 <= w.at <= broker.server_time_s() + 1
    assert w.next_try_at == pytest.approx(w.at + fin.FINALIZE_RETRY_S) and 25 < w.next_try_in_s <= 30
    note = waiting_note(broker, st)
    assert note.startswith(f"finalize waits for storage: {w.reason} (tried at ") and " UTC; next try in " in note
    d = st.to_dict()
    assert d["state"] == "finalizing" and d["finalize_wait"]["reason"] == w.reason
    assert d["finalize_wait"]["tries"] == 1 and d["finalize_wait"]["at"] == w.at
    # a second try while the store is still away counts on from the first
    _next_try_now(broker, job_id)
    assert not finalize_if_ready(broker, job_id)
    w2 = broker.status(job_id).finalize_wait
    assert w2.tries == 2 and w2.since == w.since and w2.at >= w.at
    assert w2.reason == w.reason
    assert "(tried 2 times since " in waiting_note(broker, broker.status(job_id))
    # the store answers again: the job completes, and the reason is gone from its status and its record
    away["on"] = False
    _next_try_now(broker, job_id)
    assert finalize_if_ready(broker, job_id)
    st = broker.status(job_id)
    assert st.state == JobState.COMPLETED and st.finalize_wait is None and st.to_dict()["finalize_wait"] is None
    assert waiting_note(broker, st) is None
    assert broker.client.hget(broker.keys.job(job_id), "finalize_wait") is None
    assert collections.Counter(r["id"] for r in io.read_parts(out.url, "errors")) == \
        collections.Counter(f"p{i}" for i in range(4))


def test_the_reason_goes_when_the_job_leaves_finalizing_or_a_try_gets_past_the_store(tmp_path, broker, monkeypatch):
    job_id, out = _committed_job(tmp_path, broker)
    away = _store_away(monkeypatch)
    assert not finalize_if_ready(broker, job_id)
    assert broker.status(job_id).finalize_wait is not None
    # only the caller holding the election writes (or clears) it
    assert not broker.end_finalize(job_id, "not-the-finalizer", reason="something else")
    assert not broker.end_finalize(job_id, "not-the-finalizer")
    assert broker.status(job_id).finalize_wait.reason.startswith(f"{out.url}: ConnectTimeoutError")
    # a try that gets past the store and gives the election up for another reason (a lost commit's grace) clears it
    assert broker.begin_finalize(job_id, "f1") is False                  # still held for the retry wait
    _next_try_now(broker, job_id)
    assert broker.begin_finalize(job_id, "f1") and broker.end_finalize(job_id, "f1", after_s=1.0)
    assert broker.status(job_id).finalize_wait is None
    # the store answers with an error that fails the job: failed, with its error, and no waiting reason left
    assert broker.client.delete(broker.keys.finalizer(job_id)) == 1
    assert not finalize_if_ready(broker, job_id) and broker.status(job_id).finalize_wait is not None
    away["on"] = False
    monkeypatch.setattr(io, "write_manifest", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    _next_try_now(broker, job_id)
    with pytest.raises(PermissionError):
        finalize_if_ready(broker, job_id)
    st = broker.status(job_id)
    assert st.state == JobState.FAILED and "PermissionError" in st.error and st.finalize_wait is None
    assert broker.client.hget(broker.keys.job(job_id), "finalize_wait") is None


def test_records_without_the_field_or_with_an_unreadable_one_read_as_before(tmp_path, broker):
    job_id, _ = _committed_job(tmp_path, broker)
    assert broker.status(job_id).finalize_wait is None and broker.status(job_id).to_dict()["finalize_wait"] is None
    broker.client.hset(broker.keys.job(job_id), "finalize_wait", "{not json")
    assert broker.status(job_id).finalize_wait is None


def test_the_status_command_prints_the_reason_and_then_no_more(tmp_path, broker, monkeypatch, capsys):
    from ziya_batch import cli

    job_id, out = _committed_job(tmp_path, broker)
    away = _store_away(monkeypatch)
    assert not finalize_if_ready(broker, job_id)
    monkeypatch.setattr(cli, "_broker", lambda url: broker)
    reason = f'{out.url}: ConnectTimeoutError: Connect timeout on endpoint URL: "{out.url}/_markers/"'

    def run(*argv) -> str:
        with pytest.raises(SystemExit) as ex:
            cli.main(list(argv))
        assert ex.value.code == 0
        return capsys.readouterr().out

    for argv in (("status", job_id), ("status",)):
        shown = " ".join(run(*argv).split())         # the table wraps long lines at the console's width
        assert f"finalize waits for storage: {reason} (tried at " in shown and "next try in " in shown, argv
    assert f"{job_id}: finalize waits for storage: " in " ".join(run("status").split())
    one = json.loads(run("status", job_id, "--json"))
    [listed] = json.loads(run("status", "--json"))
    for d in (one, listed):
        assert d["state"] == "finalizing" and d["finalize_wait"]["reason"] == reason
        assert d["finalize_wait"]["tries"] == 1 and d["note"].startswith(f"finalize waits for storage: {reason}")
    away["on"] = False
    _next_try_now(broker, job_id)
    assert finalize_if_ready(broker, job_id)
    assert "finalize waits" not in run("status", job_id) and "finalize waits" not in run("status")
    one = json.loads(run("status", job_id, "--json"))
    assert one["state"] == "completed" and one["finalize_wait"] is None and one["note"] is None


def test_the_http_api_gives_the_reason_in_a_jobs_status(api_env, monkeypatch):
    from api_support import AUTH, job_spec

    data, models, make_client = api_env
    client = make_client()
    job_id = client.post("/v1/jobs", json=job_spec(data, models), headers=AUTH).json()["id"]
    broker = client.app.state.brokers.get()
    out = _commit_every_shard(broker, job_id)
    away = _store_away(monkeypatch)
    assert not finalize_if_ready(broker, job_id)
    got = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    [listed] = client.get("/v1/jobs", headers=AUTH).json()["jobs"]
    for d in (got, listed):
        assert d["state"] == "finalizing" and d["finalize_wait"]["reason"].startswith(f"{out.url}: ConnectTimeoutError")
        assert d["note"].startswith("finalize waits for storage: ")
    away["on"] = False
    _next_try_now(broker, job_id)
    assert finalize_if_ready(broker, job_id)
    got = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert got["state"] == "completed" and got["finalize_wait"] is None and got["note"] is None
