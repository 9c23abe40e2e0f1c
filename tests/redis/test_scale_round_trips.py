"""What the control plane's reads and writes cost in Redis round trips as the queue grows: counted (every packet a
client sends is one: a command, or a pipeline), not timed. A listing, a /metrics scrape and a new job's submit read
every job the queue knows (thousands, for a service run for months); a submit writes every input file's name (an
input of thousands of small files). Before, each cost a round trip or more per job or per file."""
from __future__ import annotations

import pytest
import redis

from ziya_batch.jobs import waiting_note, waiting_notes
from ziya_batch.queue import ShardStats
from ziya_batch.queue.status import STATUS_BATCH

STATS = ShardStats(prompts_done=10, samples=10, output_tokens=100, parts={"results": (10, "a" * 64)})


@pytest.fixture
def trips(monkeypatch):
    """trips() -> round trips sent by every Redis client of this process so far."""
    count = [0]
    orig = redis.connection.AbstractConnection.send_packed_command

    def send(conn, command, check_health=True):
        count[0] += 1
        return orig(conn, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", send)
    return lambda: count[0]


def _jobs(broker, make_spec, make_shards, n: int, done: int) -> list[str]:
    """n jobs of two shards: the first `done` completed (one with a lease expiry), one with a shard leased."""
    ids = []
    for i in range(n):
        spec = make_spec(f"j{i}")
        job_id = broker.submit(spec, make_shards(spec, 2)).job_id
        ids.append(job_id)
        if i < done:
            for _ in range(2):
                broker.commit(broker.claim("w", accept=lambda j, job_id=job_id: j == job_id), STATS)
            broker.mark_completed(job_id)
    broker.register_worker("w2", "host-2", {"device": "cpu"})
    broker.claim("w2", accept=lambda j: j == ids[-1])
    broker.client.hset(broker.keys.job(ids[0]), "lease_expiries", 3)
    return ids


def _same(a, b) -> bool:
    """Two statuses of one job read at two moments: equal but for the last minute's rate."""
    live = {"tokens_per_s": 0, "prompts_per_s": 0, "eta_s": None}
    return {**a.to_dict(), **live} == {**b.to_dict(), **live}


def test_list_jobs_round_trips_do_not_grow_with_jobs(broker, make_spec, make_shards, trips):
    n = STATUS_BATCH + 50
    ids = _jobs(broker, make_spec, make_shards, n, done=n - 10)
    broker.list_jobs()                   # statuses.lua loaded into Redis (SCRIPT LOAD, once a server)
    before = trips()
    listed = broker.list_jobs()
    used = trips() - before
    # the ids, TIME, a statuses.lua call per STATUS_BATCH jobs, the leased shards' records, their holders' hosts
    assert used <= 2 + -(-n // STATUS_BATCH) + 2, used          # was 3 a job
    assert [s.job_id for s in listed] == ids                     # oldest first, as before
    for st in listed:
        assert _same(st, broker.status(st.job_id))
    busy = listed[-1]
    assert busy.shards["leased"] == 1 and busy.workers == ({"worker_id": "w2", "host": "host-2", "shards": [0]},)
    assert listed[0].lease_expiries == 3 and listed[0].state.value == "completed"


def test_list_jobs_leaves_out_a_job_deleted_under_it(broker, make_spec, make_shards):
    ids = _jobs(broker, make_spec, make_shards, 3, done=1)
    broker.client.delete(broker.keys.job(ids[1]))       # its hash gone, its id still indexed
    assert [s.job_id for s in broker.list_jobs()] == [ids[0], ids[2]]


def test_lease_expiries_is_one_round_trip_over_the_jobs(broker, make_spec, make_shards, trips):
    _jobs(broker, make_spec, make_shards, 40, done=30)
    before = trips()
    assert broker.lease_expiries() == 3
    assert trips() - before <= 2                 # the ids, then one pipeline (was a status of every job)


def test_metrics_scrape_round_trips_do_not_grow_with_jobs(broker, make_spec, make_shards, trips):
    from ziya_batch.api.metrics import QueueCollector

    class Holder:
        def get(self):
            return broker

    _jobs(broker, make_spec, make_shards, 60, done=55)
    broker.list_jobs()                   # statuses.lua loaded into Redis (SCRIPT LOAD, once a server)
    before = trips()
    families = {f.name: f for f in QueueCollector(Holder()).collect()}
    used = trips() - before
    assert families["ziya_batch_redis_up"].samples[0].value == 1
    assert families["ziya_batch_jobs"].samples[0].value == 60
    assert used <= 15, used                     # was 6 a job (every status read twice)


def test_waiting_notes_read_the_workers_once(broker, make_spec, make_shards, trips):
    n = 30
    for i in range(n):                           # queued, nothing leased: each gets the note of no worker
        spec = make_spec(f"q{i}")
        broker.submit(spec, make_shards(spec, 2))
    statuses = broker.list_jobs()
    one_by_one = [waiting_note(broker, st) for st in statuses]
    before = trips()
    notes = waiting_notes(broker, statuses)
    used = trips() - before
    assert notes == one_by_one and all(n and "no live worker" in n for n in notes)
    assert used <= n + 5, used                   # a spec a job and the workers once (was ~5 a job)


def test_submit_of_many_files_is_not_a_round_trip_a_file(broker, make_spec, make_shards, trips):
    spec = make_spec("files")
    n_files = 700
    before = trips()
    st = broker.submit(spec, make_shards(spec, n_files, files=n_files))
    used = trips() - before
    assert st.shards_total == n_files and st.sealed
    assert used <= 15, used                      # was one RPUSH a file
    files = broker.client.lrange(broker.keys.files(st.job_id), 0, -1)
    assert files == [f"/data/files-{i}.jsonl" for i in range(n_files)]
    # every shard names its own file, as claimed
    seen = set()
    while (lease := broker.claim("w")) is not None:
        assert lease.shard.file == f"/data/files-{lease.shard.index % n_files}.jsonl"
        seen.add(lease.shard.index)
    assert len(seen) == n_files
