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
- a UTF-8 byte-order mark at the start of a file is not part of line 1;
- a line longer than MAX_LINE_BYTES is never held in memory: it is counted like any line and read back as a
  TooLongLine (its first bytes), which becomes that line's line_too_long error (a blank one stays blank).

Only regular files (or objects in object storage) are inputs: a device, FIFO, socket, directory or a
pseudo-file of unknown size (/proc) could be endless or block forever, so it is refused before reading, and
a local file is read only up to the size it had when opened.

A local file's shards carry its identity (st_dev:st_ino of the descriptor the indexer read), and a worker reads
a shard only from that same file (same_file): the HTTP API judged the file by where its path pointed at submit,
and a path (or a folder on it) swapped for a symlink afterwards must not lead a worker to a file it never judged.
A file written over in place keeps its identity and is held to the line count check, as before.
"""
from __future__ import annotations

import glob as _glob
import os
from typing import Iterable, Iterator, Optional

from fsspec.implementations.local import LocalFileSystem

from ..errors import InputError, utf8_safe
from ..records import ShardRef, TooLongLine
from .storage import full_url, normalize_url, special_kind, storage_away, url_to_fs

BLOCK_BYTES = 8 * 2**20       # read size while indexing; peak memory is a small multiple of this
MAX_LINE_BYTES = 16 * 2**20   # a longer line is that line's error (line_too_long), never read into memory
_HEAD_BYTES = 64              # what a TooLongLine keeps of its line
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
                for m in matches:
                    why = not_regular(fs, m)
                    if not utf8_safe(m):
                        # undecodable bytes of a local name, held as lone surrogates: no Redis key, spec or record
                        # can carry the name
                        shown = os.fsencode(full_url(fs, m)).decode("utf-8", "backslashreplace")
                        unusable.append(f"{shown} (its name is not UTF-8: rename the file)")
                    elif why:
                        unusable.append(f"{full_url(fs, m)} ({why})")
                    else:
                        files.append(full_url(fs, m))
            elif not fs.exists(path):
                missing.append(url)
            elif fs.isdir(path):
                unusable.append(f"{url} (a directory: name its files, e.g. {url.rstrip('/')}/*.jsonl)")
            elif not_regular(fs, path):
                unusable.append(f"{url} ({not_regular(fs, path)})")
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


def not_regular(fs, path: str) -> Optional[str]:
    """Why a local path (symlinks followed) cannot be an input, or None for a regular file; object stores hold
    only objects. Checked before anything opens it: opening a FIFO blocks until a writer comes."""
    if not isinstance(fs, LocalFileSystem):
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a broken symlink, or removed while listed"
    kind = special_kind(st.st_mode)
    if kind:
        return f"{kind}, not a regular file: inputs are JSONL files"
    if st.st_size == 0 and _pseudo_file(path):
        return "a pseudo-file whose size is unknown (like those under /proc): copy it to a regular file"
    return None


def _pseudo_file(path: str) -> bool:
    """A regular file that says it is empty yet has bytes (/proc, /sys): it may never end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return bool(os.read(fd, 1))
    except OSError:
        return False
    finally:
        os.close(fd)


_BOOT_ID: Optional[str] = None


def boot_id() -> str:
    """This host's boot id (Linux: a random UUID the kernel draws at each boot), "" where there is none."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                _BOOT_ID = f.read(64).strip()
        except (OSError, ValueError):
            _BOOT_ID = ""
    return _BOOT_ID


def file_identity(st: os.stat_result) -> str:
    """A local file's identity as ShardRef.identity keeps it: the same file whatever path or link leads to it.
    "st_dev:st_ino:boot_id" (the boot id left out where the host has none)."""
    boot = boot_id()
    return f"{st.st_dev}:{st.st_ino}" + (f":{boot}" if boot else "")


def same_file(recorded: str, current: str) -> bool:
    """Whether two file_identity values name one file. The inode numbers must be equal. The device numbers too, but
    only where both were taken on one host in one boot, and then not between filesystems without a fixed device
    (major number 0: NFS, Lustre, CephFS, FUSE, overlay, tmpfs, btrfs), which the kernel numbers per mount (again
    after a remount). Across hosts or boots a device number means nothing: a shared filesystem, or a disk of a
    shared-disk filesystem, has another number on each host, and one host may number its disks and volumes in
    another order after a reboot; there only the inode number tells files apart. (An identity without a boot id,
    as an earlier build wrote, counts as this boot's.)"""
    (dev_a, ino_a, boot_a), (dev_b, ino_b, boot_b) = (_identity_parts(i) for i in (recorded, current))
    if ino_a != ino_b:
        return False
    if boot_a and boot_b and boot_a != boot_b:
        return True
    return dev_a == dev_b or os.major(dev_a) == os.major(dev_b) == 0


def _identity_parts(identity: str) -> tuple[int, int, str]:
    dev, ino, *boot = identity.split(":", 2)
    return int(dev), int(ino), boot[0] if boot else ""


def where_local_file_is(file: str) -> Optional[tuple[str, str]]:
    """(file_identity, absolute path) of the local file `file` names now, both read from one descriptor: the path is
    the kernel's name for what was opened (/proc/self/fd), so a symlink swapped into the path between the two cannot
    make them name different files, as a realpath then a stat could. None for object storage. The HTTP API judges
    the path and hands the identity to submit_job, which refuses a file indexed under another identity."""
    fs, path = url_to_fs(file)
    if not isinstance(fs, LocalFileSystem):
        return None
    # O_PATH: neither read permission nor a FIFO's writer is needed; nothing is read through it
    try:
        fd = os.open(path, getattr(os, "O_PATH", os.O_RDONLY | os.O_NONBLOCK) | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"input not found: {file} (removed after it was listed?)") from None
    except OSError as err:
        raise InputError(f"input not usable: {file} ({err.strerror})") from None
    try:
        st = os.fstat(fd)
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:                 # no /proc (not Linux): the path as resolved now, after the descriptor's stat
            where = os.path.realpath(path)
    finally:
        os.close(fd)
    return file_identity(st), where


def _open_local(file: str, path: str):
    """A regular file opened for reading, checked on the open descriptor (the path may have been swapped for a
    FIFO or device since it was listed; O_NONBLOCK keeps a FIFO's open from waiting for a writer), and read only
    up to the size it has now. Its identity is taken from the same descriptor: the file read is the file named."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InputError(f"input not found: {file} (removed after it was listed?)") from None
    except OSError as err:
        raise InputError(f"input not usable: {file} ({err.strerror})") from None
    st = os.fstat(fd)
    kind = special_kind(st.st_mode)
    if kind:
        os.close(fd)
        raise InputError(f"input not usable: {file} ({kind}, not a regular file: inputs are JSONL files)")
    return _Bounded(os.fdopen(fd, "rb"), st.st_size, file_identity(st))


def _open_remote(file: str, f):
    """An object read only up to the size its store reported: a URL whose size is unknown (a stream) might
    never end, and is refused."""
    size = getattr(f, "size", None)
    if not isinstance(size, int):
        f.close()
        raise InputError(f"input not usable: {file} (its size is unknown, as a stream's is: inputs are files or "
                         "objects)")
    return _Bounded(f, size)


class _Bounded:
    """A binary stream that ends after `size` bytes: a file that grows while it is read (or never ends) is read
    as it was when opened."""

    def __init__(self, f, size: int, identity: Optional[str] = None):
        self.f, self.left, self.identity = f, size, identity      # identity: a local file's (file_identity)

    def read(self, n: int) -> bytes:
        data = self.f.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data

    def seek(self, pos: int) -> None:
        self.left -= pos - self.f.tell()
        self.f.seek(pos)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _blank(line: bytes) -> bool:
    return not line or line.isspace()


def _line_lists(f, block_bytes: int, max_line_bytes: int = MAX_LINE_BYTES, first: bytes = b"") -> Iterator[list]:
    """Lists of the complete lines (without b"\\n") in each block of a binary stream; a last line without
    a newline comes alone in a final list [_NO_NEWLINE, line]; a line longer than `max_line_bytes` comes alone
    as [TooLongLine] (with .length, .blank and .newline), only its head kept. Holds one block plus one partial
    line of at most `max_line_bytes`. Lines come in lists, not one by one, because a Python call per line would
    dominate the indexing. `first`: bytes already read from the stream (see _skip_bom)."""
    block_bytes = min(block_bytes, max_line_bytes)   # then a line inside one block is never too long
    pending: list[bytes] = []     # pieces of a line longer than a block (avoids quadratic concatenation)
    pending_len = 0
    long: Optional[list] = None   # [head, length, blank] of a line past the limit, read on without keeping it
    while True:
        block = first + f.read(max(1, block_bytes - len(first))) if first else f.read(block_bytes)
        first = b""
        if not block:
            break
        cut = block.find(b"\n")
        if cut < 0:
            if long is not None:
                long[1] += len(block)
                long[2] = long[2] and block.isspace()
            else:
                pending.append(block)
                pending_len += len(block)
                if pending_len > max_line_bytes:
                    long, pending, pending_len = _long(pending), [], 0
            continue
        if long is None and pending and pending_len + cut > max_line_bytes:
            long, pending, pending_len = _long(pending), [], 0
        if long is not None:
            yield [_too_long(long, block[:cut], max_line_bytes, newline=True)]
            long, block = None, block[cut + 1:]
        elif pending:
            pending.append(block)
            block = b"".join(pending)
            pending, pending_len = [], 0
        lines = block.split(b"\n")
        tail = lines.pop()
        if tail:
            pending, pending_len = [tail], len(tail)
        if lines:
            yield lines
    if long is not None:
        yield [_too_long(long, b"", max_line_bytes, newline=False)]
    elif pending:
        yield [_NO_NEWLINE, b"".join(pending)]


def _skip_bom(f) -> tuple[int, bytes]:
    """Read past a UTF-8 byte-order mark at the start of a stream: (bytes skipped, bytes read that are not one),
    so that no line, long or not, includes it."""
    head = f.read(len(_BOM))
    return (len(_BOM), b"") if head == _BOM else (0, head)


def _long(pieces: list[bytes]) -> list:
    return [b"".join(pieces)[:_HEAD_BYTES], sum(map(len, pieces)), all(p.isspace() for p in pieces)]


def _too_long(long: list, last: bytes, limit: int, newline: bool) -> TooLongLine:
    line = TooLongLine(long[0], long[1] + len(last), limit)
    # b"\r" is whitespace: a blank CRLF line stays blank
    line.blank, line.newline = long[2] and (not last or last.isspace()), int(newline)
    return line


_NO_NEWLINE = object()


def index_file(file: str, shard_size: int, block_bytes: int = BLOCK_BYTES, max_line_bytes: int = MAX_LINE_BYTES
               ) -> Iterator[tuple[str, int, int, int, int, Optional[str]]]:
    """Shards of one file: (file, start, end, first_line, num_lines, identity); identity: the local file's
    (file_identity), None for object storage."""
    fs, path = url_to_fs(file)
    pos = 0               # byte offset of the current line
    line_no = 0
    count = 0             # non-blank lines in the open shard
    start = first = 0
    try:
        # remote: one streaming GET per block; local: the OS page cache does the read-ahead
        f = _open_local(file, path) if isinstance(fs, LocalFileSystem) else \
            _open_remote(file, fs.open(path, "rb", block_size=block_bytes, cache_type="readahead"))
    except FileNotFoundError:
        raise InputError(f"input not found: {file} (removed after it was listed?)") from None
    identity = f.identity
    with f:
        pos, head = _skip_bom(f)     # the byte-order mark is not part of line 1: a BOM-only line is blank
        for lines in _line_lists(f, block_bytes, max_line_bytes, head):
            newline = 1
            if type(lines[0]) is TooLongLine:
                long = lines[0]
                length = long.length
                line_no += 1
                if not long.blank:
                    if count == 0:
                        start, first = pos, line_no
                    count += 1
                    if count == shard_size:
                        yield file, start, pos + length + long.newline, first, count, identity
                        count = 0
                pos += length + long.newline
                continue
            if lines[0] is _NO_NEWLINE:
                lines = lines[1:]
                newline = 0
            # the hot loop: one iteration per input line, kept to a few C calls (a CRLF line's b"\r" is
            # whitespace, so a blank CRLF line is isspace() without stripping it)
            for line in lines:
                line_no += 1
                if line and not line.isspace():
                    if count == 0:
                        start, first = pos, line_no
                    count += 1
                    if count == shard_size:
                        yield file, start, pos + len(line) + newline, first, count, identity
                        count = 0
                pos += len(line) + newline
    if count:
        yield file, start, pos, first, count, identity   # trailing blank lines may ride along: readers skip them


def index_inputs(files: list[str], shard_size: int, block_bytes: int = BLOCK_BYTES,
                 max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, int, int, int, int, Optional[str]]]:
    """Stream (file, start, end, first_line, num_lines, identity) for every shard of every file, in order.

    Each shard holds `shard_size` non-blank lines (a file's last shard may hold fewer; shards never span
    files or split a line). The shard index is the running count over all files; the caller builds
    ShardRef(job_id, index, *row). Memory is constant in file size.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    for file in files:
        # listed a moment ago: a store that stops answering now is one line, as at the listing
        with storage_away(f"input {file}"):
            yield from index_file(file, shard_size, block_bytes, max_line_bytes)


def shard_refs(job_id: str, files: list[str], shard_size: int,
               rows: Optional[Iterable[tuple[str, int, int, int, int, Optional[str]]]] = None) -> Iterator[ShardRef]:
    """index_inputs (or its `rows`, read already) as ShardRefs numbered from 0."""
    for index, row in enumerate(rows if rows is not None else index_inputs(files, shard_size)):
        yield ShardRef(job_id, index, *row)


def read_shard(ref: ShardRef, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(1-based line number in its file, line bytes without newline) for each non-blank line of the shard; a
    line longer than `max_line_bytes` comes as a TooLongLine.

    One ranged read of [start, end), streamed in blocks where the range could hold a line too long to keep.
    Raises InputError (before yielding anything) when the file no longer holds what it held at submit (too
    short, or a different number of lines in the range): a changed input would otherwise silently produce
    wrong ids; and when a local file is no longer the file indexed (ref.identity), even one of the same bytes:
    the identity is what the HTTP API's check of where the path pointed vouches for, not the content.
    """
    fs, path = url_to_fs(ref.file)
    try:
        if isinstance(fs, LocalFileSystem) or ref.end - ref.start > max_line_bytes:
            got, complete = _stream_range(ref, fs, path, max_line_bytes)
        else:
            got, complete = _split_range(ref, fs.cat_file(path, start=ref.start, end=ref.end))
    except FileNotFoundError:
        raise InputError(f"input {ref.file} disappeared after submit (shard {ref.index}); "
                         "restore it or cancel the job") from None
    if not complete or len(got) != ref.num_lines:
        raise InputError(f"input {ref.file} changed after submit: shard {ref.index} (bytes {ref.start}.."
                         f"{ref.end}) now holds {len(got)} lines, expected {ref.num_lines}; put the original "
                         "content back, or submit the job again with a new output.path (the same spec resumes "
                         "this job, whose inputs stay indexed as they were at submit)")
    return iter(got)


def _split_range(ref: ShardRef, data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
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
    return out, complete


def _stream_range(ref: ShardRef, fs, path: str, max_line_bytes: int) -> tuple[list[tuple[int, bytes]], bool]:
    """_split_range for a range read block by block: no line past `max_line_bytes` is held whole. Local files
    come here too, opened as regular files only (a path swapped for a FIFO must not block a worker forever)."""
    local = isinstance(fs, LocalFileSystem)
    if local:
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        f = _open_local(ref.file, path)
    else:
        f = fs.open(path, "rb", block_size=BLOCK_BYTES, cache_type="readahead")
    out: list[tuple[int, bytes]] = []
    line_no = ref.first_line
    with f:
        if local and ref.identity is not None and not same_file(ref.identity, f.identity):
            raise InputError(f"input {ref.file} was replaced after submit (shard {ref.index}): it is no longer the "
                             "file that was checked and indexed; put the original back, or submit the job again "
                             "with a new output.path")
        f.seek(ref.start)
        r = _Bounded(f, ref.end - ref.start)
        head = _skip_bom(r)[1] if ref.start == 0 else b""
        for lines in _line_lists(r, BLOCK_BYTES, max_line_bytes, head):
            if type(lines[0]) is TooLongLine:
                if not lines[0].blank:
                    out.append((line_no, lines[0]))
                line_no += 1
                continue
            if lines[0] is _NO_NEWLINE:
                lines = lines[1:]
            for line in lines:
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not _blank(line):
                    out.append((line_no, line))
                line_no += 1
        return out, r.left == 0
