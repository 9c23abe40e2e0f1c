"""Finishing a job: when every shard is committed or dead-lettered, one caller promotes any parts whose
commit Redis accepted but whose promotion a crash interrupted, writes manifest.json last, and marks the
job completed. A job is completed only when storage holds a commit marker for every shard. A commit whose
staged parts storage lost before they were promoted is taken back (broker.uncommit): the shard runs again."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from .. import io

if TYPE_CHECKING:
    from ..protocols import JobsBroker
    from ..queue import JobStatus, ShardStats

log = logging.getLogger(__name__)


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

    status = broker.find_job(job_id)
    if status is None:
        return False
    spec = broker.get_spec(job_id)
    out = io.OutputDir(spec.output.path, spec.output.format)
    if status.state == JobState.CANCELLED:
        return _finalize_cancelled(broker, job_id, status, spec, out)
    if status.state != JobState.FINALIZING or not broker.begin_finalize(job_id):
        return False
    status = broker.find_job(job_id)        # as this election found it: what _left_finalizing compares with
    if status is None:
        return False
    try:
        markers, lost = _committed(broker, job_id, out)
        if lost:
            return False            # those shards run again; the commit of the last of them finalizes the job
        missing = [i for i in range(status.shards_total) if i not in markers]
        if missing:
            if not _left_finalizing(broker, status):
                broker.mark_failed(job_id, f"{len(missing)} shard(s) have no committed parts in storage")
            return False
        io.write_manifest(out, spec.to_json(), {**_summary(status, markers), "state": "completed"}, markers)
        broker.mark_completed(job_id)
        out.clear_staging()         # leftovers of lost attempts; the manifest no longer needs them
        log.info("job %s completed: manifest written to %s", job_id, out)
        return True
    except Exception as err:
        if not _left_finalizing(broker, status):
            broker.mark_failed(job_id, f"finalizing failed: {type(err).__name__}: {err}")
        raise


def _left_finalizing(broker: "JobsBroker", status: "JobStatus") -> bool:
    """Whether the job changed state since `status` was read, right after this finalizer's election: another caller
    took a commit back (uncommit), and the job may be finalizing again since, that shard committed anew. What this
    finalizer saw is out of date then, no reason to fail the job. (Compared with a status read before the election,
    a job that went finalizing -> running -> finalizing in between looked changed, and this finalizer, the current
    one, failed nothing: a real failure left the job finalizing with no error, its election held.)"""
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


def promote_accepted(broker: "JobsBroker", out: "io.OutputDir", job_id: str, index: int, token: int,
                     stats: "ShardStats", caller: str = "") -> Optional["io.CommitMarker"]:
    """Promote the parts of a commit Redis accepted (OutputDir.promote) and return the shard's commit marker. Where
    storage lost the staged parts first (promote raises CommitError and storage holds no marker for the shard),
    the commit is taken back so that the shard runs again (broker.uncommit, a compare-and-set on `token`: a newer
    commit is left alone), and None is returned."""
    try:
        return out.promote(index, token, stats.attempt, stats.parts, stats.to_dict())
    except io.CommitError as err:
        marker = out.read_marker(index)
        if marker is not None:      # another promote of the shard finished meanwhile
            return marker
        if broker.uncommit(job_id, index, token, str(err), stats.attempt, caller, out.staging_url).taken_back:
            log.warning("job %s shard %d: its parts were lost from storage before promotion (%s); it runs again",
                        job_id, index, err)
        return None


def _committed(broker: "JobsBroker", job_id: str, out: "io.OutputDir") -> tuple[dict, list[int]]:
    """Every shard's commit marker, after promoting the parts of commits Redis accepted whose promotion a
    crash (or a finalize call racing the worker) left undone; and the shards whose staged parts storage lost
    before that, taken back to run again (promote_accepted)."""
    markers = out.committed_shards()
    lost = []
    for index, (token, stats) in broker.commits(job_id).items():
        if index in markers:
            continue
        marker = promote_accepted(broker, out, job_id, index, token, stats, caller="finalize")
        if marker is None:
            lost.append(index)
        else:
            markers[index] = marker
    return markers, lost


def _finalize_cancelled(broker: "JobsBroker", job_id: str, status, spec, out: "io.OutputDir") -> bool:
    """A cancelled job's manifest lists every shard committed before the cancel took hold: a commit can land
    (and move the job from cancelling to cancelled) before its parts are promoted, so parts Redis accepted
    are promoted here too, and a manifest written before a late promote is written again. Every caller
    checks again after writing, so the last writer lists them all. A shard whose staged parts were lost is left
    out and goes back to pending, for a resubmit to run. True if this call wrote the manifest."""
    wrote = False
    for _ in range(3):
        markers, _ = _committed(broker, job_id, out)
        manifest = io.read_manifest(out)
        if manifest is not None and set(markers) <= io.manifest_shards(manifest):
            return wrote
        io.write_manifest(out, spec.to_json(), _summary(status, markers), markers)
        wrote = True
    return wrote
