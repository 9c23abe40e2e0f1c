"""Committing a shard's output parts: stage aside, promote to the final names, mark committed last.

Layout under the output directory (part N belongs to shard N)::

    _staging/{kind}/part-00005.{token}-{attempt}.jsonl   a worker's attempt, written whole in one atomic put
    _staging/part-00005.{token}-{attempt}.json          the attempt's intent: format, per-kind lines and
                                                        sha256; written after every part, so its presence =
                                                        staged whole
    {kind}/part-00005.jsonl                     the final part; only promote_shard writes it
    _committed/part-00005.json                 the commit marker, written LAST by promote_shard

Fencing. A lease's token is a number from Redis, new with every grant of a shard. Every attempt stages
under its own token and a random attempt id (a Redis that lost its last writes can grant one token twice),
so two workers never write the same object; only the worker whose commit Redis
accepted for its token calls promote_shard, and a worker whose lease was lost calls discard_staged. As a
second line of defence, committed output is never replaced: once a shard has a marker, promote_shard with
any other token discards that token's staged parts and returns the existing marker. So a confused stale
worker cannot overwrite the winner's part, and a shard run twice because Redis lost a commit keeps its
first output (exactly-once output without relying on token order surviving a Redis loss). The one
window left is two tokens promoted at the same moment for one shard with no marker yet, which the Redis
fencing rules out.

Crash safety. promote_shard is idempotent: called again after a crash between any two steps (parts
half moved, moved but no marker, marker written but intent not yet removed) it finishes the job and
returns the same marker. The markers are the truth a lost Redis is rebuilt from (committed_shards).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from ..errors import ZiyaBatchError
from .schema import EXTENSIONS, KINDS, encode_part
from .storage import exists_fresh, join_url, list_fresh, move_atomic, open_output_fs, put_atomic, read_bytes

STAGING = "_staging"
COMMITTED = "_committed"


class CommitError(ZiyaBatchError):
    """A shard's commit cannot proceed: nothing staged under that token, a newer token already committed
    it, or a promoted part went missing."""

    exit_code = 3


@dataclass(frozen=True)
class StagedPart:
    kind: str
    lines: int
    sha256: str
    path: str                 # full URL or path of the staged object
    size_bytes: int = 0


class PartInfo(NamedTuple):
    """A committed part. A tuple whose first two items are (lines, sha256), like staged_info's values."""

    lines: int
    sha256: str
    path: str                 # relative to the output directory, e.g. "results/part-00005.jsonl"
    size_bytes: int = 0


@dataclass(frozen=True)
class CommitMarker:
    """_committed/part-N.json: which token committed shard N, its parts, and the worker's counts."""

    index: int
    token: int
    format: str
    parts: dict[str, PartInfo] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)   # as the worker passed it (prompts_done, ...)

    @property
    def lines(self) -> dict[str, int]:
        return {k: p.lines for k, p in self.parts.items()}

    @property
    def prompts_done(self) -> int:
        return int(self.stats.get("prompts_done", 0))

    @property
    def prompts_failed(self) -> int:
        return int(self.stats.get("prompts_failed", 0))

    @property
    def samples(self) -> int:
        return int(self.stats.get("samples", 0))

    @property
    def output_tokens(self) -> int:
        return int(self.stats.get("output_tokens", 0))

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "token": self.token, "format": self.format,
                           "parts": {k: p._asdict() for k, p in self.parts.items()},
                           "stats": self.stats}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "CommitMarker":
        d = json.loads(text)
        return cls(index=int(d["index"]), token=int(d["token"]), format=d["format"],
                   parts={k: PartInfo(**p) for k, p in d["parts"].items()}, stats=d.get("stats") or {})


def part_name(index: int, fmt: str) -> str:
    return f"part-{index:05d}.{EXTENSIONS[fmt]}"


def part_path(output_url: str, kind: str, index: int, fmt: str = "jsonl") -> str:
    """URL of a final part, e.g. s3://b/run/results/part-00005.jsonl."""
    return join_url(output_url, kind, part_name(index, fmt))


def _attempt_key(token: int, attempt: str) -> str:
    return f"{int(token)}-{attempt}" if attempt else str(int(token))


def _staged_name(index: int, token: int, fmt: str, attempt: str = "") -> str:
    return f"part-{index:05d}.{_attempt_key(token, attempt)}.{EXTENSIONS[fmt]}"


def _intent_rel(index: int, token: int, attempt: str = "") -> str:
    return f"{STAGING}/part-{index:05d}.{_attempt_key(token, attempt)}.json"


def new_attempt() -> str:
    """A random id for one attempt at a shard, for stage_shard/promote_shard/discard_staged."""
    import uuid

    return uuid.uuid4().hex[:12]


def _marker_rel(index: int) -> str:
    return f"{COMMITTED}/part-{index:05d}.json"


def stage_shard(output_url: str, index: int, token: int, parts: dict[str, list[dict]], fmt: str = "jsonl",
                input_format: str = "ziya", attempt: str = "") -> dict[str, StagedPart]:
    """Write every kind's part of one attempt aside (one atomic put each), then the attempt's intent.

    `parts` maps kind (results, sft, experience, errors) to records. An errors part is always written,
    even empty, so a committed shard is complete. `input_format` (the spec's `format`) picks the
    openai-batch Parquet schema for results and errors.
    """
    if fmt not in EXTENSIONS:
        raise ValueError(f"unknown output format {fmt!r}; expected jsonl or parquet")
    unknown = set(parts) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown record kinds {sorted(unknown)}; expected {', '.join(KINDS)}")
    fs, root = open_output_fs(output_url)
    kinds = [k for k in KINDS if k in parts or k == "errors"]
    staged: dict[str, StagedPart] = {}
    for kind in kinds:
        records = parts.get(kind) or []
        data = encode_part(kind, records, fmt, input_format)
        path = join_url(root, STAGING, kind, _staged_name(index, token, fmt, attempt))
        put_atomic(fs, path, data)
        staged[kind] = StagedPart(kind, len(records), hashlib.sha256(data).hexdigest(), path, len(data))
    intent = {"index": index, "token": int(token), "format": fmt,
              "parts": {k: {"lines": s.lines, "sha256": s.sha256, "size_bytes": s.size_bytes}
                        for k, s in staged.items()}}
    put_atomic(fs, join_url(root, _intent_rel(index, token, attempt)), json.dumps(intent, sort_keys=True).encode())
    return staged


def read_marker(output_url: str, index: int) -> Optional[CommitMarker]:
    fs, root = open_output_fs(output_url)
    fs.invalidate_cache(join_url(root, COMMITTED))
    data = read_bytes(fs, join_url(root, _marker_rel(index)))
    return CommitMarker.from_json(data) if data is not None else None


def promote_shard(output_url: str, index: int, token: int,
                  staged_info: Optional[dict[str, tuple[int, str]]] = None,
                  stats: Optional[dict[str, Any]] = None, attempt: str = "") -> CommitMarker:
    """Move the token's staged parts to their final names, then write the commit marker; idempotent.

    Call only after Redis accepted this token's commit. Returns the shard's commit marker. If the shard
    is already committed under another token, nothing is replaced: that marker is returned (compare its
    `token` with yours) and this token's staged parts are deleted. `staged_info` (kind -> (lines,
    sha256)), when given, is checked against what was staged. `stats` (JSON-able counts: prompts_done,
    prompts_failed, samples, output_tokens) is kept in the marker, so a lost Redis can be rebuilt from
    storage. Raises CommitError when nothing is staged under this token or a moved part went missing.
    """
    fs, root = open_output_fs(output_url)
    marker_path = join_url(root, _marker_rel(index))
    intent_path = join_url(root, _intent_rel(index, token, attempt))
    fs.invalidate_cache(join_url(root, COMMITTED))
    existing = read_bytes(fs, marker_path)
    old = CommitMarker.from_json(existing) if existing is not None else None
    if old is not None:
        if old.token == int(token) and old.stats.get("attempt", "") == attempt:
            _remove_quietly(fs, [intent_path])      # a crash after the marker left the intent behind
        else:
            # committed output is never replaced: this attempt is a duplicate (a stale worker, or a shard
            # run again because Redis lost its commit); its staged parts go, the committed ones stay
            discard_staged(output_url, index, token, attempt)
        return old
    raw = read_bytes(fs, intent_path)
    if raw is None:
        # a concurrent promote of the same token (the worker's and a finalizer's recovery) may have just
        # finished and removed the intent: its marker is then the answer
        now = read_bytes(fs, marker_path)
        if now is not None and CommitMarker.from_json(now).token == int(token):
            return CommitMarker.from_json(now)
        # (a marker of this token but another attempt is returned too: the caller compares tokens only)
        raise CommitError(f"shard {index}: nothing staged under token {token} in {output_url} "
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
        staged = join_url(root, STAGING, kind, _staged_name(index, token, fmt, attempt))
        rel = f"{kind}/{part_name(index, fmt)}"
        final = join_url(root, rel)
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
    clean_stats = {k: v for k, v in (stats or {}).items() if k not in ("parts", "attempt")}
    if attempt:
        clean_stats["attempt"] = attempt
    marker = CommitMarker(index=index, token=int(token), format=fmt, parts=parts, stats=clean_stats)
    put_atomic(fs, marker_path, marker.to_json().encode())
    _remove_quietly(fs, [intent_path])
    return marker


def discard_staged(output_url: str, index: int, token: int, attempt: str = "") -> None:
    """Delete one attempt's staged parts and intent. Never touches final parts or markers."""
    fs, root = open_output_fs(output_url)
    paths = [join_url(root, _intent_rel(index, token, attempt))]      # the intent first: no half-staged "whole"
    for kind in KINDS:
        for fmt in EXTENSIONS:
            paths.append(join_url(root, STAGING, kind, _staged_name(index, token, fmt, attempt)))
    _remove_quietly(fs, paths)


def clear_staging(output_url: str) -> None:
    """Remove everything under _staging/ (leftovers of lost attempts), e.g. once the job is complete."""
    fs, root = open_output_fs(output_url)
    path = join_url(root, STAGING)
    if exists_fresh(fs, path):
        fs.rm(path, recursive=True)


def committed_shards(output_url: str) -> dict[int, CommitMarker]:
    """Every shard's commit marker, by shard index: what is done, even if Redis lost it."""
    fs, root = open_output_fs(output_url)
    names = [p for p in list_fresh(fs, join_url(root, COMMITTED)) if p.endswith(".json")]
    if not names:
        return {}
    # one concurrent batch on object stores; a marker that cannot be read is an error, not a shard left out
    # (a cancelled job's manifest would miss its part; a resubmit would run it again)
    blobs = fs.cat(names, on_error="raise")
    markers = {}
    for data in blobs.values():
        m = CommitMarker.from_json(data)
        markers[m.index] = m
    return markers


def _remove_quietly(fs, paths: list[str]) -> None:
    for p in paths:
        try:
            fs.rm_file(p)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(p)
