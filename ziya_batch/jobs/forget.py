"""Forgetting finished jobs: their records leave Redis, their output (committed parts, manifest.json) stays.

Redis keeps every job it ran, a few hundred bytes a shard, and a Redis that must not evict (noeviction) fills up
unless jobs are forgotten. `ziya-batch forget` and DELETE /v1/jobs/{id} forget by id; `--finished-before` forgets
every job that finished longer ago than a duration. A job is forgotten only once it is finished (completed, failed
or cancelled) with no lease of a worker still running (Broker.forget_job: one atomic script). Submitting its spec
again afterwards does not run it again where its output holds its completed manifest: submit_job records it
completed from that (Broker.restore_completed); a failed or cancelled one resumes from its committed parts.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..errors import JobNotFinished, JobNotFound, ZiyaBatchError
from ..spec import show_text
from .service import API_HINT, CLI_HINT, job_status

if TYPE_CHECKING:
    from ..protocols import JobsBroker
    from ..queue import ForgetResult, JobStatus

UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# a century: a longer age is a typo (and a number big enough to mean nothing, or to overflow where it is used)
MAX_DURATION_S = 36_500 * 86400
_DURATION_CHARS = 32
# ASCII digits only: Python's int() and \d also take other scripts' digits ('٣' is 3), which nobody types here
_DURATION = re.compile(r"(?:[0-9]+[smhdw])+", re.ASCII)
_PART = re.compile(r"([0-9]+)([smhdw])", re.ASCII)
DURATION_HELP = "a whole number and a unit, s, m, h, d or w (30m, 12h, 7d, 2w; 1d12h)"


def parse_duration(text: str) -> int:
    """Seconds in a duration such as `30m`, `12h`, `7d`, `2w` or `1d12h` (each unit at most once); ValueError naming
    what is wrong for anything else: no unit, a negative, a fraction, other scripts' digits, over MAX_DURATION_S."""
    shown = show_text(text, _DURATION_CHARS + 8)
    if len(text) > _DURATION_CHARS or not _DURATION.fullmatch(text):
        raise ValueError(f"'{shown}' is not a duration: give {DURATION_HELP}")
    parts = _PART.findall(text)
    units = [unit for _, unit in parts]
    if len(set(units)) != len(units):
        raise ValueError(f"'{shown}' gives a unit twice: give each of s, m, h, d, w at most once (1d12h)")
    seconds = sum(int(n) * UNIT_S[unit] for n, unit in parts)
    if seconds > MAX_DURATION_S:
        raise ValueError(f"'{shown}' is longer than {MAX_DURATION_S // 86400}d")
    return seconds


@dataclass(frozen=True)
class ForgottenJob:
    """A job forget_job forgot (or, on a dry run, would forget)."""

    job_id: str
    name: str
    state: str                       # completed, failed or cancelled
    finished_at: Optional[float]     # unix seconds (Redis clock): finished_at() of its status
    shards: int                      # shard records that left Redis with it
    output_path: str                 # its output, which stays
    dry_run: bool = False

    def to_dict(self) -> dict:
        return {"id": self.job_id, "name": self.name, "state": self.state, "finished_at": self.finished_at,
                "shards": self.shards, "output_path": self.output_path, "forgotten": not self.dry_run,
                "dry_run": self.dry_run}


def forget_job(broker: "JobsBroker", job_id: str, dry_run: bool = False, hint: str = CLI_HINT) -> ForgottenJob:
    """Forget one finished job: JobNotFound (ending in `hint`) for an id this Redis does not know, JobNotFinished
    for a job that is not finished or has a lease out; nothing is changed then, nor on a `dry_run`."""
    status = job_status(broker, job_id, hint=hint)
    got = broker.forget_job(job_id, dry_run=dry_run)
    if not got.done:
        raise refusal(job_id, got, hint)
    return _forgotten(status, got, dry_run)


def forget_finished_before(broker: "JobsBroker", age_s: float, dry_run: bool = False,
                           now_s: Optional[float] = None) -> tuple[list[ForgottenJob], list[ZiyaBatchError]]:
    """Forget every job that finished more than `age_s` seconds before `now_s` (default: the Redis server's clock,
    the one finish times are taken on). Returns the jobs forgotten (or, `dry_run`, that would be) in the order the
    queue lists them (first submitted first), and the refusals of jobs selected that hold a lease not yet expired (a
    failed job whose workers still run). A job submitted again, reopened or forgotten by someone else since the
    listing is no longer selected, and is left alone: the cut-off is checked again in the forget's own step."""
    now_s = broker.server_time_s() if now_s is None else now_s
    cutoff_ms = int(round((now_s - age_s) * 1000))
    done: list[ForgottenJob] = []
    refused: list[ZiyaBatchError] = []
    for status in broker.list_jobs():
        at = finished_at(status)
        if not status.state.is_finished() or at is None or round(at * 1000) >= cutoff_ms:
            continue
        got = broker.forget_job(status.job_id, finished_before_ms=cutoff_ms, dry_run=dry_run)
        if got.done:
            done.append(_forgotten(status, got, dry_run))
        elif got.outcome == "leased":
            refused.append(refusal(status.job_id, got, CLI_HINT))
    return done, refused


def finished_at(status: "JobStatus") -> Optional[float]:
    """When a finished job finished (its last change, for one finished before that was recorded); None for a job
    that has not."""
    if not status.state.is_finished():
        return None
    return status.finished_at if status.finished_at is not None else status.updated_at


def refusal(job_id: str, got: "ForgetResult", hint: str = CLI_HINT) -> ZiyaBatchError:
    """The error a refused forget is: one line saying why and what to do."""
    state = got.state.value if got.state is not None else "unknown"
    if got.outcome == "not finished":
        if state == "cancelling":
            return JobNotFinished(f"job {job_id} is cancelling: some of its shards still run; it can be forgotten "
                                  "once it is cancelled (when they commit or their leases expire)")
        if state == "finalizing":
            return JobNotFinished(f"job {job_id} is finalizing: every shard is committed and its manifest is being "
                                  "written; it can be forgotten once it is completed")
        how = f"POST /v1/jobs/{job_id}/cancel" if hint == API_HINT else f"`ziya-batch cancel {job_id}`"
        return JobNotFinished(f"job {job_id} is {state}: only a completed, failed or cancelled job can be forgotten; "
                              f"wait for it to finish, or cancel it first ({how})")
    if got.outcome == "leased":
        return JobNotFinished(f"job {job_id} is {state}, but {got.live_leases} of its shards are leased to workers "
                              f"that may still write them (the last lease runs {got.leases_expire_in_s:.0f} s more "
                              "unless renewed): forget it once they are given back or their leases expire")
    return JobNotFound(f"no job {show_text(job_id)}{hint}")


def _forgotten(status: "JobStatus", got: "ForgetResult", dry_run: bool) -> ForgottenJob:
    state = got.state.value if got.state is not None else status.state.value
    return ForgottenJob(job_id=status.job_id, name=status.name, state=state, finished_at=finished_at(status),
                        shards=got.shards, output_path=status.output_path, dry_run=dry_run)


def describe_forgotten(job: ForgottenJob) -> str:
    """The line `ziya-batch forget` prints for a job: 'forgot ID (NAME): completed 2026-12-01 09:12 UTC, 12 shards;
    its output stays in OUT' ('would forget' on a dry run). Users' text (the name) is not escaped here."""
    when = "" if job.finished_at is None else " " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(job.finished_at))
    verb = "would forget" if job.dry_run else "forgot"
    return (f"{verb} {job.job_id} ({job.name}): {job.state}{when}, {job.shards} shard(s); its output stays in "
            f"{job.output_path}")
