"""The output directory (OutputDir) and committing a shard's parts in it: stage aside, promote to the final
names, mark committed last.

Layout under the output directory (part N belongs to shard N)::

    _staging/{kind}/part-00005.{token}-{attempt}.jsonl   a worker's attempt, written whole in one atomic put
    _staging/part-00005.{token}-{attempt}.json          the attempt's intent: format, per-kind lines and
                                                        sha256; written after every part, so its presence =
                                                        staged whole
    {kind}/part-00005.jsonl                     the final part; only OutputDir.promote writes it
    _committed/part-00005.json                 the commit marker, written LAST by OutputDir.promote

Fencing. A lease's token is a number from Redis, new with every grant of a shard. Every attempt stages
under its own token and a random attempt id (a Redis that lost its last writes can grant one token twice),
so two workers never write the same object; only the worker whose commit Redis
accepted for its token calls OutputDir.promote, and a worker whose lease was lost calls OutputDir.discard. As a
second line of defence, committed output is never replaced: once a shard has a marker, promote with
any other token discards that token's staged parts and returns the existing marker. So a confused stale
worker cannot overwrite the winner's part, and a shard run twice because Redis lost a commit keeps its
first output (exactly-once output without relying on token order surviving a Redis loss). The one
window left is two tokens promoted at the same moment for one shard with no marker yet, which the Redis
fencing rules out, with one exception: a commit whose staged parts storage lost before they were promoted
(staged_loss says so) is taken back by the job's finalizer and its shard runs again under a new token. The
finalizer discards what is left of the old attempt first and takes the commit back only a grace period after it
(queue.broker.PROMOTE_GRACE_S), and promote checks each staged part right before moving it and the intent right
before writing the marker, so a late promoter of the old token finds nothing to move and writes no marker. Only a
promoter stalled for longer than the grace between such a check and its write can still write over the re-run's
part or marker: storage without conditional writes cannot rule that out.

Crash safety. OutputDir.promote is idempotent: called again after a crash between any two steps (parts
half moved, moved but no marker, marker written but intent not yet removed) it finishes the job and
returns the same marker. The markers are the truth a lost Redis is rebuilt from (committed_shards).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import re
from typing import Any, Optional

from fsspec.implementations.local import LocalFileSystem

from ..errors import InputError
from .markers import (CommitError, CommitMarker, PartInfo, StagedPart, attempt_key, new_attempt, part_index, part_name,
                      part_stem)
from .schema import EXTENSIONS, KINDS, encode_part
from .storage import (_fsync_dir, absent_fresh, exists_fresh, join_url, list_fresh, list_fresh_detail,
                      move_atomic, open_output_fs, put_atomic, read_bytes, write_synced)

STAGING = "_staging"
COMMITTED = "_committed"
# the most a JSON file of ours holds: the manifest (~300 bytes a shard, at most 200,000 shards) at the top; a
# commit marker or an attempt's intent (a few hundred bytes each) in _committed/ and _staging/
MAX_TOP_JSON_BYTES = 256 << 20
MAX_MARKER_BYTES = 4 << 20


class OutputDir:
    """One output directory (output.path): its filesystem and root, opened once, and the output format its parts
    are staged in. Owns every name in it (parts, staged attempts, intents, commit markers, the owner file) and the
    commit protocol above."""

    OWNER = "_owner.json"

    def __init__(self, url: str, fmt: str = "jsonl"):
        self.url = url
        self.format = fmt
        self.fs, self.root = open_output_fs(url)
        # local: where the directory really is (it may be a link itself); nothing in it may lead out of there
        self._real = os.path.realpath(self.root) if isinstance(self.fs, LocalFileSystem) else None

    @classmethod
    def of(cls, output: "OutputDir | str") -> "OutputDir":
        """The output directory a caller holds, or one opened from its URL: functions that take either let a
        caller that makes several calls (a submit) open the filesystem once."""
        return output if isinstance(output, OutputDir) else cls(output)

    def __repr__(self) -> str:
        return f"OutputDir({self.url!r}, {self.format!r})"

    # -- names ------------------------------------------------------------------------------------------------
    def path(self, *rel: str) -> str:
        """The path in the filesystem of a name relative to the directory. Local: InputError where the name,
        or a folder on the way (results/, _staging/, ...), is a symbolic link out of the directory, so nothing
        is read or written outside it through one (an HTTP user may only write under the allowed prefixes)."""
        path = join_url(self.root, *rel)
        if any(seg == ".." for r in rel for seg in re.split(r"[/\\]", r)):
            raise InputError(f"{self.url}: {'/'.join(rel)[:200]!r} names a place outside the output "
                             "directory ('..'): not a name ziya-batch writes")
        if self._real is not None and rel and self._leads_out(path):
            raise InputError(f"{self.url}: {self._link_out(rel)} is a symbolic link out of the output "
                             "directory; remove it, or choose another output.path")
        return path

    def _leads_out(self, path: str) -> bool:
        """Whether a local path, symlinks resolved, lies outside the directory's real path."""
        real = os.path.realpath(path)
        return real != self._real and not real.startswith(self._real.rstrip(os.sep) + os.sep)

    def _link_out(self, rel: tuple) -> str:
        """The first name of `rel` that leads out of the directory (for the message)."""
        names = posixpath.join(*rel).split("/")
        for i in range(1, len(names) + 1):
            if self._leads_out(join_url(self.root, *names[:i])):
                return "/".join(names[:i]) + ("/" if i < len(names) else "")
        return posixpath.join(*rel)

    def check_folders(self) -> None:
        """InputError where one of the folders the job writes into is a symbolic link out of the directory
        (checked again at every write; here so a submit is refused before anything is queued)."""
        for kind in (*KINDS, COMMITTED, STAGING):
            self.path(kind, "-")
        for kind in KINDS:
            self.path(STAGING, kind, "-")

    def part_url(self, kind: str, index: int, fmt: Optional[str] = None) -> str:
        """URL of a final part, e.g. s3://b/run/results/part-00005.jsonl."""
        return join_url(self.url, kind, part_name(index, fmt or self.format))

    @property
    def staging_url(self) -> str:
        """URL of the folder attempts are staged in, e.g. s3://b/run/_staging/ (for messages)."""
        return join_url(self.url, STAGING) + "/"

    @staticmethod
    def part_rel(kind: str, index: int, fmt: str) -> str:
        return f"{kind}/{part_name(index, fmt)}"

    def _staged(self, kind: str, index: int, token: int, attempt: str, fmt: str) -> str:
        return self.path(STAGING, kind, f"{part_stem(index)}.{attempt_key(token, attempt)}.{EXTENSIONS[fmt]}")

    def _intent(self, index: int, token: int, attempt: str) -> str:
        return self.path(STAGING, f"{part_stem(index)}.{attempt_key(token, attempt)}.json")

    def _marker(self, index: int) -> str:
        return self.path(COMMITTED, f"{part_stem(index)}.json")

    # -- small files at the top -------------------------------------------------------------------------------
    def read_json(self, name: str) -> Optional[Any]:
        """A JSON file at the top of the directory, read fresh (no listing cache), or None if absent."""
        path = self.path(name)
        self.fs.invalidate_cache(path)
        try:
            data = read_bytes(self.fs, path, MAX_TOP_JSON_BYTES)
        except NotADirectoryError:
            raise InputError(f"{self.url} is a file, or lies under one; an output path names a directory (it "
                             "receives results/, sft/, ...)") from None
        except (IsADirectoryError, PermissionError) as err:
            raise InputError(f"{self.url}: cannot read {name} ({err.strerror or type(err).__name__}); choose "
                             "another output.path") from None
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:          # also not UTF-8
            raise InputError(f"{self.url}: {name} is corrupt (not JSON); if no job writes into this directory "
                             f"any more, delete {name}, or choose another output.path") from None

    def put(self, name: str, data: bytes) -> None:
        put_atomic(self.fs, self.path(name), data)

    def read(self, rel: str, expect_size: Optional[int] = None) -> Optional[bytes]:
        """The bytes of a file in the directory (e.g. a part's path from its marker), None if absent. `expect_size`:
        the size its marker or the manifest gives (one request instead of two on S3: read_bytes)."""
        return read_bytes(self.fs, self.path(rel), expect_size=expect_size)

    def owner(self) -> Optional[str]:
        """The job id that writes into this directory (recorded at submit), or None."""
        owner = self.read_json(self.OWNER)
        if owner is None:
            return None
        if not isinstance(owner, dict) or not isinstance(owner.get("job_id"), str):
            raise InputError(f"{self.url}: {self.OWNER} is corrupt (no job_id); if no job writes into this "
                             f"directory any more, delete {self.OWNER}, or choose another output.path")
        return owner["job_id"]

    def set_owner(self, job_id: str) -> None:
        """Record that job_id writes into this directory: parts and commit markers in it are its own."""
        self.put(self.OWNER, json.dumps({"job_id": job_id}).encode())

    def claim_owner(self, job_id: str) -> Optional[str]:
        """Record job_id as the owner unless one is recorded: create-if-absent, so of several processes claiming
        one new directory at the same moment exactly one wins. Returns None when this call created the owner
        file, else the owner found. Local: the file is written whole aside and hard-linked into place (link
        fails if the name exists; readers never see it half written); other filesystems: open(mode="xb") (a
        conditional put on S3), or where a backend has no exclusive create, a check then a put."""
        data = json.dumps({"job_id": job_id}).encode()
        path = self.path(self.OWNER)
        if isinstance(self.fs, LocalFileSystem):
            return self._claim_local(path, data)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return self.owner()
        except (NotImplementedError, ValueError):       # no exclusive create on this backend
            found = self.owner()
            if found is not None:
                return found
            self.put(self.OWNER, data)
        finally:
            self.fs.invalidate_cache(path)
        return None

    def _claim_local(self, path: str, data: bytes) -> Optional[str]:
        os.makedirs(self.root, exist_ok=True)
        tmp = self.path(f".{self.OWNER}.{new_attempt()}.tmp")
        try:
            write_synced(tmp, data)
            os.link(tmp, path)
        except FileExistsError:
            return self.owner()
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK) or not os.path.exists(tmp):
                raise
            # no hard links here (some network and FUSE filesystems): O_EXCL on the name itself, written at once
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return self.owner()
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(self.root)
        return None

    def release_owner(self, job_id: str) -> None:
        """Remove the owner file if it still names job_id (a claim withdrawn before anything was written)."""
        if self.owner() == job_id:
            _remove_quietly(self.fs, [self.path(self.OWNER)])

    # -- the commit protocol ----------------------------------------------------------------------------------
    def stage(self, index: int, token: int, attempt: str, parts: dict[str, list[dict]],
              input_format: str = "ziya") -> dict[str, StagedPart]:
        """Write every kind's part of one attempt aside (one atomic put each), then the attempt's intent.

        `parts` maps kind (results, sft, experience, errors) to records. An errors part is always written,
        even empty, so a committed shard is complete. `input_format` (the spec's `format`) picks the
        openai-batch Parquet schema for results and errors.
        """
        fmt = self.format
        if fmt not in EXTENSIONS:
            raise ValueError(f"unknown output format {fmt!r}; expected jsonl or parquet")
        unknown = set(parts) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown record kinds {sorted(unknown)}; expected {', '.join(KINDS)}")
        staged: dict[str, StagedPart] = {}
        for kind in [k for k in KINDS if k in parts or k == "errors"]:
            records = parts.get(kind) or []
            data = encode_part(kind, records, fmt, input_format)
            path = self._staged(kind, index, token, attempt, fmt)
            put_atomic(self.fs, path, data)
            staged[kind] = StagedPart(kind, len(records), hashlib.sha256(data).hexdigest(), path, len(data))
        intent = {"index": index, "token": int(token), "format": fmt,
                  "parts": {k: {"lines": s.lines, "sha256": s.sha256, "size_bytes": s.size_bytes}
                            for k, s in staged.items()}}
        put_atomic(self.fs, self._intent(index, token, attempt), json.dumps(intent, sort_keys=True).encode())
        return staged

    def read_marker(self, index: int) -> Optional[CommitMarker]:
        self.fs.invalidate_cache(self.path(COMMITTED))
        data = read_bytes(self.fs, self._marker(index), MAX_MARKER_BYTES)
        return CommitMarker.from_json(data, self._marker(index)) if data is not None else None

    def promote(self, index: int, token: int, attempt: str = "",
                staged_info: Optional[dict[str, tuple[int, str]]] = None,
                stats: Optional[dict[str, Any]] = None) -> CommitMarker:
        """Move the token's staged parts to their final names, then write the commit marker; idempotent.

        Call only after Redis accepted this token's commit. Returns the shard's commit marker. If the shard
        is already committed under another token, nothing is replaced: that marker is returned (compare its
        `token` with yours) and this token's staged parts are deleted. `staged_info` (kind -> (lines,
        sha256)), when given, is checked against what was staged. `stats` (JSON-able counts: prompts_done,
        prompts_failed, samples, output_tokens) is kept in the marker, so a lost Redis can be rebuilt from
        storage. Raises CommitError when nothing is staged under this token, the intent differs from
        `staged_info`, a staged part is gone and its final name does not hold it, or the intent was removed (the
        attempt discarded) before the marker was written.
        """
        fs = self.fs
        marker_path, intent_path = self._marker(index), self._intent(index, token, attempt)
        fs.invalidate_cache(self.path(COMMITTED))
        existing = read_bytes(fs, marker_path, MAX_MARKER_BYTES)
        old = CommitMarker.from_json(existing, self._marker(index)) if existing is not None else None
        if old is not None:
            if old.token == int(token) and old.stats.get("attempt", "") == attempt:
                _remove_quietly(fs, [intent_path])      # a crash after the marker left the intent behind
            else:
                # committed output is never replaced: this attempt is a duplicate (a stale worker, or a shard
                # run again because Redis lost its commit); its staged parts go, the committed ones stay
                self.discard(index, token, attempt)
            return old
        raw = read_bytes(fs, intent_path, MAX_MARKER_BYTES)
        if raw is None:
            # a concurrent promote of the same token (the worker's and a finalizer's recovery) may have just
            # finished and removed the intent: its marker is then the answer
            now = read_bytes(fs, marker_path, MAX_MARKER_BYTES)
            if now is not None and CommitMarker.from_json(now, self._marker(index)).token == int(token):
                return CommitMarker.from_json(now, self._marker(index))
            # (a marker of this token but another attempt is returned too: the caller compares tokens only)
            raise CommitError(f"shard {index}: nothing staged under token {token} in {self.url} "
                              "(never staged, or discarded)")
        intent = json.loads(raw)
        fmt = intent["format"]
        if staged_info is not None:
            got = {k: (v["lines"], v["sha256"]) for k, v in intent["parts"].items()}
            want = {k: (int(v[0]), str(v[1])) for k, v in staged_info.items()}
            if any(got.get(k) != v for k, v in want.items()):
                raise CommitError(f"shard {index} token {token}: staged parts differ from the ones reported "
                                  f"at commit ({want} vs {got})")
        parts: dict[str, PartInfo] = {}
        for kind, info in intent["parts"].items():
            staged = self._staged(kind, index, token, attempt, fmt)
            rel = self.part_rel(kind, index, fmt)
            final = self.path(rel)
            moved = False
            if exists_fresh(fs, staged):
                try:
                    move_atomic(fs, staged, final)
                    moved = True
                except FileNotFoundError:      # a concurrent promote of this token moved it first
                    pass
            if not moved:
                # moved by an earlier (interrupted or concurrent) call: the final object must be what was staged
                data = read_bytes(fs, final)
                if data is None or hashlib.sha256(data).hexdigest() != info["sha256"]:
                    raise CommitError(f"shard {index} token {token}: staged {kind} part is gone and {rel} does "
                                      "not hold it; the shard must run again")
            parts[kind] = PartInfo(int(info["lines"]), info["sha256"], rel, int(info.get("size_bytes", 0)))
        # a finalizer taking the commit back (its parts were lost) discards the intent first: no marker may name
        # parts that the re-run replaces. A promoter stalled between this check and the put for longer than the
        # grace before a take-back (queue.broker.PROMOTE_GRACE_S) can still write over the re-run's marker.
        if absent_fresh(fs, intent_path):
            done = self.read_marker(index)      # a concurrent promote of this attempt removes the intent last
            if done is not None and done.token == int(token) and done.stats.get("attempt", "") == attempt:
                return done
            raise CommitError(f"shard {index} token {token}: the attempt's intent was removed before its commit "
                              "marker was written (discarded: its commit was taken back, or storage lost it)")
        clean_stats = {k: v for k, v in (stats or {}).items() if k not in ("parts", "attempt")}
        if attempt:
            clean_stats["attempt"] = attempt
        marker = CommitMarker(index=index, token=int(token), format=fmt, parts=parts, stats=clean_stats)
        put_atomic(fs, marker_path, marker.to_json().encode())
        _remove_quietly(fs, [intent_path])
        return marker

    def staged_loss(self, index: int, token: int, attempt: str = "") -> Optional[str]:
        """What storage positively says is gone of one attempt's staging, so that it can never be promoted: its
        intent, or a part that is neither staged nor moved into place already. None when storage holds all of it.
        Only "not found" counts as gone: any other error propagates (fsspec's exists() answers False for every
        error, a timeout or a refused permission included)."""
        raw = read_bytes(self.fs, self._intent(index, token, attempt), MAX_MARKER_BYTES)
        if raw is None:
            return f"its intent {STAGING}/{part_stem(index)}.{attempt_key(token, attempt)}.json is gone"
        intent = json.loads(raw)
        fmt = intent["format"]
        for kind, info in sorted(intent["parts"].items()):
            if not absent_fresh(self.fs, self._staged(kind, index, token, attempt, fmt)):
                continue
            rel = self.part_rel(kind, index, fmt)
            data = read_bytes(self.fs, self.path(rel))
            if data is None or hashlib.sha256(data).hexdigest() != info["sha256"]:
                return f"its staged {kind} part is gone and {rel} does not hold it"
        return None

    def discard(self, index: int, token: int, attempt: str = "") -> None:
        """Delete one attempt's staged parts and intent. Never touches final parts or markers."""
        paths = [self._intent(index, token, attempt)]      # the intent first: no half-staged "whole"
        for kind in KINDS:
            for fmt in EXTENSIONS:
                paths.append(self._staged(kind, index, token, attempt, fmt))
        _remove_quietly(self.fs, paths)

    def clear_staging(self) -> None:
        """Remove everything under _staging/ (leftovers of lost attempts), e.g. once the job is complete."""
        path = self.path(STAGING)
        if exists_fresh(self.fs, path):
            self.fs.rm(path, recursive=True)

    def first_written(self) -> Optional[str]:
        """A file of a name a job writes (a part under a record kind's directory, a commit marker under
        _committed/) that is here already, or None: what a directory no job owns must not hold before one claims
        it, or the job would overwrite it. Anything else (an empty folder, a folder key an object store's console
        made, .gitkeep) is no obstacle."""
        for sub in (*KINDS, COMMITTED):
            for entry in list_fresh_detail(self.fs, self.path(sub)):
                name = posixpath.basename(str(entry.get("name", "")).rstrip("/"))
                index = part_index(name)
                if index is None or entry.get("type") != "file":
                    continue
                ours = {f"{part_stem(index)}.json"} if sub == COMMITTED else {part_name(index, f) for f in EXTENSIONS}
                if name in ours:
                    return f"{sub}/{name}"
        return None

    def committed_shards(self) -> dict[int, CommitMarker]:
        """Every shard's commit marker, by shard index: what is done, even if Redis lost it."""
        return self._read_markers(list_fresh(self.fs, self.path(COMMITTED)))

    def commit_times(self) -> dict[int, float]:
        """Shard index -> when its commit marker was written (the storage's modification time)."""
        path = self.path(COMMITTED)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return _commit_times(entries)

    def committed_with_times(self) -> tuple[dict[int, CommitMarker], dict[int, float]]:
        """committed_shards() and commit_times() from one listing of _committed/ (a page a thousand markers on an
        object store, read one after another): every marker, and when each was written."""
        entries = list_fresh_detail(self.fs, self.path(COMMITTED))
        return self._read_markers(sorted(str(e.get("name", "")) for e in entries)), _commit_times(entries)

    def _read_markers(self, listed: list[str]) -> dict[int, CommitMarker]:
        names = [p for p in listed if p.endswith(".json")]
        if not names:
            return {}
        # one concurrent batch on object stores; a marker that cannot be read is an error, not a shard left out
        # (a cancelled job's manifest would miss its part; a resubmit would run it again)
        if self._real is not None:      # each through read_bytes: a FIFO named like a marker must not block
            blobs = {n: read_bytes(self.fs, n, MAX_MARKER_BYTES) for n in names}
        else:
            blobs = self.fs.cat(names, on_error="raise")
        markers = {}
        for name, data in blobs.items():
            if data is None:
                raise FileNotFoundError(errno.ENOENT, "commit marker removed while read", name)
            m = CommitMarker.from_json(data, name)
            markers[m.index] = m
        return markers


def _commit_times(entries: list[dict]) -> dict[int, float]:
    """Shard index -> the modification time of its commit marker, from a detailed listing of _committed/."""
    out = {}
    for e in entries:
        name = str(e.get("name", ""))
        index = part_index(name) if name.endswith(".json") else None
        if index is None:
            continue
        t = e.get("mtime") or e.get("LastModified") or e.get("last_modified") or e.get("created")
        if hasattr(t, "timestamp"):
            t = t.timestamp()
        try:
            out[index] = float(t)
        except (TypeError, ValueError):
            continue
    return out


# The same, one call each, for callers holding a URL (each opens the directory again).
def part_path(output_url: str, kind: str, index: int, fmt: str = "jsonl") -> str:
    """URL of a final part, e.g. s3://b/run/results/part-00005.jsonl."""
    return OutputDir(output_url, fmt).part_url(kind, index)


def stage_shard(output_url: str, index: int, token: int, parts: dict[str, list[dict]], fmt: str = "jsonl",
                input_format: str = "ziya", attempt: str = "") -> dict[str, StagedPart]:
    return OutputDir(output_url, fmt).stage(index, token, attempt, parts, input_format)


def read_marker(output_url: str, index: int) -> Optional[CommitMarker]:
    return OutputDir(output_url).read_marker(index)


def promote_shard(output_url: str, index: int, token: int,
                  staged_info: Optional[dict[str, tuple[int, str]]] = None,
                  stats: Optional[dict[str, Any]] = None, attempt: str = "") -> CommitMarker:
    return OutputDir(output_url).promote(index, token, attempt, staged_info, stats)


def discard_staged(output_url: str, index: int, token: int, attempt: str = "") -> None:
    OutputDir(output_url).discard(index, token, attempt)


def clear_staging(output_url: str) -> None:
    OutputDir(output_url).clear_staging()


def committed_shards(output_url: str) -> dict[int, CommitMarker]:
    return OutputDir(output_url).committed_shards()


def _remove_quietly(fs, paths: list[str]) -> None:
    for p in paths:
        try:
            fs.rm_file(p)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(p)
