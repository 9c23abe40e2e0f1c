"""Retries with backoff, dead letters, isolate mode with bad lines, the reaper."""

from ziya_batch.queue import Broker, JobState, ShardStats


def test_failed_shard_waits_out_an_exponential_backoff(redis_client, make_shards, make_spec, wait_claim):
    broker = Broker(redis_client, prefix="zbtest", backoff_base_s=0.3, backoff_max_s=10)
    spec = make_spec(max_retries=5)
    broker.submit(spec, make_shards(spec, 1))
    lease = broker.claim("w")
    assert broker.fail(lease, "CUDA OOM") == "retry"
    assert broker.claim("w") is None                    # inside the 0.3 s backoff
    lease = wait_claim(broker, "w")
    assert lease is not None and lease.attempt == 2
    assert broker.fail(lease, "CUDA OOM") == "retry"    # second failure: 0.6 s
    k = broker.keys
    not_before_ms = broker.client.zscore(k.pending(lease.job_id), "0")
    sec, usec = broker.client.time()
    wait_ms = not_before_ms - (sec * 1000 + usec // 1000)
    assert 450 < wait_ms <= 600


def test_backoff_is_capped(redis_client, make_shards, make_spec, wait_claim):
    broker = Broker(redis_client, prefix="zbtest", backoff_base_s=0.01, backoff_max_s=0.05)
    spec = make_spec(max_retries=20)
    broker.submit(spec, make_shards(spec, 1))
    for _ in range(10):
        lease = wait_claim(broker, "w")
        assert broker.fail(lease, "x") == "retry"
    sec, usec = broker.client.time()
    wait_ms = broker.client.zscore(broker.keys.pending(lease.job_id), "0") - (sec * 1000 + usec // 1000)
    assert wait_ms <= 50


def test_shard_is_dead_lettered_after_max_retries_and_then_written_as_errors(broker, make_shards, make_spec,
                                                                            wait_claim):
    spec = make_spec(max_retries=2)
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    outcomes = []
    for attempt in range(1, 4):
        lease = wait_claim(broker, "w")
        assert lease.attempt == attempt and not lease.dead_letter
        outcomes.append(broker.fail(lease, f"crash {attempt}"))
    assert outcomes == ["retry", "retry", "dead"]      # the first try and max_retries=2 retries
    st = broker.status(job_id, detail=True)
    assert st.dead_shards == 1 and st.shards["dead"] == 1 and st.retries == 3
    assert [e["outcome"] for e in st.errors] == ["dead", "retry", "retry"]
    # the next claim comes at once, marked dead_letter: the worker writes retries_exhausted lines
    lease = broker.claim("w")
    assert lease is not None and lease.dead_letter and lease.attempt == 4
    assert broker.commit(lease, ShardStats(prompts_failed=10, parts={"errors": (10, "e" * 64)}))
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.FINALIZING and st.prompts_failed == 10 and st.dead_shards == 1
    assert st.shard_lists["dead_lettered"] == [0]


def test_failing_dead_letter_lease_stays_dead(broker, make_shards, make_spec, wait_claim):
    spec = make_spec(max_retries=0)
    broker.submit(spec, make_shards(spec, 1))
    assert broker.fail(broker.claim("w"), "boom") == "dead"
    lease = wait_claim(broker, "w")
    assert lease.dead_letter
    assert broker.fail(lease, "storage down") == "dead"
    lease = wait_claim(broker, "w")
    assert lease.dead_letter and lease.attempt == 3


def test_isolate_mode_collects_bad_lines_without_sinking_the_shard(broker, expire, make_shards, make_spec, wait_claim):
    spec = make_spec(max_retries=1)
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    lease = broker.claim("w")
    assert not lease.isolate
    expire(broker, lease)                         # the worker died running the whole batch
    assert broker.reap() == [(job_id, 0, "retry")]
    # isolate mode: lines one by one; each crash names its line, which is dead-lettered alone, and a
    # crash that found a new bad line does not count against the shard's retry limit
    crashes = [4, 7, 9]
    for n, bad in enumerate(crashes):
        lease = wait_claim(broker, "w")
        assert lease.isolate and not lease.dead_letter
        assert lease.bad_lines == frozenset(crashes[:n])
        for line_no in range(1, 11):
            if line_no in lease.bad_lines:
                continue
            assert broker.line_started(lease, line_no)
            if line_no == bad:
                break
        expire(broker, lease)
        assert broker.reap() == [(job_id, 0, "retry")]
    lease = wait_claim(broker, "w")
    assert lease.bad_lines == {4, 7, 9} and not lease.dead_letter
    assert broker.commit(lease, ShardStats(prompts_done=7, prompts_failed=3))
    st = broker.status(job_id, detail=True)
    assert st.dead_lines == 3 and st.dead_shards == 0 and st.state == JobState.FINALIZING
    assert [e.get("bad_line") for e in st.errors] == [9, 7, 4, None]


def test_line_finished_keeps_a_late_crash_off_the_last_line(broker, expire, make_shards, make_spec, wait_claim):
    spec = make_spec(max_retries=3)
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    expire(broker, broker.claim("w"))
    broker.reap()
    lease = wait_claim(broker, "w")
    broker.line_started(lease, 10)
    broker.line_finished(lease)                   # all lines ran; death while writing parts
    expire(broker, lease)
    broker.reap()
    lease = wait_claim(broker, "w")
    assert lease.bad_lines == frozenset() and lease.attempt == 3
    assert broker.status(job_id).dead_lines == 0


def test_fail_may_name_the_bad_line(broker, make_shards, make_spec):
    spec = make_spec(max_retries=0)
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    lease = broker.claim("w")
    assert broker.fail(lease, "NaN logits", bad_line=5) == "retry"   # progress: not a counted failure
    lease = broker.claim("w")                                         # no backoff after a bad line
    assert lease.bad_lines == {5} and lease.isolate
    assert broker.fail(lease, "NaN logits again", bad_line=5) == "dead"   # known line: counts
    assert broker.status(job_id).dead_lines == 1


def test_reaper_requeues_only_expired_leases_and_counts_them(broker, expire, make_shards, make_spec):
    spec = make_spec(max_retries=0)
    job_id = broker.submit(spec, make_shards(spec, 3)).job_id
    a, b, c = broker.claim("w1"), broker.claim("w2"), broker.claim("w3")
    expire(broker, a)
    expire(broker, c)
    assert sorted(broker.reap()) == [(job_id, 0, "dead"), (job_id, 2, "dead")]
    assert broker.reap() == []
    assert broker.heartbeat(b) and not broker.heartbeat(a)
    st = broker.status(job_id, detail=True)
    assert st.retries == 2 and st.dead_shards == 2 and st.lease_expiries == 2
    assert broker.fail(b, "boom") == "dead" and broker.status(job_id).lease_expiries == 2  # a failure is no expiry
    assert broker.lease_expiries() == 2
    assert {e["reason"] for e in st.errors} == {"lease expired"}
    assert {e["worker_id"] for e in st.errors} == {"w1", "w3"}
