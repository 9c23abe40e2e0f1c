"""Input JSONL files: expanding globs, indexing them into shards by byte range, reading one shard back.

A shard is (file, [start, end) byte range, first line number, number of lines); Redis stores only that,
and a worker reads its range straight from storage with one ranged read. Indexing streams each file
once in fixed-size blocks, so its memory does not depend on the file's size.

Line rules, shared by index and read so they agree exactly:
- a line ends at b"\\n"; a trailing b"\\r" (CRLF files) is not part of the line; the last line may
  lack a newline;
- a blank line (empty or ASCII whitespace only) is skipped: it is not counted in a shard and gets no
  output line, but it does count in line numbers (line numbers are the file's, 1-based, as an editor
  shows them);
- a UTF-8 byte-order mark at the start of a file is not part of line 1.
"""
from __future__ import annotations

import glob as _glob
from typing import Iterator

from fsspec.implementations.local import LocalFileSystem

from ..errors import InputError
from ..records import ShardRef
from .storage import full_url, normalize_url, url_to_fs

BLOCK_BYTES = 8 * 2**20       # read size while indexing; peak memory is a small multiple of this
_BOM = b"\xef\xbb\xbf"


def _has_magic(url: str) -> bool:
    return _glob.has_magic(url.split("://", 1)[-1])


_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4", ".snappy")


def expand_inputs(urls: list[str]) -> list[str]:
    """Input URLs with globs expanded: each glob's matches sorted, inputs in the order given, a file named
    twice kept once. Every missing or unusable input is named in one InputError. Local paths become
    absolute (workers run in other directories)."""
    files: list[str] = []
    missing: list[str] = []
    unusable: list[str] = []
    for url in urls:
        target = normalize_url(url)
        try:
            fs, path = url_to_fs(target)
            if _has_magic(target):
                # detail=True: one listing gives the types, no request per match on object stores
                found = fs.glob(path, detail=True)
                matches = sorted(p for p, info in found.items() if info.get("type") != "directory")
                if not matches:
                    missing.append(f"{url} (no match)")
                files.extend(full_url(fs, m) for m in matches)
            elif not fs.exists(path):
                missing.append(url)
            elif fs.isdir(path):
                unusable.append(f"{url} (a directory: name its files, e.g. {url.rstrip('/')}/*.jsonl)")
            else:
                files.append(full_url(fs, path))
        except PermissionError:
            unusable.append(f"{url} (permission denied)")
        except Exception as err:  # noqa: BLE001 - a storage backend may raise anything; name it
            unusable.append(f"{url} ({type(err).__name__}: {err}; check the URL and its credentials)")
    unusable.extend(f"{f} (compressed: shards are byte ranges of plain JSONL, decompress it first)"
                    for f in files if f.lower().endswith(_COMPRESSED))
    if missing or unusable:
        problems = []
        if missing:
            problems.append("input not found: " + ", ".join(missing))
        if unusable:
            problems.append("input not usable: " + ", ".join(unusable))
        raise InputError("; ".join(problems))
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _blank(line: bytes) -> bool:
    return not line or line.isspace()


def _line_lists(f, block_bytes: int) -> Iterator[list[bytes]]:
    """Lists of the complete lines (without b"\\n") in each block of a binary stream; a last line without
    a newline comes alone in a final list [_NO_NEWLINE, line]. Holds one block plus one partial line.
    Lines come in lists, not one by one, because a Python call per line would dominate the indexing."""
    pending: list[bytes] = []     # pieces of a line longer than a block (avoids quadratic concatenation)
    while True:
        block = f.read(block_bytes)
        if not block:
            break
        if b"\n" not in block:
            pending.append(block)
            continue
        if pending:
            pending.append(block)
            block = b"".join(pending)
            pending = []
        lines = block.split(b"\n")
        tail = lines.pop()
        if tail:
            pending.append(tail)
        yield lines
    if pending:
        yield [_NO_NEWLINE, b"".join(pending)]


_NO_NEWLINE = object()


def index_file(file: str, shard_size: int, block_bytes: int = BLOCK_BYTES
               ) -> Iterator[tuple[str, int, int, int, int]]:
    """Shards of one file: (file, start, end, first_line, num_lines)."""
    fs, path = url_to_fs(file)
    pos = 0               # byte offset of the current line
    line_no = 0
    count = 0             # non-blank lines in the open shard
    start = first = 0
    try:
        # remote: one streaming GET per block; local: the OS page cache does the read-ahead
        f = fs.open(path, "rb") if isinstance(fs, LocalFileSystem) else \
            fs.open(path, "rb", block_size=block_bytes, cache_type="readahead")
    except FileNotFoundError:
        raise InputError(f"input not found: {file} (removed after it was listed?)") from None
    with f:
        for lines in _line_lists(f, block_bytes):
            newline = 1
            if lines[0] is _NO_NEWLINE:
                lines = lines[1:]
                newline = 0
            if pos == 0 and lines[0].startswith(_BOM):
                # the byte-order mark is not part of line 1: a BOM-only line is blank
                pos, lines[0] = len(_BOM), lines[0][len(_BOM):]
            # the hot loop: one iteration per input line, kept to a few C calls (a CRLF line's b"\r" is
            # whitespace, so a blank CRLF line is isspace() without stripping it)
            for line in lines:
                line_no += 1
                if line and not line.isspace():
                    if count == 0:
                        start, first = pos, line_no
                    count += 1
                    if count == shard_size:
                        yield file, start, pos + len(line) + newline, first, count
                        count = 0
                pos += len(line) + newline
    if count:
        yield file, start, pos, first, count      # trailing blank lines may ride along: readers skip them


def index_inputs(files: list[str], shard_size: int, block_bytes: int = BLOCK_BYTES
                 ) -> Iterator[tuple[str, int, int, int, int]]:
    """Stream (file, start, end, first_line, num_lines) for every shard of every file, in order.

    Each shard holds `shard_size` non-blank lines (a file's last shard may hold fewer; shards never span
    files or split a line). The shard index is the running count over all files; the caller builds
    ShardRef(job_id, index, file, start, end, first_line, num_lines). Memory is constant in file size.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    for file in files:
        yield from index_file(file, shard_size, block_bytes)


def shard_refs(job_id: str, files: list[str], shard_size: int) -> Iterator[ShardRef]:
    """index_inputs as ShardRefs numbered from 0."""
    for index, (file, start, end, first, num) in enumerate(index_inputs(files, shard_size)):
        yield ShardRef(job_id, index, file, start, end, first, num)


def read_shard(ref: ShardRef) -> Iterator[tuple[int, bytes]]:
    """(1-based line number in its file, line bytes without newline) for each non-blank line of the shard.

    One ranged read of [start, end). Raises InputError (before yielding anything) when the file no longer
    holds what it held at submit (too short, or a different number of lines in the range): a changed
    input would otherwise silently produce wrong ids.
    """
    fs, path = url_to_fs(ref.file)
    try:
        data = fs.cat_file(path, start=ref.start, end=ref.end)
    except FileNotFoundError:
        raise InputError(f"input {ref.file} disappeared after submit (shard {ref.index}); "
                         "restore it or cancel the job") from None
    complete = len(data) == ref.end - ref.start
    if ref.start == 0 and data.startswith(_BOM):
        data = data[len(_BOM):]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()               # the range ends with a newline
    out: list[tuple[int, bytes]] = []
    for line_no, line in enumerate(lines, ref.first_line):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not _blank(line):
            out.append((line_no, line))
    if not complete or len(out) != ref.num_lines:
        raise InputError(f"input {ref.file} changed after submit: shard {ref.index} (bytes {ref.start}.."
                         f"{ref.end}) now holds {len(out)} lines, expected {ref.num_lines}; "
                         "resubmit the job with the new file")
    return iter(out)
