"""What a shard's commit leaves in storage, apart from the directory that holds it (parts.py): the commit marker,
the staged and committed parts it lists, the error a commit that cannot proceed raises, and the names all these go
by (part-00005.jsonl, part-00005.json, part-00005.{token}-{attempt}.jsonl)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from ..errors import InputError, ZiyaBatchError
from .schema import EXTENSIONS


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


# the worker's counts a marker's stats hold (whole numbers; 0 where absent)
MARKER_COUNTS = ("prompts_done", "prompts_failed", "samples", "output_tokens")


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
    def from_json(cls, text: str | bytes, where: str = "a commit marker") -> "CommitMarker":
        """The marker to_json wrote; anything else (not JSON, fields missing or of other types, counts that are
        not whole numbers) is an InputError naming `where`: every reader of a marker trusts its counts."""
        try:
            d = json.loads(text)
            parts = {k: PartInfo(**p) for k, p in d["parts"].items()}
            stats = d.get("stats") or {}
            whole = (d["index"], d["token"], *(p.lines for p in parts.values()),
                     *(p.size_bytes for p in parts.values()), *(stats.get(k, 0) for k in MARKER_COUNTS))
            if (not all(type(n) is int for n in whole) or not isinstance(d["format"], str)
                    or not all(isinstance(k, str) and isinstance(p.sha256, str) and isinstance(p.path, str)
                               for k, p in parts.items())):
                raise TypeError("a field of another type")
            return cls(index=d["index"], token=d["token"], format=d["format"], parts=parts, stats=stats)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
            raise InputError(f"{where} is not a commit marker ziya-batch wrote ({type(err).__name__}: "
                             f"{str(err)[:120]}): damaged, or written by something else") from None


def new_attempt() -> str:
    """A random id for one attempt at a shard, for OutputDir.stage/promote/discard."""
    import uuid

    return uuid.uuid4().hex[:12]


_PREFIX = "part-"


def part_stem(index: int) -> str:
    """Every name of shard N's files starts so (the one place the part-name format is spelled)."""
    return f"{_PREFIX}{index:05d}"


def part_index(name: str) -> Optional[int]:
    """The shard index in a part, marker or intent name (`part-00005.json` -> 5), None for other names."""
    stem = name.rsplit("/", 1)[-1].split(".", 1)[0]
    digits = stem[len(_PREFIX):]
    return int(digits) if stem.startswith(_PREFIX) and digits.isdigit() else None


def part_name(index: int, fmt: str) -> str:
    return f"{part_stem(index)}.{EXTENSIONS[fmt]}"


def attempt_key(token: int, attempt: str) -> str:
    return f"{int(token)}-{attempt}" if attempt else str(int(token))
