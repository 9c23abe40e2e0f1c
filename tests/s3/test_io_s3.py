"""The storage layer on S3, against the moto server that conftest.py starts on 127.0.0.1."""
from __future__ import annotations

import collections
import hashlib
import json
import uuid

import pytest

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from ziya_batch.errors import InputError, ServiceError  # noqa: E402
from ziya_batch.io import (committed_shards, expand_inputs, index_inputs,  # noqa: E402
                           part_path, promote_shard, read_manifest, read_parts, read_shard, stage_shard,
                           url_to_fs, write_manifest)
from ziya_batch.records import ShardRef  # noqa: E402



def _put(bucket: str, key: str, data: bytes) -> None:
    fs, path = url_to_fs(f"s3://{bucket}/{key}")
    fs.pipe_file(path, data)


def test_s3_expand_index_and_read_byte_ranges(bucket, monkeypatch):
    a = b'{"id": "a1"}\r\n\r\n{"id": "a2", "prompt": "\xe8\xa5\xbf\xe5\xae\x89"}\n{"id": "a3"}\n{"id": "a4"}'
    b = b"".join(b'{"id": "b%d"}\n' % i for i in range(5))
    _put(bucket, "in/a.jsonl", a)
    _put(bucket, "in/b.jsonl", b)
    _put(bucket, "in/notes.txt", b"x\n")
    files = expand_inputs([f"s3://{bucket}/in/*.jsonl"])
    assert files == [f"s3://{bucket}/in/a.jsonl", f"s3://{bucket}/in/b.jsonl"]
    with pytest.raises(InputError) as exc:
        expand_inputs([f"s3://{bucket}/in/zz*.jsonl", f"s3://{bucket}/missing.jsonl", files[0]])
    assert str(exc.value) == (f"input not found: s3://{bucket}/in/zz*.jsonl (no match), "
                              f"s3://{bucket}/missing.jsonl")

    calls = []
    fs, _ = url_to_fs(files[0])          # fsspec caches the instance: read_shard gets this very one
    real_cat = fs.cat_file

    def counting_cat(path, start=None, end=None, **kwargs):
        calls.append((path, start, end))
        return real_cat(path, start=start, end=end, **kwargs)

    monkeypatch.setattr(fs, "cat_file", counting_cat)
    seen = collections.Counter()
    shards = list(index_inputs(files, 2))
    for index, (file, start, end, first, num, ident) in enumerate(shards):
        assert ident is None
        calls.clear()
        lines = list(read_shard(ShardRef("j", index, file, start, end, first, num)))
        assert calls == [(file.removeprefix("s3://"), start, end)]       # one ranged read of just the shard
        assert len(lines) == num
        seen.update((file, no) for no, _ in lines)
    assert seen == collections.Counter([(files[0], n) for n in (1, 3, 4, 5)] +
                                       [(files[1], n) for n in range(1, 6)])
    assert [s[3:5] for s in shards if s[0] == files[0]] == [(1, 2), (4, 2)]


def test_s3_index_streams_in_blocks(bucket):
    """Blocks far smaller than the object: lines cross block edges, the index still matches the lines."""
    lines = [json.dumps({"id": i, "prompt": "长安" * (i % 50)}, ensure_ascii=False).encode() for i in range(400)]
    data = b"\n".join(ln if i % 9 else ln + b"\r" for i, ln in enumerate(lines)) + b"\n\n"
    _put(bucket, "big.jsonl", data)
    file = f"s3://{bucket}/big.jsonl"
    shards = list(index_inputs([file], 37, block_bytes=1000))
    got = []
    for index, row in enumerate(shards):
        got.extend(raw for _, raw in read_shard(ShardRef("j", index, *row)))
    assert got == lines
    assert [s[4] for s in shards] == [37] * 10 + [30]


def test_s3_stage_promote_discard_and_manifest(bucket, shard_parts):
    out = f"s3://{bucket}/runs/x/"
    fs, root = url_to_fs(out)
    staged = {}
    for index in range(3):
        stage_shard(out, index, 20 + index, {"results": [{"id": "stale"}]}, "jsonl")      # a lost lease
        staged[index] = stage_shard(out, index, 30 + index, shard_parts(2, start=2 * index), "jsonl")
        promote_shard(out, index, 30 + index, {k: (p.lines, p.sha256) for k, p in staged[index].items()},
                      stats={"prompts_done": 2})
        assert promote_shard(out, index, 20 + index).token == 30 + index       # never replaces the winner
    markers = committed_shards(out)
    assert sorted(markers) == [0, 1, 2] and all(m.token == 30 + i for i, m in markers.items())
    assert markers[1].prompts_done == 2
    write_manifest(out, json.dumps({"name": "s3"}), {"prompts": 6}, markers)
    manifest = read_manifest(out)
    for kind in ("results", "sft", "experience", "errors"):
        for entry in manifest["parts"][kind]:
            data = fs.cat_file(f"{root.rstrip('/')}/{entry['path']}")
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] == staged[entry["shard"]][kind].sha256
    ids = [r["id"] for r in read_parts(out, "results", verify=True)]
    assert len(ids) == 12 and "stale" not in ids
    keys = fs.find(root)
    assert not any("/_staging/" in k for k in keys)
    assert sum(k.endswith(".jsonl") for k in keys) == 12


def test_s3_promote_is_idempotent_after_a_crash_mid_move(bucket, shard_parts):
    out = f"s3://{bucket}/runs/crash"
    fs, root = url_to_fs(out)
    staged = stage_shard(out, 4, 7, shard_parts(1), "parquet")
    # crash after the server-side copy of results, before deleting its staged object and the rest
    fs.cp_file(staged["results"].path, part_path(out, "results", 4, "parquet").removeprefix("s3://"))
    assert committed_shards(out) == {}
    marker = promote_shard(out, 4, 7)
    assert marker == promote_shard(out, 4, 7)
    assert set(marker.parts) == {"results", "sft", "experience", "errors"}
    for kind, part in staged.items():
        data = fs.cat_file(part_path(out, kind, 4, "parquet"))
        assert hashlib.sha256(data).hexdigest() == part.sha256
    write_manifest(out, "{}", {}, committed_shards(out))
    rows = list(read_parts(out, "experience", verify=True))
    assert rows[0]["prompt_ids"] == [1, 2, 3, 4]


def test_s3_endpoint_from_aws_endpoint_url(moto_endpoint, monkeypatch):
    """The other documented way: botocore's AWS_ENDPOINT_URL, no ziya-batch option at all."""
    monkeypatch.delenv("ZIYA_BATCH_STORAGE_OPTIONS", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"zb-{uuid.uuid4().hex[:12]}"
    fs, _ = url_to_fs(f"s3://{name}")
    fs.mkdir(name)
    fs.pipe_file(f"{name}/p.jsonl", b'{"prompt": "x"}\n')
    files = expand_inputs([f"s3://{name}/p.jsonl"])
    assert [s[3:] for s in index_inputs(files, 8)] == [(1, 1, None)]
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_endpoint_from_fsspec_config_env(bucket, moto_endpoint):
    """The third documented way: fsspec's FSSPEC_S3_ENDPOINT_URL (read when fsspec is imported)."""
    import os
    import subprocess
    import sys

    _put(bucket, "q.jsonl", b'{"prompt": "x"}\n{"prompt": "y"}\n')
    env = {k: v for k, v in os.environ.items() if k != "ZIYA_BATCH_STORAGE_OPTIONS"}
    env["FSSPEC_S3_ENDPOINT_URL"] = moto_endpoint
    code = ("from ziya_batch.io import expand_inputs, index_inputs; "
            f"print(list(index_inputs(expand_inputs(['s3://{bucket}/q*.jsonl']), 10)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"[('s3://{bucket}/q.jsonl', 0, 32, 1, 2, None)]"


def test_s3_small_files_are_read_under_a_cap(bucket, monkeypatch):
    """Our JSON files are read with a cap (a ranged read): an empty object, which S3 answers 416 for a range of,
    is read as empty (a corrupt file, said so), and one past the cap is refused without reading it whole."""
    from ziya_batch.io import OutputDir
    from ziya_batch.io import parts as parts_mod

    _put(bucket, "out/_owner.json", b"")
    with pytest.raises(InputError, match="_owner.json is corrupt"):
        OutputDir(f"s3://{bucket}/out").owner()
    _put(bucket, "out/manifest.json", b"{}" + b" " * 100)
    monkeypatch.setattr(parts_mod, "MAX_TOP_JSON_BYTES", 64)
    with pytest.raises(InputError, match="larger than 64 bytes"):
        read_manifest(f"s3://{bucket}/out")


def test_s3_staged_loss_and_a_discarded_attempt(bucket, shard_parts):
    """What storage says is gone of an attempt, through s3fs (HEAD answers 404, its listing cache bypassed); a
    promote of an attempt discarded meanwhile writes no marker."""
    from ziya_batch.io import CommitError, OutputDir

    out = OutputDir(f"s3://{bucket}/runs/lost")
    staged = out.stage(4, 7, "a1", shard_parts(1))
    out.fs.ls(out.path("_staging", "sft"))                   # a listing s3fs caches
    assert out.staged_loss(4, 7, "a1") is None
    out.fs.rm_file(staged["sft"].path)
    assert out.staged_loss(4, 7, "a1") == "its staged sft part is gone and sft/part-00004.jsonl does not hold it"
    out.discard(4, 7, "a1")
    assert out.staged_loss(4, 7, "a1") == "its intent _staging/part-00004.7-a1.json is gone"
    with pytest.raises(CommitError, match="nothing staged"):
        out.promote(4, 7, "a1")
    assert out.read_marker(4) is None


def test_s3_input_that_stops_answering_while_indexed_is_one_line(bucket, store_to_stop):
    # submit lists the inputs (answered), then indexes them: a store gone meanwhile was a botocore traceback
    _put(bucket, "in/prompts.jsonl", b"".join(b'{"prompt": "p%d"}\n' % i for i in range(30)))
    url = f"s3://{bucket}/in/prompts.jsonl"
    files = expand_inputs([url])
    store_to_stop()
    with pytest.raises(ServiceError, match=rf"^input {url}: its storage does not answer \(EndpointConnectionError"):
        list(index_inputs(files, 10))
