"""A job may have at most MAX_SHARDS shards: a spec whose inputs make more is refused with one line before Redis
holds anything of it (each shard is a record there; a million shards of one line would fill the queue's memory for
every job). Real redis-server."""
from __future__ import annotations

import json

import pytest

from ziya_batch.errors import SpecError
from ziya_batch.jobs import submit, submit_job
from ziya_batch.spec import parse_spec


def _spec(tmp_path, lines: int, shard_size: int):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"hello {i}"}) + "\n" for i in range(lines)))
    return parse_spec({"name": "cap", "model": {"path": "m"}, "input": [str(inp)], "shard_size": shard_size,
                       "output": {"path": str(tmp_path / "out")}})


def test_more_shards_than_a_job_may_have_are_refused_before_redis_holds_any(tmp_path, broker, redis_client,
                                                                            monkeypatch):
    monkeypatch.setattr(submit, "MAX_SHARDS", 4)
    with pytest.raises(SpecError) as err:
        submit_job(_spec(tmp_path, 9, 2), broker)                # 5 shards
    msg = str(err.value)
    assert "more than 4 shards" in msg and "raise shard_size" in msg and "\n" not in msg
    assert broker.list_jobs() == [] and not any(":shards" in k or "shard" in k for k in redis_client.keys("*"))


def test_a_job_of_exactly_the_most_shards_is_queued_and_resubmitting_it_reads_no_input(tmp_path, broker,
                                                                                       monkeypatch):
    monkeypatch.setattr(submit, "MAX_SHARDS", 5)
    spec = _spec(tmp_path, 9, 2)                                  # 5 shards
    st = submit_job(spec, broker)
    assert st.shards_total == 5
    # the job exists: a resubmit neither counts nor reads the inputs again (even where the cap is lower now)
    monkeypatch.setattr(submit, "MAX_SHARDS", 1)
    monkeypatch.setattr(submit.io, "index_inputs", lambda *a: (_ for _ in ()).throw(AssertionError("read")))
    assert submit_job(spec, broker).job_id == st.job_id
