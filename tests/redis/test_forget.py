"""Forgetting finished jobs on a real Redis: every key and index entry of the job goes in one step, nothing of
another job changes, unfinished jobs and jobs with live leases are refused, --finished-before selects by the time a
job finished, a dry run changes nothing, and a worker still at work on a forgotten job writes nothing back."""
from __future__ import annotations

import pytest
import redis

from ziya_batch import jobs
from ziya_batch.errors import JobNotFinished, JobNotFound
from ziya_batch.queue import JobState, ShardStats

DAY_MS = 86_400_000


@pytest.fixture
def raw(redis_server, redis_client):
    """A client that reads values as bytes (DUMP's), on the database `redis_client` flushes."""
    return redis.Redis.from_url(redis_server.url)


def _dump(raw) -> dict[bytes, bytes]:
    return {key: raw.dump(key) for key in raw.scan_iter("*")}


def _keys_naming(client, job_id: str) -> list[str]:
    return sorted(k for k in client.scan_iter("*") if job_id in k)


def _members_naming(broker, job_id: str) -> dict[str, list[str]]:
    """Members of the indexes that mention the job, by index."""
    k, c = broker.keys, broker.client
    found = {name: [m for m in c.zrange(key, 0, -1) if job_id in m]
             for name, key in (("jobs", k.jobs()), ("ready", k.ready()), ("leases", k.leases()),
                               ("workers", k.workers()))}
    for wid in c.zrange(k.workers(), 0, -1):
        notes = c.hget(k.worker(wid), "cannot_load") or ""
        if job_id in notes:
            found.setdefault("cannot_load", []).append(wid)
    return {name: members for name, members in found.items() if members}


def _complete(broker, job_id: str) -> None:
    """Commit every claimable shard of the job (one worker) and mark it completed."""
    while (lease := broker.claim("w-done", accept=lambda j: j == job_id)) is not None:
        broker.commit(lease, ShardStats(prompts_done=10, samples=10, output_tokens=30, parts={"results": (10, "a" * 64)}))
    broker.mark_completed(job_id)


def _a_full_life(broker, make_spec, make_shards, wait_claim) -> str:
    """A job that went through everything that writes a key: leases, mid-shard progress and credit, a failure that
    dead-lettered a shard, errors, commits, a finalizer election, a worker's note; completed."""
    spec = make_spec("full", max_retries=0)
    job_id = broker.submit(spec, make_shards(spec, 4)).job_id
    broker.register_worker("w1", "host-1")
    broker.note_cannot_load("w1", job_id, "out of memory loading the engine")
    first = broker.claim("w1")
    broker.add_progress(job_id, "w1", 3, 3, 40)
    assert broker.fail(first, "boom") == "dead"
    while (lease := wait_claim(broker, "w1", timeout_s=2.0)) is not None:
        broker.commit(lease, ShardStats(prompts_done=10, samples=10, output_tokens=30, parts={"results": (10, "a" * 64)}))
        if broker.status(job_id).state == JobState.FINALIZING:
            break
    assert broker.begin_finalize(job_id)
    broker.mark_completed(job_id)
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.COMPLETED and st.dead_shards == 1 and st.errors
    return job_id


def test_forget_drops_every_key_and_index_entry_of_the_job_and_nothing_else(broker, raw, make_spec, make_shards,
                                                                            wait_claim):
    c, k = broker.client, broker.keys
    job_id = _a_full_life(broker, make_spec, make_shards, wait_claim)
    other_spec = make_spec("other")
    other = broker.submit(other_spec, make_shards(other_spec, 3)).job_id
    broker.register_worker("w2", "host-2")
    held = broker.claim("w2")                              # the other job runs: leases, progress, a note
    assert held.job_id == other
    broker.add_progress(other, "w2", 1, 1, 7)
    broker.note_cannot_load("w1", other, "cannot load")
    named = _keys_naming(c, job_id)
    # what a job leaves: its hash, spec, files, shards, dead set, errors, progress and credit at least
    assert {k.job(job_id), k.spec(job_id), k.files(job_id), k.shards(job_id), k.dead(job_id), k.errors(job_id),
            k.progress(job_id), k.credit(job_id)} <= set(named), named
    assert set(named) <= set(k.job_keys(job_id))          # and nothing job_keys does not know of
    assert _members_naming(broker, job_id) == {"jobs": [job_id], "cannot_load": ["w1"]}
    before = _dump(raw)

    forgotten = jobs.forget_job(broker, job_id)

    assert (forgotten.job_id, forgotten.state, forgotten.shards, forgotten.dry_run) == (job_id, "completed", 4, False)
    assert _keys_naming(c, job_id) == []
    assert _members_naming(broker, job_id) == {}
    after = _dump(raw)
    changed = {key.decode() for key in set(before) | set(after) if before.get(key) != after.get(key)}
    # the job's own keys went; of the others only the indexes that named it, and the worker whose note named it
    assert changed == set(named) | {k.jobs(), k.worker("w1")}, changed
    assert c.zrange(k.jobs(), 0, -1) == [other]
    assert c.hget(k.worker("w1"), "cannot_load") == '{"%s":"cannot load"}' % other
    assert [s.job_id for s in broker.list_jobs()] == [other]
    assert broker.find_job(job_id) is None
    with pytest.raises(JobNotFound):
        jobs.forget_job(broker, job_id)                   # forgotten: unknown now
    assert broker.heartbeat(held) and broker.commit(held, ShardStats(prompts_done=10))   # the other job runs on


def test_a_note_that_was_the_workers_only_one_goes_with_its_field(broker, make_spec, make_shards):
    spec = make_spec("noted")
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    broker.register_worker("w1", "h")
    broker.note_cannot_load("w1", job_id, "no")
    _complete(broker, job_id)
    jobs.forget_job(broker, job_id)
    assert broker.client.hgetall(broker.keys.worker("w1")).keys() == {"host", "info", "started_ms"}
    assert [w.cannot_load for w in broker.worker_infos()] == [{}]


@pytest.mark.parametrize("state", ["queued", "running", "cancelling", "finalizing"])
def test_a_job_that_is_not_finished_is_refused_and_left_as_it_was(broker, raw, make_spec, make_shards, state):
    spec = make_spec(f"live-{state}")
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    if state in ("running", "cancelling"):
        broker.claim("w1")
    if state == "cancelling":
        broker.cancel(job_id)
    if state == "finalizing":
        while (lease := broker.claim("w1")) is not None:
            broker.commit(lease, ShardStats(prompts_done=10))
    assert broker.status(job_id).state.value == state
    before = _dump(raw)
    with pytest.raises(JobNotFinished, match=f"job {job_id} is {state}"):
        jobs.forget_job(broker, job_id)
    with pytest.raises(JobNotFinished):
        jobs.forget_job(broker, job_id, dry_run=True)
    assert _dump(raw) == before


def test_a_finished_job_with_a_live_lease_waits_for_it_to_expire(broker, make_spec, make_shards, expire):
    """A job failed while a worker ran one of its shards: that worker may still write it. Once its lease has expired
    (the worker gone) the job is forgotten with its lease, and whatever that worker still sends writes nothing."""
    c, k = broker.client, broker.keys
    spec = make_spec("failed-running")
    job_id = broker.submit(spec, make_shards(spec, 3)).job_id
    lease = broker.claim("w1")
    broker.mark_failed(job_id, "an operator failed it")
    with pytest.raises(JobNotFinished, match="1 of its shards are leased to workers"):
        jobs.forget_job(broker, job_id)
    assert broker.find_job(job_id) is not None and c.zcard(k.leases()) == 1
    expire(broker, lease)
    assert jobs.forget_job(broker, job_id).state == "failed"
    assert _keys_naming(c, job_id) == [] and c.zcard(k.leases()) == 0
    # the late worker: refused everywhere, and no key of the job comes back
    assert not broker.heartbeat(lease)
    assert not broker.line_started(lease, 3)
    broker.add_progress(job_id, "w1", 5, 5, 50)
    assert not broker.commit(lease, ShardStats(prompts_done=10))
    assert broker.fail(lease, "late") == "lost"
    assert broker.reap() == []
    assert not broker.begin_finalize(job_id)
    assert _keys_naming(c, job_id) == [] and _members_naming(broker, job_id) == {}


def test_unknown_ids_and_ids_naming_a_jobs_keys_are_not_found(broker, raw, make_spec, make_shards):
    spec = make_spec("kept")
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    _complete(broker, job_id)
    before = _dump(raw)
    for bad in ("0123456789abcdef", f"{job_id}:spec", f"{job_id}:shards", "", "*", f"{job_id}|0"):
        with pytest.raises(JobNotFound, match="no job"):
            jobs.forget_job(broker, bad)
        assert broker.forget_job(bad).outcome == "unknown"
    assert _dump(raw) == before


def test_a_dry_run_lists_the_job_and_changes_nothing(broker, raw, make_spec, make_shards):
    spec = make_spec("dry")
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    _complete(broker, job_id)
    before = _dump(raw)
    got = jobs.forget_job(broker, job_id, dry_run=True)
    assert (got.job_id, got.name, got.state, got.shards, got.dry_run) == (job_id, "dry", "completed", 2, True)
    assert jobs.describe_forgotten(got).startswith(f"would forget {job_id} (dry): completed ")
    assert _dump(raw) == before


def _finished_at(broker, job_id: str, ms) -> None:
    """Inject when the job finished (Redis ms)."""
    broker.client.hset(broker.keys.job(job_id), "finished_ms", str(ms))


def test_finished_before_selects_by_when_jobs_finished(broker, raw, make_spec, make_shards):
    c, k = broker.client, broker.keys
    now_ms = int(broker.server_time_s() * 1000)
    ids = {}
    for name, state in (("old-done", "completed"), ("old-failed", "failed"), ("old-cancelled", "cancelled"),
                        ("recent", "completed"), ("legacy", "completed"), ("running", "queued")):
        spec = make_spec(name)
        ids[name] = broker.submit(spec, make_shards(spec, 2)).job_id
        if state == "completed":
            _complete(broker, ids[name])
        elif state == "failed":
            broker.mark_failed(ids[name], "x")
        elif state == "cancelled":
            broker.cancel(ids[name])
    _finished_at(broker, ids["old-done"], now_ms - 10 * DAY_MS)
    _finished_at(broker, ids["old-failed"], now_ms - 8 * DAY_MS)
    _finished_at(broker, ids["old-cancelled"], now_ms - 7 * DAY_MS - 1000)
    _finished_at(broker, ids["recent"], now_ms - 6 * DAY_MS)
    # finished before finish times were recorded: its last change counts
    c.hdel(k.job(ids["legacy"]), "finished_ms")
    c.hset(k.job(ids["legacy"]), "updated_ms", now_ms - 30 * DAY_MS)
    c.hset(k.job(ids["running"]), "finished_ms", now_ms - 30 * DAY_MS)      # not finished, whatever it says
    before = _dump(raw)

    would, refused = jobs.forget_finished_before(broker, 7 * 86400, dry_run=True)
    assert refused == [] and _dump(raw) == before
    expected = [ids[n] for n in ("old-done", "old-failed", "old-cancelled", "legacy")]
    assert [j.job_id for j in would] == expected and all(j.dry_run for j in would)
    assert [j.state for j in would] == ["completed", "failed", "cancelled", "completed"]

    done, refused = jobs.forget_finished_before(broker, 7 * 86400)
    assert [j.job_id for j in done] == expected and refused == []
    assert sorted(s.job_id for s in broker.list_jobs()) == sorted([ids["recent"], ids["running"]])
    for job_id in expected:
        assert _keys_naming(c, job_id) == [] and _members_naming(broker, job_id) == {}

    assert jobs.forget_finished_before(broker, 7 * 86400) == ([], [])        # nothing left that old
    done, _ = jobs.forget_finished_before(broker, 5 * 86400, now_s=now_ms / 1000)
    assert [j.job_id for j in done] == [ids["recent"]]
    assert [s.job_id for s in broker.list_jobs()] == [ids["running"]]


def test_the_cut_off_is_checked_in_the_same_step_as_the_forget(broker, make_spec, make_shards):
    """A job selected as old that is reopened and finishes again before its forget runs is left alone."""
    spec = make_spec("again")
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    _complete(broker, job_id)
    finished_ms = int(broker.client.hget(broker.keys.job(job_id), "finished_ms"))
    got = broker.forget_job(job_id, finished_before_ms=finished_ms)
    assert got.outcome == "too recent" and got.finished_at == finished_ms / 1000
    assert broker.find_job(job_id) is not None
    assert broker.forget_job(job_id, finished_before_ms=finished_ms + 1).outcome == "forgotten"


def test_finished_before_reports_a_selected_job_whose_lease_is_live(broker, make_spec, make_shards):
    spec, quiet = make_spec("leased"), make_spec("quiet")
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    quiet_id = broker.submit(quiet, make_shards(quiet, 1)).job_id
    broker.claim("w1", accept=lambda j: j == job_id)
    broker.mark_failed(job_id, "x")
    _complete(broker, quiet_id)
    done, refused = jobs.forget_finished_before(broker, 0, now_s=broker.server_time_s() + 1)
    assert [j.job_id for j in done] == [quiet_id]
    assert len(refused) == 1 and isinstance(refused[0], JobNotFinished) and job_id in str(refused[0])
    assert broker.find_job(job_id) is not None
