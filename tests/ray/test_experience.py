"""Experience jobs through the real worker (no Ray needed): reference logprobs and KL, rewards, GRPO group
fields, SFT filters and Parquet parts."""
import collections
import json
import math

import pyarrow.parquet as pq
import pytest
import yaml

from ziya_batch import io
from ziya_batch.jobs import submit_job
from ziya_batch.queue import Broker, JobState
from ziya_batch.work.worker import Worker
from ziya_batch.spec import load_spec
from ziya_batch.tools.demo_model import write_demo_reference_model, write_demo_reward_model

pytestmark = pytest.mark.slow


def run_job(tmp_path, redis_url, spec: dict) -> None:
    """Submits the spec (as a YAML file, as a user would) and runs a CPU worker until the job has completed."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec, allow_unicode=True))
    broker = Broker.from_url(redis_url)
    job_id = submit_job(load_spec(job), broker).job_id
    Worker(broker, device="cpu").run_until_idle()
    assert broker.status(job_id).state == JobState.COMPLETED


def _run(tmp_path, redis_url, extra):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"写一句关于{i}的话"}) + "\n" for i in range(12)))
    spec = {"name": "exp", "model": {"path": str(tmp_path / "policy")}, "input": [str(inp)],
            "sampling": {"max_new_tokens": 6, "n": 3, "seed": 5}, "output": {"path": str(tmp_path / "out")},
            "shard_size": 5, **extra}
    run_job(tmp_path, redis_url, spec)
    return tmp_path / "out"


@pytest.fixture
def models(tmp_path, demo_model):
    import shutil

    shutil.copytree(demo_model, tmp_path / "policy")
    write_demo_reference_model(tmp_path / "ref")
    write_demo_reward_model(tmp_path / "reward", layout="ziya")
    return tmp_path


def test_reference_reward_and_group_fields(models, redis_url):
    out = _run(models, redis_url, {"experience": {"reference_model": str(models / "ref"),
                                                  "reward_model": str(models / "reward")},
                                   "output": {"path": str(models / "out"),
                                              "filters": {"min_reward": -1e9, "dedup": True}}})
    exp = list(io.read_parts(str(out), "experience"))
    assert collections.Counter(e["id"] for e in exp) == collections.Counter({f"e{i}": 3 for i in range(12)})
    for e in exp:
        n = len(e["response_ids"])
        assert len(e["logprobs"]) == len(e["ref_logprobs"]) == len(e["kl"]) == len(e["kl_k3"]) == n
        assert all(math.isclose(k, lp - rp, abs_tol=1e-6) for k, lp, rp in zip(e["kl"], e["logprobs"], e["ref_logprobs"]))
        assert all(k3 >= -1e-9 for k3 in e["kl_k3"])          # k3 is non-negative by construction
        assert isinstance(e["reward"], float) and e["total_length"] == len(e["prompt_ids"]) + n
    for gid, group in collections.Counter(e["group_id"] for e in exp).items():
        rewards = [e["reward"] for e in exp if e["group_id"] == gid]
        mean = sum(rewards) / 3
        assert group == 3
        assert all(math.isclose(e["group_reward_mean"], mean, rel_tol=1e-9) for e in exp if e["group_id"] == gid)
    sft = list(io.read_parts(str(out), "sft"))
    assert 0 < len(sft) <= len(exp)


def test_parquet_output_and_reward_threshold(models, redis_url):
    out = _run(models, redis_url, {"experience": {"reward_model": str(models / "reward")},
                                   "output": {"path": str(models / "out"), "format": "parquet",
                                              "filters": {"min_reward": 1e9}}})
    manifest = io.read_manifest(str(out))
    files = [str(out / p["path"]) for p in manifest["parts"]["experience"]]
    table = pq.read_table(files)
    assert table.num_rows == 36 and table.column("ref_logprobs").null_count == 36
    assert table.column("reward").null_count == 0
    assert manifest["records"].get("sft", 0) == 0             # no reward reaches 1e9: every SFT sample dropped
