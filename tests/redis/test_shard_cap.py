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


def test_a_refused_new_jobs_claim_is_named_so_the_corrected_spec_knows_what_to_remove(tmp_path, broker, monkeypatch):
    from ziya_batch import io

    monkeypatch.setattr(submit, "MAX_SHARDS", 4)
    with pytest.raises(SpecError, match="more than 4 shards"):
        submit_job(_spec(tmp_path, 9, 2), broker)                # 5 shards: refused after the path was claimed
    with pytest.raises(SpecError) as err:
        submit_job(_spec(tmp_path, 9, 3), broker)                # the fix is another job id
    msg = str(err.value)
    assert "claimed by a job" in msg and "this queue does not know and that wrote nothing there" in msg
    assert "_owner.json" in msg and "\n" not in msg
    (tmp_path / "out" / io.OutputDir.OWNER).unlink()             # as the message says
    assert submit_job(_spec(tmp_path, 9, 3), broker).shards_total == 3


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


def test_a_job_whose_shard_list_is_unfinished_is_capped_as_its_shards_come(tmp_path, broker, monkeypatch):
    # a submit that died midway (or one of an earlier release) left the job without its whole list: the next
    # submit completes it, shard by shard, and stops at the cap with the same line
    from ziya_batch import io
    from ziya_batch.records import ShardRef

    spec = submit.absolute_locations(_spec(tmp_path, 9, 2))     # 5 shards
    job_id = submit.job_id_for(spec, broker)
    first = next(io.index_inputs(spec.input, 2))

    def dies():
        yield ShardRef(job_id, 0, *first)
        raise RuntimeError("the submitter died")
    with pytest.raises(RuntimeError):
        broker.submit(spec, dies(), job_id=job_id)
    assert broker.find_job(job_id) is not None
    monkeypatch.setattr(submit, "MAX_SHARDS", 4)
    with pytest.raises(SpecError, match="more than 4 shards"):
        submit_job(spec, broker)
    monkeypatch.setattr(submit, "MAX_SHARDS", 5)
    assert submit_job(spec, broker).shards_total == 5


def test_a_completed_job_whose_output_was_deleted_runs_again_under_the_cap(tmp_path, broker, monkeypatch):
    import dataclasses
    import shutil

    from ziya_batch.queue import JobState

    monkeypatch.setattr(submit, "MAX_SHARDS", 5)
    spec = _spec(tmp_path, 9, 2)                                  # 5 shards
    st = submit_job(spec, broker)
    real_find = broker.find_job
    # the job as Redis holds it once completed (its run is not what this test is about)
    monkeypatch.setattr(broker, "find_job", lambda job_id: dataclasses.replace(st, state=JobState.COMPLETED)
                        if job_id == st.job_id and real_find(job_id) is not None else real_find(job_id))
    shutil.rmtree(tmp_path / "out")
    with open(tmp_path / "in.jsonl", "a") as fh:                 # and the inputs grew since: 7 shards now
        fh.write('{"id": "more", "prompt": "x"}\n' * 4)
    with pytest.raises(SpecError, match="more than 5 shards"):
        submit_job(spec, broker)
    assert broker.list_jobs() == []          # the completed job deleted, the new run refused before Redis held it
