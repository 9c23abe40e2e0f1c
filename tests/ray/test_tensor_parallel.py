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
