#!/usr/bin/env python3
"""Control-plane scale benchmark: what the queue's and the storage's paths cost with thousands of jobs, a job of
20,000 shards and an input of 10,000 files. Counts Redis round trips (every packet a client sends: one command, or
one pipeline) and Redis commands (INFO commandstats), and storage calls, besides wall time.

Needs a Redis of its own: `--redis-url` (flushed: never point it at a Redis that holds anything), or none given, a
private server in a temp dir. `--s3` runs the finalize part on a moto server too (moto installed). Not a test:
numbers depend on the machine.

    python scripts/bench_scale.py [--jobs 3000] [--shards 20000] [--files 10000] [--s3]
"""
from __future__ import annotations

import argparse
import contextlib
import io as _io
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import redis

from ziya_batch import io
from ziya_batch.queue import Broker, PrivateRedis, ShardStats
from ziya_batch.records import ShardRef
from ziya_batch.spec import parse_spec


class Counter:
    """Round trips of every redis-py connection in this process, and Redis's own command count."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self.trips = 0
        orig = redis.connection.AbstractConnection.send_packed_command
        counter = self

        def send(conn, command, check_health=True):
            counter.trips += 1
            return orig(conn, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = send

    def commands(self) -> int:
        return sum(v["calls"] for v in self.client.info("commandstats").values())

    @contextlib.contextmanager
    def measure(self, label: str, out: dict):
        c0, t0 = self.commands(), self.trips
        w0 = time.perf_counter()
        yield
        wall = time.perf_counter() - w0
        trips = self.trips - t0
        cmds = self.commands() - c0 - 1          # less the INFO that measured it
        out[label] = {"wall_s": round(wall, 4), "round_trips": trips, "commands": cmds}
        print(f"  {label:48s} {wall * 1000:9.1f} ms  {trips:7d} round trips  {cmds:8d} commands", flush=True)


def _spec(name: str, shard_size: int = 512, output: str | None = None, inputs=None):
    return parse_spec({"name": name, "model": {"path": "/models/ziya"}, "input": inputs or [f"/data/{name}.jsonl"],
                       "output": {"path": output or f"/tmp/zbscale-out/{name}"}, "shard_size": shard_size})


def _refs(spec, n: int, files: int = 16):
    job_id, size = spec.identity(), spec.shard_size
    for i in range(n):
        yield ShardRef(job_id, i, f"s3://bench-input/{spec.name}/part-{i % files:04d}.jsonl",
                       i * size * 400, (i + 1) * size * 400, i * size + 1, size)


STATS = ShardStats(prompts_done=512, samples=512, output_tokens=131072, parts={"results": (512, "a" * 64)})


def many_jobs(url: str, c: Counter, jobs: int, active: int, out: dict) -> None:
    print(f"== {jobs} jobs, {active} of them queued", flush=True)
    b = Broker.from_url(url)
    b.client.flushdb()
    t0 = time.perf_counter()
    for n in range(jobs):
        spec = _spec(f"done-{n}", 512)
        jid = b.submit(spec, _refs(spec, 2)).job_id
        if n < jobs - active:
            for _ in range(2):
                lease = b.claim("filler", accept=lambda j, jid=jid: j == jid)
                b.commit(lease, STATS)
            b.mark_completed(jid)
            if n < jobs - active - 50:      # most finished days ago (their own /metrics series are left out)
                b.client.hset(b.keys.job(jid), "finished_ms", int((time.time() - 2 * 86400) * 1000))
    print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    b.register_worker("w1", "host1", {"device": "cpu", "tensor_parallel": 1})
    b.worker_heartbeat("w1")
    with c.measure("list_jobs", out):
        b.list_jobs()
    from fastapi.testclient import TestClient

    from ziya_batch.api.app import create_app
    from ziya_batch.api.settings import ApiSettings

    app = create_app(ApiSettings(token="t" * 40, storage_url="/tmp/zbscale-api"), lambda: Broker.from_url(url))
    client = TestClient(app)
    h = {"Authorization": "Bearer " + "t" * 40}
    client.get("/healthz")
    with c.measure("GET /metrics", out):
        r = client.get("/metrics", headers=h)
    assert r.status_code == 200, r.text[:200]
    out["metrics_bytes"] = len(r.content)
    with c.measure("GET /v1/jobs", out):
        r = client.get("/v1/jobs", headers=h)
    assert r.status_code == 200
    out["v1_jobs_bytes"] = len(r.content)
    from ziya_batch.runtime.status_view import show_status

    with c.measure("status (listing, --json)", out), contextlib.redirect_stdout(_io.StringIO()):
        show_status(b, None, as_json=True)
    with c.measure("status (listing, table)", out), contextlib.redirect_stdout(_io.StringIO()):
        show_status(b, None)
    with c.measure("unfinished_finalizing (worker sweep)", out):
        b.unfinished_finalizing()
    with c.measure("reap, nothing expired", out):
        b.reap()
    n = 200
    c0 = c.trips
    with c.measure(f"{n} claim+commit among the running jobs", out):
        for _ in range(n):
            lease = b.claim("w1", accept=lambda j: True, prefer=lambda j: False)
            if lease is None:
                break
            b.commit(lease, STATS)
    out["claim_commit_trips_each"] = (c.trips - c0) / n
    # a new job's submit reads every known job's output (jobs.submit._known_outputs)
    data = Path(tempfile.mkdtemp(prefix="zbscale-in-"))
    (data / "in.jsonl").write_text("".join(json.dumps({"id": str(i), "prompt": "hi"}) + "\n" for i in range(10)))
    from ziya_batch.jobs import submit_job

    spec = _spec("new-job", 512, output=str(data / "out"), inputs=[str(data / "in.jsonl")])
    with c.measure("submit_job of a new small job", out):
        submit_job(spec, b)


def big_job(url: str, c: Counter, shards: int, out: dict, s3: str | None) -> None:
    print(f"== one job of {shards} shards", flush=True)
    b = Broker.from_url(url)
    b.client.flushdb()
    root = Path(tempfile.mkdtemp(prefix="zbscale-big-"))
    spec = _spec("big", 512, output=str(root / "out"))
    with c.measure(f"submit {shards} shard descriptors", out):
        jid = b.submit(spec, _refs(spec, shards)).job_id
    mem = sum(b.client.memory_usage(k, samples=0) or 0 for k in b.keys.job_keys(jid))
    out["job_redis_bytes"] = mem
    rates = []
    t0, trips0 = time.perf_counter(), c.trips
    for i in range(shards - 64):
        lease = b.claim("w1")
        b.commit(lease, STATS)
        if (i + 1) % 2000 == 0:
            rates.append(((i + 1), 2000 / (time.perf_counter() - t0), (c.trips - trips0) / 2000))
            t0, trips0 = time.perf_counter(), c.trips
    for at, rate, trips in rates:
        print(f"  claim+commit up to {at:6d}: {rate:7.0f}/s, {trips:.1f} round trips each", flush=True)
    out["claim_commit_rates"] = rates
    leases = [b.claim(f"w{i % 8}") for i in range(64)]
    with c.measure("status JOB (64 leases, 8 workers)", out):
        b.status(jid)
    with c.measure("status JOB detail (64 leases)", out):
        b.status(jid, detail=True)
    with c.measure("commits() (finalize's read of Redis)", out):
        b.commits(jid)
    for lease in leases:
        b.commit(lease, STATS)
    assert b.status(jid).state.value == "finalizing"
    for label, url_ in (("local", str(root / "out")),) + ((("s3", s3),) if s3 else ()):
        _finalize(b, c, jid, spec, url_, shards, label, out)


def _write_markers(url: str, shards: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    od = io.OutputDir(url)

    def put(i):
        m = io.CommitMarker(index=i, token=1, format="jsonl",
                            parts={"results": io.PartInfo(512, "a" * 64, f"results/part-{i:05d}.jsonl", 1000)},
                            stats=STATS.to_dict())
        od.put(f"_committed/part-{i:05d}.json", m.to_json().encode())

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(put, range(shards)))


def _count_storage(fs) -> tuple[dict, callable]:
    """Counts calls of the filesystem's methods that reach storage."""
    calls: dict[str, int] = {}
    names = ("_call_s3",) if hasattr(fs, "_call_s3") else ("open", "_open", "ls", "info", "cat_file", "pipe_file",
                                                            "rm_file", "mv", "exists", "makedirs", "find")
    saved = {}
    for name in names:
        orig = getattr(fs, name)
        saved[name] = orig

        def wrap(*a, _orig=orig, _name=name, **kw):
            key = a[0] if _name == "_call_s3" else _name
            calls[key] = calls.get(key, 0) + 1
            return _orig(*a, **kw)

        setattr(fs, name, wrap)

    def undo():
        for name, orig in saved.items():
            setattr(fs, name, orig)

    return calls, undo


def _finalize(b: Broker, c: Counter, jid: str, spec, url: str, shards: int, label: str, out: dict) -> None:
    from ziya_batch.jobs.finalize import finalize_if_ready

    t0 = time.perf_counter()
    _write_markers(url, shards)
    print(f"  [{label}] wrote {shards} markers in {time.perf_counter() - t0:.1f} s", flush=True)
    b.client.hset(b.keys.job(jid), "output_path", url)
    b.client.set(b.keys.spec(jid), spec.model_copy(update={"output": spec.output.model_copy(
        update={"path": url})}).to_json())
    fs = io.OutputDir(url).fs
    calls, undo = _count_storage(fs)
    tracemalloc.start()
    with c.measure(f"[{label}] finalize {shards} shards", out):
        ok = finalize_if_ready(b, jid)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    undo()
    assert ok and b.status(jid).state.value == "completed", b.status(jid)
    out[f"{label}_finalize_storage_calls"] = calls
    out[f"{label}_finalize_peak_mib"] = round(peak / 2**20, 1)
    print(f"  [{label}] storage calls {calls}, peak traced memory {peak / 2**20:.1f} MiB", flush=True)
    # reopen for the next store
    b.client.hset(b.keys.job(jid), "state", "finalizing")
    b.client.hdel(b.keys.job(jid), "finished_ms")


def many_files(url: str, c: Counter, nfiles: int, out: dict) -> None:
    print(f"== an input of {nfiles} small files", flush=True)
    b = Broker.from_url(url)
    b.client.flushdb()
    root = Path(tempfile.mkdtemp(prefix="zbscale-files-"))
    (root / "in").mkdir()
    for i in range(nfiles):
        (root / "in" / f"f{i:05d}.jsonl").write_text(
            "".join(json.dumps({"id": f"{i}-{j}", "prompt": "hello " * 20}) + "\n" for j in range(20)))
    from ziya_batch.jobs import submit_job

    spec = _spec("files", 512, output=str(root / "out"), inputs=[str(root / "in" / "*.jsonl")])
    used0 = b.client.info("memory")["used_memory"]
    tracemalloc.start()
    with c.measure(f"submit_job of {nfiles} files", out):
        st = submit_job(spec, b)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out["files_submit_peak_mib"] = round(peak / 2**20, 1)
    out["files_redis_bytes"] = sum(b.client.memory_usage(k, samples=0) or 0 for k in b.keys.job_keys(st.job_id))
    out["files_used_memory_delta"] = b.client.info("memory")["used_memory"] - used0
    out["files_shards"] = st.shards_total
    print(f"  shards {st.shards_total}, peak traced {peak / 2**20:.1f} MiB, job keys "
          f"{out['files_redis_bytes']:,} B", flush=True)
    with c.measure("claim+commit of one file's shard", out):
        lease = b.claim("w1")
        b.commit(lease, STATS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url")
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--active", type=int, default=200)
    ap.add_argument("--shards", type=int, default=20000)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--s3", action="store_true", help="finalize on a moto S3 server too")
    ap.add_argument("--only", nargs="+", default=["jobs", "big", "files"])
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)
    out: dict = {"jobs": args.jobs, "shards": args.shards, "files": args.files}
    with contextlib.ExitStack() as stack:
        url = args.redis_url
        if url is None:
            d = stack.enter_context(tempfile.TemporaryDirectory(prefix="zb-scale-"))
            url = stack.enter_context(PrivateRedis(Path(d) / "redis")).url
        c = Counter(redis.Redis.from_url(url, decode_responses=True))
        s3 = None
        if args.s3:
            from moto.server import ThreadedMotoServer

            from ziya_batch.queue.server import free_port

            port = free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            stack.callback(server.stop)
            os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1",
                              AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}")
            import boto3

            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="bench")
            s3 = "s3://bench/big"
        if "jobs" in args.only:
            many_jobs(url, c, args.jobs, args.active, out)
        if "big" in args.only:
            big_job(url, c, args.shards, out, s3)
        if "files" in args.only:
            many_files(url, c, args.files, out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
