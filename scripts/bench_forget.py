#!/usr/bin/env python3
"""What a completed 10-million-line job holds in Redis, and what forgetting it costs: the job's keys (MEMORY USAGE),
used_memory before and after, the wall time of `jobs.forget_job` and how long its script held Redis (SLOWLOG), with
the keys deleted by UNLINK (what forget.lua does) or by DEL.

Needs a Redis of its own: `--redis-url` (flushed: never point it at a Redis that holds anything), or none given, a
private server in a temp dir. Not a test: numbers depend on the machine.

    python scripts/bench_forget.py [--lines 10000000] [--shard-size 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ziya_batch import jobs
from ziya_batch.queue import Broker, PrivateRedis, ShardStats
from ziya_batch.queue import scripts as queue_scripts
from ziya_batch.records import ShardRef
from ziya_batch.spec import parse_spec

# what a worker commits for a shard writing results, sft and experience (and an empty errors part)
STATS = ShardStats(prompts_done=512, samples=512, output_tokens=100_000, prefix_cache_query_tokens=20_000,
                   parts={kind: (512, "0" * 64) for kind in ("results", "sft", "experience", "errors")},
                   attempt="0" * 12)


def completed_job(broker: Broker, name: str, lines: int, shard_size: int) -> str:
    spec = parse_spec({"name": name, "model": {"path": "/models/m"}, "input": [f"/data/{name}.jsonl"],
                       "output": {"path": f"/out/{name}"}, "shard_size": shard_size})
    job_id = spec.identity()
    n = -(-lines // shard_size)
    refs = (ShardRef(job_id, i, f"/data/{name}.jsonl", i * shard_size * 100, (i + 1) * shard_size * 100,
                     i * shard_size + 1, shard_size) for i in range(n))
    broker.submit(spec, refs, committed={i: STATS for i in range(n)})        # every shard committed: finalizing
    assert broker.begin_finalize(job_id)
    broker.mark_completed(job_id)
    return job_id


def _text(command) -> str:
    return command.decode("utf-8", "replace") if isinstance(command, bytes) else str(command)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", help="a Redis of its own (it is flushed); default: a private server in a temp dir")
    ap.add_argument("--lines", type=int, default=10_000_000)
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    private = None
    url = args.redis_url
    if url is None:
        private = PrivateRedis(Path(tempfile.mkdtemp()) / "redis")
        url = private.start()
    try:
        broker = Broker.from_url(url)
        c = broker.client
        c.flushdb()
        source = queue_scripts.source("forget")
        for how in ("UNLINK", "DEL"):
            if how == "DEL":       # the same script deleting synchronously, for comparison
                patched = source.replace("redis.call('UNLINK', KEYS[i])", "redis.call('DEL', KEYS[i])")
                assert patched != source
                broker.scripts._registered["forget"] = c.register_script(patched)
            walls, held = [], []
            for rep in range(args.repeats):
                job_id = completed_job(broker, f"big-{how}-{rep}", args.lines, args.shard_size)
                size = sum(c.memory_usage(k, samples=0) or 0 for k in broker.keys.job_keys(job_id))
                used = c.info("memory")["used_memory"]
                c.config_set("slowlog-log-slower-than", 0)
                c.slowlog_reset()
                t0 = time.perf_counter()
                jobs.forget_job(broker, job_id)
                walls.append(time.perf_counter() - t0)
                log = c.slowlog_get(128)
                c.config_set("slowlog-log-slower-than", 10_000)
                held.append(max(e["duration"] for e in log if _text(e["command"]).startswith("EVALSHA")))
                time.sleep(0.5)        # UNLINK frees in the background
                freed = used - c.info("memory")["used_memory"]
                print(f"{how}: {-(-args.lines // args.shard_size)} shards, job keys {size / 1e6:.2f} MB, used_memory "
                      f"down {freed / 1e6:.2f} MB, forget_job {walls[-1] * 1000:.1f} ms wall, script held Redis "
                      f"{held[-1] / 1000:.2f} ms", flush=True)
                assert not [k for k in c.scan_iter(f"*{job_id}*")]
            print(f"{how}: median forget_job {statistics.median(walls) * 1000:.1f} ms, script "
                  f"{statistics.median(held) / 1000:.2f} ms", flush=True)
    finally:
        if private is not None:
            private.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
