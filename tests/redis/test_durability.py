"""redis-server SIGKILLed mid-sequence and restarted from its AOF: committed state and leases survive, and leases that
ran out while it was down are not taken from owners that renew them after the restart."""
import time

import pytest
import redis

from tests.processes import wait_for
from ziya_batch.queue import Broker, JobState, ShardStats


def _wait_up(broker):
    for _ in range(100):
        try:
            broker.client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.05)


def test_committed_state_survives_sigkill_and_restart(restartable_redis, make_shards, make_spec):
    broker = Broker.from_url(restartable_redis.url, prefix="zb")
    spec = make_spec(max_retries=0)
    job_id = broker.submit(spec, make_shards(spec, 4)).job_id
    done = broker.claim("w1")
    stats = ShardStats(prompts_done=10, samples=10, output_tokens=123, parts={"results": (10, "f" * 64)})
    assert broker.commit(done, stats)
    running = broker.claim("w2")
    assert broker.fail(broker.claim("w3"), "boom") == "dead"

    restartable_redis.kill()
    restartable_redis.start()
    _wait_up(broker)

    st = broker.status(job_id, detail=True)
    assert st.state == JobState.RUNNING
    assert st.shards == {"pending": 1, "leased": 1, "committed": 1, "dead": 1}
    assert st.dead_shards == 1 and st.retries == 1 and st.output_tokens == 123
    assert broker.commits(job_id) == {0: (1, stats)}
    # the lease held across the outage is still its owner's; fencing still refuses a stale token
    assert broker.heartbeat(running)
    assert broker.commit(running, ShardStats(prompts_done=10))
    assert not broker.commit(done, ShardStats(prompts_done=10))
    for _ in range(2):
        lease = broker.claim("w4")
        assert broker.commit(lease, ShardStats(prompts_done=10 if not lease.dead_letter else 0,
                                               prompts_failed=10 if lease.dead_letter else 0))
    assert broker.status(job_id).state == JobState.FINALIZING


def test_submit_interrupted_by_a_redis_crash_completes_on_resubmit(restartable_redis, make_shards, make_spec):
    broker = Broker.from_url(restartable_redis.url, prefix="zb")
    spec = make_spec(shard_size=5)

    def shards_then_crash():
        for i, ref in enumerate(make_shards(spec, 3000)):
            if i == 2500:
                restartable_redis.kill()
            yield ref

    try:
        broker.submit(spec, shards_then_crash())
        raise AssertionError("submit should have failed with Redis down")
    except redis.ConnectionError:
        pass
    restartable_redis.start()
    _wait_up(broker)
    assert broker.claim("w") is None                         # not sealed: nothing handed out
    st = broker.submit(spec, make_shards(spec, 3000))
    assert st.shards_total == 3000 and st.prompts_total == 15000 and st.state == JobState.QUEUED
    assert broker.claim("w").shard.index == 0


def test_leases_that_ran_out_while_redis_was_down_are_their_owners_for_one_lease_after_the_restart(
        restartable_redis, make_shards, make_spec):
    broker = Broker.from_url(restartable_redis.url, prefix="zb")
    spec = make_spec(lease_s=2.0, max_retries=0)
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    alive, gone = broker.claim("alive"), broker.claim("gone")

    restartable_redis.kill()
    time.sleep(2.5)                 # both leases run out on the server's clock while nobody can renew them
    restartable_redis.start()
    _wait_up(broker)

    # a reaper right after the restart takes neither (with max_retries=0 it dead-lettered both, lines never tried)
    assert broker.reap() == []
    assert broker.heartbeat(alive)

    def reaped():
        broker.heartbeat(alive)     # its owner renews as a live worker does
        return broker.reap()

    # the owner that stayed silent for a whole lease after the restart is taken back, as any expired lease is
    assert wait_for(reaped, timeout_s=10, every_s=0.3, what="the silent lease reaped") == [(job_id, gone.shard.index,
                                                                                              "dead")]
    assert broker.commit(alive, ShardStats(prompts_done=10))
    st = broker.status(job_id)
    assert st.lease_expiries == 1 and st.shards["committed"] == 1 and st.shards["dead"] == 1


def test_a_readonly_answer_closes_its_connection_so_the_next_try_reaches_the_new_primary(restartable_redis):
    # behind a name that a failover moves, only a new connection reaches the new primary: a READONLY answer must
    # not leave the broker's pooled connection talking to the demoted one; nothing is retried inside redis-py
    from ziya_batch.queue.server import free_port

    broker = Broker.from_url(restartable_redis.url, prefix="zb")
    admin = redis.Redis.from_url(restartable_redis.url)
    first = broker.client.client_id()
    admin.replicaof("127.0.0.1", free_port())
    try:
        with pytest.raises(redis.ReadOnlyError):
            broker.client.set("zb:failover-probe", "1")
        listed = {c["id"] for c in admin.client_list()}
        assert first not in listed                  # the connection that heard READONLY is gone
    finally:
        admin.replicaof("NO", "ONE")
    assert broker.client.set("zb:failover-probe", "1") and broker.client.client_id() != first
