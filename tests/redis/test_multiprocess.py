"""Processes racing for the same shards: every (shard, token) is won by exactly one of them."""
import collections
import multiprocessing as mp
import time


def claim_all(url: str, prefix: str, worker: str, start_at: float, out) -> None:
    """Child process: claim until nothing is left, reporting (job_id, index, token) on `out`."""
    from ziya_batch.queue import Broker

    broker = Broker.from_url(url, prefix=prefix)
    while time.time() < start_at:          # all processes start claiming together
        time.sleep(0.001)
    got = []
    while (lease := broker.claim(worker)) is not None:
        got.append((lease.job_id, lease.shard.index, lease.token))
    out.put((worker, got))


def hold_lease(url: str, prefix: str, out) -> None:
    """Child process: claim a shard, report it, run lines in isolate mode and heartbeat until killed."""
    from ziya_batch.queue import Broker

    broker = Broker.from_url(url, prefix=prefix)
    lease = broker.claim("doomed")
    line = lease.shard.first_line
    broker.line_started(lease, line)
    out.put((lease.job_id, lease.shard.index, lease.token, line))
    while True:
        time.sleep(0.2)
        broker.heartbeat(lease)


def _race(url, n_procs):
    ctx = mp.get_context("fork")         # the children build their own clients
    out = ctx.Queue()
    start_at = time.time() + 0.5
    procs = [ctx.Process(target=claim_all, args=(url, "zbtest", f"p{i}", start_at, out)) for i in range(n_procs)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    return results


def test_processes_racing_claim_each_shard_exactly_once(broker, redis_server, expire, make_shards, make_spec):
    jobs = [make_spec(f"one{i}") for i in range(10)] + [make_spec("many")]
    expected = collections.Counter()
    for spec in jobs:
        n = 60 if spec.name == "many" else 1
        broker.submit(spec, make_shards(spec, n))
        expected.update((spec.identity(), i, 1) for i in range(n))
    results = _race(redis_server.url, 4)
    claims = collections.Counter(c for _, got in results for c in got)
    assert claims == expected                                # a multiset: no shard twice, none missing
    assert sum(1 for _, got in results if got) >= 2          # the race really had several winners

    # every lease of the big job is lost; the processes race again for the same shards: token 2 each
    many = make_spec("many").identity()
    from ziya_batch.queue import Lease
    from ziya_batch.records import ShardRef

    for i in range(60):
        expire(broker, Lease(many, ShardRef(many, i, "", 0, 0, 1, 1), token=1, attempt=1, lease_s=30, worker_id=""))
    assert len(broker.reap()) == 60
    time.sleep(0.3)                                          # the retry backoff (0.05 s first)
    results = _race(redis_server.url, 2)
    claims = collections.Counter(c for _, got in results for c in got)
    assert claims == collections.Counter((many, i, 2) for i in range(60))


def test_sigkilled_worker_keeps_its_lease_while_alive_and_loses_it_after(broker, redis_server, make_shards, make_spec):
    import os
    import signal


    spec = make_spec(lease_s=1.0, max_retries=3)
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    # the shard failed once already, so the doomed worker runs it in isolate mode
    broker.fail(broker.claim("first"), "earlier failure")
    time.sleep(0.1)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=hold_lease, args=(redis_server.url, "zbtest", out))
    child.start()
    try:
        got_job, index, token, line = out.get(timeout=30)
        assert (got_job, index, token) == (job_id, 0, 2)
        time.sleep(1.5)                                      # longer than lease_s: heartbeats keep it
        assert broker.reap() == []
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        time.sleep(1.2)
        assert broker.reap() == [(job_id, 0, "retry")]
    finally:
        if child.is_alive():
            child.kill()
    lease = broker.claim("heir")
    assert lease.token == 3 and lease.bad_lines == {line}    # the line in flight at death is set aside
