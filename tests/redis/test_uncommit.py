"""Broker.uncommit (uncommit.lua): a commit Redis accepted whose staged parts storage lost before they were
promoted is taken back, so the shard runs again: a compare-and-set on the committed token and attempt, no sooner
than the grace after the commit, and at most max_retries times a shard before the job fails instead."""
from __future__ import annotations

import json
import time

import pytest

from ziya_batch.queue import JobState, ShardStats


@pytest.fixture(autouse=True)
def _no_grace(broker):
    """Takes back at once, except in the tests of the grace."""
    broker.promote_grace_s = 0.0

COUNTERS = ("prompts_done", "prompts_failed", "samples", "output_tokens", "prefix_cache_query_tokens",
            "prefix_cache_hit_tokens")


def _stats(n: int, attempt: str) -> ShardStats:
    return ShardStats(prompts_done=n, prompts_failed=1, samples=2 * n, output_tokens=100 * n,
                      prefix_cache_query_tokens=40 * n, prefix_cache_hit_tokens=7 * n, attempt=attempt)


def _counters(broker, job_id) -> dict:
    h = broker.client.hgetall(broker.keys.job(job_id))
    return {f: int(h.get(f, 0)) for f in COUNTERS}


def _snapshot(broker, job_id) -> dict:
    k, c = broker.keys, broker.client
    return {"job": {f: v for f, v in c.hgetall(k.job(job_id)).items() if f != "progress_seq"},
            "shards": c.hgetall(k.shards(job_id)), "pending": c.zrange(k.pending(job_id), 0, -1, withscores=True),
            "ready": c.zrange(k.ready(), 0, -1), "finalizer": c.get(k.finalizer(job_id)),
            "errors": c.lrange(k.errors(job_id), 0, -1)}


def _committed_job(broker, make_spec, make_shards, n=2, **kw):
    """A job of `n` shards, every one committed (shard i with _stats(i + 3, f"a{i}")): it is finalizing."""
    spec = make_spec(**kw)
    job_id = broker.submit(spec, make_shards(spec, n)).job_id
    leases = [broker.claim("w") for _ in range(n)]
    for lease in leases:
        assert broker.commit(lease, _stats(lease.shard.index + 3, f"a{lease.shard.index}"))
    return job_id, leases


def test_a_wrong_token_attempt_or_state_changes_nothing(broker, make_spec, make_shards):
    job_id, (a, b) = _committed_job(broker, make_spec, make_shards)
    before = _snapshot(broker, job_id)
    assert broker.uncommit(job_id, 0, a.token + 1, "lost").outcome == "refused"
    assert broker.uncommit(job_id, 0, a.token, "lost", attempt="someone-else").outcome == "refused"
    assert broker.uncommit(job_id, 7, a.token, "lost").outcome == "refused"                 # no such shard
    assert _snapshot(broker, job_id) == before
    spec = make_spec("other")
    other = broker.submit(spec, make_shards(spec, 1)).job_id
    assert broker.uncommit(other, 0, 0, "lost").outcome == "refused"                        # pending, not committed
    assert broker.shard_counts(other)["pending"] == 1


def test_the_right_token_puts_the_shard_back_and_the_job_runs_again(broker, make_spec, make_shards):
    job_id, (a, b) = _committed_job(broker, make_spec, make_shards)
    assert broker.status(job_id).state == JobState.FINALIZING
    assert broker.begin_finalize(job_id)
    got = broker.uncommit(job_id, b.shard.index, b.token, "staged results part is gone", attempt="a1", caller="w9")
    assert (got.outcome, got.times_lost) == ("retry", 1)
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.RUNNING and st.retries == 1
    assert st.shards == {"pending": 1, "leased": 0, "committed": 1, "dead": 0}
    assert _counters(broker, job_id) == {f: v for f, v in _stats(3, "a0").to_dict().items() if f in COUNTERS}
    assert broker.client.get(broker.keys.finalizer(job_id)) is None
    assert broker.client.zscore(broker.keys.ready(), job_id) is not None
    rec = json.loads(broker.client.hget(broker.keys.shards(job_id), "1"))
    assert rec["state"] == "pending" and rec["lost"] == 1
    assert not {"stats", "committed_token", "committed_ms"} & set(rec)
    err = st.errors[0]
    assert (err["shard"], err["token"], err["worker_id"], err["reason"]) == (1, b.token, "w9", "parts lost")
    assert err["message"] == "staged results part is gone"
    # claimable at once, under a new token; its new commit finalizes the job again
    again = broker.claim("w2")
    assert (again.shard.index, again.token, again.attempt) == (1, b.token + 1, 2)
    assert broker.uncommit(job_id, 1, b.token, "a stale caller").outcome == "refused"       # leased now
    assert broker.commit(again, _stats(5, "a2"))
    assert broker.uncommit(job_id, 1, b.token, "a stale caller").outcome == "refused"       # a newer token committed
    assert broker.status(job_id).state == JobState.FINALIZING
    assert _counters(broker, job_id) == {f: _stats(3, "").to_dict()[f] + _stats(5, "").to_dict()[f]
                                         for f in COUNTERS}
    assert broker.commits(job_id)[1][0] == again.token


def test_a_running_job_stays_running_and_claimable(broker, make_spec, make_shards):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 3)).job_id
    a = broker.claim("w")
    assert broker.claim("w") and broker.claim("w") and broker.claim("w") is None
    assert broker.client.zscore(broker.keys.ready(), job_id) is None              # nothing pending: not ready
    assert broker.commit(a, _stats(3, "x"))
    assert broker.uncommit(job_id, 0, a.token, "lost").taken_back
    assert broker.status(job_id).state == JobState.RUNNING
    assert broker.claim("w").shard.index == 0


def test_a_dead_lettered_shard_goes_back_to_dead(broker, make_spec, make_shards):
    spec = make_spec(max_retries=1)
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    assert broker.fail(broker.claim("w"), "boom") == "retry"
    time.sleep(0.1)                                          # the fixture's backoff
    assert broker.fail(broker.claim("w"), "boom") == "dead"
    lease = broker.claim("w")
    assert lease.dead_letter
    assert broker.commit(lease, ShardStats(prompts_failed=10))
    assert broker.uncommit(job_id, 0, lease.token, "lost").taken_back
    assert broker.shard_counts(job_id) == {"pending": 0, "leased": 0, "committed": 0, "dead": 1}
    assert broker.status(job_id).state == JobState.RUNNING
    assert broker.claim("w").dead_letter                     # its error lines are written again


def test_a_completed_job_is_refused(broker, make_spec, make_shards):
    job_id, (a, _) = _committed_job(broker, make_spec, make_shards)
    assert broker.begin_finalize(job_id)
    broker.mark_completed(job_id)
    before = _snapshot(broker, job_id)
    assert broker.uncommit(job_id, 0, a.token, "lost").outcome == "refused"
    assert _snapshot(broker, job_id) == before


@pytest.mark.parametrize("end", ["cancelled", "failed"])
def test_a_cancelled_or_failed_job_keeps_its_state_and_a_resubmit_runs_the_shard(broker, make_spec, make_shards,
                                                                                  end):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    a, b = broker.claim("w"), broker.claim("w")
    if end == "cancelled":
        assert broker.cancel(job_id).state == JobState.CANCELLING      # b may finish
        assert broker.commit(a, _stats(3, "x"))
        assert broker.uncommit(job_id, 0, a.token, "lost").taken_back
        assert broker.status(job_id).state == JobState.CANCELLING
        assert broker.commit(b, _stats(4, "y"))                        # the last lease: cancelled
    else:
        broker.mark_failed(job_id, "operator stopped it")
        assert broker.commit(a, _stats(3, "x")) and broker.commit(b, _stats(4, "y"))
        assert broker.uncommit(job_id, 0, a.token, "lost").taken_back
    st = broker.status(job_id)
    assert st.state == JobState(end) and st.shards["pending"] == 1
    assert broker.claim("w") is None
    assert _counters(broker, job_id)["prompts_done"] == 4
    assert broker.submit(spec, make_shards(spec, 2)).state == JobState.QUEUED   # reopened
    again = broker.claim("w")
    assert again.shard.index == 0 and again.token == a.token + 1
    assert broker.commit(again, _stats(3, "z"))
    assert broker.status(job_id).state == JobState.FINALIZING


def test_a_commit_is_taken_back_only_after_the_grace(broker, make_spec, make_shards):
    """A promoter of the commit may still be at work for a while: until the grace has passed nothing changes."""
    broker.promote_grace_s = 0.5
    job_id, (a, _) = _committed_job(broker, make_spec, make_shards)
    before = _snapshot(broker, job_id)
    got = broker.uncommit(job_id, 0, a.token, "lost", "a0")
    assert got.outcome == "too recent" and 0.2 < got.wait_s <= 0.5
    assert _snapshot(broker, job_id) == before
    time.sleep(got.wait_s + 0.05)
    assert broker.uncommit(job_id, 0, a.token, "lost", "a0").outcome == "retry"


def test_a_commit_recorded_without_its_time_starts_the_grace_at_the_first_try(broker, make_spec, make_shards):
    """Commits made before commits carried their time (or rebuilt from storage on a resubmit) have none."""
    broker.promote_grace_s = 0.3
    job_id, (a, _) = _committed_job(broker, make_spec, make_shards)
    rec = json.loads(broker.client.hget(broker.keys.shards(job_id), "0"))
    del rec["committed_ms"]
    broker.client.hset(broker.keys.shards(job_id), "0", json.dumps(rec))
    assert broker.uncommit(job_id, 0, a.token, "lost").wait_s == pytest.approx(0.3)
    assert "committed_ms" in json.loads(broker.client.hget(broker.keys.shards(job_id), "0"))
    time.sleep(0.35)
    assert broker.uncommit(job_id, 0, a.token, "lost").outcome == "retry"


def test_parts_lost_more_than_max_retries_times_fail_the_job_and_a_resubmit_runs_the_shard(broker, make_spec,
                                                                                            make_shards):
    job_id, (a, _) = _committed_job(broker, make_spec, make_shards, max_retries=1)
    assert broker.uncommit(job_id, 0, a.token, "lost", "a0").outcome == "retry"
    again = broker.claim("w")
    assert broker.commit(again, _stats(3, "b0"))
    got = broker.uncommit(job_id, 0, again.token, "lost again", "b0", staging="s3://b/run/_staging/")
    assert (got.outcome, got.times_lost) == ("failed", 2)
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.FAILED and st.retries == 1
    assert st.error == ("shard 0: its staged parts disappeared from storage 2 times before they could be promoted; "
                        "check lifecycle rules or cleanup jobs on s3://b/run/_staging/")
    assert [(e["outcome"], e["message"]) for e in st.errors[:2]] == [("failed", "lost again"), ("retry", "lost")]
    # taken back all the same, not run: a failed job hands nothing out, and its shard waits for a resubmit
    assert st.shards == {"pending": 1, "leased": 0, "committed": 1, "dead": 0}
    assert broker.client.get(broker.keys.finalizer(job_id)) is None
    assert broker.claim("w") is None
    spec = make_spec(max_retries=1)
    assert broker.submit(spec, make_shards(spec, 2)).state == JobState.QUEUED
    third = broker.claim("w")
    assert third.shard.index == 0 and broker.commit(third, _stats(3, "c0"))
    # the count starts again after the failure: one more loss runs the shard again
    assert broker.uncommit(job_id, 0, third.token, "lost", "c0").outcome == "retry"


def test_max_retries_zero_fails_the_job_at_the_first_loss(broker, make_spec, make_shards):
    job_id, (_, b) = _committed_job(broker, make_spec, make_shards, max_retries=0)
    got = broker.uncommit(job_id, 1, b.token, "lost", "a1")
    assert (got.outcome, got.times_lost) == ("failed", 1)
    st = broker.status(job_id)
    assert st.state == JobState.FAILED and st.retries == 0
    assert "disappeared from storage once before" in st.error
