"""Finding, listing, cancelling a job, reading its manifest and saying why it waits: what the CLI, the HTTP API
and OpenAI batches do to a job once it is submitted, done the same way on every surface."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

from .. import io
from ..errors import InputError, JobNotFound, ServiceError, ZiyaBatchError, short_text
from ..spec import show_text
from .finalize import finalize_if_ready

if TYPE_CHECKING:
    from ..protocols import JobsBroker, WorkerBroker
    from ..queue import JobStatus

# how a user of each surface finds the ids there are; the text that follows "no job ID" in JobNotFound
CLI_HINT = " in this Redis (list jobs with `ziya-batch status`)"
API_HINT = ": list jobs with GET /v1/jobs"


# a job whose submit has not written its whole shard list: none of its shards is handed out until one has
UNSEALED_NOTE = ("its shard list is not all written, so no shard is handed out yet: a submit is writing it, or "
                 "one stopped midway (then submit the same spec again, which finishes the list and keeps what "
                 "is there)")


class ManifestNotReady(JobNotFound):
    """The job exists but has not finished: its manifest.json is not written yet (HTTP 404)."""


def job_status(broker: "JobsBroker", job_id: str, detail: bool = False, hint: str = CLI_HINT) -> "JobStatus":
    """The job's status; JobNotFound (ending in `hint`) when this Redis has no such job."""
    if broker.find_job(job_id) is None:
        raise JobNotFound(f"no job {show_text(job_id)}{hint}")
    return broker.status(job_id, detail=detail)


def waiting_note(broker: "WorkerBroker", status: "JobStatus") -> Optional[str]:
    """Why a job's pending shards may wait with no worker to take them (no live worker, none of its
    tensor_parallel shape, or every one failed to load its engine; leased shards whose leases all expired count
    as waiting, their workers gone); None when some worker can, or the job has nothing pending or leased to a
    live worker; or that its shard list is not all written yet; or, for a finalizing job, that its last
    finalize try waits for storage (finalize_note). Shown by `status` and GET /v1/jobs/{id}."""
    if not status.sealed and not status.state.is_finished():
        return UNSEALED_NOTE
    if status.finalize_wait is not None:
        return finalize_note(status)
    leased = status.shards.get("leased", 0)
    if not status.state.is_claimable() or not (status.shards.get("pending", 0) or leased):
        return None
    try:
        stale = ""
        if leased:
            # leases still renewed: their workers run. All expired with nobody to take them back (every worker
            # gone: its `run` killed, its node lost; a live worker's loop reaps them): say so
            leases = (status if status.detail else broker.status(status.job_id, detail=True)).leases
            if not leases or any(x["expires_in_s"] > 0 for x in leases):
                return None
            holders = sorted({x["worker_id"] for x in leases if x["worker_id"]})
            stale = (f"the {len(leases)} leased shard(s) are held by workers whose leases expired "
                     f"({', '.join(holders[:3])}{', ...' if len(holders) > 3 else ''}); ")
        note = unserved_note(broker, status.job_id)
        return stale + note if note else None
    except Exception:  # noqa: BLE001 - a hint that cannot be worked out (Redis hiccup) is left out
        return None


def waiting_notes(broker: "WorkerBroker", statuses: list["JobStatus"]) -> list[Optional[str]]:
    """waiting_note of each of `statuses` (a listing), the live workers read once for them all: a listing of many
    queued jobs is not several round trips a job."""
    once = _WorkersOnce(broker)
    return [waiting_note(once, st) for st in statuses]


class _WorkersOnce:
    """The broker, with worker_infos read on the first call only (what waiting_notes' notes are worked out from)."""

    def __init__(self, broker: "WorkerBroker"):
        self._broker = broker
        self._workers = None

    def worker_infos(self):
        if self._workers is None:
            self._workers = self._broker.worker_infos()
        return self._workers

    def __getattr__(self, name: str):
        return getattr(self._broker, name)


def finalize_note(status: "JobStatus") -> Optional[str]:
    """The line saying why a finalizing job is not finished (JobStatus.finalize_wait), e.g. "finalize waits for
    storage: s3://bucket/out: ConnectTimeoutError: ... (tried 4 times since 09:12:03 UTC, last at 09:13:36 UTC;
    next try in 27 s)"; None when its last try did not wait."""
    w = status.finalize_wait
    if w is None:
        return None
    tried = f"tried at {_utc(w.at)}" if w.tries == 1 else \
        f"tried {w.tries} times since {_utc(w.since)}, last at {_utc(w.at)}"
    # once the wait is over, the next worker sweep (or a submit of the same spec) makes the try
    then = (f"next try in {w.next_try_in_s:.0f} s" if w.next_try_in_s >= 1 else
            "next try due now, by a running worker (or submit the job again)")
    return f"finalize waits for storage: {w.reason} ({tried}; {then})"


def _utc(at_s: float) -> str:
    """A time of day in UTC, with its date where that is not today's."""
    at, today = time.gmtime(at_s), time.gmtime()
    same_day = (at.tm_year, at.tm_yday) == (today.tm_year, today.tm_yday)
    return time.strftime("%H:%M:%S UTC" if same_day else "%Y-%m-%d %H:%M:%S UTC", at)


def list_jobs(broker: "JobsBroker") -> list["JobStatus"]:
    return broker.list_jobs()


def cancel_job(broker: "JobsBroker", job_id: str, abandon_running: bool = False,
               hint: str = CLI_HINT) -> "JobStatus":
    """Stop handing out the job's shards; committed parts stay. A job with nothing running is cancelled at
    once, and its manifest (the parts committed so far) is written now; one with shards running gets it from
    the commit (or lease expiry) that settles the last of them. Returns the status the cancel left."""
    job_status(broker, job_id, hint=hint)
    status = broker.cancel(job_id, abandon_running=abandon_running)
    try:
        finalize_if_ready(broker, job_id)
    except OSError as err:
        # the cancel stands; only its manifest is not written (the output path turned into a file, a disk
        # full, the store away): say so, and cancelling again writes it once the storage lets it
        why = (f"job {job_id} is cancelled, but its manifest could not be written ({type(err).__name__}: "
               f"{short_text(err)}); cancel it again once its output path can be written")
        raise (ServiceError(why) if io.storage.unreachable(err) else InputError(why)) from None
    return status


def get_manifest(broker: "JobsBroker", job_id: str, hint: str = CLI_HINT) -> dict:
    """The job's manifest.json; ManifestNotReady while it is not written yet."""
    status = job_status(broker, job_id, hint=hint)
    found: Optional[dict] = io.read_manifest(broker.get_spec(job_id).output.path)
    if found is None:
        raise ManifestNotReady(f"job {job_id} has no manifest yet (state {status.state.value}); it is written "
                               "when the job completes or is cancelled")
    return found


def unserved_note(broker: "WorkerBroker", job_id: str) -> Optional[str]:
    """A line saying why a job's shards may wait with nobody to claim them: no live worker serves its
    tensor_parallel (a replica claims only jobs of its own shape), or every one that does could not load the
    job's engine, or none can read its spec. None when one can."""
    try:
        tp = broker.get_spec(job_id).model.tensor_parallel
    except ZiyaBatchError:                      # a newer release's spec, say: the workers that tried noted why
        notes = [w.cannot_load[job_id] for w in broker.worker_infos() if job_id in w.cannot_load]
        if not notes:
            raise
        return (f"{len(notes)} live worker(s) left this job ({notes[0]}): its shards wait for a worker that can "
                f"read its spec (one of the release that submitted it)")
    serving = [w for w in broker.worker_infos() if int(w.info.get("tensor_parallel", 1)) == tp]
    failed = [w.cannot_load[job_id] for w in serving if job_id in w.cannot_load]
    if serving and len(failed) == len(serving):
        return (f"none of the {len(serving)} live worker(s) that serve tensor_parallel {tp} could load this job's "
                f"engine ({failed[0]}): its shards wait. Out of memory: lower engine.gpu_memory_fraction or "
                f"engine.max_num_seqs, or raise model.tensor_parallel, and submit the spec again (the job resumes)")
    if serving:
        return None
    how = (f"`ziya-batch worker --tensor-parallel {tp}`" if tp > 1 else "`ziya-batch worker`")
    return (f"no live worker serves tensor_parallel {tp} jobs: its shards wait until one does ({how} on GPU "
            f"nodes, or `ziya-batch run` with this job's spec)")
