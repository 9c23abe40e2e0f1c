"""A shard's storage series (requeue.lua) starts at its first storage give-back and ends only at its commit, a failed
try of its own, or a reopen of it dead-lettered. A shard given back once sits pending behind every fresh shard of the
job (fresh ones are scored by index, retried ones by time), or is lost to a lease expiry or a plain give-back, so
its series may be hours old when it is next tried, with the job's commits of all that time counted as its
evidence. An outage the design says costs nothing then counts at once. The grace is scaled down (grace_ms below
stands for the 10 minutes, read_back_ms for the hour). Real redis-server."""
import json
import time

from ziya_batch.queue import ShardStats

STORAGE = "storage did not answer on w: ReadTimeoutError: Read timeout on endpoint URL"
GRACE_MS = 300


def _record(broker, job_id, index):
    return json.loads(broker.client.hget(broker.keys.shards(job_id), str(index)))


def _commit(broker, lease):
    assert broker.commit(lease, ShardStats(prompts_done=10, samples=10, parts={"results": (10, "r" * 64)}))


def _claim(broker, wait_claim, index):
    lease = wait_claim(broker, "w")
    assert lease is not None and lease.shard.index == index, lease
    return lease


def _a_blip_then_the_store_answers(broker, make_spec, make_shards, wait_claim, n=4):
    """Shard 0 is caught by a blip; the store answers and shards 1 and 2 commit; shard 0 waits, behind the fresh
    shards, past the grace."""
    broker.storage_grace_ms = GRACE_MS
    broker.storage_read_back_grace_ms = GRACE_MS
    broker.storage_series_gap_ms = GRACE_MS * 2 // 3      # the wait below is longer: shard 0 sits untried
    spec = make_spec(max_retries=0)
    job = broker.submit(spec, make_shards(spec, n)).job_id
    assert broker.give_back(_claim(broker, wait_claim, 0), STORAGE, storage=True) == "retry"     # the blip
    _commit(broker, _claim(broker, wait_claim, 1))
    _commit(broker, _claim(broker, wait_claim, 2))
    time.sleep(GRACE_MS / 1000 + 0.05)
    return job


def test_a_store_wide_outage_after_an_old_blip_costs_nothing_however_long(broker, make_spec, make_shards,
                                                                          wait_claim):
    """Later the whole store goes down (no commit of the job from then on) for longer than the grace, the shards
    tried again and again: every give-back is free, shard 0's too, however long the outage lasts."""
    job = _a_blip_then_the_store_answers(broker, make_spec, make_shards, wait_claim)
    deadline = time.monotonic() + 2 * GRACE_MS / 1000
    while time.monotonic() < deadline:                          # the outage: shards 3 and 0 in turn
        lease = wait_claim(broker, "w")
        assert lease is not None and lease.shard.index in (0, 3)
        assert broker.give_back(lease, STORAGE, storage=True) == "retry", \
            f"a store-wide outage counted shard {lease.shard.index}'s give-back"
    st = broker.status(job)
    assert st.retries == 0 and st.dead_shards == 0


def test_a_short_input_outage_after_an_old_blip_costs_nothing(broker, make_spec, make_shards, wait_claim):
    """Later the input's store alone goes down for less than the grace while a shard past its read commits: shard 0's
    give-back in it is free, as any shard's is in such an outage."""
    job = _a_blip_then_the_store_answers(broker, make_spec, make_shards, wait_claim, n=5)
    in_flight = _claim(broker, wait_claim, 3)                   # read its input before the outage
    assert broker.give_back(_claim(broker, wait_claim, 4), STORAGE, storage=True) == "retry"     # the outage
    _commit(broker, in_flight)
    assert broker.give_back(_claim(broker, wait_claim, 0), STORAGE, storage=True) == "retry", \
        "an input outage shorter than the grace dead-lettered shard 0"
    assert broker.status(job).retries == 0


def test_a_try_lost_to_a_lease_expiry_then_a_short_blip_keeps_the_lines_ids(broker, make_spec, make_shards,
                                                                             wait_claim, expire):
    """Shard 0, caught by a blip, is tried again and reads its input, but its worker dies (a lease expiry, which ends
    no series) and with max_retries 0 it is dead-lettered. Its read-back for the lines' ids meets a short blip:
    read_back must stay on (its lines keep their own ids), not be given up as if the store had failed it for the
    read-back grace."""
    job = _a_blip_then_the_store_answers(broker, make_spec, make_shards, wait_claim, n=3)
    expire(broker, _claim(broker, wait_claim, 0))
    assert [o for *_, o in broker.reap()] == ["dead"]
    lease = _claim(broker, wait_claim, 0)
    assert lease.dead_letter and lease.read_back
    assert broker.give_back(lease, STORAGE, storage=True) == "dead"                 # a short blip on the read-back
    lease = _claim(broker, wait_claim, 0)
    assert lease.dead_letter
    assert lease.read_back, "a short blip after an old one writes the lines numbered FILE:LINE"
    assert "no_read_back" not in _record(broker, job, 0)


def test_a_shard_that_sat_untried_and_then_keeps_failing_alone_is_still_bounded(broker, make_spec, make_shards,
                                                                                wait_claim):
    """The grace that starts again after shard 0 sat untried keeps the job's earlier commits as the store's answer:
    the job's last shard, failing on its own storage try after try (nothing else to commit), is counted once the
    grace has passed again, and dead-lettered, rather than given back for ever."""
    job = _a_blip_then_the_store_answers(broker, make_spec, make_shards, wait_claim, n=3)
    outcomes = []
    deadline = time.monotonic() + 3 * GRACE_MS / 1000
    while "dead" not in outcomes and time.monotonic() < deadline:
        outcomes.append(broker.give_back(_claim(broker, wait_claim, 0), STORAGE, storage=True))
    assert outcomes[0] == "retry" and outcomes[-1] == "dead", outcomes
    assert broker.status(job).dead_shards == 1
