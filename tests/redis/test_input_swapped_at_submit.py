"""An input swapped for a symlink to a file outside the allowed prefixes (the file itself, or a folder on its path)
between the HTTP API's check of where it points and the indexer's open: the submit is refused with a 403 and
nothing is queued, where before the indexer recorded the other file's identity and workers read it as vetted.
The swap is made deterministic by running it right after the API's check (api.app.check_expanded_inputs). Also: a
plain submit passes, a known job whose shard list is unfinished (the broker reads the rest lazily) is held to the
same rule, and a known job whose list is complete reads no input on a resubmit, so its shards keep the identities
they were queued with. Real redis-server (each test's own, flushed database), the API's own submit."""
from __future__ import annotations

import json
import os

import pytest
from api_support import AUTH, TOKEN

from ziya_batch import io
from ziya_batch.api import app as app_module


def _jsonl(prefix: str, n: int) -> bytes:
    return b"".join(json.dumps({"id": f"{prefix}{i}", "prompt": f"{prefix} question {i}"}).encode() + b"\n"
                    for i in range(n))


@pytest.fixture
def env(tmp_path, broker):
    """(data dir, outside dir, models dir, client, spec of a job reading data/a.jsonl and data/sub/b.jsonl)."""
    from fastapi.testclient import TestClient

    from ziya_batch.api.settings import ApiSettings

    data, outside, models = tmp_path / "data", tmp_path / "outside", tmp_path / "models"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    (models / "m").mkdir(parents=True)
    (data / "a.jsonl").write_bytes(_jsonl("a", 4))            # shards 0 and 1
    (data / "sub" / "b.jsonl").write_bytes(_jsonl("b", 2))    # shard 2
    (outside / "b.jsonl").write_bytes(_jsonl("s", 2))         # b's shape, outside every allowed prefix
    app = app_module.create_app(ApiSettings(token=TOKEN, allowed_prefixes=(str(data),),
                                            allowed_models=(str(models),)), lambda: broker)
    spec = {"name": "swapped", "model": {"path": str(models / "m")},
            "input": [str(data / "a.jsonl"), str(data / "sub" / "b.jsonl")],
            "sampling": {"max_new_tokens": 2}, "output": {"path": str(data / "out")}, "shard_size": 2}
    return data, outside, models, TestClient(app, raise_server_exceptions=False), spec


def _swap_b_after_check(monkeypatch, data, outside, what: str) -> None:
    """Run the real check, then swap b (the file, or its folder) for a symlink out of the allowed prefix."""
    real = app_module.check_expanded_inputs

    def check_then_swap(files, settings):
        vetted = real(files, settings)
        if what == "file":
            (data / "sub" / "b.jsonl").unlink()
            (data / "sub" / "b.jsonl").symlink_to(outside / "b.jsonl")
        else:
            os.rename(data / "sub", data / "sub.orig")
            (data / "sub").symlink_to(outside, target_is_directory=True)
        return vetted

    monkeypatch.setattr(app_module, "check_expanded_inputs", check_then_swap)


def _refused(data) -> str:
    return (f"input file {data / 'sub' / 'b.jsonl'} was replaced while the job was submitted (a symlink swapped in "
            "for it or a folder on its path, say): the file indexed is not the file checked against the allowed "
            "prefixes, and none of its shards was queued; put the file back and submit again")


@pytest.mark.parametrize("what", ["file", "folder"])
def test_an_input_swapped_for_a_symlink_after_the_check_is_refused_and_nothing_queued(env, broker, monkeypatch,
                                                                                      what):
    data, outside, _, client, spec = env
    _swap_b_after_check(monkeypatch, data, outside, what)
    r = client.post("/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == {"message": _refused(data), "type": "permission_denied", "code": 403}
    assert broker.list_jobs() == [] and broker.client.keys("*") == []     # nothing at all in Redis


def test_a_plain_submit_queues_the_files_checked(env, broker):
    data, _, _, client, spec = env
    r = client.post("/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code == 200, r.text
    st = broker.status(r.json()["id"])
    assert st.sealed and st.shards_total == 3
    idents = {json.loads(v).get("identity") for v in broker.client.hvals(broker.keys.shards(st.job_id))}
    assert idents == {io.inputs.file_identity(os.stat(data / "a.jsonl")),
                      io.inputs.file_identity(os.stat(data / "sub" / "b.jsonl"))}


def _half_submitted(broker, spec_dict) -> str:
    """The job's first shard written, then the submitting process gone: an unfinished list a resubmit completes."""
    from ziya_batch.jobs import submit
    from ziya_batch.spec import parse_spec

    spec = submit.absolute_locations(parse_spec(spec_dict))
    job_id = submit.job_id_for(spec, broker)

    def first_then_die():
        yield next(io.shard_refs(job_id, list(spec.input), spec.shard_size))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        broker.submit(spec, first_then_die(), job_id=job_id)
    return job_id


def test_a_known_unfinished_job_reads_the_rest_of_its_list_vetted_too(env, broker, monkeypatch):
    from ziya_batch.queue import broker as broker_module

    data, outside, _, client, spec = env
    monkeypatch.setattr(broker_module, "SUBMIT_BATCH", 1)           # each shard written as it comes
    job_id = _half_submitted(broker, spec)
    assert not broker.status(job_id).sealed and broker.client.hlen(broker.keys.shards(job_id)) == 1
    _swap_b_after_check(monkeypatch, data, outside, "file")
    r = client.post("/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code == 403 and r.json()["error"]["message"] == _refused(data), r.text
    st = broker.status(job_id)
    assert not st.sealed and broker.claim("w") is None               # still unfinished: nothing runs
    recs = [json.loads(v) for v in broker.client.hvals(broker.keys.shards(job_id))]
    a_ident = io.inputs.file_identity(os.stat(data / "a.jsonl"))
    # a's two shards (vetted, written as the broker read them), none of the other file
    assert len(recs) == 2 and {r.get("identity") for r in recs} == {a_ident}, recs

    monkeypatch.undo()                                                # the file put back: the resubmit finishes it
    (data / "sub" / "b.jsonl").unlink()
    (data / "sub" / "b.jsonl").write_bytes(_jsonl("b", 2))
    r = client.post("/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code == 200, r.text
    st = broker.status(job_id)
    assert st.sealed and st.shards_total == 3


def test_a_known_sealed_job_reads_no_input_on_a_resubmit(env, broker, monkeypatch):
    """Its shards are in Redis with the identities of the files checked at its first submit; a resubmit reads no
    input, so a swap after the check changes nothing queued (a worker then refuses the other file: see
    test_input_replaced.py)."""
    data, outside, _, client, spec = env
    r = client.post("/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    before = sorted(broker.client.hvals(broker.keys.shards(job_id)))
    _swap_b_after_check(monkeypatch, data, outside, "file")
    r = client.post("/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == job_id, r.text
    assert sorted(broker.client.hvals(broker.keys.shards(job_id))) == before
