"""tensor_parallel 2 (two rank actors joined by gloo, logical CPUs) gives token-for-token the same greedy
output as tensor_parallel 1, through the whole stack (Redis, Ray, run)."""
import json

import pytest
import yaml

from ziya_batch import io
from ziya_batch.runtime.local import run_job

pytestmark = pytest.mark.slow


def _run(tmp_path, model, inp, tp, redis_url):
    job = tmp_path / f"job-tp{tp}.yaml"
    job.write_text(yaml.safe_dump({
        "name": f"tp{tp}", "model": {"path": str(model), "tensor_parallel": tp}, "input": [str(inp)],
        "sampling": {"max_new_tokens": 8, "temperature": 0}, "shard_size": 16, "output": {"path": str(tmp_path / f"out-tp{tp}"), "records": ["results", "experience"]}}))
    assert run_job(str(job), redis_url=redis_url, progress=False) == 0
    return {(r["id"], tuple(r["response_ids"])) for r in io.read_parts(str(tmp_path / f"out-tp{tp}"), "experience")}


def test_tensor_parallel_2_matches_1(tmp_path, demo_model, redis_url, ray_local):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"第{i}个问题: what is {i} squared?"}) + "\n"
                           for i in range(40)))
    one = _run(tmp_path, demo_model, inp, 1, redis_url)
    two = _run(tmp_path, demo_model, inp, 2, redis_url)
    assert len(one) == 40 and all(len(ids) > 0 for _, ids in one)
    assert two == one
    from ray._private.state import actors       # the GCS's table (the state API needs a dashboard)

    ranks = [a for a in actors().values() if a["ActorClassName"].endswith("TPRankActor")]
    assert len(ranks) == 2                          # the tp=2 job really ran on two rank actors


def test_a_tensor_parallel_replica_serves_jobs_of_two_models(tmp_path, demo_model, redis_url, ray_local):
    """One tensor_parallel 2 replica started with no job (as `ziya-batch worker --tensor-parallel 2` starts
    them) serves two queued jobs of different models: it loads each job's model on both ranks when it claims its
    shards, and each job's tokens equal tensor_parallel 1's on that model."""
    import time

    from ziya_batch.tools.demo_model import write_demo_model
    from ziya_batch.queue import Broker, JobState
    from ziya_batch.runtime.replicas import ReplicaManager
    from ziya_batch.jobs import submit_job
    from ziya_batch.spec import parse_spec

    other = write_demo_model(tmp_path / "other-model", seed=1)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"tell me about {i}"}) + "\n" for i in range(16)))
    want = {}
    for i, m in enumerate((demo_model, other)):
        (tmp_path / f"ref-{i}").mkdir()
        want[m] = _run(tmp_path / f"ref-{i}", m, inp, 1, redis_url)
    assert want[demo_model] != want[other]

    broker = Broker.from_url(redis_url)
    jobs = {}
    for i, m in enumerate((demo_model, other)):
        spec = parse_spec({"name": f"switch{i}", "model": {"path": str(m), "tensor_parallel": 2}, "input": [str(inp)],
                           "sampling": {"max_new_tokens": 8, "temperature": 0}, "shard_size": 4,
                           "output": {"path": str(tmp_path / f"out-{i}"), "records": ["results", "experience"]}})
        jobs[m] = (submit_job(spec, broker).job_id, tmp_path / f"out-{i}")
    manager = ReplicaManager(redis_url, tensor_parallel=2, replicas=1, use_gpus=False, cpu_threads=1)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            manager.reconcile()
            if all(broker.status(j).state == JobState.COMPLETED for j, _ in jobs.values()):
                break
            time.sleep(1)
        assert manager.restarts == 0
    finally:
        manager.stop()
    for m, (job_id, out) in jobs.items():
        assert broker.status(job_id).state == JobState.COMPLETED
        got = {(r["id"], tuple(r["response_ids"])) for r in io.read_parts(str(out), "experience")}
        assert got == want[m]


def test_a_tensor_parallel_run_whose_ranks_cannot_load_the_model_stops_with_the_cause(tmp_path, demo_model, redis_url,
                                                                                       ray_local):
    """The ranks of a tensor-parallel replica load the job's model as they start; where they cannot (a weights
    file cut short here; out of memory on a GPU), every replica dies at once and would be rebuilt forever: `run`
    stops after DEATHS_WITHOUT_PROGRESS deaths in a row with the ranks' own error, and the job stays queued."""
    import shutil

    from ziya_batch.errors import ModelError
    from ziya_batch.queue import Broker
    from ziya_batch.spec import load_spec

    model = tmp_path / "model"
    shutil.copytree(demo_model, model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"q {i}"}) + "\n" for i in range(4)))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "tp-broken", "model": {"path": str(model), "tensor_parallel": 2},
                                   "input": [str(inp)], "output": {"path": str(tmp_path / "out")}}))
    with pytest.raises(ModelError, match=r"replicas died 3 times in a row starting or loading its engine \(.*Error"):
        run_job(str(job), redis_url=redis_url, progress=False, poll_s=0.2)
    st = Broker.from_url(redis_url).status(load_spec(str(job)).identity())
    assert not st.state.is_finished() and st.prompts_done == st.prompts_failed == 0
