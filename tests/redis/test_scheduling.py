"""Which job a claim serves: priority first, equal priorities in turn, never a cancelled job."""
import collections

from ziya_batch.queue import ShardStats


def test_higher_priority_job_is_served_first(broker, make_shards, make_spec):
    low, high = make_spec("low", priority=0), make_spec("high", priority=5)
    low_id = broker.submit(low, make_shards(low, 3)).job_id
    high_id = broker.submit(high, make_shards(high, 2)).job_id
    order = [broker.claim("w").job_id for _ in range(5)]
    assert order == [high_id, high_id, low_id, low_id, low_id]
    assert broker.claim("w") is None


def test_equal_priority_jobs_share_claims_fairly(broker, make_shards, make_spec):
    specs = [make_spec(f"job{i}") for i in range(3)]
    ids = [broker.submit(s, make_shards(s, 40)).job_id for s in specs]
    counts = collections.Counter()
    for _ in range(60):
        lease = broker.claim("w")
        counts[lease.job_id] += 1
        assert broker.commit(lease, ShardStats(prompts_done=10))
    assert counts == {i: 20 for i in ids}


def test_new_higher_priority_job_overtakes_a_running_one(broker, make_shards, make_spec):
    a = make_spec("a")
    a_id = broker.submit(a, make_shards(a, 10)).job_id
    assert broker.claim("w").job_id == a_id
    urgent = make_spec("urgent", priority=100)
    u_id = broker.submit(urgent, make_shards(urgent, 1)).job_id
    assert broker.claim("w").job_id == u_id
    assert broker.claim("w").job_id == a_id


def test_backoff_of_one_job_does_not_block_another(broker, make_shards, make_spec):
    a, b = make_spec("a", priority=9, max_retries=5), make_spec("b")
    a_id = broker.submit(a, make_shards(a, 1)).job_id
    b_id = broker.submit(b, make_shards(b, 2)).job_id
    lease = broker.claim("w")
    assert lease.job_id == a_id
    broker.fail(lease, "transient")
    assert broker.claim("w").job_id == b_id            # a's only shard is backing off


def test_lower_priority_job_is_idle_until_higher_ones_drain(broker, make_shards, make_spec):
    hi, lo = make_spec("hi", priority=1), make_spec("lo", priority=-1)
    broker.submit(lo, make_shards(lo, 2))
    hi_id = broker.submit(hi, make_shards(hi, 3)).job_id
    got = [broker.claim(f"w{i}").job_id for i in range(3)]
    assert got == [hi_id] * 3


def test_a_job_submitted_again_with_another_priority_moves_in_the_claim_order(broker, make_shards, make_spec):
    """Priority decides how the job runs, not what it writes: the same job (same id), served from its new place."""
    a, b = make_spec("a"), make_spec("b")
    a_id = broker.submit(a, make_shards(a, 3)).job_id
    b_id = broker.submit(b, make_shards(b, 3)).job_id
    assert broker.claim("w").job_id == a_id
    urgent = make_spec("b", priority=50)
    assert broker.submit(urgent, make_shards(urgent, 3)).job_id == b_id
    assert broker.get_spec(b_id).priority == 50
    assert [broker.claim("w").job_id for _ in range(4)] == [b_id, b_id, b_id, a_id]
