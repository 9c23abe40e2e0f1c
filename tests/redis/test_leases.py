"""Claim, heartbeat, commit, and fencing: a lease that was lost can neither renew nor commit."""
import time

from ziya_batch.queue import JobState, ShardStats


def test_claim_gives_shards_in_order_with_their_byte_ranges(broker, make_shards, make_spec):
    spec = make_spec()
    refs = list(make_shards(spec, 3, files=2))
    job_id = broker.submit(spec, iter(refs)).job_id
    leases = [broker.claim("w1") for _ in range(3)]
    assert [l.shard for l in leases] == refs
    assert all(l.token == 1 and l.attempt == 1 and not l.isolate and not l.dead_letter for l in leases)
    assert leases[0].lease_s == spec.reliability.lease_s
    assert broker.claim("w1") is None
    assert broker.status(job_id).shards["leased"] == 3


def test_heartbeat_renews_and_commit_records_stats(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    lease = broker.claim("w1")
    k = broker.keys
    before = broker.client.zscore(k.leases(), k.lease_member(job_id, 0))
    time.sleep(0.02)
    assert broker.heartbeat(lease)
    assert broker.client.zscore(k.leases(), k.lease_member(job_id, 0)) > before
    stats = ShardStats(prompts_done=9, prompts_failed=1, samples=18, output_tokens=700,
                       parts={"results": (18, "ab" * 32), "errors": (1, "cd" * 32)})
    assert broker.commit(lease, stats)
    assert broker.commits(job_id) == {0: (1, stats)}
    st = broker.status(job_id)
    assert (st.prompts_done, st.prompts_failed, st.samples, st.output_tokens) == (9, 1, 18, 700)
    assert st.state == JobState.FINALIZING
    # committed is final: neither a second commit nor a heartbeat is accepted
    assert not broker.commit(lease, stats)
    assert not broker.heartbeat(lease)
    assert broker.client.zcard(k.leases()) == 0


def test_the_same_commit_sent_again_after_a_lost_reply_is_answered_as_the_one_that_ran(broker, make_shards,
                                                                                        make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    lease = broker.claim("w1")
    stats = ShardStats(prompts_done=10, samples=10, output_tokens=50, parts={"results": (10, "ab" * 32)},
                       attempt="a1b2c3d4e5f6")
    assert broker.commit(lease, stats)
    # the worker never got the reply (Redis killed, the connection cut) and sends it again: refused, it would discard
    # the parts that Redis holds committed
    assert broker.commit(lease, stats)
    st = broker.status(job_id)
    assert (st.prompts_done, st.output_tokens, st.shards["committed"]) == (10, 50, 1)     # counted once
    # another attempt under the same token (a Redis that lost writes granted it twice) is still refused
    other = ShardStats(prompts_done=10, samples=10, output_tokens=50, parts={"results": (10, "cd" * 32)},
                       attempt="0f9e8d7c6b5a")
    assert not broker.commit(lease, other)
    assert broker.commits(job_id) == {0: (1, stats)}


def test_expired_and_reclaimed_lease_cannot_heartbeat_or_commit(broker, expire, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    old = broker.claim("slow")
    expire(broker, old)
    assert broker.reap() == [(job_id, 0, "retry")]
    new = None
    deadline = time.monotonic() + 5
    while new is None and time.monotonic() < deadline:
        new = broker.claim("fast")
    assert new.token == old.token + 1 and new.attempt == 2 and new.isolate
    assert not broker.heartbeat(old)
    assert not broker.line_started(old, 3)
    assert not broker.commit(old, ShardStats(prompts_done=10))
    assert broker.fail(old, "late failure") == "lost"
    assert broker.heartbeat(new)
    assert broker.commit(new, ShardStats(prompts_done=10))
    assert broker.commits(job_id)[0][0] == new.token


def test_expired_but_not_reaped_lease_still_belongs_to_its_owner(broker, expire, make_shards, make_spec):
    spec = make_spec()
    broker.submit(spec, make_shards(spec, 1))
    lease = broker.claim("w")
    expire(broker, lease)
    # nobody took it over: the owner's heartbeat renews it and the reaper then leaves it alone
    assert broker.heartbeat(lease)
    assert broker.reap() == []
    assert broker.commit(lease, ShardStats(prompts_done=10))


def test_real_lease_expiry_on_the_redis_clock(broker, make_shards, make_spec):
    spec = make_spec(lease_s=1.0)
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    lease = broker.claim("w")
    assert broker.reap() == []
    time.sleep(1.1)
    assert broker.reap() == [(job_id, 0, "retry")]
    assert not broker.heartbeat(lease)


def test_fencing_token_grows_by_one_per_claim(broker, make_shards, make_spec):
    spec = make_spec(max_retries=5)
    broker.submit(spec, make_shards(spec, 1))
    tokens = []
    for _ in range(4):
        deadline = time.monotonic() + 5
        lease = None
        while lease is None and time.monotonic() < deadline:
            lease = broker.claim("w")
        tokens.append(lease.token)
        broker.fail(lease, "again")
    assert tokens == [1, 2, 3, 4]


def test_workers_registry_and_lease_holders_in_status(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 3)).job_id
    broker.register_worker("w1", "gpu-node-1", {"device": "cuda:0"})
    broker.register_worker("w2", "gpu-node-2", {"device": "cuda:1"})
    broker.claim("w1"), broker.claim("w1"), broker.claim("w2")
    broker.worker_heartbeat("w1")
    assert {w["worker_id"]: w["host"] for w in broker.workers()} == {"w1": "gpu-node-1", "w2": "gpu-node-2"}
    st = broker.status(job_id)
    assert [(w["worker_id"], w["host"], w["shards"]) for w in st.workers] == \
        [("w1", "gpu-node-1", [0, 1]), ("w2", "gpu-node-2", [2])]
    broker.unregister_worker("w2")
    assert [w["worker_id"] for w in broker.workers()] == ["w1"]


def test_a_shorter_lease_given_on_a_resubmit_never_expires_a_lease_claimed_with_a_longer_one(broker, make_shards,
                                                                                              make_spec):
    """The job takes the resubmitted lease_s, but a worker renews a lease at a third of the length it claimed
    with: its renewals keep that length, and only shards claimed afterwards get the shorter one."""
    spec = make_spec(lease_s=30.0)
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    held = broker.claim("w1")
    assert broker.submit(make_spec(lease_s=2.0), make_shards(spec, 2)).job_id == job_id
    assert broker.get_spec(job_id).reliability.lease_s == 2.0
    assert broker.heartbeat(held)
    now_ms = broker.server_time_s() * 1000
    assert broker.client.zscore(broker.keys.leased(job_id), str(held.shard.index)) >= now_ms + 29_000
    fresh = broker.claim("w2")
    assert fresh.lease_s == 2.0 and broker.heartbeat(fresh)
    assert broker.client.zscore(broker.keys.leased(job_id), str(fresh.shard.index)) <= now_ms + 3_000
