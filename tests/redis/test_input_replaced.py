"""An input the HTTP API checked and indexed, swapped afterwards for a symlink to a file outside the allowed
prefixes: the worker refuses its shard (failed, then dead-lettered: its lines become retries_exhausted error lines
that quote nothing of the other file) and the job's other shards complete exactly. Shards carry their file's
identity through Redis and back unchanged, and shards queued without one (an older release) still run. Real
redis-server, the API's own submit, the demo model on the CPU, local output; exact multisets of output ids."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
import uuid

from api_support import AUTH, TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ziya_batch import io
from ziya_batch.queue import JobState
from ziya_batch.records import ShardRef
from ziya_batch.work.worker import Worker


def _jsonl(prefix: str, n: int) -> bytes:
    # one width per line whatever the prefix: files of identical line structure
    return b"".join(json.dumps({"id": f"{prefix}{i}", "prompt": f"{prefix} question {i}"}).encode() + b"\n"
                    for i in range(n))


def _spec(data, model, inputs) -> dict:
    return {"name": "replaced", "model": {"path": str(model)}, "input": [str(p) for p in inputs],
            "sampling": {"max_new_tokens": 2, "n": 2, "seed": 1}, "output": {"path": str(data / "out")},
            "shard_size": 2, "reliability": {"max_retries": 1}}


def _run(broker, job_id: str, timeout_s: float = 120.0) -> None:
    """A worker until the job is finished (a failed shard waits out its backoff before its next try)."""
    worker = Worker(broker, device="cpu")
    deadline = time.monotonic() + timeout_s
    while not broker.status(job_id).state.is_finished():
        assert time.monotonic() < deadline, broker.status(job_id, detail=True)
        worker.run_until_idle()
        time.sleep(0.05)


def test_an_input_swapped_for_a_symlink_after_submit_fails_only_its_shard(tmp_path, broker, demo_model):
    from fastapi.testclient import TestClient

    from ziya_batch.api.app import create_app
    from ziya_batch.api.settings import ApiSettings

    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    a, b, secret = data / "a.jsonl", data / "b.jsonl", outside / "secret.jsonl"
    a.write_bytes(_jsonl("a", 4))              # shards 0 and 1
    b.write_bytes(_jsonl("b", 2))              # shard 2
    secret.write_bytes(_jsonl("s", 2))         # b's line structure, outside every allowed prefix
    app = create_app(ApiSettings(token=TOKEN, allowed_prefixes=(str(data),), allowed_models=(str(demo_model),)),
                     lambda: broker)
    r = TestClient(app).post("/v1/jobs", json=_spec(data, demo_model, [a, b]), headers=AUTH)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    assert broker.status(job_id).shards_total == 3

    b.unlink()
    b.symlink_to(secret)                       # after the check and the index: the API never saw this
    _run(broker, job_id)

    st_ = broker.status(job_id, detail=True)
    assert st_.state == JobState.COMPLETED and st_.dead_shards == 1 and st_.prompts_failed == 2, st_
    replaced = (f"InputError: input {b} was replaced after submit (shard 2): it is no longer the file that was "
                "checked and indexed; put the original back, or submit the job again with a new output.path")
    assert [(e["shard"], e["message"]) for e in st_.errors] == [(2, replaced)] * 2      # the try and the retry
    out = str(data / "out")
    results = collections.Counter((r["id"], r["sample_index"]) for r in io.read_parts(out, "results"))
    assert results == collections.Counter({(f"a{i}", s): 1 for i in range(4) for s in range(2)})
    errs = list(io.read_parts(out, "errors"))
    assert collections.Counter(e["id"] for e in errs) == collections.Counter([f"{b}:1", f"{b}:2"])
    assert {e["error"]["code"] for e in errs} == {"retries_exhausted"}
    # the error line's message is cut at 200 characters: the job's errors above hold the reason whole
    assert all("could not be read back (InputError: input " in e["error"]["message"] for e in errs), errs
    for root, _, names in os.walk(out):        # nothing of the other file reached the output
        for name in names:
            assert b"s question" not in open(os.path.join(root, name), "rb").read(), name


def test_shards_queued_without_identity_still_run(tmp_path, broker, demo_model):
    """As an older release queued them: nothing to compare, so a new file of the same lines is read (the line
    count check is all there is, as before)."""
    from ziya_batch.jobs import submit
    from ziya_batch.spec import parse_spec

    inp = tmp_path / "in.jsonl"
    inp.write_bytes(_jsonl("p", 3))
    spec = submit.absolute_locations(parse_spec(_spec(tmp_path, demo_model, [inp])))
    job_id = submit.job_id_for(spec, broker)
    old = [dataclasses.replace(r, identity=None) for r in io.shard_refs(job_id, [str(inp)], 2)]
    broker.submit(spec, old, job_id=job_id)
    assert all("identity" not in json.loads(v) for v in broker.client.hvals(broker.keys.shards(job_id)))
    new = tmp_path / "new.jsonl"
    new.write_bytes(_jsonl("q", 3))
    os.replace(new, inp)
    _run(broker, job_id)
    assert broker.status(job_id).state == JobState.COMPLETED
    results = collections.Counter((r["id"], r["sample_index"]) for r in io.read_parts(str(tmp_path / "out"), "results"))
    assert results == collections.Counter({(f"q{i}", s): 1 for i in range(3) for s in range(2)})


_refs = st.lists(st.tuples(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),           # file
    st.integers(0, 2**40), st.integers(0, 2**30), st.integers(1, 2**31), st.integers(1, 2**20),
    st.none() | st.builds(lambda dev, ino: f"{dev}:{ino}", st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
), min_size=1, max_size=8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_refs)
def test_shards_come_back_from_redis_as_they_went_in(broker, make_spec, rows):
    """Through the Lua scripts' JSON too (which would round an inode past 2**53 were it a number)."""
    spec = make_spec(f"rt-{uuid.uuid4().hex[:8]}")
    job_id = spec.identity()
    refs = [ShardRef(job_id, i, file, start, start + length, first, num, ident)
            for i, (file, start, length, first, num, ident) in enumerate(rows)]
    broker.submit(spec, refs)
    back = [broker.claim("w", accept=lambda j: j == job_id).shard for _ in refs]
    assert sorted(back, key=lambda r: r.index) == refs
