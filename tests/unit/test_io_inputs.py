"""Input indexing by byte range and reading shards back: every non-blank line exactly once, right numbers."""
from __future__ import annotations

import collections
import json
import os
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ziya_batch.errors import InputError
from ziya_batch.io import expand_inputs, index_inputs, read_shard, shard_refs
from ziya_batch.io.inputs import index_file
from ziya_batch.records import ShardRef


def expected_lines(data: bytes, limit: int | None = None) -> list[tuple[int, bytes | int]]:
    """(line number, line) of every non-blank line, by the documented rules, computed the simple way; with a
    limit, a line over `limit` bytes as (line number, its length) unless it is all whitespace."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for no, line in enumerate(lines, 1):
        if limit is not None and len(line) > limit:
            if not line.isspace():
                out.append((no, len(line)))
            continue
        line = line[:-1] if line.endswith(b"\r") else line
        if line.strip(b" \t\r\n\x0b\x0c"):
            out.append((no, line))
    return out


def _read_all(files: list[str], shard_size: int, block_bytes: int = 2**20) -> list[tuple[str, int, bytes]]:
    got = []
    for index, (file, start, end, first, num, ident) in enumerate(index_inputs(files, shard_size, block_bytes)):
        lines = list(read_shard(ShardRef("job", index, file, start, end, first, num, ident)))
        assert len(lines) == num
        assert 1 <= num <= shard_size
        assert lines[0][0] == first
        got.extend((file, no, raw) for no, raw in lines)
    return got


def test_round_trip_crlf_blank_no_trailing_newline_chinese(tmp_path):
    zh = json.dumps({"id": "z", "prompt": "写一首关于西安的诗"}, ensure_ascii=False).encode()
    data = (b'{"id": "a", "prompt": "x"}\r\n'
            b"\r\n"
            b"   \n"
            + zh + b"\r\n"
            b'{"id": "c", "prompt": "y"}\n'
            b"\n"
            b'{"id": "d", "prompt": "last, no newline"}')
    f = tmp_path / "in.jsonl"
    f.write_bytes(data)
    got = _read_all([str(f)], shard_size=2)
    assert [(no, raw) for _, no, raw in got] == [
        (1, b'{"id": "a", "prompt": "x"}'), (4, zh), (5, b'{"id": "c", "prompt": "y"}'),
        (7, b'{"id": "d", "prompt": "last, no newline"}')]
    assert json.loads(got[1][2])["prompt"] == "写一首关于西安的诗"
    shards = list(index_inputs([str(f)], 2))
    assert [(s[3], s[4]) for s in shards] == [(1, 2), (5, 2)]


def test_line_exactly_at_shard_boundary_and_utf8_bom(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b"".join(b'{"i": %d}\n' % i for i in range(6)))
    shards = list(index_inputs([str(f)], 3))
    assert len(shards) == 2
    (_, s0, e0, f0, n0, _), (_, s1, e1, f1, n1, _) = shards
    assert (f0, n0, f1, n1) == (1, 3, 4, 3)
    assert e0 == s1                      # the boundary falls exactly between two lines
    assert e1 == f.stat().st_size
    got = _read_all([str(f)], 3)
    assert [raw for _, _, raw in got] == [b'{"i": %d}' % i for i in range(6)]   # BOM not in line 1
    assert json.loads(got[0][2]) == {"i": 0}


def test_line_longer_than_the_read_block(tmp_path):
    long = b'{"p": "' + b"x" * 5000 + b'"}'
    f = tmp_path / "long.jsonl"
    f.write_bytes(long + b"\n" + b"\n" + long + b"\r\n" + b'{"p": 1}')
    got = _read_all([str(f)], 2, block_bytes=64)
    assert [(no, raw) for _, no, raw in got] == [(1, long), (3, long), (4, b'{"p": 1}')]


def test_many_files_and_globs_every_line_once(tmp_path):
    expected = collections.Counter()
    for k in range(7):
        lines = [json.dumps({"id": f"{k}-{i}"}).encode() for i in range(k * 3 + 1)]
        (tmp_path / f"part{k}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        expected.update((str(tmp_path / f"part{k}.jsonl"), i + 1) for i in range(len(lines)))
    (tmp_path / "skip.txt").write_text("not json\n")
    files = expand_inputs([str(tmp_path / "part*.jsonl")])
    assert files == sorted(files) and len(files) == 7
    got = _read_all(files, shard_size=4)
    assert collections.Counter((f, no) for f, no, _ in got) == expected
    # shard indices are a running count across files; no shard spans two files
    refs = list(shard_refs("j", files, 4))
    assert [r.index for r in refs] == list(range(len(refs)))
    assert sum(r.num_lines for r in refs) == sum(expected.values())


def test_expand_inputs_lists_every_missing_input_in_one_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(InputError) as exc:
        expand_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "missing.jsonl"), str(tmp_path / "x*.jsonl"),
                       str(tmp_path)])
    msg = str(exc.value)
    assert msg == (f"input not found: {tmp_path}/missing.jsonl, {tmp_path}/x*.jsonl (no match); "
                   f"input not usable: {tmp_path} (a directory: name its files, e.g. {tmp_path}/*.jsonl)")


def test_expand_inputs_refuses_compressed_files(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(InputError, match="a.jsonl.gz \\(compressed"):
        expand_inputs([str(tmp_path / "*.gz")])


def test_expand_inputs_refuses_a_match_whose_name_is_not_utf8(tmp_path):
    # a glob's match named in bytes that are not UTF-8 (Python holds them as lone surrogates) cannot be a Redis key's
    # text, a JSON spec's or a record's `file`: refused by name before anything is written, where the submit met a
    # UnicodeEncodeError writing the job's files to Redis (a traceback, the job left half written)
    (tmp_path / "ok.jsonl").write_text('{"prompt": "x"}\n')
    os.close(os.open(os.fsencode(tmp_path) + b"/bad\xff\xfe.jsonl", os.O_CREAT | os.O_WRONLY))
    with pytest.raises(InputError) as exc:
        expand_inputs([str(tmp_path / "*.jsonl")])
    msg = str(exc.value)
    msg.encode("utf-8")
    assert msg == f"input not usable: {tmp_path}/bad\\xff\\xfe.jsonl (its name is not UTF-8: rename the file)"
    assert expand_inputs([str(tmp_path / "ok*.jsonl")]) == [str(tmp_path / "ok.jsonl")]


def test_expand_inputs_order_dedup_and_absolute_paths(tmp_path, monkeypatch):
    for name in ("b.jsonl", "a.jsonl", "c.jsonl"):
        (tmp_path / name).write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    files = expand_inputs(["c.jsonl", "*.jsonl", f"file://{tmp_path}/a.jsonl"])
    assert files == [str(tmp_path / n) for n in ("c.jsonl", "a.jsonl", "b.jsonl")]
    assert all(os.path.isabs(f) for f in files)


def test_read_shard_refuses_a_changed_input(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b"".join(b'{"i": %d}\n' % i for i in range(4)))
    row, = index_inputs([str(f)], 10)
    f.write_bytes(b'{"i": 0}\n')
    with pytest.raises(InputError, match="changed after submit") as got:
        read_shard(ShardRef("j", 0, *row))
    # what to do: a resubmit of the same spec resumes the job and indexes nothing again, so it is no way out
    assert str(got.value).endswith("holds 1 lines, expected 4; put the original content back, or submit the job "
                                   "again with a new output.path (the same spec resumes this job, whose inputs "
                                   "stay indexed as they were at submit)")
    f.unlink()
    with pytest.raises(InputError, match="disappeared"):
        read_shard(ShardRef("j", 0, *row))


def test_empty_and_blank_only_files_yield_no_shards(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\r\n  \n")
    assert list(index_inputs([str(tmp_path / "empty.jsonl"), str(tmp_path / "blank.jsonl")], 5)) == []


_line = st.one_of(
    st.just(b""), st.just(b"   "), st.just(b"\r"),
    st.text(alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), min_size=1,
            max_size=40).map(lambda s: json.dumps({"p": s}, ensure_ascii=False).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, max_size=40), crlf=st.booleans(), trailing=st.booleans(), bom=st.booleans(),
       shard_size=st.integers(1, 7), block=st.integers(1, 64))
def test_index_read_matches_a_plain_line_split(tmp_path, lines, crlf, trailing, bom, shard_size, block):
    sep = b"\r\n" if crlf else b"\n"
    data = (b"\xef\xbb\xbf" if bom else b"") + sep.join(lines) + (sep if trailing and lines else b"")
    f = tmp_path / "h.jsonl"
    f.write_bytes(data)
    got = [(no, raw) for _, no, raw in _read_all([str(f)], shard_size, block_bytes=block)]
    assert got == expected_lines(data)


def test_indexing_memory_does_not_grow_with_file_size(tmp_path):
    """~50 MB file, 1 MB read blocks: the traced peak stays a small multiple of the block, not the file."""
    f = tmp_path / "big.jsonl"
    line = json.dumps({"prompt": "西安" * 150 + "x" * 600}, ensure_ascii=False).encode() + b"\n"
    chunk = line * 1000
    with open(f, "wb") as out:
        while out.tell() < 50 * 2**20:
            out.write(chunk)
    size = f.stat().st_size
    tracemalloc.start()
    try:
        shards = 0
        lines = 0
        for *_, num, _ in index_file(str(f), 512, block_bytes=2**20):
            shards += 1
            lines += num
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == size // len(line)
    assert peak < 8 * 2**20, f"indexing a {size >> 20} MB file peaked at {peak >> 20} MB"


def test_io_imports_no_torch_ray_redis_or_pyarrow():
    """io sits below runtime and above the plain-data modules; submit and JSONL workers stay light."""
    import subprocess
    import sys

    code = ("import sys, ziya_batch.io; "
            "print(sorted(m for m in ('torch', 'ray', 'redis', 'pyarrow', 's3fs') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
