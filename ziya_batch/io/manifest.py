"""manifest.json: written last, it names every committed part; readers trust only the parts it lists.

Shape (format_version 1)::

    {
      "format_version": 1,
      "job_id": "...",                       summary["job_id"], when given
      "spec": {...},                         the job spec as submitted
      "summary": {"job_id": .., "state": .., "shards": .., "prompts": .., "prompts_failed": .., "samples": ..,
                  "output_tokens": .., "prefix_cache_hit_tokens": .., ...},
      "counts": {"prompts": 512, "prompts_failed": 2, "samples": 1024, "output_tokens": 90000,
                 "results": 1024, "sft": 1024, "experience": 0, "errors": 2},
                                             the summary's totals, and the records of every kind (0: none)
      "format": "jsonl" | "parquet",
      "num_shards": 3,
      "records": {"results": 1024, "sft": 1024, "errors": 2},     lines per kind over all parts
      "parts": {"results": [{"shard": 0, "path": "results/part-00000.jsonl", "lines": 512,
                             "sha256": "...", "size_bytes": 123456}, ...], ...},
      "written_at": "2026-11-28T07:00:00Z"
    }

Paths are relative to the directory holding manifest.json, so an output copied elsewhere stays valid.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import time
from typing import Iterator, Optional

from ..errors import InputError
from .markers import CommitMarker
from .parts import OutputDir
from .schema import KINDS, decode_part, iter_part, part_format
from .storage import join_url, list_fresh_detail

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# the summary's totals that "counts" repeats (DESIGN: the manifest holds "spec, counts, and every committed part")
COUNT_KEYS = ("prompts", "prompts_failed", "samples", "output_tokens")


def build_manifest(spec_json: str, summary: dict, markers: dict[int, CommitMarker]) -> dict:
    ordered = [markers[i] for i in sorted(markers)]
    formats = sorted({m.format for m in ordered})
    parts: dict[str, list[dict]] = {}
    for kind in KINDS:
        rows = [{"shard": m.index, "path": p.path, "lines": p.lines, "sha256": p.sha256,
                 "size_bytes": p.size_bytes}
                for m in ordered for k, p in m.parts.items() if k == kind]
        if rows:
            parts[kind] = rows
    records = {kind: sum(r["lines"] for r in rows) for kind, rows in parts.items()}
    spec = json.loads(spec_json) if spec_json else None
    if not formats:
        # no part (a job of no lines): the format its parts would have, as the spec names it
        output = spec.get("output") if isinstance(spec, dict) else None
        formats = [output.get("format", "jsonl") if isinstance(output, dict) else "jsonl"]
    return {
        "format_version": FORMAT_VERSION,
        "job_id": summary.get("job_id"),
        "spec": spec,
        "summary": dict(summary),
        "counts": {**{k: summary[k] for k in COUNT_KEYS if k in summary},
                   **{kind: records.get(kind, 0) for kind in KINDS}},
        "format": formats[0] if len(formats) == 1 else formats,
        "num_shards": len(ordered),
        "records": records,
        "parts": parts,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_manifest(output: "OutputDir | str", spec_json: str, summary: dict, markers: dict[int, CommitMarker]) -> dict:
    """Write {output}/manifest.json atomically and return it. Call once every shard is committed."""
    manifest = build_manifest(spec_json, summary, markers)
    OutputDir.of(output).put(MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8"))
    return manifest


def output_owner(output: "OutputDir | str") -> Optional[str]:
    """The job id that writes into this output directory (recorded at submit), or None."""
    return OutputDir.of(output).owner()


def set_output_owner(output: "OutputDir | str", job_id: str) -> None:
    """Record that job_id writes into this output directory: parts and commit markers in it are its own."""
    OutputDir.of(output).set_owner(job_id)


def manifest_shards(manifest: dict) -> set[int]:
    """The shards a manifest lists (each committed shard has at least its errors part)."""
    return {row["shard"] for rows in manifest.get("parts", {}).values() for row in rows}


def parts_not_there(output: "OutputDir | str", manifest: dict) -> list[str]:
    """The parts a manifest lists that its directory does not hold as listed: absent, or of another size than its
    size_bytes (where given), one sentence each. One listing of each folder the parts lie in (one per record kind),
    no part read: cheap enough to check before trusting a manifest without reading every part (verify_output)."""
    out = OutputDir.of(output)
    sizes: dict[str, dict[str, int]] = {}
    problems = []
    for rows in manifest["parts"].values():
        for row in rows:
            folder, name = posixpath.split(row["path"])
            if folder not in sizes:
                sizes[folder] = {posixpath.basename(str(e.get("name", "")).rstrip("/")): e.get("size")
                                 for e in list_fresh_detail(out.fs, out.path(folder)) if e.get("type") == "file"}
            size, expect = sizes[folder].get(name), row.get("size_bytes")
            if size is None:
                problems.append(f"{row['path']} is missing")
            elif type(expect) is int and size != expect:
                problems.append(f"{row['path']} holds {size} bytes, not the {expect} of its size in {MANIFEST}")
    return problems


def read_manifest(output: "OutputDir | str") -> Optional[dict]:
    """The manifest, or None when the job has not written one (yet). One that is not of the shape this module
    writes (an object whose parts are lists of rows with a path) is an InputError: nothing that reads it may
    trust it, and nothing may take the directory for an empty one."""
    out = OutputDir.of(output)
    manifest = out.read_json(MANIFEST)
    if manifest is None:
        return None
    parts = manifest.get("parts") if isinstance(manifest, dict) else None
    job_id = manifest.get("job_id") if isinstance(manifest, dict) else None
    if (not isinstance(parts, dict) or not isinstance(job_id, (str, type(None)))
            or not all(isinstance(rows, list) and all(isinstance(row, dict) and isinstance(row.get("path"), str)
                                                       for row in rows) for rows in parts.values())):
        raise InputError(f"{out.url}: {MANIFEST} is corrupt (not the manifest ziya-batch writes); if no job "
                         f"writes into this directory any more, delete it, or choose another output.path")
    return manifest


def manifest_part_urls(output_url: str, kind: str, manifest: Optional[dict] = None) -> list[str]:
    """URLs of the kind's parts that the manifest lists, in shard order (for data_files= arguments)."""
    manifest = manifest if manifest is not None else _require(output_url)
    return [join_url(output_url, p["path"]) for p in manifest["parts"].get(kind, [])]


def read_parts(output_url: str, kind: str, verify: bool = False) -> Iterator[dict]:
    """Records of every part of `kind` listed in the manifest, in shard order; files not listed (staged,
    leftover, foreign) are never read. `verify` checks each part's sha256 and line count first."""
    manifest = _require(output_url)
    out = OutputDir(output_url)
    for entry in manifest["parts"].get(kind, []):
        data = out.read(entry["path"])
        if data is None:
            raise InputError(f"{output_url}: {entry['path']} is listed in manifest.json but missing")
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise InputError(f"{output_url}: {entry['path']} does not match its sha256 in manifest.json")
        fmt, where = part_format(entry["path"]), f"{output_url}: {entry['path']}"
        if not verify:
            yield from iter_part(data, fmt, where)
            continue
        records = decode_part(data, fmt, where)
        if len(records) != entry["lines"]:
            raise InputError(f"{output_url}: {entry['path']} holds {len(records)} records, "
                             f"manifest.json says {entry['lines']}")
        yield from records


def verify_output(output_url: str) -> list[str]:
    """Problems with a finished output, one sentence each ([] = every part the manifest lists is present
    with its sha256 and line count). Reads every part once."""
    manifest = _require(output_url)
    out = OutputDir(output_url)
    problems = []
    for kind, entries in manifest["parts"].items():
        for entry in entries:
            data = out.read(entry["path"])
            if data is None:
                problems.append(f"{entry['path']} is listed in manifest.json but missing")
            elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problems.append(f"{entry['path']} does not match its sha256 in manifest.json")
            else:
                try:
                    n = sum(1 for _ in iter_part(data, part_format(entry["path"]), entry["path"]))
                except InputError as err:
                    problems.append(str(err))
                    continue
                if n != entry["lines"]:
                    problems.append(f"{entry['path']} holds {n} records, manifest.json says {entry['lines']}")
    return problems


def _require(output_url: str) -> dict:
    manifest = read_manifest(output_url)
    if manifest is None:
        raise InputError(f"{output_url} has no {MANIFEST}: the job has not completed (parts without a "
                         "manifest are not trusted)")
    return manifest
