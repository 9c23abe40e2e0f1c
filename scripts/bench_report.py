#!/usr/bin/env python3
"""`ziya-batch report` at scale: the storage calls and wall time of compute_stats + render_html over an output of
many shards, local or on a moto S3 server (a process of its own, as a store is).

Writes the output directly in the layout a job leaves (parts, commit markers a second apart, manifest.json unless
--no-manifest), then reports it. Counts every storage call (local: file reads and listings; S3: every request, by
operation) and the most calls in flight at once. Prints the sha256 of the page with its "report written" time
taken out, so runs of two versions can be compared for the same page. Not a test: times depend on the machine.

    python scripts/bench_report.py [--shards 5000] [--per-shard 4] [--s3] [--no-manifest] [--runs 1]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from ziya_batch import io
from ziya_batch.io.manifest import build_manifest
from ziya_batch.io.schema import encode_part
from ziya_batch.report import compute_stats, render_html


def shard_records(index: int, per_shard: int) -> dict[str, list[dict]]:
    results, experience, sft, errors = [], [], [], []
    for j in range(per_shard):
        i = index * per_shard + j
        for s in range(2):
            results.append({"id": f"p{i}", "sample_index": s, "prompt": "q" * 40, "response": "a" * 200,
                            "finish_reason": ("stop", "length")[(i + s) % 2],
                            "usage": {"prompt_tokens": 10 + i % 50, "completion_tokens": 5 + (i * 7) % 120 + s}})
            experience.append({"id": f"p{i}", "sample_index": s, "reward": (i % 20) / 10 - 1.0 + s * 0.05})
            sft.append({"id": f"p{i}", "messages": [{"role": "user", "content": "q"}]})
    if index % 3 == 0:
        errors.append({"id": f"bad{index}", "file": "in.jsonl", "line": index,
                       "error": {"code": "invalid_json", "message": "x"}})
    return {"results": results, "sft": sft, "experience": experience, "errors": errors}


def build_output(url: str, shards: int, per_shard: int, manifest: bool, t0: float = 1.7e9) -> None:
    """Every part, marker and the manifest, written with 16 threads (objects straight to their final names)."""
    od = io.OutputDir(url)
    markers: dict[int, io.CommitMarker] = {}
    lock = threading.Lock()

    def one(index: int) -> None:
        parts, infos = shard_records(index, per_shard), {}
        for kind, records in parts.items():
            data = encode_part(kind, records, "jsonl")
            rel = f"{kind}/part-{index:05d}.jsonl"
            od.put(rel, data)
            infos[kind] = io.PartInfo(len(records), hashlib.sha256(data).hexdigest(), rel, len(data))
        stats = {"prompts_done": per_shard, "prompts_failed": len(parts["errors"]), "samples": 2 * per_shard,
                 "output_tokens": sum(r["usage"]["completion_tokens"] for r in parts["results"])}
        m = io.CommitMarker(index=index, token=1, format="jsonl", parts=infos, stats=stats)
        od.put(f"_committed/part-{index:05d}.json", m.to_json().encode())
        if od._real is not None:
            t = t0 + index + 1
            os.utime(od.path(f"_committed/part-{index:05d}.json"), (t, t))
        with lock:
            markers[index] = m

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(one, range(shards)))
    if manifest:
        doc = build_manifest('{"name": "bench-report"}', {"job_id": "bench", "state": "completed"}, markers)
        od.put("manifest.json", json.dumps(doc, indent=1).encode())


class Calls:
    """Storage calls by kind, and the most in flight at once."""

    def __init__(self):
        self.by: dict[str, int] = {}
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def enter(self, key: str) -> None:
        with self.lock:
            self.by[key] = self.by.get(key, 0) + 1
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


@contextlib.contextmanager
def counting(url: str, latency_s: float = 0.0):
    """Local: every file read and listing. S3: every HTTP request the client sends (by operation, listing pages
    included), with `latency_s` added to each; in flight: the s3fs calls (a GET, a HEAD) under way at once."""
    calls = Calls()
    fs, _ = io.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        import s3fs
        from fsspec.asyn import sync

        client = sync(fs.loop, fs.set_session)
        requests: dict[str, int] = {}

        async def before_send(event_name: str = "", **kw):
            op = event_name.rsplit(".", 1)[-1]
            requests[op] = requests.get(op, 0) + 1
            if latency_s:
                await asyncio.sleep(latency_s)

        orig = s3fs.S3FileSystem._call_s3

        async def call(self, method, *a, **kw):
            calls.enter(method)
            try:
                return await orig(self, method, *a, **kw)
            finally:
                calls.leave()

        client.meta.events.register("before-send.s3", before_send)
        s3fs.S3FileSystem._call_s3 = call
        try:
            yield calls
        finally:
            s3fs.S3FileSystem._call_s3 = orig
            client.meta.events.unregister("before-send.s3", before_send)
            calls.by = requests
        return
    from ziya_batch.io import storage

    read, ls = storage._read_local, LocalFileSystem.ls

    def counted(key, fn):
        def wrap(*a, **kw):
            calls.enter(key)
            try:
                return fn(*a, **kw)
            finally:
                calls.leave()
        return wrap

    storage._read_local = counted("read", read)
    LocalFileSystem.ls = counted("ls", ls)
    try:
        yield calls
    finally:
        storage._read_local, LocalFileSystem.ls = read, ls


def page_digest(page: str, url: str) -> str:
    """The page's sha256 less its "report written" time and the output's URL (a temp dir's name)."""
    page = re.sub(r"report written [^<]*", "", page).replace(url, "URL")
    return hashlib.sha256(page.encode()).hexdigest()[:16]


def moto(stack: contextlib.ExitStack, endpoint: str | None, shards: int) -> str:
    """The output's URL on a moto server: `endpoint`'s (one running already), else a new one's, stopped at the end."""
    if endpoint is None:
        from ziya_batch.queue.server import free_port

        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(lambda: (proc.terminate(), proc.wait(10)))
        endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    os.environ["ZIYA_BATCH_STORAGE_OPTIONS"] = json.dumps({"s3": {"client_kwargs": {"endpoint_url": endpoint}}})
    import urllib.request

    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    fs, _ = io.url_to_fs("s3://bench-report")
    if not fs.exists("bench-report"):
        fs.mkdir("bench-report")
    return f"s3://bench-report/out-{shards}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=5000)
    ap.add_argument("--per-shard", type=int, default=4, help="prompts a shard (2 samples each)")
    ap.add_argument("--s3", action="store_true", help="on a moto S3 server instead of a local directory")
    ap.add_argument("--no-manifest", action="store_true", help="a running job: the report reads the markers' parts")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--endpoint", help="a moto server running already (with --s3): its output is written once and "
                                       "kept, so that two versions can report the same one")
    ap.add_argument("--dir", type=Path, help="a local output directory to use (written once and kept)")
    ap.add_argument("--readers", type=int, help="parts read at once, local or remote (report.PART_READERS and "
                                                "LOCAL_PART_READERS; where the version has them)")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="with --s3: add this to every request (moto on this machine answers in a few ms; S3 takes "
                         "~10-30 ms for a small GET)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)
    out: dict = {"shards": args.shards, "per_shard": args.per_shard, "s3": args.s3, "latency_ms": args.latency_ms,
                 "readers": args.readers, "manifest": not args.no_manifest, "runs": []}
    with contextlib.ExitStack() as stack:
        if args.s3:
            url = moto(stack, args.endpoint, args.shards)
        elif args.dir:
            url = str(args.dir.absolute())
        else:
            root = tempfile.mkdtemp(prefix="zb-bench-report-")
            stack.callback(shutil.rmtree, root, True)
            url = f"{root}/out"
        if args.readers is not None:
            import ziya_batch.report as report

            report.PART_READERS = report.LOCAL_PART_READERS = args.readers
        if io.OutputDir(url).committed_shards():
            print(f"reporting {url} as it is", flush=True)
        else:
            t0 = time.perf_counter()
            build_output(url, args.shards, args.per_shard, not args.no_manifest)
            print(f"wrote {args.shards} shards to {url} in {time.perf_counter() - t0:.1f} s", flush=True)
        for _ in range(args.runs):
            with counting(url, args.latency_ms / 1000) as calls:
                t0 = time.perf_counter()
                stats = compute_stats(url)
                wall = time.perf_counter() - t0
            page = render_html(stats)
            run = {"wall_s": round(wall, 3), "calls": calls.by, "total_calls": sum(calls.by.values()),
                   "peak_in_flight": calls.peak, "page": page_digest(page, url)}
            out["runs"].append(run)
            print(f"  compute_stats {wall:8.2f} s  calls {sum(calls.by.values()):6d} {calls.by}  "
                  f"peak in flight {calls.peak}  page {run['page']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
