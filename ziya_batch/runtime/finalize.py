"""Finishing a job: when every shard is committed or dead-lettered, one caller promotes any parts whose
commit Redis accepted but whose promotion a crash interrupted, writes manifest.json last, and marks the
job completed. A job is completed only when storage holds a commit marker for every shard."""
from __future__ import annotations

import logging

from .. import io

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
    }


def finalize_if_ready(broker, job_id: str) -> bool:
    """True if this call wrote the manifest. Safe to call from every worker after every commit."""
    from ..queue import JobState

    status = broker.find_job(job_id)
    if status is None:
        return False
    spec = broker.get_spec(job_id)
    out = spec.output.path
    if status.state == JobState.CANCELLED:
        if io.read_manifest(out) is None:
            markers = io.committed_shards(out)
            io.write_manifest(out, spec.to_json(), _summary(status, markers), markers)
            return True
        return False
    if status.state != JobState.FINALIZING or not broker.begin_finalize(job_id):
        return False
    try:
        markers = io.committed_shards(out)
        for index, (token, stats) in broker.commits(job_id).items():
            if index not in markers:
                markers[index] = io.promote_shard(out, index, token, stats.parts, stats=stats.to_dict())
        if len(markers) < status.shards_total:
            missing = status.shards_total - len(markers)
            broker.mark_failed(job_id, f"{missing} shard(s) have no committed parts in storage")
            return False
        io.write_manifest(out, spec.to_json(), {**_summary(status, markers), "state": "completed"}, markers)
        broker.mark_completed(job_id)
        io.clear_staging(out)       # leftovers of lost attempts; the manifest no longer needs them
        log.info("job %s completed: manifest written to %s", job_id, out)
        return True
    except Exception as err:
        broker.mark_failed(job_id, f"finalizing failed: {type(err).__name__}: {err}")
        raise
