"""A job Redis does not know, submitted again: recorded completed from its output's manifest only where that is the
completed manifest of this very job; anything else (a cancelled job's manifest, numbers no finalizer writes) takes the
usual path, which indexes the input and resumes from the commit markers."""
from __future__ import annotations

import calendar
import json
import time

import pytest

from ziya_batch import io
from ziya_batch.jobs import submit_job
from ziya_batch.queue import JobState, ShardStats
from ziya_batch.spec import parse_spec


def _spec(tmp_path, input_lines: int = 0):
    inp = tmp_path / "in.jsonl"
    if input_lines:
        inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "hi"}) + "\n" for i in range(input_lines)))
    return parse_spec({"name": "restored", "model": {"path": "/models/m"}, "input": [str(inp)],
                       "output": {"path": str(tmp_path / "out")}, "shard_size": 2})


def _manifest(spec, job_id: str, **summary) -> None:
    full = {"job_id": job_id, "state": "completed", "shards": 3, "prompts": 5, "prompts_failed": 1, "samples": 10,
            "output_tokens": 77, "prefix_cache_hit_tokens": 4, "prefix_cache_query_tokens": 9, **summary}
    io.write_manifest(spec.output.path, spec.to_json(), full, {})


def test_a_completed_manifest_of_this_job_is_recorded_completed_without_reading_input(tmp_path, broker):
    spec = _spec(tmp_path)                         # its input does not exist
    job_id = spec.identity()
    _manifest(spec, job_id)
    written = calendar.timegm(time.strptime(io.read_manifest(spec.output.path)["written_at"], "%Y-%m-%dT%H:%M:%SZ"))
    st = submit_job(spec, broker)
    assert (st.job_id, st.state, st.shards_total, st.prompts_total, st.prompts_done, st.prompts_failed, st.samples,
            st.output_tokens, st.prefix_cache_hit_tokens) == (job_id, JobState.COMPLETED, 3, 6, 5, 1, 10, 77, 4)
    assert st.shards == {"pending": 0, "leased": 0, "committed": 3, "dead": 0} and st.finished_at == written
    assert broker.client.hget(broker.keys.job(job_id), "restored") == "1"
    assert broker.client.hlen(broker.keys.shards(job_id)) == 0
    assert broker.get_spec(job_id) == spec and broker.claim("w") is None
    assert submit_job(spec, broker).state == JobState.COMPLETED                    # known now: found as it is


@pytest.mark.parametrize("summary", [{"state": "cancelled"}, {"state": "failed"}, {"shards": "many"},
                                     {"prompts": None, "shards": -1}, {"samples": [1]}])
def test_anything_but_a_finalizers_completed_manifest_takes_the_usual_path(tmp_path, broker, summary):
    spec = _spec(tmp_path, input_lines=5)
    job_id = spec.identity()
    _manifest(spec, job_id, **summary)
    st = submit_job(spec, broker)
    # indexed from its input, no marker in storage: every shard to run
    assert (st.state, st.shards_total, st.prompts_total, st.prompts_done) == (JobState.QUEUED, 3, 5, 0)
    assert broker.client.hget(broker.keys.job(job_id), "restored") is None


def test_restore_writes_nothing_over_a_job_that_exists(tmp_path, broker):
    spec = _spec(tmp_path, input_lines=3)
    st = submit_job(spec, broker)
    lease = broker.claim("w")
    before = broker.client.hgetall(broker.keys.job(st.job_id))
    assert broker.restore_completed(spec, st.job_id, 2, ShardStats(prompts_done=3)) is None
    assert broker.client.hgetall(broker.keys.job(st.job_id)) == before and broker.heartbeat(lease)
