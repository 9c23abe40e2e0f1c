"""Inputs that are not regular files are refused before anything reads them; a line past the length limit is
that line's error (line_too_long), read in bounded memory, and index and read still agree on every line."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_io_inputs import expected_lines
from ziya_batch import errors
from ziya_batch.errors import InputError, LineError
from ziya_batch.io import expand_inputs, index_inputs, read_shard
from ziya_batch.prompts import parse_line
from ziya_batch.records import ShardRef, TooLongLine
from ziya_batch.spec import SamplingSpec


def _refused(url: str, within_s: float = 5.0) -> str:
    """expand_inputs must refuse `url` quickly (a FIFO's open would block forever; a device never ends)."""
    out: dict = {}

    def go():
        try:
            expand_inputs([url])
            out["result"] = "accepted"
        except InputError as err:
            out["result"] = str(err)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(within_s)
    assert "result" in out, f"{url}: expand_inputs still running after {within_s}s"
    assert out["result"] != "accepted"
    assert "\n" not in out["result"]
    return out["result"]


def test_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    assert "named pipe" in _refused(str(fifo))


@pytest.mark.parametrize("dev", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_devices_are_refused(dev):
    if not os.path.exists(dev):
        pytest.skip(f"{dev} missing")
    assert "character device" in _refused(dev)


def test_symlink_to_a_device_and_a_glob_matching_one_are_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n')
    os.symlink("/dev/zero", tmp_path / "b.jsonl")
    assert "character device" in _refused(str(tmp_path / "b.jsonl"))
    msg = _refused(str(tmp_path / "*.jsonl"))
    assert "b.jsonl" in msg and "a.jsonl" not in msg


def test_socket_and_directory_are_refused(tmp_path):
    path = tmp_path / "s.jsonl"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        assert "socket" in _refused(str(path))
    finally:
        s.close()
    assert "directory" in _refused(str(tmp_path))


def test_proc_pseudo_file_is_refused():
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc")
    assert "pseudo-file" in _refused("/proc/self/status")


def test_a_path_swapped_for_a_fifo_after_listing_is_refused_at_open(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"prompt": "x"}\n')
    files = expand_inputs([str(f)])
    f.unlink()
    os.mkfifo(f)
    t0 = time.monotonic()
    with pytest.raises(InputError, match="named pipe"):
        list(index_inputs(files, 10))
    assert time.monotonic() - t0 < 5


def test_a_growing_file_is_indexed_as_it_was_when_opened(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"prompt": "a"}\n' * 3)
    shards = []
    with open(f, "ab") as w:
        for shard in index_inputs([str(f)], 1, block_bytes=4):
            w.write(b'{"prompt": "more"}\n')     # appended while it is read: never reached
            w.flush()
            shards.append(shard)
    assert [s[4] for s in shards] == [1, 1, 1]


_line = st.one_of(
    st.binary(min_size=0, max_size=12).filter(lambda b: b"\n" not in b),
    st.builds(lambda n, c: c * n, st.integers(13, 80), st.sampled_from([b"x", b" ", b"{", b"\r"])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, max_size=20), trailing=st.booleans(), bom=st.booleans(),
       shard_size=st.integers(1, 5), block=st.integers(1, 40), limit=st.integers(8, 30))
def test_long_lines_index_and_read_back_as_too_long(tmp_path, lines, trailing, bom, shard_size, block, limit):
    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + (b"\n" if trailing and lines else b"")
    f = tmp_path / "in.jsonl"
    f.write_bytes(data)
    got = []
    for index, row in enumerate(index_inputs([str(f)], shard_size, block, limit)):
        first, num = row[3:5]
        back = list(read_shard(ShardRef("j", index, *row), max_line_bytes=limit))
        assert len(back) == num and back[0][0] == first
        got.extend(back)
    assert [(no, raw.length if isinstance(raw, TooLongLine) else raw) for no, raw in got] == expected_lines(data, limit)


def test_too_long_line_is_its_own_error(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"id": "a", "prompt": "ok"}\n{"id": "big", "prompt": "' + b"y" * 100 + b'"}\n{"prompt": "ok"}\n')
    row, = index_inputs([str(f)], 10, 16, 64)
    file = row[0]
    back = list(read_shard(ShardRef("j", 0, *row), max_line_bytes=64))
    assert [no for no, _ in back] == [1, 2, 3]
    with pytest.raises(LineError) as ei:
        parse_line(back[1][1], "ziya", file, 2, SamplingSpec())
    assert ei.value.code == errors.LINE_TOO_LONG and "over the limit of 64 bytes" in ei.value.message


def test_a_glob_matching_a_broken_symlink_names_it(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n')
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "b.jsonl")
    msg = _refused(str(tmp_path / "*.jsonl"))
    assert "b.jsonl (a broken symlink" in msg
