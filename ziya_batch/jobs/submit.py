"""Submitting a job: validate inputs, index them into shards (streamed; a new job's counted first), resume from
committed parts.

No Ray here: the CLI, `run`, the HTTP API and OpenAI batches all submit through `submit_job`.
"""
from __future__ import annotations

import calendar
import itertools
import os
import re
import time

from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Optional

from .. import io
from ..errors import AccessDenied, InputError, SpecError
from ..io.claims import claim_output
from ..records import ShardRef
from ..spec import JobSpec, show_text
from .finalize import finish_empty_job

if TYPE_CHECKING:
    from ..protocols import JobsBroker
    from ..queue import JobStatus


# The most shards one job may have. Each is a record in Redis (296-318 bytes, docs/BENCHMARKS.md; ~30 more with a
# local input's identity), so a spec cutting a hundred million lines into shards of one would fill the queue's
# memory, every job's. 200,000 shards of the default 512 lines hold 102 million prompts (about 64 MB of Redis).
MAX_SHARDS = 200_000


def _shard_refs(job_id: str, files: list[str], shard_size: int,
                rows: Optional[Iterable[tuple]] = None) -> Iterator[ShardRef]:
    """The job's shards in order, from `rows` (index_inputs' tuples, counted already or read as they come) or read
    here as they come; past MAX_SHARDS, SpecError (a job Redis knows and whose list is unfinished reads them here
    too)."""
    for ref in io.shard_refs(job_id, files, shard_size, rows):
        if ref.index == MAX_SHARDS:
            raise _too_many_shards(shard_size)
        yield ref


def _too_many_shards(shard_size: int) -> SpecError:
    return SpecError(f"shard_size {shard_size}: the inputs make more than {MAX_SHARDS:,} shards, the most one job may "
                     "have (each is a record in the job queue); raise shard_size, or split the inputs over several "
                     "jobs")


def _counted_rows(files: list[str], shard_size: int, vetted: Optional[Mapping[str, str]] = None) -> list[tuple]:
    """index_inputs' rows for a new job, counted before the broker writes any (a refused job leaves nothing in
    Redis): SpecError past MAX_SHARDS, AccessDenied for a file not `vetted` (_vetted_rows). Tuples, not ShardRefs:
    ~180 bytes a shard while they wait (a file's identity string is one object shared by its rows)."""
    rows = list(itertools.islice(_index(files, shard_size, vetted), MAX_SHARDS + 1))
    if len(rows) > MAX_SHARDS:
        raise _too_many_shards(shard_size)
    return rows


def _index(files: list[str], shard_size: int, vetted: Optional[Mapping[str, str]]) -> Iterator[tuple]:
    """index_inputs' rows, through _vetted_rows where the caller vetted the files. A generator: nothing is read (or
    called) before the first row is asked for, so a job whose shard list is complete reads no input."""
    rows = io.index_inputs(files, shard_size)
    yield from (rows if vetted is None else _vetted_rows(rows, vetted))


def _vetted_rows(rows: Iterable[tuple], vetted: Mapping[str, str]) -> Iterator[tuple]:
    """index_inputs' rows, each of a local file only if the file indexed is the one the caller judged: its identity
    (the descriptor the indexer read) is `vetted[file]` (io.inputs.same_file); else AccessDenied, before the row goes
    anywhere. The HTTP API judged each path by where it pointed; a symlink swapped in (the file, or a folder on its
    path) between that check and the indexer's open would have the job read a file it never judged. Rows of object
    storage carry no identity: nothing to compare."""
    checked: Optional[tuple[str, str]] = None       # (file, identity) of the last row that passed: one file's rows
    for row in rows:
        file, identity = row[0], row[5]
        if identity is not None and (file, identity) != checked:
            judged = vetted.get(file)
            if judged is None or not io.inputs.same_file(judged, identity):
                raise AccessDenied(
                    f"input file {show_text(file)} was replaced while the job was submitted (a symlink swapped in "
                    "for it or a folder on its path, say): the file indexed is not the file checked against the "
                    "allowed prefixes, and none of its shards was queued; put the file back and submit again")
            checked = (file, identity)
        yield row


def list_inputs(spec: JobSpec) -> list[str]:
    """The input files `spec` names, globs expanded (InputError naming every input that matches nothing).
    A surface that must check the files before submitting (the HTTP API's allowed prefixes) lists them
    here once and hands the list to submit_job."""
    return io.expand_inputs(spec.input)


# the spec's single locations besides `input`, as (section, field)
_LOCATIONS = (("output", "path"), ("model", "path"), ("model", "base"), ("model", "delta"),
              ("experience", "reference_model"), ("experience", "reward_model"))


def absolute_locations(spec: JobSpec) -> JobSpec:
    """`spec` with its input, output and model locations as every process opens them (io.storage.absolute_url):
    a relative or `file:`/`local://`/`~` local path becomes the absolute path fsspec opens from here, since
    workers run in other directories or on other machines (and the HTTP API's allow-list judged it from here).
    The stored spec holds this form."""
    update: dict = {}
    inputs = [io.absolute_url(u) for u in spec.input]
    if inputs != spec.input:
        update["input"] = inputs
    for section, name in _LOCATIONS:
        value = getattr(getattr(spec, section), name)
        if value and io.absolute_url(value) != value:
            fields = update.setdefault(section, {})
            fields[name] = io.absolute_url(value)
    # a reward function given as 'file.py:function' runs on the workers, which do not share this directory
    fn = spec.experience.reward_function
    if fn and absolute_reward_function(fn) != fn:
        update.setdefault("experience", {})["reward_function"] = absolute_reward_function(fn)
    if not update:
        return spec
    sections = {k: getattr(spec, k).model_copy(update=v) if isinstance(v, dict) else v for k, v in update.items()}
    return spec.model_copy(update=sections)


def absolute_reward_function(ref: str) -> str:
    """experience.reward_function as stored: 'file.py:function' with the file's absolute path from here; a module
    reference or a built-in as given."""
    target, sep, name = ref.rpartition(":")
    if sep and target.endswith(".py") and not os.path.isabs(target):
        return f"{os.path.abspath(target)}:{name}"
    return ref


def _same_job(stored: JobSpec, job_id: str) -> bool:
    """The stored spec is this job's: its identity, or (a spec stored before locations were made absolute at
    submit) the identity of its relative paths made absolute from here."""
    return stored.identity() == job_id or absolute_locations(stored).identity() == job_id


def _output_dir(spec: JobSpec, out: Optional[io.OutputDir]) -> io.OutputDir:
    return out if out is not None else io.OutputDir(spec.output.path, spec.output.format)


# what JobSpec.identity and legacy_identity give: 16 lowercase hex digits
_JOB_ID = re.compile(r"[0-9a-f]{16}")


def job_id_for(spec: JobSpec, broker: Optional["JobsBroker"] = None, out: Optional[io.OutputDir] = None) -> str:
    """The id `spec` runs under: its identity, or the id of the job its output path holds where that job is the
    same job under an id an earlier release gave it (which hashed every field, run settings too): its id is
    this spec's legacy identity, or its stored spec (in Redis, or in the manifest of a finished job) has this
    spec's identity. So such a job resumes, with this spec's run settings. `out`: the spec's output directory,
    where the caller opened it already."""
    job_id = spec.identity()
    out = _output_dir(spec, out)
    manifest = io.read_manifest(out)
    recorded = (manifest or {}).get("job_id") or io.output_owner(out)
    if recorded in (None, job_id) or not _JOB_ID.fullmatch(str(recorded)):
        # an id this tool never gives (anyone can write a manifest) is not adopted: it would be shown, typed and
        # stored as one
        return job_id
    if recorded == spec.legacy_identity():
        return recorded
    try:
        if manifest and manifest.get("job_id") == recorded and manifest.get("spec"):
            stored = JobSpec.model_validate(manifest["spec"])
        elif broker is not None and broker.find_job(recorded) is not None:
            stored = broker.get_spec(recorded)
        else:
            stored = None
        if stored is not None and _same_job(stored, job_id):
            return recorded
    except Exception:  # noqa: BLE001 - a stored spec this release cannot read is another job's, as before
        pass
    return job_id


def check_output_owner(spec: JobSpec, job_id: Optional[str] = None,
                       out: Optional[io.OutputDir] = None, broker: Optional["JobsBroker"] = None) -> Optional[str]:
    """An output path belongs to one job: refuse to mix a different job's parts into it, finished (its
    manifest) or not (the owner recorded at its submit: a spec that writes something else, e.g. another
    shard_size or sampling, would otherwise take the other job's committed parts for its own shards). A spec
    that differs only in how the job runs (spec.RUN_FIELDS) is the same job. Returns the owner recorded
    (`job_id`, by default job_id_for(spec)), or None if none is yet. `out`: as for job_id_for. `broker`: given, an
    owner it does not know whose directory holds nothing is named as a submit refused before its job was queued."""
    out = _output_dir(spec, out)
    job_id = job_id or job_id_for(spec, out=out)
    manifest = io.read_manifest(out)
    if manifest and manifest.get("job_id") not in (None, job_id):
        raise SpecError(
            f"output.path {out.url} already holds the output of another job "
            f"({show_text(str(manifest.get('job_id')))}); "
            "choose a new output.path or delete the old output")
    owner = io.output_owner(out)
    if owner not in (None, job_id):
        if broker is not None and _never_queued(out, owner, broker):
            raise SpecError(
                f"output.path {out.url} is claimed by a job ({show_text(owner)}) this queue does not know and that "
                f"wrote nothing there (a submit refused before its job was queued?): choose a new output.path, or "
                f"if so remove {io.OutputDir.OWNER} there and submit again")
        raise SpecError(
            f"output.path {out.url} holds the parts of another job ({show_text(owner)}) that has not finished "
            "(a spec that "
            "writes something else to the same path; only model.tensor_parallel/replicas, the engine's "
            "throughput settings, reliability and priority may change on a resume): resume that job with "
            "its own spec, or choose a new output.path, or delete the old output")
    return owner


def check_model(spec: JobSpec) -> None:
    """A local model directory the spec names must exist now, not fail on every worker later."""
    import os

    for field in ("path", "base", "delta"):
        path = getattr(spec.model, field)
        if path and "://" not in path and not os.path.isdir(path):
            raise SpecError(f"model.{field}: {path} is not a directory (a merged Hugging Face checkpoint; "
                            "`ziya-batch demo-model DIR` writes a tiny one to try things with)")


def _run_settings_changed(spec: JobSpec, broker: "JobsBroker", job_id: str) -> list[str]:
    """What submitting `spec` changes in how the unfinished job `job_id` runs (spec.run_field_changes)."""
    from ..spec import run_field_changes

    try:
        return run_field_changes(broker.get_spec(job_id), spec)
    except Exception:  # noqa: BLE001 - a note only: submit_job says what is wrong, if anything is
        return []


def _keep_logprobs_mode(spec: JobSpec, broker: "JobsBroker", job_id: str) -> JobSpec:
    """A job started before experience.logprobs_mode existed keeps the mode its parts were written in
    (spec.stored_spec) when its spec is submitted again: the same id, so only that legacy default can differ."""
    try:
        mode = broker.get_spec(job_id).experience.logprobs_mode
    except Exception:  # noqa: BLE001 - unreadable: submit_job stores the new spec, as before
        return spec
    if mode == spec.experience.logprobs_mode:
        return spec
    return spec.model_copy(update={"experience": spec.experience.model_copy(update={"logprobs_mode": mode})})


def open_output(spec: JobSpec) -> io.OutputDir:
    """The spec's output directory, opened and its manifest read once: storage that cannot be reached (no
    credentials, a host that does not answer, a bucket name the store rejects, a filesystem whose library is
    missing) is one line here, as an input's is, not a storage backend's traceback."""
    with io.storage.storage_errors(f"output.path {show_text(spec.output.path)}"):
        out = io.OutputDir(spec.output.path, spec.output.format)
        out.check_folders()
        io.read_manifest(out)
    return out


def submit_job(spec: JobSpec, broker: "JobsBroker", check_model_dir: bool = False,
               changes: Optional[list[str]] = None, files: Optional[list[str]] = None,
               vetted: Optional[Mapping[str, str]] = None) -> "JobStatus":
    """Queue `spec` (or find it again) and return its JobStatus. Idempotent: the same spec and output path
    is the same job; if Redis lost it, the shards committed in storage are recorded as done.
    `check_model_dir`: the model must be a local directory here (the CLI, where workers share the host's
    paths; the HTTP API's host may not hold the weights its workers load). `changes`: a list that receives
    what this submit changes in how the unfinished job it resumes runs ('engine.max_num_seqs: 256 -> 64'):
    nothing for a new job, a completed one or the same settings (a failed or cancelled one reopens).
    `files`: the inputs as list_inputs(spec) gave them, where the caller listed them already. `vetted`: where the
    caller judged the local files (the HTTP API: api.access.check_expanded_inputs), each file's identity as judged;
    a file indexed as another file (replaced since) is refused with AccessDenied before any of its shards is
    written (a new job: before anything is written to Redis). Files must then be given too."""
    from ..queue import JobState

    spec = absolute_locations(spec)
    if io.storage.protocol_of(spec.output.path) == "memory":
        # fsspec's memory filesystem lives in one process: workers would write where nobody reads
        raise SpecError(f"output.path {show_text(spec.output.path)}: memory:// is one process's memory, which "
                        "workers cannot write back to; give a local path or object storage (s3://...)")
    out = open_output(spec)                 # its filesystem opened once for the whole submit
    job_id = job_id_for(spec, broker, out)
    existing = broker.find_job(job_id)
    if existing is None:
        # forgotten, or lost with Redis's data, after its finalizer wrote its completed manifest: that is the truth,
        # so it is recorded completed from it, and nothing runs again, nor is any input read (they may be gone)
        restored = _restore_completed(spec, broker, job_id, out)
        if restored is not None:
            return restored
    if existing is not None and existing.state == JobState.COMPLETED:
        manifest = io.read_manifest(out)
        if manifest is not None:
            # its parts still there as the manifest lists them (a resubmit of a completed job answers "completed")
            check_parts_there(spec, out, manifest, job_id)
            return existing
        # completed, but its output has been deleted since: the same spec runs again from the start, a new job
        broker.delete_job(job_id)
        existing = None
    elif existing is not None and changes is not None:
        changes.extend(_run_settings_changed(spec, broker, job_id))      # before submit stores the new spec
    if existing is not None:
        spec = _keep_logprobs_mode(spec, broker, job_id)
    # a job Redis knows is resubmitted too: the broker then reads no shard list, but records the parts
    # that storage holds and Redis lost (the last second of writes before a crash, under appendfsync everysec)
    if files is None:
        if vetted is not None:
            raise ValueError("submit_job: `vetted` judges the files given in `files`; pass both")
        files = list_inputs(spec)
    if check_model_dir:
        check_model(spec)
    check_output_owner(spec, job_id, out, broker)
    claim_output(out, job_id, _known_outputs(broker, job_id))
    committed = {i: _stats_from_marker(m) for i, m in out.committed_shards().items()}
    # a new job's shards are counted first; a job Redis knows reads none, or completes its list as they come
    # (a sealed list reads no input; an unfinished one reads its rows as the broker takes them, each vetted too)
    rows = _counted_rows(files, spec.shard_size, vetted) if existing is None else \
        _index(files, spec.shard_size, vetted)
    status = broker.submit(spec, _shard_refs(job_id, files, spec.shard_size, rows), committed=committed,
                           job_id=job_id)
    return finish_empty_job(broker, status)


def _restore_completed(spec: JobSpec, broker: "JobsBroker", job_id: str,
                       out: io.OutputDir) -> Optional["JobStatus"]:
    """The job's status once recorded completed from its output's manifest (broker.restore_completed), where that is
    the completed manifest of this job id as its finalizer writes it; None where it is not (none, another job's, or a
    cancelled or failed job's list of the parts it committed so far, which a resubmit resumes from; one of another
    format_version, or numbers no finalizer writes), or where a submit of the job got there first. InputError, writing
    nothing, where it is, but a part it lists is gone or of another size: the output was damaged since it completed,
    and a job is never recorded completed without its parts."""
    from ..queue import ShardStats

    manifest = io.read_manifest(out)
    summary = (manifest or {}).get("summary")
    if not manifest or manifest.get("job_id") != job_id or not isinstance(summary, dict) \
            or summary.get("state") != "completed" or manifest.get("format_version") != io.manifest.FORMAT_VERSION:
        return None
    counts = {k: _count(summary.get(k, 0)) for k in _SUMMARY_COUNTS}
    shards = _count(summary.get("shards", manifest.get("num_shards")))
    if shards is None or None in counts.values() or not _lists_every_shard(manifest, shards):
        return None                     # not the numbers a finalizer writes: the job is rebuilt from its parts instead
    check_parts_there(spec, out, manifest, job_id)
    totals = ShardStats(prompts_done=counts["prompts"], **{k: v for k, v in counts.items() if k != "prompts"})
    return broker.restore_completed(spec, job_id, shards, totals, _written_ms(manifest.get("written_at")))


def check_parts_there(spec: JobSpec, out: io.OutputDir, manifest: dict, job_id: str) -> None:
    """InputError naming them where parts the completed `manifest` lists are gone or of another size (one listing a
    kind, no part read): the output was damaged after the job completed, and a job is never taken for completed
    without its parts."""
    with io.storage.storage_errors(f"output.path {show_text(spec.output.path)}"):
        gone = io.parts_not_there(out, manifest)
    if gone:
        raise InputError(
            f"output.path {show_text(out.url)} holds the completed manifest.json of job {job_id}, but {len(gone)} of "
            f"the parts it lists are not there as it lists them ({show_text('; '.join(gone[:3]))}"
            f"{'; ...' if len(gone) > 3 else ''}): the output was damaged after the job completed, and the job is "
            "not taken for completed without its parts; put them back, or delete the output (manifest.json, "
            "_committed/ and the parts) to run the job again")


# the summary's totals restore_completed records (absent in an older finalizer's manifest: 0)
_SUMMARY_COUNTS = ("prompts", "prompts_failed", "samples", "output_tokens", "prefix_cache_query_tokens",
                   "prefix_cache_hit_tokens")


def _count(value) -> Optional[int]:
    """A count as a finalizer writes it: a whole JSON number from 0 below 2**53 (what Redis's Lua, whose numbers are
    doubles, adds exactly); None for anything else (a float, a bool, a numeric string, a negative, a huge number)."""
    return value if type(value) is int and 0 <= value < 2**53 else None


def _lists_every_shard(manifest: dict, shards: int) -> bool:
    """Whether the manifest lists parts of shards 0 .. shards - 1 and of no other (a finalizer lists at least an
    errors part of every one). Compared by count and bounds: a hand-written 2**52 builds no range."""
    listed = {row.get("shard") for rows in manifest["parts"].values() for row in rows}
    return len(listed) == shards and all(type(i) is int and 0 <= i < shards for i in listed)


def _written_ms(written_at) -> Optional[int]:
    """A manifest's written_at ('2026-12-07T09:12:03Z') in unix ms; None where it is not that."""
    try:
        return calendar.timegm(time.strptime(str(written_at), "%Y-%m-%dT%H:%M:%SZ")) * 1000
    except ValueError:
        return None


def _never_queued(out: io.OutputDir, owner: str, broker: "JobsBroker") -> bool:
    """Whether the job named in out's owner file is one the queue does not know that has written nothing there."""
    try:
        return broker.find_job(owner) is None and out.first_written() is None and not out.committed_shards()
    except Exception:  # noqa: BLE001 - only which message is given depends on it
        return False


def _known_outputs(broker: "JobsBroker", job_id: str) -> Iterator[tuple[str, str]]:
    """(job id, output path) of every other job this Redis knows, read lazily (only a new claim reads them)."""
    for st in broker.list_jobs():
        if st.job_id != job_id:
            yield st.job_id, st.output_path


def _stats_from_marker(marker):
    from ..queue import ShardStats

    return ShardStats(prompts_done=marker.prompts_done, prompts_failed=marker.prompts_failed,
                      samples=marker.samples, output_tokens=marker.output_tokens,
                      parts={k: (v[0], v[1]) for k, v in marker.parts.items()})
