"""A forget that lands while a submit of the same job streams its shards into Redis: the job was cancelled (a cancel
of a job not yet sealed with nothing leased ends it at once) and forgotten between two of the submit's batches. The
submit's later batches write nothing of it back, and the next submit builds the job whole."""
from __future__ import annotations

import dataclasses

import pytest

from ziya_batch import jobs
from ziya_batch.errors import JobNotFound
from ziya_batch.queue import JobState
from ziya_batch.queue.broker import SUBMIT_BATCH


def _keys_naming(client, job_id: str) -> list[str]:
    return sorted(k for k in client.scan_iter("*") if job_id in k)


def test_a_job_forgotten_while_its_submit_streams_is_not_written_back(broker, make_spec, make_shards):
    c = broker.client
    spec = make_spec("streamed")
    job_id = spec.identity()
    n = SUBMIT_BATCH * 2 + 3

    def refs():
        # the first batch's shards read one file, the later ones a second: its name is appended after the forget
        for ref in make_shards(spec, n):
            yield dataclasses.replace(ref, file=f"/data/streamed-{int(ref.index >= SUBMIT_BATCH)}.jsonl")

    def shards():
        for ref in refs():
            if ref.index == SUBMIT_BATCH + 1:        # the first batch is in Redis, the second being gathered
                assert broker.cancel(job_id).state == JobState.CANCELLED
                assert jobs.forget_job(broker, job_id).shards == SUBMIT_BATCH
                assert _keys_naming(c, job_id) == []
            yield ref

    with pytest.raises(JobNotFound, match=f"job {job_id} was forgotten while this submit wrote its shards"):
        broker.submit(spec, shards())
    assert _keys_naming(c, job_id) == []
    assert c.zrange(broker.keys.jobs(), 0, -1) == [] and c.zrange(broker.keys.ready(), 0, -1) == []

    st = broker.submit(spec, refs())
    assert (st.state, st.shards_total, st.prompts_total) == (JobState.QUEUED, n, n * spec.shard_size)
    assert st.shards == {"pending": n, "leased": 0, "committed": 0, "dead": 0}
    assert c.hlen(broker.keys.shards(job_id)) == n and c.zcard(broker.keys.pending(job_id)) == n
    assert c.lrange(broker.keys.files(job_id), 0, -1) == ["/data/streamed-0.jsonl", "/data/streamed-1.jsonl"]
