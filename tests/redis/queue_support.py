"""Shared by the Redis tests: job specs, shard descriptors, lease shortcuts, child-process bodies."""
from __future__ import annotations

import time

from ziya_batch.queue import Broker
from ziya_batch.records import ShardRef
from ziya_batch.spec import parse_spec


def make_spec(name: str = "job", priority: int = 0, lease_s: float = 30.0, max_retries: int = 2,
              shard_size: int = 10, output: str | None = None):
    return parse_spec({"name": name, "model": {"path": "/models/ziya"}, "input": [f"/data/{name}.jsonl"],
                       "output": {"path": output or f"/out/{name}"}, "shard_size": shard_size,
                       "priority": priority, "reliability": {"lease_s": lease_s, "max_retries": max_retries}})


def make_shards(spec, n: int, lines_per_shard: int | None = None, files: int = 1):
    """n shard descriptors of one job, spread round-robin over `files` input files."""
    per = lines_per_shard or spec.shard_size
    job_id = spec.identity()
    for i in range(n):
        yield ShardRef(job_id, i, f"/data/{spec.name}-{i % files}.jsonl", i * per * 100, (i + 1) * per * 100,
                       i * per + 1, per)


def expire(broker: Broker, lease) -> None:
    """Make a lease look expired to the reaper without waiting lease_s (test-only shortcut)."""
    k = broker.keys
    broker.client.zadd(k.leased(lease.job_id), {str(lease.shard.index): 0})
    broker.client.zadd(k.leases(), {k.lease_member(lease.job_id, lease.shard.index): 0})


def wait_claim(broker: Broker, worker: str, timeout_s: float = 5.0):
    """Claim, waiting out a retry backoff."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lease = broker.claim(worker)
        if lease is not None:
            return lease
        time.sleep(0.01)
    return None


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
