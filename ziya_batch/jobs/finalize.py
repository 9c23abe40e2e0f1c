"""Finishing a job: when every shard is committed or dead-lettered, one caller promotes any parts whose
commit Redis accepted but whose promotion a crash interrupted, writes manifest.json last, and marks the
job completed. A job is completed only when storage holds a commit marker for every shard.

The elected finalizer is also the only caller that takes a commit back (broker.uncommit), where storage positively
says the staged parts are gone (OutputDir.staged_loss) and holds no marker for the shard: it discards what is left
of the attempt, and once the grace after the commit has passed (queue.broker.PROMOTE_GRACE_S) the shard runs
again. Until then the job stays finalizing and the election ends with the grace, for the workers' sweep to try
again. Storage that does not answer (a connection refused or cut, a time-out: io.storage.unreachable) ends the
election too, and the sweep tries again FINALIZE_RETRY_S later, for as long as it does not answer: every shard is
committed, so waiting loses nothing; the job's status says why it waits (JobStatus.finalize_wait, kept until a
try gets past storage or the job leaves finalizing). Any other failure to promote fails the job."""
from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from .. import io
from ..errors import short_text

if TYPE_CHECKING:
    from ..protocols import JobsBroker
    from ..queue import JobStatus, ShardStats, UncommitResult

log = logging.getLogger(__name__)

FINALIZE_RETRY_S = 30.0      # after storage did not answer, the next finalizer is elected no sooner than this


def _summary(status, markers) -> dict:
    return {
        "job_id": status.job_id,
        "state": status.state.value,
        "shards": status.shards_total,
        "prompts": sum(m.prompts_done for m in markers.values()),
        "prompts_failed": sum(m.prompts_failed for m in markers.values()),
        "samples": sum(m.samples for m in markers.values()),
        "output_tokens": sum(m.output_tokens for m in markers.values()),
        # a marker's stats are the worker's ShardStats as committed (older markers lack these: 0)
        "prefix_cache_hit_tokens": sum(int(m.stats.get("prefix_cache_hit_tokens", 0)) for m in markers.values()),
        "prefix_cache_query_tokens": sum(int(m.stats.get("prefix_cache_query_tokens", 0)) for m in markers.values()),
        # prompts whose samples all got one reward, left out of experience/ (output.filters)
        "dropped_constant_reward_groups": sum(int(m.stats.get("dropped_constant_reward_groups", 0))
                                              for m in markers.values()),
    }


def finalize_if_ready(broker: "JobsBroker", job_id: str) -> bool:
    """True if this call wrote the manifest. Safe to call from every worker after every commit."""
    from ..queue import JobState
    from ..queue.errors import BROKER_ERRORS

    status = broker.find_job(job_id)
    if status is None:
        return False
    spec = broker.get_spec(job_id)
    out = io.OutputDir(spec.output.path, spec.output.format)
    if status.state == JobState.CANCELLED:
        return _finalize_cancelled(broker, job_id, status, spec, out)
    owner = uuid.uuid4().hex
    if status.state != JobState.FINALIZING or not broker.begin_finalize(job_id, owner):
        return False
    status = broker.find_job(job_id)        # as this election found it: what _left_finalizing compares with
    if status is None:
        return False
    try:
        markers, lost = _committed(broker, job_id, out)
        if lost:
            # taken back (the job is running again, or failed), or not yet: then the sweep tries again after the wait
            waits = [u.wait_s for u in lost.values() if not u.taken_back]
            broker.end_finalize(job_id, owner, after_s=min(waits) if waits else 0.0)
            return False
        missing = [i for i in range(status.shards_total) if i not in markers]
        if missing:
            if not _left_finalizing(broker, status):
                broker.mark_failed(job_id, f"{len(missing)} shard(s) have no committed parts in storage")
            return False
        io.write_manifest(out, spec.to_json(), {**_summary(status, markers), "state": "completed"}, markers)
        broker.mark_completed(job_id)
    except BROKER_ERRORS:
        raise                               # Redis itself: the caller waits it out (a worker) or reports it
    except Exception as err:
        if io.storage.unreachable(err):
            log.warning("job %s: finalizing waits for its output's storage, which did not answer (%s: %s); "
                        "trying again in %.0f s", job_id, type(err).__name__, err, FINALIZE_RETRY_S)
            # the reason goes to the job's status too: this log is one process's, status is everyone's
            broker.end_finalize(job_id, owner, after_s=FINALIZE_RETRY_S,
                                reason=f"{out.url}: {type(err).__name__}: {short_text(err)}")
            return False
        if not _left_finalizing(broker, status):
            broker.mark_failed(job_id, f"finalizing failed: {type(err).__name__}: {err}")
        raise
    log.info("job %s completed: manifest written to %s", job_id, out)
    try:
        out.clear_staging()         # leftovers of lost attempts; the manifest no longer needs them
    except Exception as err:  # noqa: BLE001 - the job is completed: nothing to wait for or fail, only leftovers
        log.warning("job %s: its output's _staging/ (leftovers of lost attempts) could not be removed (%s: %s); "
                    "the job is completed, its manifest written", job_id, type(err).__name__, err)
    return True


def _left_finalizing(broker: "JobsBroker", status: "JobStatus") -> bool:
    """Whether the job changed state since `status` was read, right after this finalizer's election: a finalizer
    elected after this one's election expired (FINALIZE_TTL_S) took a commit back or finished the job. What this
    one saw is out of date then, no reason to fail the job."""
    from ..queue import JobState

    now = broker.find_job(status.job_id)
    return now is None or now.state != JobState.FINALIZING or now.updated_at != status.updated_at


def finish_empty_job(broker: "JobsBroker", status: "JobStatus") -> "JobStatus":
    """A job that is finalizing with no shard left to run (an empty input, or every shard already committed in
    storage when it was submitted) gets no worker commit to finish it: finish it here. Returns its status,
    as it is after that."""
    from ..queue import JobState

    if status.state != JobState.FINALIZING:
        return status
    finalize_if_ready(broker, status.job_id)
    return broker.status(status.job_id)


class _Lost(Exception):
    """Storage positively says a commit's staged parts are gone and holds no marker for the shard."""


def _committed(broker: "JobsBroker", job_id: str, out: "io.OutputDir",
               elected: bool = True) -> tuple[dict, dict[int, "UncommitResult"]]:
    """Every shard's commit marker, after promoting the parts of commits Redis accepted whose promotion a crash
    (or a worker's failed promote) left undone; and, by shard, what broker.uncommit did with the commits whose
    staged parts storage lost (_take_back). Only the job's elected finalizer (`elected`) takes a commit back, and
    it stops at the first it took back: that ended its election. A promote that fails otherwise raises its error;
    where the caller is not elected (a cancelled job's manifest), every failed promote is logged and the shard left
    out."""
    markers = out.committed_shards()
    lost = {}
    for index, (token, stats) in broker.commits(job_id).items():
        if index in markers:
            continue
        try:
            markers[index] = _promote(out, index, token, stats)
        except io.CommitError as err:
            if elected:
                raise
            log.warning("job %s shard %d: %s", job_id, index, err)
        except _Lost as err:
            if not elected:
                log.warning("job %s shard %d: %s; left out (a resubmit runs it again)", job_id, index, err)
                continue
            lost[index] = _take_back(broker, out, job_id, index, token, stats, str(err))
            if lost[index].taken_back:
                break
    return markers, lost


def _promote(out: "io.OutputDir", index: int, token: int, stats: "ShardStats") -> "io.CommitMarker":
    """OutputDir.promote of a commit Redis accepted. Where it fails, storage is asked what is gone: _Lost where it
    says the attempt can never be promoted and no marker was written; the marker, where a concurrent promote wrote
    one; else (storage holds the whole attempt: the promote met a passing error) a second promote, whose error, if
    any, stands: a mismatch with what the worker reported fails the same way again."""
    try:
        return out.promote(index, token, stats.attempt, stats.parts, stats.to_dict())
    except io.CommitError:
        pass                                # what went wrong is asked of storage
    gone = out.staged_loss(index, token, stats.attempt)
    marker = out.read_marker(index)         # after the intent: a promoter writes the marker before removing it
    if marker is not None:
        return marker
    if gone is not None:
        raise _Lost(f"shard {index} token {token}: {gone}")
    return out.promote(index, token, stats.attempt, stats.parts, stats.to_dict())


def _take_back(broker: "JobsBroker", out: "io.OutputDir", job_id: str, index: int, token: int,
               stats: "ShardStats", reason: str) -> "UncommitResult":
    """Discard what is left of a lost commit's staging, so that a promoter of it still at work finds no part to move
    and no intent (it then writes no marker), and take the commit back (broker.uncommit)."""
    out.discard(index, token, stats.attempt)
    got = broker.uncommit(job_id, index, token, reason, stats.attempt, caller="finalize",
                          staging=out.staging_url)
    if got.outcome == "retry":
        log.warning("job %s shard %d: its staged parts were lost from storage before promotion (%s); it runs again",
                    job_id, index, reason)
    elif got.outcome == "failed":
        log.error("job %s shard %d: its staged parts were lost from storage before promotion (%s), %s; the job "
                  "failed", job_id, index, reason, "once" if got.times_lost == 1 else f"{got.times_lost} times")
    elif got.outcome == "too recent":
        log.warning("job %s shard %d: its staged parts were lost from storage before promotion (%s); it runs again "
                    "in %.0f s, once no promote of them can be under way", job_id, index, reason, got.wait_s)
    return got


def _finalize_cancelled(broker: "JobsBroker", job_id: str, status, spec, out: "io.OutputDir") -> bool:
    """A cancelled job's manifest lists every shard committed before the cancel took hold: a commit can land
    (and move the job from cancelling to cancelled) before its parts are promoted, so parts Redis accepted
    are promoted here too, and a manifest written before a late promote is written again. Every caller
    checks again after writing, so the last writer lists them all. A shard whose parts cannot be promoted is left
    out, still committed in Redis: where storage lost them, the finalizer of the resubmitted job takes the commit
    back. True if this call wrote the manifest."""
    wrote = False
    for _ in range(3):
        markers, _ = _committed(broker, job_id, out, elected=False)
        manifest = io.read_manifest(out)
        if manifest is not None and set(markers) <= io.manifest_shards(manifest):
            return wrote
        io.write_manifest(out, spec.to_json(), _summary(status, markers), markers)
        wrote = True
    return wrote
