"""Claiming an output directory for one job, so no job can break another's output.

An output directory belongs to the job whose id its owner file (OutputDir.OWNER) names. A new job may not write
inside another job's output (its parts, its _staging/ or _committed/ bookkeeping) nor around it (its own
parts would land beside the other's, and a manifest written above would list neither). So before a job claims a
directory that no job owns yet, the claim looks for other outputs: the jobs its caller knows (Redis), owner
files and manifests on the directory's ancestors, and below it as far as a bounded walk goes.

The claim itself is create-if-absent on the owner file (OutputDir.claim_owner): of several submits of
different specs to one new directory at the same moment exactly one wins. Two submits of nested directories
at the same moment each claim first and look again after: whichever looks second sees the other's owner file,
so at most one of them keeps its claim (both may lose; neither's output is broken, and a retry wins).
"""
from __future__ import annotations

import posixpath
from typing import Iterable, Optional

from ..errors import InputError, SpecError
from ..spec_load import show_text
from .manifest import MANIFEST, read_manifest
from .parts import OutputDir
from .storage import canonical_location, exists_fresh, list_fresh_detail, location_within

MARKS = (OutputDir.OWNER, MANIFEST)   # a directory holding either is a job's output
MAX_WALK_DIRS = 200                   # directories listed below a new output, at most (a claim stays cheap)
MAX_WALK_DEPTH = 4                    # levels below it (its parts are one level down, staged ones two)


def _canonical(url: str) -> Optional[str]:
    try:
        return canonical_location(url)
    except ValueError:
        return None


def _marked(out: OutputDir, path: str) -> bool:
    try:
        return any(exists_fresh(out.fs, posixpath.join(path, m)) for m in MARKS)
    except OSError:             # a directory we may not look into holds nothing we could break
        return False


def _ancestor_output(out: OutputDir) -> Optional[str]:
    """The nearest directory above `out` that holds an owner file or a manifest (a path in out's fs), or None."""
    path = out.root.rstrip("/")
    while True:
        parent = posixpath.dirname(path)
        if not parent or parent == path:
            return None
        if _marked(out, parent):
            return parent
        path = parent


def _descendant_output(out: OutputDir) -> Optional[str]:
    """A directory below `out` holding an owner file or a manifest, looked for breadth first down to
    MAX_WALK_DEPTH levels, one listing per directory and at most MAX_WALK_DIRS of them; None when none was
    found (symlinked directories are not followed)."""
    root = out.root.rstrip("/") or "/"
    level, listed = [root], 0
    for _ in range(MAX_WALK_DEPTH + 1):
        below = []
        for d in level:
            if listed >= MAX_WALK_DIRS:
                return None
            listed += 1
            try:
                entries = list_fresh_detail(out.fs, d)
            except OSError:
                continue
            names = {posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") != "directory"}
            if d != root and names & set(MARKS):
                return d
            below += [e["name"].rstrip("/") for e in entries if e.get("type") == "directory" and not e.get("islink")]
        level = below
    return None


def output_conflict(output: "OutputDir | str", job_id: str, known: Iterable[tuple[str, str]] = ()) -> Optional[str]:
    """A sentence naming another job's output that `output` lies inside or contains, or None. `known`: (job id,
    output URL) of the jobs the caller knows of (Redis); the storage is then searched above and below."""
    out = OutputDir.of(output)
    here = _canonical(out.url)
    if here is not None:
        for other_id, other_url in known:
            there = _canonical(other_url)
            if other_id == job_id or there is None or there == here:
                continue
            if location_within(here, there):
                return f"lies inside the output of job {other_id} ({other_url})"
            if location_within(there, here):
                return f"contains the output of job {other_id} ({other_url})"
    above = _ancestor_output(out)
    if above is not None:
        return f"lies inside another job's output ({_name(out, above)})"
    below = _descendant_output(out)
    if below is not None:
        return f"contains another job's output ({_name(out, below)})"
    return None


def _name(out: OutputDir, path: str) -> str:
    from .storage import full_url

    return full_url(out.fs, path)


def check_output_dir(output: "OutputDir | str") -> None:
    """An output path must be a directory (or not exist yet): InputError naming what it is otherwise."""
    out = OutputDir.of(output)
    url = out.url
    try:
        if out.fs.isfile(out.root):
            raise InputError(f"{url} is a file, or lies under one; an output path names a directory (it "
                             "receives results/, sft/, ...)")
    except PermissionError:
        raise SpecError(f"output.path {url}: permission denied; choose a directory this user can write") from None


def claim_output(output: "OutputDir | str", job_id: str, known: Iterable[tuple[str, str]] = ()) -> None:
    """Make job_id the owner of the output directory (an OutputDir, or its URL), or raise SpecError (one line)
    saying why it cannot be: another job owns it or claimed it a moment ago, it lies inside or contains another
    job's output, it is a file, or it cannot be written. A directory job_id owns already is left as it is (a resume)."""
    out = OutputDir.of(output)
    url = out.url
    check_output_dir(out)
    owner = out.owner()
    if owner == job_id:
        return
    if owner is not None:
        raise _taken(url, owner)
    conflict = output_conflict(out, job_id, known)
    if conflict:
        raise SpecError(f"output.path {url} {conflict}: choose an output.path outside every other job's output")
    # parts no job owns (files put there by hand, or a directory given by mistake) would be overwritten by this
    # job's parts of the same names: refused, unless the directory's manifest says this job wrote them
    written = out.first_written()
    if written is not None:
        if (read_manifest(out) or {}).get("job_id") != job_id:
            raise SpecError(f"output.path {url} already holds {show_text(written)} (and maybe more) that no job "
                            f"recorded as its own (no {OutputDir.OWNER}): a job would overwrite such files; choose a "
                            "new or empty output.path, or move them away")
    try:
        found = out.claim_owner(job_id)
    except OSError as err:
        raise SpecError(f"output.path {url} cannot be written ({err.strerror or type(err).__name__}); choose a "
                        "directory this user can write") from None
    if found == job_id:
        return
    if found is not None:
        raise _taken(url, found)
    conflict = output_conflict(out, job_id, ())        # a nested claim made while we looked
    if conflict:
        out.release_owner(job_id)
        raise SpecError(f"output.path {url} {conflict} (claimed at the same moment): choose an output.path "
                        "outside every other job's output")


def _taken(url: str, owner: str) -> SpecError:
    return SpecError(f"output.path {url} belongs to another job ({owner}), submitted with a different spec: "
                     "resume that job with its own spec, or choose a new output.path")
