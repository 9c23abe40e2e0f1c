"""RL-ready experience through the real worker (no Ray needed): labels carried as metadata, a reward function
and a reward URL summed with the reward model's score, constant-reward groups dropped, top_logprobs, a
reference equal to the policy giving zero KL, and OpenAI-format logprobs."""
import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.ray.test_experience import run_job
from ziya_batch import io
from ziya_batch.tools.demo_model import write_demo_reward_model

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent.parent / "unit" / "reward_fixtures.py"


def _run(tmp_path, redis_url, lines, extra, fmt="ziya"):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    spec = {"name": "rl", "model": {"path": str(tmp_path / "policy")}, "input": [str(inp)], "format": fmt,
            "sampling": {"max_new_tokens": 6, "n": 3, "seed": 5, "temperature": 0.7}, "shard_size": 4, **extra}
    run_job(tmp_path, redis_url, spec)
    return Path(spec["output"]["path"])


class _Judge(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        items = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["items"]
        data = json.dumps({"rewards": [10.0 if it["metadata"].get("constant") else 0.5 for it in items]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_labels_rewards_filters_top_logprobs_and_zero_kl(tmp_path, redis_url, demo_model, judge_url, fmt):
    shutil.copytree(demo_model, tmp_path / "policy")
    write_demo_reward_model(tmp_path / "reward", layout="ziya")
    lines = [{"id": f"q{i}", "prompt": f"问题{i}", "bonus": i, "constant": i % 3 == 0, "tags": ["a", {"b": i}]}
             for i in range(8)]
    out = _run(tmp_path, redis_url, lines, {
        "output": {"path": str(tmp_path / "out"), "format": fmt,
                   "filters": {"drop_constant_reward_groups": True}},
        "experience": {"reference_model": str(tmp_path / "policy"), "reward_model": str(tmp_path / "reward"),
                       "reward_function": f"{FIXTURES}:length_unless_constant", "reward_url": judge_url,
                       "reward_weights": {"model": 0.0, "url": 2.0}, "top_logprobs": 3}})
    manifest = io.read_manifest(str(out))
    assert manifest["spec"]["experience"]["logprobs_mode"] == "temperature"
    if fmt == "jsonl":
        exp = list(io.read_parts(str(out), "experience"))
        results = list(io.read_parts(str(out), "results"))
    else:
        exp = pq.read_table([str(out / p["path"]) for p in manifest["parts"]["experience"]]).to_pylist()
        results = pq.read_table([str(out / p["path"]) for p in manifest["parts"]["results"]]).to_pylist()
        for rec in exp + results:
            rec["metadata"] = json.loads(rec["metadata"])
        for e in exp:
            e["top_logprobs"] = [[[t["id"], t["logprob"]] for t in pos] for pos in e["top_logprobs"]]
            e["rewards"] = {"model": e["rewards"]["model"], "url": e["rewards"]["url"],
                            "length_unless_constant": e["rewards"]["function"]}
    assert len(results) == 24 and {r["id"]: r["metadata"] for r in results}["q4"] == {
        "bonus": 4, "constant": False, "tags": ["a", {"b": 4}]}
    response = {(r["id"], r["sample_index"]): r["response"] for r in results}
    # q0, q3 and q6 have a constant reward by their label; another group is dropped too when its three samples
    # happen to have responses of one length (the line seeds come from the seed and the input's path, which is
    # pytest's tmp_path and so differs between runs)
    same_length = {f"q{i}" for i in range(8) if i % 3 and len({len(response[f"q{i}", k]) for k in range(3)}) == 1}
    assert sorted({e["id"] for e in exp}) == [f"q{i}" for i in range(8) if i % 3 and f"q{i}" not in same_length]
    assert manifest["summary"]["dropped_constant_reward_groups"] == 3 + len(same_length)
    for e in exp:
        i = int(e["id"][1:])
        assert e["metadata"] == {"bonus": i, "constant": False, "tags": ["a", {"b": i}]}
        assert e["rewards"]["length_unless_constant"] == len(response[e["id"], e["sample_index"]]) + i
        assert e["rewards"]["url"] == 0.5 and e["reward_error"] is None
        assert e["reward"] == pytest.approx(e["rewards"]["length_unless_constant"] + 2 * 0.5)
        n = len(e["response_ids"])
        assert len(e["top_logprobs"]) == n and all(len(pos) == 3 for pos in e["top_logprobs"])
        for pos, lp in zip(e["top_logprobs"], e["logprobs"]):
            assert pos[0][1] >= lp - 1e-5 and pos[0][1] >= pos[1][1] >= pos[2][1]
        assert max(abs(k) for k in e["kl"]) < 2e-3 and max(abs(k) for k in e["kl_k3"]) < 1e-5
    kept = exp[0]["id"]
    rewards = [e["reward"] for e in exp if e["id"] == kept]
    assert len(rewards) == 3
    assert all(math.isclose(e["group_reward_mean"], sum(rewards) / 3) for e in exp if e["id"] == kept)


def test_openai_batch_lines_get_the_logprobs_they_ask_for(tmp_path, redis_url, demo_model):
    shutil.copytree(demo_model, tmp_path / "policy")
    lines = [{"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "user_label": "x",
              "body": {"messages": [{"role": "user", "content": "你好"}], "logprobs": True, "top_logprobs": 2}},
             {"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "hi"}]}},
             {"custom_id": "c3", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "hello", "logprobs": 2}}]
    out = _run(tmp_path, redis_url, lines, {"output": {"path": str(tmp_path / "out")},
                                            "sampling": {"max_new_tokens": 5, "n": 1, "seed": 1}},
               fmt="openai-batch")
    by_id = {r["custom_id"]: r["response"]["body"] for r in io.read_parts(str(out), "results")}
    choice = by_id["c1"]["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == by_id["c1"]["usage"]["completion_tokens"] > 0
    for tok in content:
        assert set(tok) == {"token", "logprob", "bytes", "top_logprobs"} and len(tok["top_logprobs"]) == 2
        assert tok["logprob"] <= 0 and bytes(tok["bytes"]).decode("utf-8", "replace") == tok["token"]
        assert tok["top_logprobs"][0]["logprob"] >= tok["logprob"] - 1e-5
    assert by_id["c2"]["choices"][0]["logprobs"] is None
    legacy = by_id["c3"]["choices"][0]["logprobs"]
    assert len(legacy["tokens"]) == len(legacy["token_logprobs"]) == len(legacy["top_logprobs"]) > 0
