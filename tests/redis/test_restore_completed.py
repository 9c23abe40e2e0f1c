"""A job Redis does not know, submitted again: recorded completed from its output's manifest only where that is the
completed manifest of this very job; anything else (a cancelled job's manifest, numbers no finalizer writes) takes the
usual path, which indexes the input and resumes from the commit markers."""
from __future__ import annotations

import calendar
import json
import time

import hashlib
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ziya_batch import io
from ziya_batch.errors import InputError
from ziya_batch.io.markers import CommitMarker, PartInfo
from ziya_batch.jobs import submit_job
from ziya_batch.queue import JobState, ShardStats
from ziya_batch.spec import parse_spec


def _spec(tmp_path, input_lines: int = 0):
    inp = tmp_path / "in.jsonl"
    if input_lines:
        inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "hi"}) + "\n" for i in range(input_lines)))
    return parse_spec({"name": "restored", "model": {"path": "/models/m"}, "input": [str(inp)],
                       "output": {"path": str(tmp_path / "out")}, "shard_size": 2})


def _markers(out: str, shards: int) -> dict[int, CommitMarker]:
    """Each shard's results and errors parts written in `out`, as a finalizer's markers name them."""
    markers = {}
    for i in range(shards):
        parts = {}
        for kind in ("results", "errors"):
            data = f'{{"id": "r{i}"}}\n'.encode() if kind == "results" else b""
            rel = f"{kind}/part-{i:05d}.jsonl"
            os.makedirs(os.path.join(out, kind), exist_ok=True)
            with open(os.path.join(out, rel), "wb") as f:
                f.write(data)
            parts[kind] = PartInfo(data.count(b"\n"), hashlib.sha256(data).hexdigest(), rel, len(data))
        markers[i] = CommitMarker(i, 1, "jsonl", parts)
    return markers


def _manifest(spec, job_id: str, parts: bool = True, **summary) -> dict:
    """A finalizer's completed manifest of 3 shards (`summary` overrides its summary), with its parts written unless
    `parts` is False."""
    full = {"job_id": job_id, "state": "completed", "shards": 3, "prompts": 5, "prompts_failed": 1, "samples": 10,
            "output_tokens": 77, "prefix_cache_hit_tokens": 4, "prefix_cache_query_tokens": 9, **summary}
    markers = _markers(spec.output.path, 3) if parts else {}
    return io.write_manifest(spec.output.path, spec.to_json(), full, markers)


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


@pytest.mark.parametrize("damage", ["deleted", "truncated", "manifest lists none"])
def test_a_completed_manifest_whose_parts_are_not_all_there_marks_nothing_completed(tmp_path, broker, damage):
    """DESIGN: losing Redis state never marks a job complete; the manifest and the committed parts are the truth. A
    part the manifest lists that is gone or of another size (one listing of each kind's folder says so) is a damaged
    output: the submit is refused, naming it, and nothing is written to Redis."""
    spec = _spec(tmp_path, input_lines=5)
    job_id = spec.identity()
    if damage == "manifest lists none":
        _manifest(spec, job_id, parts=False)           # says 3 shards, lists no part of any
    else:
        _manifest(spec, job_id)
        part = tmp_path / "out" / "results" / "part-00001.jsonl"
        part.unlink() if damage == "deleted" else part.write_bytes(b"{")
    if damage == "manifest lists none":
        # not a finalizer's manifest: rebuilt from the input and the commit markers (none: every shard runs)
        st = submit_job(spec, broker)
        assert (st.state, st.shards_total, st.prompts_done) == (JobState.QUEUED, 3, 0)
        return
    with pytest.raises(InputError, match=r"results/part-00001.jsonl .*(missing|size)"):
        submit_job(spec, broker)
    assert broker.find_job(job_id) is None and list(broker.client.scan_iter("*")) == []


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_completed_job_redis_knows_is_not_answered_completed_once_its_parts_are_damaged(tmp_path, broker, damage):
    """The same rule where Redis still knows the job: resubmitting a completed job whose output lost or changed a part
    the manifest lists is refused naming it (Redis unchanged); with the parts put back it answers completed again."""
    spec = _spec(tmp_path)
    job_id = spec.identity()
    _manifest(spec, job_id)
    assert submit_job(spec, broker).state == JobState.COMPLETED                # restored: Redis knows it now
    before = {key: broker.client.dump(key) for key in broker.client.scan_iter("*")}
    part = tmp_path / "out" / "results" / "part-00002.jsonl"
    kept = part.read_bytes()
    part.unlink() if damage == "deleted" else part.write_bytes(kept + b"{}\n")
    with pytest.raises(InputError, match=r"results/part-00002.jsonl .*(missing|size)"):
        submit_job(spec, broker)
    assert {key: broker.client.dump(key) for key in broker.client.scan_iter("*")} == before
    part.write_bytes(kept)
    assert submit_job(spec, broker).state == JobState.COMPLETED


_COUNT_FIELDS = ("shards", "prompts", "prompts_failed", "samples", "output_tokens", "prefix_cache_hit_tokens",
                 "prefix_cache_query_tokens")
_ANY_VALUE = st.one_of(st.integers(-2, 10**20), st.floats(allow_nan=True), st.booleans(), st.none(),
                       st.text(max_size=4), st.lists(st.integers(0, 3), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_COUNT_FIELDS), value=_ANY_VALUE)
@example(field="shards", value=2**52)               # no range of that many shards is built to compare with
@example(field="shards", value=2)                   # fewer than the 3 listed
def test_a_summary_number_is_restored_only_as_the_whole_number_a_finalizer_writes(tmp_path, broker, field, value):
    """A hand-written or foreign manifest's numbers: a float, a bool, a numeric string, a negative, or a number past
    what Redis and Lua hold exactly (2**53) is not a finalizer's; the job then takes the usual path. A whole number
    in range is restored as given (shards must also be the 3 shards the manifest lists)."""
    broker.client.flushdb()
    spec = _spec(tmp_path, input_lines=5)
    job_id = spec.identity()
    _manifest(spec, job_id, **{field: value})
    st = submit_job(spec, broker)
    exact = type(value) is int and 0 <= value < 2**53 and (field != "shards" or value == 3)
    assert (st.state == JobState.COMPLETED) == exact, (field, value, st.state)
    if exact:
        got = {"shards": st.shards_total, "prompts": st.prompts_done, "prompts_failed": st.prompts_failed,
               "samples": st.samples, "output_tokens": st.output_tokens,
               "prefix_cache_hit_tokens": st.prefix_cache_hit_tokens,
               "prefix_cache_query_tokens": st.prefix_cache_query_tokens}
        assert got[field] == value


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_a_manifest_of_another_format_version_is_not_restored_from(tmp_path, broker, version):
    spec = _spec(tmp_path, input_lines=5)
    job_id = spec.identity()
    manifest = _manifest(spec, job_id)
    manifest["format_version"] = version
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    assert submit_job(spec, broker).state == JobState.QUEUED
