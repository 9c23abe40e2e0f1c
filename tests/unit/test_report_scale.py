"""The report over many parts: reads of a remote store's parts overlap (a store's latency is paid once for every
few parts, not once a part), never more than PART_READERS parts' bytes are held, the records are used in the order
of a read of one part after another (the same page, the reward sample included), errors are raised at their part's
turn, and the manifest and the markers' listing are read once. Counted, not timed: an in-memory filesystem stands
for the remote store (fsspec's memory://, which is not a local disk, so the report reads it ahead)."""
from __future__ import annotations

import json
import re
import threading
import uuid

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from ziya_batch import io, report
from ziya_batch.errors import InputError
from ziya_batch.report import compute_stats, render_html

PART_KINDS = ("results", "errors", "experience")


@pytest.fixture()
def remote():
    """An output URL on fsspec's in-memory filesystem (a remote store to the report), removed afterwards."""
    url = f"memory://zb-report-{uuid.uuid4().hex[:12]}/out"
    yield url
    fs = MemoryFileSystem()
    root = url.split("://", 1)[1].rsplit("/", 1)[0]
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _records(index: int, per_shard: int, errors_every: int) -> dict[str, list[dict]]:
    results, experience = [], []
    for j in range(per_shard):
        i = index * per_shard + j
        for s in range(2):
            results.append({"id": f"p{i}", "sample_index": s, "finish_reason": ("stop", "length")[(i + s) % 2],
                            "usage": {"prompt_tokens": 10 + i % 7, "completion_tokens": 5 + (i * 7) % 30 + s}})
            experience.append({"id": f"p{i}", "sample_index": s, "reward": (i * 37 + s) % 101 / 100})
    errors = [{"id": f"bad{index}", "error": {"code": f"code{index % 3}"}}] if index % errors_every == 0 else []
    return {"results": results, "sft": [{"id": "x"}], "experience": experience, "errors": errors}


def _write(url: str, shards: int, per_shard: int = 3, manifest: bool = True, errors_every: int = 2) -> dict:
    markers = {}
    for index in range(shards):
        parts = _records(index, per_shard, errors_every)
        io.stage_shard(url, index, 1, parts)
        stats = {"prompts_done": per_shard, "prompts_failed": len(parts["errors"]), "samples": 2 * per_shard,
                 "output_tokens": sum(r["usage"]["completion_tokens"] for r in parts["results"])}
        markers[index] = io.promote_shard(url, index, 1, stats=stats)
    if manifest:
        io.write_manifest(url, '{"name": "scale"}', {"job_id": "job-scale", "state": "completed"}, markers)
    return markers


class Reads:
    """Counts every read of the memory filesystem (cat_file, info, ls) by path, and the reads in flight at once;
    `gate` makes the first part's read wait until another read has started (up to 10 s): it returns at once where
    reads overlap and only after the wait where they do not."""

    def __init__(self, monkeypatch, gate: bool = False):
        self.calls: list[tuple[str, str]] = []
        self.now = self.peak = 0
        self.started = 0
        self.lock = threading.Lock()
        self.other_started = threading.Event()
        self.waited_in_vain = False
        for name in ("cat_file", "info", "ls"):
            orig = getattr(MemoryFileSystem, name)

            def wrap(fs, path, *a, _orig=orig, _name=name, **kw):
                part = _name != "ls" and any(f"/{k}/" in str(path) for k in PART_KINDS)
                with self.lock:
                    self.calls.append((_name, str(path)))
                    self.now += 1
                    self.peak = max(self.peak, self.now)
                    first = part and self.started == 0
                    if part:
                        self.started += 1
                        if self.started > 1:
                            self.other_started.set()
                try:
                    if gate and first and not self.other_started.wait(10):
                        self.waited_in_vain = True
                    return _orig(fs, path, *a, **kw)
                finally:
                    with self.lock:
                        self.now -= 1

            monkeypatch.setattr(MemoryFileSystem, name, wrap)

    def count(self, op: str, part: str = "") -> int:
        return sum(1 for name, path in self.calls if name == op and part in path)


def _page(stats) -> str:
    return re.sub(r"report written [^<]*", "", render_html(stats))


def test_a_remote_stores_parts_are_read_ahead_and_the_report_is_the_one_a_sequential_read_gives(remote, monkeypatch):
    _write(remote, 12)
    monkeypatch.setattr(report, "REWARD_RESERVOIR", 5)         # the reservoir samples: its rng sees the same order
    monkeypatch.setattr(report, "PART_READERS", 1)
    sequential = compute_stats(remote)
    monkeypatch.setattr(report, "PART_READERS", 4)
    reads = Reads(monkeypatch, gate=True)
    ahead = compute_stats(remote)
    assert not reads.waited_in_vain                 # the first part's read saw a second one start meanwhile
    assert 1 < reads.peak <= 4
    assert ahead == sequential and _page(ahead) == _page(sequential)
    assert sequential.rewards_seen > 5 and len(ahead.rewards) == 5
    # every part once: 12 results, 12 errors, 12 experience; manifest.json once; _committed/ listed once, its
    # markers read once each
    assert reads.count("cat_file", "/results/") == reads.count("cat_file", "/experience/") == 12
    assert reads.count("cat_file", "/errors/") + reads.count("info", "/errors/") == 12
    assert reads.count("cat_file", "manifest.json") == 1
    assert reads.count("ls", "_committed") == 1
    assert reads.count("cat_file", "/_committed/") == 12
    assert reads.count("cat_file", "/sft/") == 0


def test_without_a_manifest_the_markers_parts_are_read_ahead_too(remote, monkeypatch):
    _write(remote, 6, manifest=False)
    monkeypatch.setattr(report, "PART_READERS", 1)
    sequential = compute_stats(remote)
    monkeypatch.setattr(report, "PART_READERS", 3)
    reads = Reads(monkeypatch, gate=True)
    ahead = compute_stats(remote)
    assert not reads.waited_in_vain and 1 < reads.peak <= 3
    assert ahead == sequential and ahead.source == "commit markers"


def _held(monkeypatch) -> list[tuple[int, int]]:
    """(parts whose read has begun, parts whose records were used) as each part's records begin to be used."""
    started, seen, lock = [0], [], threading.Lock()
    read = io.OutputDir.read

    def counted(self, rel, *a, **kw):
        with lock:
            started[0] += 1
        return read(self, rel, *a, **kw)

    iter_part = report.iter_part

    def decoding(data, fmt, where):
        with lock:
            seen.append((started[0], len(seen)))
        return iter_part(data, fmt, where)

    monkeypatch.setattr(io.OutputDir, "read", counted)
    monkeypatch.setattr(report, "iter_part", decoding)
    return seen


@pytest.mark.parametrize("readers,budget,ahead", [(4, 64 << 20, 4), (8, 64 << 20, 8), (4, 1, 1)])
def test_at_most_part_readers_parts_are_held(remote, monkeypatch, readers, budget, ahead):
    """When the i-th part's records begin to be used, at most `ahead` reads have begun beyond the i parts done
    with (the i-th's included): PART_READERS, or one where READ_AHEAD_BYTES is smaller than a part."""
    _write(remote, 10, errors_every=1)
    monkeypatch.setattr(report, "PART_READERS", readers)
    monkeypatch.setattr(report, "READ_AHEAD_BYTES", budget)
    seen = _held(monkeypatch)
    compute_stats(remote)
    assert len(seen) == 30
    assert all(started - done <= ahead for started, done in seen), seen
    if ahead == 1:
        assert all(started - done == 1 for started, done in seen)


def test_errors_are_raised_at_their_parts_turn(remote, monkeypatch):
    """A part that cannot be decoded before one that is missing: the first is what a read of one part after
    another names, though the second's read finished first; and a missing part listed in the manifest is one
    line naming it."""
    _write(remote, 8)
    fs = MemoryFileSystem()
    root = remote.split("://", 1)[1]
    fs.pipe_file(f"{root}/results/part-00002.jsonl", b'{"a": 1}\n{oops\n')
    fs.rm_file(f"{root}/results/part-00005.jsonl")
    monkeypatch.setattr(report, "PART_READERS", 8)
    with pytest.raises(InputError, match=r"results/part-00002.jsonl: line 2 is not JSON"):
        compute_stats(remote)
    fs.pipe_file(f"{root}/results/part-00002.jsonl", b"")
    with pytest.raises(InputError, match=r"results/part-00005.jsonl is listed in manifest.json but missing"):
        compute_stats(remote)


def test_sizes_that_lie_change_nothing(remote, monkeypatch):
    """The sizes the manifest gives only pace the reads (and spare a request on S3): a part said to be empty that
    is not, and one said to hold bytes that is empty, are read whole all the same."""
    _write(remote, 4)
    monkeypatch.setattr(report, "PART_READERS", 1)
    honest = compute_stats(remote)
    fs = MemoryFileSystem()
    root = remote.split("://", 1)[1]
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    for rows in manifest["parts"].values():
        for row in rows:
            row["size_bytes"] = 0 if row["size_bytes"] else 123
    fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest).encode())
    monkeypatch.setattr(report, "PART_READERS", 4)
    assert compute_stats(remote) == honest


def test_a_local_directory_is_read_in_order_and_its_manifest_once(tmp_path, monkeypatch):
    """Locally the report reads one part after another (no thread: the page cache answers faster than one hands
    a part over), the manifest once (report_main passes on what it read) and _committed/ is listed once."""
    out = tmp_path / "out"
    _write(str(out), 6)
    from fsspec.implementations.local import LocalFileSystem

    from ziya_batch.io import storage

    reads, lists, threads = [], [], set()
    read_local, ls = storage._read_local, LocalFileSystem.ls

    def counted_read(path, limit):
        reads.append(path)
        threads.add(threading.get_ident())
        return read_local(path, limit)

    def counted_ls(fs, path, *a, **kw):
        lists.append(path)
        return ls(fs, path, *a, **kw)

    monkeypatch.setattr(storage, "_read_local", counted_read)
    monkeypatch.setattr(LocalFileSystem, "ls", counted_ls)
    monkeypatch.delenv("ZIYA_BATCH_REDIS_URL", raising=False)
    monkeypatch.setattr("ziya_batch.runtime.services.connect_broker",
                        lambda *a, **k: (_ for _ in ()).throw(ConnectionError("no Redis here")))
    report.report_main(str(out), tmp_path / "r.html")
    assert threads == {threading.get_ident()}
    assert sum(p.endswith("manifest.json") for p in reads) == 1
    assert sum("/_committed/" in p for p in reads) == 6
    assert sum(p.endswith(".jsonl") for p in reads) == 18          # results, errors, experience; not sft
    assert [p for p in lists if p.endswith("_committed")] and len(lists) == 1
