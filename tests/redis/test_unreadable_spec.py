"""A job whose stored spec this worker cannot read (a newer release's spec during a rolling upgrade: the spec
forbids unknown keys) waits for a worker that can: it is not claimed, or if claimed it is given back untried
(no retry counted, nothing dead-lettered), the reason is noted on the worker's registration, and the worker
keeps serving the other jobs. The demo model on the CPU, a real Redis, local output; exact output ids."""
import json
import threading
import time

from ziya_batch import io
from ziya_batch.jobs import submit_job
from ziya_batch.queue import JobState
from ziya_batch.spec import parse_spec
from ziya_batch.jobs import unserved_note
from ziya_batch.work.worker import Worker

UNREADABLE = json.dumps({"name": 5})


def _spec(tmp_path, model, name: str, n_lines: int = 2, max_retries: int = 1):
    d = tmp_path / name
    d.mkdir()
    inp = d / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"{name}{i}", "prompt": f"question {i}"}) + "\n"
                           for i in range(n_lines)))
    return parse_spec({"name": name, "model": {"path": str(model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 4, "ignore_eos": True, "seed": 1},
                       "output": {"path": str(d / "out")}, "shard_size": 2,
                       "reliability": {"max_retries": max_retries}})


def _break(broker, job: str) -> str:
    key = broker.keys.spec(job)
    stored = broker.client.get(key)
    broker.client.set(key, UNREADABLE)
    return stored


def _note(broker, worker_id: str, job: str):
    (info,) = [w for w in broker.worker_infos() if w.worker_id == worker_id]
    return info.cannot_load.get(job)


def _untouched(broker, job: str) -> None:
    """Pending, never counted as a failure, never isolated, nothing written for its lines."""
    st = broker.status(job, detail=True)
    assert not st.state.is_finished()
    assert st.shards["pending"] == 1 and st.shards["leased"] == 0 and st.shards["dead"] == 0
    assert st.retries == 0 and st.prompts_failed == 0 and st.prompts_done == 0
    shard = json.loads(broker.client.hget(broker.keys.shards(job), "0"))
    assert not shard.get("isolate") and not shard.get("failures") and not shard.get("dead")


def test_a_job_whose_spec_cannot_be_read_waits_and_the_worker_serves_the_others(tmp_path, demo_model, broker):
    bad = submit_job(_spec(tmp_path, demo_model, "bad"), broker).job_id
    good = submit_job(_spec(tmp_path, demo_model, "good"), broker).job_id
    stored = _break(broker, bad)
    w = Worker(broker, worker_id="old-release", device="cpu")
    assert w.run_until_idle() >= 1                   # no exception out of the loop
    assert broker.status(good).state == JobState.COMPLETED
    assert [r["id"] for r in io.read_parts(str(tmp_path / "good" / "out"), "results")] == ["good0", "good1"]
    _untouched(broker, bad)
    assert not broker.status(bad, detail=True).errors       # never claimed, so nothing given back either
    note = _note(broker, "old-release", bad)
    assert note is not None and note.startswith("cannot read the job's spec (SpecError: ") and "'name'" in note
    # what `status` and `submit` show for the job (runtime/services.waiting_note, cli submit)
    assert unserved_note(broker, bad).startswith(f"1 live worker(s) left this job ({note}): its shards wait")
    # the release that wrote the spec (here: the spec put back) runs it, and the note goes
    broker.client.set(broker.keys.spec(bad), stored)
    time.sleep(0.1)
    w.run_until_idle()
    assert broker.status(bad).state == JobState.COMPLETED and broker.status(bad).retries == 0
    assert [r["id"] for r in io.read_parts(str(tmp_path / "bad" / "out"), "results")] == ["bad0", "bad1"]
    assert _note(broker, "old-release", bad) is None


def test_a_shard_claimed_before_its_spec_became_unreadable_is_given_back_untried(tmp_path, demo_model, broker,
                                                                                   monkeypatch):
    """The claim filter saw a spec it could read; the start reads it again and cannot: back untried."""
    bad = submit_job(_spec(tmp_path, demo_model, "bad"), broker).job_id
    _break(broker, bad)
    w = Worker(broker, worker_id="old-release", device="cpu", max_in_flight=1)
    monkeypatch.setattr(w, "_serves", lambda job_id: True)          # the filter's earlier view
    assert w.run_once()
    _untouched(broker, bad)
    (err,) = broker.status(bad, detail=True).errors
    assert err["reason"] == "given back" and "old-release cannot read the job's spec (SpecError" in err["message"]
    assert _note(broker, "old-release", bad).startswith("cannot read the job's spec (SpecError: ")
    assert not w._flights                                           # nothing left heartbeating


def test_a_dead_letter_shard_whose_spec_cannot_be_read_is_given_back_not_written(tmp_path, demo_model, broker,
                                                                                   monkeypatch):
    """A dead-letter shard needs its spec too (the output format of its error lines): unreadable, it goes back
    still dead-lettered, and no error lines are written for it."""
    spec = _spec(tmp_path, demo_model, "bad", max_retries=0)
    bad = submit_job(spec, broker).job_id
    lease = broker.claim("someone")
    assert broker.fail(lease, "boom") == "dead"
    _break(broker, bad)
    w = Worker(broker, worker_id="old-release", device="cpu", max_in_flight=1)
    monkeypatch.setattr(w, "_serves", lambda job_id: True)
    time.sleep(0.1)
    assert w.run_once()
    st = broker.status(bad, detail=True)
    assert st.shards["leased"] == 0 and st.shards["committed"] == 0 and st.prompts_failed == 0
    assert st.shards["dead"] == 1 and st.errors[0]["reason"] == "given back"
    assert list((tmp_path / "bad" / "out").rglob("part-*")) == []
    # a worker that reads the spec then writes the dead letter's error lines, once
    broker.client.set(broker.keys.spec(bad), spec.to_json())
    time.sleep(0.3)
    Worker(broker, device="cpu").run_until_idle()
    assert broker.status(bad).state == JobState.COMPLETED
    errors = list(io.read_parts(str(tmp_path / "bad" / "out"), "errors"))
    assert sorted(e["id"] for e in errors) == ["bad0", "bad1"]
    assert {e["error"]["code"] for e in errors} == {"retries_exhausted"}


def test_the_serve_loop_keeps_serving_past_a_job_it_cannot_read(tmp_path, demo_model, broker, monkeypatch):
    bad = submit_job(_spec(tmp_path, demo_model, "bad"), broker).job_id
    _break(broker, bad)
    good = submit_job(_spec(tmp_path, demo_model, "good", n_lines=4), broker).job_id
    w = Worker(broker, worker_id="old-release", device="cpu", max_in_flight=1)
    monkeypatch.setattr(w, "_serves", lambda job_id: True)          # claims the bad job's shard again and again
    stop, raised = threading.Event(), []

    def serve():
        try:
            w.serve_forever(stop, idle_sleep_s=0.05)
        except BaseException as err:  # noqa: BLE001 - the assertion below reports it
            raised.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while broker.status(good).state != JobState.COMPLETED and time.monotonic() < deadline:
        assert thread.is_alive(), raised
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive() and raised == []
    assert broker.status(good).state == JobState.COMPLETED
    assert sorted(r["id"] for r in io.read_parts(str(tmp_path / "good" / "out"), "results")) == \
        ["good0", "good1", "good2", "good3"]
    _untouched(broker, bad)
    errors = broker.status(bad, detail=True).errors
    assert errors and {e["reason"] for e in errors} == {"given back"}
