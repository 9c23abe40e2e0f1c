"""One finalizer among many callers; status fields and their JSON."""
import json
import threading

from ziya_batch.queue import Broker, JobState, ShardStats


def test_begin_finalize_has_one_winner_among_threads(broker, redis_server, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    broker.commit(broker.claim("w"), ShardStats(prompts_done=10))
    brokers = [Broker.from_url(redis_server.url, prefix="zbtest") for _ in range(16)]
    start = threading.Barrier(len(brokers))
    wins = []

    def race(b):
        start.wait()
        wins.append(b.begin_finalize(job_id))

    threads = [threading.Thread(target=race, args=(b,)) for b in brokers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 15 + [True]


def test_begin_finalize_only_in_finalizing_and_again_after_the_winner_died(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    assert not broker.begin_finalize(job_id)                 # queued: nothing to finalize
    broker.commit(broker.claim("w"), ShardStats(prompts_done=10))
    assert broker.begin_finalize(job_id, ttl_s=0.05)
    import time
    time.sleep(0.1)
    assert broker.begin_finalize(job_id)                     # the first finalizer's election expired
    assert not broker.begin_finalize(job_id)


def test_end_finalize_gives_up_only_the_callers_election_at_once_or_after_a_while(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    broker.commit(broker.claim("w"), ShardStats(prompts_done=10))
    assert broker.begin_finalize(job_id, "f1")
    assert not broker.end_finalize(job_id, "f2")                 # not its election: it stands
    assert not broker.begin_finalize(job_id, "f2")
    assert broker.end_finalize(job_id, "f1", after_s=0.2)        # another caller may take it in 0.2 s
    assert 0 < broker.client.pttl(broker.keys.finalizer(job_id)) <= 200
    assert not broker.begin_finalize(job_id, "f2") and broker.unfinished_finalizing() == []
    import time
    time.sleep(0.25)
    assert broker.unfinished_finalizing() == [job_id]
    assert broker.begin_finalize(job_id, "f2")
    assert broker.end_finalize(job_id, "f2")                     # at once
    assert broker.begin_finalize(job_id, "f3")


def test_status_counts_rate_eta_and_json(broker, make_shards, make_spec):
    spec = make_spec(max_retries=0)
    job_id = broker.submit(spec, make_shards(spec, 4)).job_id
    broker.register_worker("w1", "node-a", {})
    a, b, c = broker.claim("w1"), broker.claim("w1"), broker.claim("w1")
    broker.add_progress(job_id, "w1", prompts=5, samples=5, output_tokens=600)
    assert broker.commit(a, ShardStats(prompts_done=10, samples=20, output_tokens=1000))
    broker.fail(b, "Traceback: boom")
    st = broker.status(job_id, detail=True)
    assert st.state == JobState.RUNNING
    assert (st.prompts_total, st.prompts_done, st.samples, st.output_tokens) == (40, 10, 20, 1000)
    assert st.retries == 1 and st.dead_shards == 1
    assert st.shards == {"pending": 1, "leased": 1, "committed": 1, "dead": 1}
    # 600 tokens reported mid-shard + the 400 the commit added on top: counted once, 1000 in all
    window_s = st.output_tokens / st.tokens_per_s
    assert 1.0 <= window_s <= 60.0
    assert st.prompts_per_s > 0 and st.eta_s is not None
    assert abs(st.eta_s - st.prompts_remaining / st.prompts_per_s) < 1e-6
    assert st.workers == ({"worker_id": "w1", "host": "node-a", "shards": [2]},)
    d = json.loads(json.dumps(st.to_dict()))
    assert d["state"] == "running" and d["errors"][0]["message"] == "Traceback: boom"
    assert d["leases"][0]["shard"] == c.shard.index and d["leases"][0]["expires_in_s"] > 0
    assert d["shard_lists"] == {"pending": [3], "leased": [2], "dead_lettered": [1]}
    assert "errors" not in broker.status(job_id).to_dict()


def test_progress_credit_is_not_counted_twice(broker, make_shards, make_spec):
    spec = make_spec()
    job_id = broker.submit(spec, make_shards(spec, 2)).job_id
    lease = broker.claim("w")
    broker.add_progress(job_id, "w", prompts=4, samples=4, output_tokens=300)
    broker.add_progress(job_id, "w", prompts=6, samples=6, output_tokens=200)
    broker.commit(lease, ShardStats(prompts_done=10, output_tokens=500))
    members = broker.client.zrange(broker.keys.progress(job_id), 0, -1)
    assert sum(int(m.split(":")[3]) for m in members) == 500
    assert sum(int(m.split(":")[2]) for m in members) == 10


def test_errors_list_is_capped(redis_client, make_shards, make_spec):
    broker = Broker(redis_client, prefix="zbtest", backoff_base_s=0.0, errors_kept=5)
    spec = make_spec(max_retries=50)
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    for i in range(12):
        broker.fail(broker.claim("w"), f"failure {i}")
    errs = broker.status(job_id, detail=True).errors
    assert [e["message"] for e in errs] == [f"failure {i}" for i in range(11, 6, -1)]


def test_list_jobs_and_find_job(broker, make_shards, make_spec):
    a, b = make_spec("a"), make_spec("b")
    broker.submit(a, make_shards(a, 1))
    broker.submit(b, make_shards(b, 1))
    assert [s.name for s in broker.list_jobs()] == ["a", "b"]
    assert broker.find_job("ffffffffffffffff") is None
    assert broker.get_spec(a.identity()) == a
    broker.delete_job(a.identity())
    assert [s.name for s in broker.list_jobs()] == ["b"]
