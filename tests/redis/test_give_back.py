"""A worker that cannot load a job's engine (out of memory, a broken checkpoint on its node) gives the shard back
untried: no retry is counted, the shard is not isolated, nothing becomes an error line, and a worker that can load
the engine generates it. The demo model on the CPU, a real Redis, local output; exact output ids."""
import json
import time

from ziya_batch import io
from ziya_batch.jobs import submit_job
from ziya_batch.queue import JobState
from ziya_batch.work import worker as worker_mod
from ziya_batch.work.models import ModelCache
from ziya_batch.work.worker import Worker
from ziya_batch.spec import parse_spec


class NoRoom(ModelCache):
    """A card too small for the job: every engine load runs out of memory."""

    def __init__(self):
        super().__init__("cpu")
        self.loads = 0

    def engine(self, spec):
        self.loads += 1
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore lines of the allocator's text")


def _spec(tmp_path, model, n_lines=8, shard_size=2):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(n_lines)))
    return parse_spec({"name": "give-back", "model": {"path": str(model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 4, "ignore_eos": True, "seed": 1},
                       "output": {"path": str(tmp_path / "out")}, "shard_size": shard_size,
                       "reliability": {"max_retries": 1}})


def test_a_worker_that_cannot_load_the_engine_gives_shards_back_untried(tmp_path, demo_model, broker, monkeypatch):
    spec = _spec(tmp_path, demo_model, n_lines=2)            # one shard
    job = submit_job(spec, broker).job_id
    small = Worker(broker, worker_id="small-card", models=NoRoom(), max_in_flight=1)
    for attempt in range(3):              # more attempts than max_retries allows failures: none of them counts
        # no backoff between this worker's attempts, except after the last (below)
        monkeypatch.setattr(worker_mod, "LOAD_RETRY_S", 3600.0 if attempt == 2 else 0.0)
        deadline = time.monotonic() + 5   # each waits out the shard's backoff (0.05 s here) first
        while not small.run_once():
            assert time.monotonic() < deadline
    st = broker.status(job, detail=True)
    assert st.retries == 0 and st.dead_shards == 0 and st.prompts_failed == 0
    assert st.shards["pending"] == 1 and small.models.loads == 3
    assert all(e["reason"] == "given back" and "CUDA out of memory" in e["message"] for e in st.errors)
    shard = json.loads(broker.client.hget(broker.keys.shards(job), "0"))
    assert not shard.get("isolate") and not shard.get("failures")
    (info,) = [w for w in broker.worker_infos() if w.worker_id == "small-card"]
    assert info.cannot_load == {job: "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"}
    # within its backoff the worker leaves the job to others instead of loading again
    time.sleep(0.2)
    assert not small.run_once() and small.models.loads == 3
    time.sleep(0.2)                       # the given-back shard's backoff (backoff_base_s: 0.05 s here)
    Worker(broker, device="cpu").run_until_idle()
    st = broker.status(job)
    assert st.state == JobState.COMPLETED and st.retries == 0 and st.prompts_failed == 0
    assert [r["id"] for r in io.read_parts(str(tmp_path / "out"), "results")] == ["p0", "p1"]
    assert list(io.read_parts(str(tmp_path / "out"), "errors")) == []


def test_a_worker_that_loads_the_engine_again_clears_its_note(tmp_path, demo_model, broker, monkeypatch):
    spec = _spec(tmp_path, demo_model, n_lines=4)
    job = submit_job(spec, broker).job_id
    models = NoRoom()
    w = Worker(broker, worker_id="flaky", models=models, max_in_flight=1)
    assert w.run_once()
    oom = "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert [x.cannot_load for x in broker.worker_infos() if x.worker_id == "flaky"] == [{job: oom}]
    # the job is resubmitted with a smaller memory share (another engine key), and that one loads
    submit_job(spec.model_copy(update={"engine": spec.engine.model_copy(update={"gpu_memory_fraction": 0.5})}),
               broker)
    monkeypatch.setattr(worker_mod, "SPEC_REREAD_S", 0.0)
    w.models = ModelCache("cpu")
    monkeypatch.setattr(worker_mod, "LOAD_RETRY_S", 0.0)
    time.sleep(0.2)
    w.run_until_idle()
    assert broker.status(job).state == JobState.COMPLETED
    assert [x.cannot_load for x in broker.worker_infos() if x.worker_id == "flaky"] == [{}]


def test_a_shard_claimed_on_a_stale_spec_is_given_back_when_the_spec_no_longer_fits(tmp_path, demo_model, broker,
                                                                                       monkeypatch):
    """The claim filter looked at the job's spec as this worker last read it; the job was resubmitted on
    tensor_parallel 2 meanwhile: the worker reads the spec again at the start, and gives the shard back untried."""
    spec = _spec(tmp_path, demo_model, n_lines=2)
    job = submit_job(spec, broker).job_id
    w = Worker(broker, device="cpu", max_in_flight=1)
    assert w.spec_for(job).model.tensor_parallel == 1
    submit_job(spec.model_copy(update={"model": spec.model.model_copy(update={"tensor_parallel": 2})}), broker)
    monkeypatch.setattr(w, "_serves", lambda job_id: True)          # the filter's stale view
    monkeypatch.setattr(worker_mod, "SPEC_REREAD_S", 0.0)
    assert w.run_once()
    st = broker.status(job, detail=True)
    assert st.retries == 0 and st.shards["pending"] == 1 and st.prompts_done == 0
    assert st.errors[0]["reason"] == "given back" and "model.tensor_parallel 2" in st.errors[0]["message"]


def test_an_engine_out_of_memory_mid_step_gives_the_shards_in_flight_back(tmp_path, demo_model, broker, monkeypatch):
    """Out of memory in a step is not a line's failure: the shards in flight go back untried (no line becomes
    generation_failed, as bisecting a failed step would make them), and run again once there is room."""
    from ziya_batch.engine.engine import LLMEngine

    spec = _spec(tmp_path, demo_model, n_lines=6)
    job = submit_job(spec, broker).job_id
    w = Worker(broker, device="cpu", max_in_flight=2)
    step = LLMEngine.step

    def no_room(self):
        raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
    monkeypatch.setattr(LLMEngine, "step", no_room)
    monkeypatch.setattr(worker_mod, "LOAD_RETRY_S", 0.0)        # no backoff: the test retries at once
    assert w.run_once()
    st = broker.status(job, detail=True)
    assert st.retries == 0 and st.prompts_failed == 0 and st.shards["leased"] == 0 and st.shards["pending"] == 3
    assert {e["reason"] for e in st.errors} == {"given back"}
    assert "out of memory" in st.errors[0]["message"]
    monkeypatch.setattr(LLMEngine, "step", step)
    monkeypatch.setattr(worker_mod, "LOAD_RETRY_S", 0.0)
    time.sleep(0.2)
    w.run_until_idle()
    st = broker.status(job)
    assert st.state == JobState.COMPLETED and st.retries == 0 and st.prompts_failed == 0
    assert [r["id"] for r in io.read_parts(str(tmp_path / "out"), "results")] == [f"p{i}" for i in range(6)]


def test_out_of_memory_while_generating_a_shard_alone_gives_it_back_too(tmp_path, demo_model, broker, monkeypatch):
    """A shard runs alone (isolate mode) after a failure; an out-of-memory there is not bisected down to lines
    marked generation_failed: the shard goes back untried."""
    from ziya_batch.engine.engine import LLMEngine

    spec = _spec(tmp_path, demo_model, n_lines=4, shard_size=4)
    job = submit_job(spec, broker).job_id
    lease = broker.claim("crashed")
    assert broker.fail(lease, "worker crashed") == "retry"               # now isolated, one failure counted
    time.sleep(0.2)
    step = LLMEngine.step

    def no_room(self):
        raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
    monkeypatch.setattr(LLMEngine, "step", no_room)
    monkeypatch.setattr(worker_mod, "LOAD_RETRY_S", 0.0)        # no backoff: the test retries at once
    w = Worker(broker, device="cpu", max_in_flight=1)
    assert w.run_once()
    st = broker.status(job, detail=True)
    assert st.prompts_failed == 0 and st.shards["pending"] == 1 and st.retries == 1
    assert st.errors[0]["reason"] == "given back" and "out of memory" in st.errors[0]["message"]
    monkeypatch.setattr(LLMEngine, "step", step)
    monkeypatch.setattr(worker_mod, "LOAD_RETRY_S", 0.0)
    time.sleep(0.2)
    w.run_until_idle()
    assert broker.status(job).state == JobState.COMPLETED
    assert [r["id"] for r in io.read_parts(str(tmp_path / "out"), "results")] == [f"p{i}" for i in range(4)]


def test_a_shard_given_back_is_never_dead_lettered_even_past_a_lowered_retry_limit(tmp_path, demo_model, broker):
    spec = _spec(tmp_path, demo_model, n_lines=2)
    spec = spec.model_copy(update={"reliability": spec.reliability.model_copy(update={"max_retries": 3})})
    job = submit_job(spec, broker).job_id
    for _ in range(2):
        assert broker.fail(broker.claim("w"), "crashed") == "retry"
        time.sleep(0.3)
    lowered = spec.model_copy(update={"reliability": spec.reliability.model_copy(update={"max_retries": 0})})
    submit_job(lowered, broker)                                              # 2 failures, 0 allowed now
    assert broker.give_back(broker.claim("w"), "engine would not load") == "retry"
    assert broker.status(job).dead_shards == 0


def test_a_worker_backs_off_longer_after_each_failed_load_of_one_engine(tmp_path, demo_model, broker, monkeypatch):
    monkeypatch.setattr(worker_mod, "LOAD_RETRY_S", 10.0)
    monkeypatch.setattr(worker_mod, "LOAD_RETRY_MAX_S", 35.0)
    spec = _spec(tmp_path, demo_model, n_lines=2)
    w = Worker(broker, worker_id="small-card", models=NoRoom())
    key = __import__("ziya_batch.work.models", fromlist=["engine_key"]).engine_key(spec)
    backoffs = []
    for _ in range(4):
        w._backoff.failed(key)
        backoffs.append(w._backoff.backoff_s(key))
    assert backoffs == [10.0, 20.0, 35.0, 35.0] and w._backoff.blocks(spec)


def test_out_of_memory_loading_the_reference_model_gives_the_shard_back(tmp_path, demo_model, broker, monkeypatch):
    """A reference model for the experience records is a second model on the same device: running out of memory
    loading it, after the shard's lines were generated, is no line's failure either."""
    spec = _spec(tmp_path, demo_model, n_lines=2)
    spec = spec.model_copy(update={"experience": spec.experience.model_copy(
        update={"reference_model": str(demo_model)})})
    job = submit_job(spec, broker).job_id

    def no_room(self, spec):
        raise RuntimeError("CUDA out of memory. Tried to allocate 26.00 GiB")
    monkeypatch.setattr(ModelCache, "reference", no_room)
    monkeypatch.setattr(worker_mod, "LOAD_RETRY_S", 0.0)
    w = Worker(broker, device="cpu", max_in_flight=1)
    assert w.run_once()
    st = broker.status(job, detail=True)
    assert st.prompts_failed == 0 and st.retries == 0 and st.shards["pending"] == 1 and st.dead_shards == 0
    assert st.errors[0]["reason"] == "given back" and "out of memory" in st.errors[0]["message"]


class TwoRanks(ModelCache):
    """Rank 0's cache of a tensor-parallel replica, as far as the worker can tell (world_size > 1); the engine
    itself is a plain CPU one here."""
    world_size = 2


def test_a_tensor_parallel_replica_out_of_memory_mid_step_gives_back_then_goes_down(tmp_path, demo_model, broker,
                                                                                    monkeypatch):
    """Its other ranks may be stuck in the failed step: the replica gives every shard back untried and raises
    ReplicaBroken (its manager starts a new one), even when Redis fails it while it gives back."""
    import pytest
    import redis

    from ziya_batch.engine.engine import LLMEngine
    from ziya_batch.work.models import ReplicaBroken

    spec = _spec(tmp_path, demo_model, n_lines=4)
    job = submit_job(spec, broker).job_id

    def no_room(self):
        raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
    monkeypatch.setattr(LLMEngine, "step", no_room)
    w = Worker(broker, device="cpu", models=TwoRanks("cpu"), max_in_flight=2)
    monkeypatch.setattr(w.models, "can_serve", lambda spec: True)
    with pytest.raises(ReplicaBroken, match="out of memory"):
        w.run_once()
    st = broker.status(job, detail=True)
    assert st.shards["leased"] == 0 and st.retries == 0 and st.prompts_failed == 0
    assert {e["reason"] for e in st.errors} == {"given back"}
    # the same with Redis refusing the give-back: ReplicaBroken still ends the replica (the lease then expires)
    time.sleep(0.2)
    w2 = Worker(broker, device="cpu", models=TwoRanks("cpu"), max_in_flight=1)
    monkeypatch.setattr(w2.models, "can_serve", lambda spec: True)

    def refused(*a, **k):
        raise redis.ConnectionError("Redis went away")
    monkeypatch.setattr(broker, "give_back", refused)
    with pytest.raises(ReplicaBroken):
        w2.run_once()
