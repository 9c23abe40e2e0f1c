"""Cancel (let running shards finish, or abandon them) and resume (submit again, rebuild after Redis loss)."""
import pytest

from ziya_batch.errors import JobNotFound
from ziya_batch.queue import JobState, ShardStats


def test_cancel_lets_running_shards_finish(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 4)).job_id
    a, b = broker.claim("w1"), broker.claim("w2")
    st = broker.cancel(job_id)
    assert st.state == JobState.CANCELLING
    assert broker.claim("w3") is None                       # no new claims at once
    assert broker.heartbeat(a) and broker.commit(a, ShardStats(prompts_done=10))
    assert broker.status(job_id).state == JobState.CANCELLING
    assert broker.fail(b, "interrupted") == "retry"
    st = broker.status(job_id)
    assert st.state == JobState.CANCELLED and st.finished_at is not None
    assert st.shards == {"pending": 3, "leased": 0, "committed": 1, "dead": 0}
    assert broker.claim("w3") is None


def test_cancel_with_abandon_takes_leases_back_at_once(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 3)).job_id
    a = broker.claim("w1")
    st = broker.cancel(job_id, abandon_running=True)
    assert st.state == JobState.CANCELLED
    assert not broker.heartbeat(a)
    assert not broker.commit(a, ShardStats(prompts_done=10))
    assert broker.client.zcard(broker.keys.leases()) == 0
    assert broker.status(job_id).shards["pending"] == 3


def test_cancel_of_idle_job_is_immediate_and_repeatable(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    assert broker.cancel(job_id).state == JobState.CANCELLED
    assert broker.cancel(job_id).state == JobState.CANCELLED
    with pytest.raises(JobNotFound):
        broker.cancel("0123456789abcdef")


def test_expiry_of_the_last_lease_settles_a_cancelling_job(broker, expire, make_shards, make_spec):

    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    lease = broker.claim("w")
    assert broker.cancel(job_id).state == JobState.CANCELLING
    expire(broker, lease)
    broker.reap()
    assert broker.status(job_id).state == JobState.CANCELLED


def test_submit_twice_is_one_job(broker, make_shards, make_spec):
    spec = make_spec()
    first = broker.submit(spec, make_shards(spec, 5))
    lease = broker.claim("w")
    broker.commit(lease, ShardStats(prompts_done=10))

    def must_not_stream():
        raise AssertionError("a resumed job must not re-read its input")
        yield

    second = broker.submit(spec, must_not_stream())
    assert second.job_id == first.job_id and second.shards_total == 5
    assert second.shards["committed"] == 1
    assert [s.job_id for s in broker.list_jobs()] == [first.job_id]


def test_resubmitting_a_cancelled_job_reopens_it_keeping_committed_shards(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 3)).job_id
    broker.commit(broker.claim("w"), ShardStats(prompts_done=10))
    broker.cancel(job_id)
    st = broker.submit(spec, make_shards(spec, 3))
    assert st.state == JobState.QUEUED and st.shards["committed"] == 1
    got = [broker.claim("w").shard.index for _ in range(2)]
    assert got == [1, 2]


def test_resubmitting_a_failed_job_gives_dead_shards_new_retries(broker, make_shards, make_spec):
    spec = make_spec(max_retries=0)
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    assert broker.fail(broker.claim("w"), "boom") == "dead"
    broker.mark_failed(job_id, "operator")
    st = broker.submit(spec, make_shards(spec, 2))
    assert st.state == JobState.QUEUED and st.shards["dead"] == 0 and st.dead_shards == 0
    lease = broker.claim("w")
    assert lease.shard.index == 0 and not lease.dead_letter


def test_rebuild_after_redis_loss_records_committed_shards_and_never_completes(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = spec.identity()
    broker.submit(spec, make_shards(spec, 4))
    broker.client.flushdb()                                  # Redis lost everything
    assert broker.find_job(job_id) is None
    committed = {0: ShardStats(prompts_done=10, samples=10, output_tokens=100, parts={"results": (10, "a" * 64)}),
                 2: ShardStats(prompts_done=9, prompts_failed=1)}
    st = broker.submit(spec, make_shards(spec, 4), committed=committed)
    assert st.shards == {"pending": 2, "leased": 0, "committed": 2, "dead": 0}
    assert st.prompts_done == 19 and st.state == JobState.QUEUED
    assert broker.commits(job_id) == {0: (0, committed[0]), 2: (0, committed[2])}
    assert sorted(broker.claim("w").shard.index for _ in range(2)) == [1, 3]


def test_rebuild_with_every_shard_committed_goes_to_finalizing_not_completed(broker, make_shards, make_spec):
    spec = make_spec()
    st = broker.submit(spec, make_shards(spec, 3), committed={i: ShardStats(prompts_done=10) for i in range(3)})
    assert st.state == JobState.FINALIZING
    assert broker.claim("w") is None


def test_resubmit_reconciles_parts_that_storage_has_and_redis_lost(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    st = broker.submit(spec, make_shards(spec, 2), committed={1: ShardStats(prompts_done=10)})
    assert st.shards["committed"] == 1
    assert broker.claim("w").shard.index == 0
    assert broker.claim("w") is None
    assert broker.status(job_id).prompts_done == 10


def test_interrupted_submit_is_completed_by_the_next_one_and_unclaimable_before(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = spec.identity()

    def dies_after(n):
        for i, ref in enumerate(make_shards(spec, 5)):
            if i == n:
                raise KeyboardInterrupt
            yield ref

    with pytest.raises(KeyboardInterrupt):
        broker.submit(spec, dies_after(3))
    assert broker.claim("w") is None                         # half a shard list is never handed out
    st = broker.submit(spec, make_shards(spec, 5))
    assert st.shards_total == 5 and st.prompts_total == 50
    assert [broker.claim("w").shard.index for _ in range(5)] == [0, 1, 2, 3, 4]


def test_shards_must_belong_to_the_spec(broker, make_shards, make_spec):
    spec, other = make_spec("a"), make_spec("b")
    with pytest.raises(ValueError, match="belongs to job"):
        broker.submit(spec, make_shards(other, 1))
