"""Random sequences of queue operations; after every step the Redis keys agree with each other."""
import json
import random

import pytest

from ziya_batch.queue import Broker, JobState, ShardStats


def check_invariants(broker: Broker, job_id: str, tokens_seen: dict) -> None:
    k, c = broker.keys, broker.client
    h = c.hgetall(k.job(job_id))
    shards = {int(i): json.loads(v) for i, v in c.hgetall(k.shards(job_id)).items()}
    pending = {int(i) for i in c.zrange(k.pending(job_id), 0, -1)}
    leased = {int(i) for i in c.zrange(k.leased(job_id), 0, -1)}
    global_leases = {m for m in c.zrange(k.leases(), 0, -1) if m.startswith(job_id)}
    dead_set = {int(i) for i in c.smembers(k.dead(job_id))}
    by_state = {s: {i for i, sh in shards.items() if sh["state"] == s} for s in ("pending", "leased", "committed", "dead")}
    # counters == records
    for s, members in by_state.items():
        assert int(h[f"n_{s}"]) == len(members), (s, h, by_state)
    assert int(h["total_shards"]) == len(shards)
    # every shard is in exactly the structure its state says
    assert pending == by_state["pending"] | by_state["dead"]
    assert leased == by_state["leased"]
    assert global_leases == {k.lease_member(job_id, i) for i in leased}
    assert by_state["dead"] <= dead_set
    # fencing tokens never go back
    for i, sh in shards.items():
        assert sh["token"] >= tokens_seen.get(i, 0)
        tokens_seen[i] = sh["token"]
    # committed sums == job counters
    done = sum(sh["stats"]["prompts_done"] for sh in shards.values() if sh["state"] == "committed")
    assert int(h["prompts_done"]) == done
    state = JobState(h["state"])
    if state == JobState.FINALIZING:
        assert len(by_state["committed"]) == len(shards)
    if state == JobState.CANCELLED:
        assert not leased
    if state in (JobState.QUEUED, JobState.RUNNING) and len(by_state["committed"]) < len(shards):
        # not stranded: something is pending (maybe backing off) or leased
        assert pending or leased


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_keys_consistent(redis_client, seed, expire, make_shards, make_spec):
    rng = random.Random(seed)
    broker = Broker(redis_client, prefix="zbtest", backoff_base_s=0.0, backoff_max_s=0.0, promote_grace_s=0.0,
                    restart_grace=False)
    spec = make_spec(f"rand{seed}", max_retries=rng.choice([0, 1, 3]))
    job_id = broker.submit(spec, make_shards(spec, 16)).job_id
    live: list = []
    stale: list = []
    committed: list = []        # leases whose commit Redis accepted and no uncommit took back
    lost: dict = {}             # shard -> uncommits counted against max_retries
    tokens: dict = {}
    cancelled = False
    for step in range(150):
        op = rng.choice(["claim", "claim", "commit", "commit", "fail", "expire", "heartbeat", "stale", "line",
                         "uncommit"])
        if step > 30 and rng.random() < 0.03 * (seed % 3):   # seeds 0, 3: never cancelled
            op = "cancel"
        if op == "claim":
            lease = broker.claim(f"w{rng.randrange(3)}")
            if lease:
                assert not cancelled
                live.append(lease)
        elif op == "commit" and live:
            lease = live.pop(rng.randrange(len(live)))
            n = lease.shard.num_lines
            st = ShardStats(prompts_failed=n) if lease.dead_letter else ShardStats(prompts_done=n)
            assert broker.commit(lease, st)
            stale.append(lease)
            committed.append(lease)
        elif op == "fail" and live:
            lease = live.pop(rng.randrange(len(live)))
            assert broker.fail(lease, "boom", bad_line=rng.choice([None, lease.shard.first_line])) in ("retry", "dead")
            stale.append(lease)
        elif op == "expire" and live:
            lease = live.pop(rng.randrange(len(live)))
            expire(broker, lease)
            assert broker.reap()
            stale.append(lease)
        elif op == "heartbeat" and live:
            assert broker.heartbeat(rng.choice(live))
        elif op == "line" and live:
            lease = rng.choice(live)
            assert broker.line_started(lease, lease.shard.first_line + rng.randrange(lease.shard.num_lines))
        elif op == "uncommit" and committed:
            # storage lost a committed shard's staged parts; its stale lease stays in `stale`
            lease = committed.pop(rng.randrange(len(committed)))
            i = lease.shard.index
            lost[i] = lost.get(i, 0) + 1
            got = broker.uncommit(job_id, i, lease.token, "lost")
            # past max_retries the shard is taken back but the job fails, and the shard's count starts again
            assert got.outcome == ("failed" if lost[i] > spec.reliability.max_retries else "retry")
            assert got.times_lost == lost[i]
            if got.outcome == "failed":
                lost[i] = 0
                assert broker.status(job_id).state in (JobState.FAILED, JobState.CANCELLED)
            assert broker.uncommit(job_id, i, lease.token, "lost").outcome == "refused"
        elif op == "stale" and stale:
            lease = rng.choice(stale)
            assert not broker.commit(lease, ShardStats(prompts_done=1))
            assert not broker.heartbeat(lease)
        elif op == "cancel":
            abandon = rng.random() < 0.5
            broker.cancel(job_id, abandon_running=abandon)
            cancelled = True
            if abandon:
                stale += live
                live = []
        check_invariants(broker, job_id, tokens)
    final = broker.status(job_id).state
    assert final in set(JobState) - {JobState.COMPLETED}     # only a finalizer completes a job
