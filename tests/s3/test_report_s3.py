"""The report of an output on S3 (moto): the same statistics as a read of one part after another, with the parts'
reads overlapping, and one request a part: a GET of the range 0- for a part its manifest says holds bytes (s3fs
sends a HEAD before a GET without a range), a HEAD alone for one it says is empty; the manifest read once, the
markers' folder listed once."""
from __future__ import annotations


import pytest

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from ziya_batch import io, report  # noqa: E402
from ziya_batch.report import compute_stats  # noqa: E402



def _job(url: str, shards: int) -> None:
    markers = {}
    for i in range(shards):
        results = [{"id": f"p{i}", "sample_index": 0, "finish_reason": "stop",
                    "usage": {"prompt_tokens": 3 + i, "completion_tokens": 4 + i}}]
        errors = [{"id": f"b{i}", "error": {"code": "oom"}}] if i % 2 else []      # half the errors parts empty
        io.stage_shard(url, i, 1, {"results": results, "errors": errors,
                                   "experience": [{"id": f"p{i}", "reward": i / 10}]})
        markers[i] = io.promote_shard(url, i, 1, stats={"prompts_done": 1, "output_tokens": 4 + i})
    io.write_manifest(url, '{"name": "s3"}', {"job_id": "j", "state": "completed"}, markers)


def test_the_report_on_s3_reads_each_part_in_one_request(bucket, monkeypatch):
    url = f"s3://{bucket}/out"
    _job(url, 6)
    monkeypatch.setattr(report, "PART_READERS", 1)
    sequential = compute_stats(url)
    calls, now, peak = [], [0], [0]
    orig = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *a, **kw):
        calls.append((method, kw.get("Key", ""), "Range" in kw))
        part = kw.get("Key", "").split("/")[-2:-1] in (["results"], ["errors"], ["experience"])
        now[0] += part
        peak[0] = max(peak[0], now[0])
        try:
            return await orig(self, method, *a, **kw)
        finally:
            now[0] -= part

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    monkeypatch.setattr(report, "PART_READERS", 4)
    assert compute_stats(url) == sequential
    parts = [c for c in calls if c[1].split("/")[-2] in ("results", "errors", "experience")]
    assert sorted((m, k.split("/", 1)[1], r) for m, k, r in parts) == sorted(
        [("get_object", f"results/part-{i:05d}.jsonl", True) for i in range(6)]
        + [("get_object", f"experience/part-{i:05d}.jsonl", True) for i in range(6)]
        + [("get_object", f"errors/part-{i:05d}.jsonl", True) for i in range(1, 6, 2)]
        + [("head_object", f"errors/part-{i:05d}.jsonl", False) for i in range(0, 6, 2)])
    assert [c[0] for c in calls if c[1].endswith("manifest.json")] == ["get_object"]
    assert sum(1 for c in calls if "/_committed/" in c[1]) == 6           # the markers, listed with their folder
    assert 1 < peak[0] <= 4                      # parts' reads overlapped


def test_storage_that_stops_answering_midway_is_one_line(bucket, store_to_stop, monkeypatch, capsys, tmp_path):
    # the first read (manifest.json) is answered, then the store goes away: the report's later reads (the commit
    # markers' listing, the parts) met it as a botocore traceback where the first read's is one line (exit 3)
    from ziya_batch.cli import main

    url = f"s3://{bucket}/out"
    _job(url, 3)
    read_manifest = report.io.read_manifest

    def then_away(output):
        manifest = read_manifest(output)
        store_to_stop()
        return manifest

    monkeypatch.setattr(report.io, "read_manifest", then_away)
    with pytest.raises(SystemExit) as exit_:
        main(["report", url, "-o", str(tmp_path / "report.html"), "--redis-url", "redis://127.0.0.1:1/0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 3 and err.count("\n") == 1, err
    assert err.startswith(f"ziya-batch: error: output {url}: its storage does not answer (EndpointConnectionError"), err
    assert not (tmp_path / "report.html").exists()
