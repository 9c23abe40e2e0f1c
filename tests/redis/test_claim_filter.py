"""A replica claims only shards of jobs it can serve: jobs of its own tensor_parallel. Claiming a shard only to
fail it burned one of the shard's attempts each time, and enough of them dead-lettered lines that a fitting
replica would have generated. The demo model on the CPU, a real Redis, local output."""
import collections
import json

from ziya_batch import io
from ziya_batch.runtime.models import TPModelCache
from ziya_batch.runtime.submit import submit_job
from ziya_batch.runtime.worker import Worker
from ziya_batch.spec import parse_spec

N_LINES, SHARD_SIZE = 12, 4


def _submit(tmp_path, model, broker, name, **model_fields):
    inp = tmp_path / f"{name}.jsonl"
    inp.write_text("".join(json.dumps({"id": f"{name}{i}", "prompt": f"question {i}"}) + "\n" for i in range(N_LINES)))
    spec = parse_spec({"name": name, "model": {"path": str(model), **model_fields}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 2, "seed": 1}, "output": {"path": str(tmp_path / name)},
                       "shard_size": SHARD_SIZE})
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
