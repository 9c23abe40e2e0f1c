"""The transition tables, and the scripts refusing what they do not allow."""
import pytest

from ziya_batch.queue import (JOB_TRANSITIONS, SHARD_TRANSITIONS, JobState, ShardState, ShardStats,
                              TransitionError, check_job_transition, check_shard_transition)
from ziya_batch.queue.states import lua_tables


def test_tables_cover_every_state_and_finished_states_are_final_or_reopen_only():
    assert set(JOB_TRANSITIONS) == set(JobState)
    assert set(SHARD_TRANSITIONS) == set(ShardState)
    assert JOB_TRANSITIONS[JobState.COMPLETED] == frozenset()
    # a commit is taken back only where storage lost its staged parts before promotion (uncommit.lua): the
    # shard runs again, and a job that was finalizing on the strength of it is running again
    assert SHARD_TRANSITIONS[ShardState.COMMITTED] == {ShardState.PENDING, ShardState.DEAD}
    assert JobState.RUNNING in JOB_TRANSITIONS[JobState.FINALIZING]
    # the only way out of failed/cancelled is a resubmission reopening the job
    for s in (JobState.FAILED, JobState.CANCELLED):
        assert JOB_TRANSITIONS[s] == {JobState.QUEUED, JobState.FINALIZING}


def test_job_state_is_ordered_and_knows_finished():
    assert JobState.QUEUED < JobState.RUNNING < JobState.FINALIZING < JobState.COMPLETED
    assert [s for s in JobState if s.is_finished()] == [JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED]
    assert JobState("running") is JobState.RUNNING


def test_python_checks_match_tables():
    check_job_transition(JobState.RUNNING, JobState.FINALIZING)
    check_shard_transition(ShardState.LEASED, ShardState.DEAD)
    with pytest.raises(TransitionError):
        check_job_transition(JobState.RUNNING, JobState.COMPLETED)
    check_shard_transition(ShardState.COMMITTED, ShardState.PENDING)
    with pytest.raises(TransitionError):
        check_shard_transition(ShardState.COMMITTED, ShardState.LEASED)
    lua = lua_tables()
    assert '["completed"]={}' in lua and '["running"]={["finalizing"]=true' in lua


def test_refused_job_transitions_raise_and_change_nothing(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    with pytest.raises(TransitionError, match="queued to completed"):
        broker.mark_completed(job_id)
    assert broker.status(job_id).state == JobState.QUEUED
    lease = broker.claim("w")
    assert broker.status(job_id).state == JobState.RUNNING
    with pytest.raises(TransitionError, match="running to completed"):
        broker.mark_completed(job_id)
    broker.mark_failed(job_id, "operator stopped it")
    st = broker.status(job_id)
    assert st.state == JobState.FAILED and st.error == "operator stopped it" and st.finished_at is not None
    with pytest.raises(TransitionError, match="failed to completed"):
        broker.mark_completed(job_id)
    # a failed job hands out nothing, but the running shard's output is still accepted
    assert broker.claim("w2") is None
    assert broker.commit(lease, ShardStats(prompts_done=10))


def test_allowed_job_path_to_completed(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    seen = [broker.status(job_id).state]
    for _ in range(2):
        lease = broker.claim("w")
        seen.append(broker.status(job_id).state)
        assert broker.commit(lease, ShardStats(prompts_done=10, samples=10, output_tokens=50))
    seen.append(broker.status(job_id).state)
    assert broker.begin_finalize(job_id)
    broker.mark_completed(job_id)
    seen.append(broker.status(job_id).state)
    assert seen == [JobState.QUEUED, JobState.RUNNING, JobState.RUNNING, JobState.FINALIZING, JobState.COMPLETED]
    with pytest.raises(TransitionError):
        broker.mark_failed(job_id, "too late")


def test_shard_counts_follow_transitions(broker, make_shards, make_spec):
    spec = make_spec(max_retries=0)
    job_id = broker.submit(spec, make_shards(spec, 3)).job_id
    a, b = broker.claim("w"), broker.claim("w")
    assert broker.shard_counts(job_id) == {"pending": 1, "leased": 2, "committed": 0, "dead": 0}
    broker.commit(a, ShardStats(prompts_done=10))
    assert broker.fail(b, "boom") == "dead"
    assert broker.shard_counts(job_id) == {"pending": 1, "leased": 0, "committed": 1, "dead": 1}
    assert sum(broker.shard_counts(job_id).values()) == broker.status(job_id).shards_total == 3


def test_lua_scripts_refuse_a_shard_transition_the_table_forbids(broker, make_shards, make_spec):
    """Even with inconsistent keys (a committed shard listed as pending), claim will not re-lease it."""
    import json

    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    k = broker.keys
    rec = json.loads(broker.client.hget(k.shards(job_id), "0"))
    rec["state"] = "committed"
    broker.client.hset(k.shards(job_id), "0", json.dumps(rec))
    with pytest.raises(TransitionError, match="shard cannot go from committed to leased"):
        broker.claim("w")
    assert json.loads(broker.client.hget(k.shards(job_id), "0"))["state"] == "committed"


def test_broker_accepts_a_client_without_decoded_responses(redis_server, make_shards, make_spec):
    import redis

    from ziya_batch.queue import Broker

    broker = Broker(redis.Redis.from_url(redis_server.url), prefix="zbtest")
    spec = make_spec()
    broker.client.flushdb()
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    assert broker.claim("w").job_id == job_id
