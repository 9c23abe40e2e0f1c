"""A replica claims only shards of jobs it can serve: jobs of its own tensor_parallel. Claiming a shard only to
fail it burned one of the shard's attempts each time, and enough of them dead-lettered lines that a fitting
replica would have generated. The demo model on the CPU, a real Redis, local output."""
import collections
import json

from ziya_batch import io
from ziya_batch.work.models import ModelCache, TPModelCache
from ziya_batch.jobs import submit_job
from ziya_batch.work.worker import Worker
from ziya_batch.spec import parse_spec

N_LINES, SHARD_SIZE = 12, 4


def _submit(tmp_path, model, broker, name, priority=0, **model_fields):
    inp = tmp_path / f"{name}.jsonl"
    inp.write_text("".join(json.dumps({"id": f"{name}{i}", "prompt": f"question {i}"}) + "\n" for i in range(N_LINES)))
    spec = parse_spec({"name": name, "model": {"path": str(model), **model_fields}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 2, "seed": 1}, "output": {"path": str(tmp_path / name)},
                       "shard_size": SHARD_SIZE, "priority": priority})
    return spec, submit_job(spec, broker).job_id


def _untouched(broker, job_id):
    """Every shard still pending with no attempt spent and no error recorded."""
    assert broker.shard_counts(job_id)["pending"] == N_LINES // SHARD_SIZE
    shards = [json.loads(v) for v in broker.client.hvals(broker.keys.shards(job_id))]
    assert [s.get("attempts", 0) for s in shards] == [0] * len(shards)
    assert broker.client.llen(broker.keys.errors(job_id)) == 0


def _ids(out):
    return collections.Counter(r["id"] for r in io.read_parts(str(out), "results"))


def test_a_tensor_parallel_replica_leaves_other_shapes_alone(tmp_path, demo_model, broker):
    """A replica of 2 ranks claims nothing of a tensor_parallel 1 job (it would switch to that model and shard
    it against the job's spec); a one-device replica then serves the job."""
    _, job = _submit(tmp_path, demo_model, broker, "one")
    tp_worker = Worker(broker, worker_id="tp", device="cpu", models=TPModelCache("cpu", 2, driver=None))
    assert tp_worker.run_until_idle() == 0
    _untouched(broker, job)
    Worker(broker, worker_id="one", device="cpu").run_until_idle()
    assert _ids(tmp_path / "one") == collections.Counter(f"one{i}" for i in range(N_LINES))


def test_a_one_device_replica_leaves_a_tensor_parallel_job_to_its_replicas(tmp_path, demo_model, broker):
    _, job = _submit(tmp_path, demo_model, broker, "tp2", tensor_parallel=2)
    assert Worker(broker, worker_id="one", device="cpu").run_until_idle() == 0
    _untouched(broker, job)


def test_skipped_jobs_do_not_count_against_the_claim_scan(tmp_path, demo_model, redis_client):
    """With more jobs it cannot serve ahead of it than a claim looks through, a worker still finds the job it
    can serve behind them."""
    from ziya_batch.queue import Broker

    broker = Broker(redis_client, prefix="zbscan", claim_scan=2)
    skipped = [_submit(tmp_path, demo_model, broker, f"tp{i}", tensor_parallel=2)[1] for i in range(3)]
    _, job = _submit(tmp_path, demo_model, broker, "mine")
    lease = broker.claim("one", accept=lambda job_id: job_id not in skipped)
    assert lease is not None and lease.job_id == job


def test_a_worker_lets_go_of_one_model_before_loading_the_next(tmp_path, demo_model, broker):
    """Between jobs of two models nothing may keep the first engine alive while the second loads (its weights
    and KV cache would stay on the device): the shard stream held it."""
    import gc
    import weakref

    alive_at_load = []

    class Cache(ModelCache):
        def _load(self, spec):
            gc.collect()
            alive_at_load.append([r() is not None for r in refs])
            engine = super()._load(spec)
            refs.append(weakref.ref(engine))
            return engine

    refs = []
    _submit(tmp_path, demo_model, broker, "first")
    _submit(tmp_path, demo_model, broker, "second", dtype="bfloat16")
    Worker(broker, worker_id="one", device="cpu", models=Cache("cpu")).run_until_idle()
    # the worker keeps the loaded model while its job has shards (two loads, not one per shard), and the
    # second load found the first engine gone
    assert alive_at_load == [[], [False]]
    assert _ids(tmp_path / "second") == collections.Counter(f"second{i}" for i in range(N_LINES))


def test_status_says_when_no_live_worker_serves_a_jobs_shape(tmp_path, demo_model, broker):
    from ziya_batch.jobs import unserved_note

    _, job = _submit(tmp_path, demo_model, broker, "tp2", tensor_parallel=2)
    assert "tensor_parallel 2" in unserved_note(broker, job)                    # nobody registered at all
    Worker(broker, worker_id="one", device="cpu")                               # a one-device replica registers
    assert "--tensor-parallel 2" in unserved_note(broker, job)
    Worker(broker, worker_id="tp", device="cpu", models=TPModelCache("cpu", 2, driver=None),
           extra_info={"tensor_parallel": 2})
    assert unserved_note(broker, job) is None
    _, job1 = _submit(tmp_path, demo_model, broker, "one")
    assert unserved_note(broker, job1) is None                                  # "one" serves tensor_parallel 1
    # the one worker that serves it could not load the job's engine: the note says so, and why
    broker.note_cannot_load("one", job1, "OutOfMemoryError: CUDA out of memory")
    note = unserved_note(broker, job1)
    assert "none of the 1 live worker(s)" in note and "CUDA out of memory" in note
    broker.note_cannot_load("one", job1, None)
    assert unserved_note(broker, job1) is None


def test_a_claim_prefers_the_loaded_model_within_a_priority_only(tmp_path, demo_model, broker):
    _, first = _submit(tmp_path, demo_model, broker, "first")
    _, loaded = _submit(tmp_path, demo_model, broker, "loaded")
    assert broker.claim("w", prefer=lambda j: j == loaded).job_id == loaded        # ahead of an equal priority
    _, urgent = _submit(tmp_path, demo_model, broker, "urgent", priority=5)
    assert broker.claim("w", prefer=lambda j: j == loaded).job_id == urgent        # not of a higher one
    assert broker.claim("w").job_id == urgent                                     # no preference: as before
    assert first != loaded


def test_jobs_of_equal_priority_still_take_turns_when_the_preference_runs_out(tmp_path, demo_model, broker,
                                                                             monkeypatch):
    """The preference for the loaded model lasts STICKY_CLAIMS claims in a row; then a claim in the fair order
    may switch models, so a worker does not keep one model's job to itself while another of equal priority
    waits (here: 2 claims, so the 3-shard jobs interleave and take more than one load each)."""
    from ziya_batch.work import worker as worker_mod

    monkeypatch.setattr(worker_mod, "STICKY_CLAIMS", 1)
    loads = []

    class Cache(ModelCache):
        def _load(self, spec):
            loads.append(spec.name)
            return super()._load(spec)

    _submit(tmp_path, demo_model, broker, "first")
    _submit(tmp_path, demo_model, broker, "second", dtype="bfloat16")
    Worker(broker, worker_id="one", device="cpu", models=Cache("cpu"), max_in_flight=1).run_until_idle()
    assert len(loads) > 2 and set(loads) == {"first", "second"}, loads
    assert _ids(tmp_path / "second") == collections.Counter(f"second{i}" for i in range(N_LINES))


def test_a_replica_that_breaks_while_loading_leaves_no_heartbeat_behind(tmp_path, demo_model, broker):
    """ReplicaBroken (a load failed after the other ranks had started it) ends the worker, not just the shard:
    the shard's heartbeat must stop with it (one left running would hold the lease for as long as the process
    lives), and the shard goes back untried at once, not through its lease's expiry (a counted retry)."""
    import threading

    import pytest

    from ziya_batch.work.models import ReplicaBroken

    class Broken(ModelCache):
        def _load(self, spec):
            raise ReplicaBroken("rank 0 failed to load after the other ranks started")

    _, job = _submit(tmp_path, demo_model, broker, "broken")
    before = sum(t.name == "lease-heartbeat" for t in threading.enumerate())
    with pytest.raises(ReplicaBroken):
        Worker(broker, worker_id="w", device="cpu", models=Broken("cpu")).run_until_idle()
    assert sum(t.name == "lease-heartbeat" and t.is_alive() for t in threading.enumerate()) == before
    st = broker.status(job, detail=True)
    assert st.shards["leased"] == 0 and st.shards["pending"] == st.shards_total and st.retries == 0
    assert st.errors[0]["reason"] == "given back" and "ReplicaBroken" in st.errors[0]["message"]


def test_a_worker_keeps_a_bounded_number_of_job_specs(tmp_path, demo_model, broker, monkeypatch):
    from ziya_batch.work import worker as worker_mod

    monkeypatch.setattr(worker_mod, "SPECS_KEPT", 2)
    jobs = [_submit(tmp_path, demo_model, broker, f"j{i}", tensor_parallel=2)[1] for i in range(5)]
    w = Worker(broker, worker_id="one", device="cpu")
    assert w.run_until_idle() == 0                      # it read every job's spec to skip it
    assert len(w._specs) <= 2 and w.spec_for(jobs[0]).name == "j0"
