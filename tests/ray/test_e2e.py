"""A real job end to end: a private redis-server, a local Ray, the demo model, local output."""
import collections
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from ziya_batch import io
from ziya_batch.runtime.local import run_job

pytestmark = pytest.mark.slow


def _write_inputs(path: Path, n_good: int) -> tuple[list[str], list[str]]:
    """n_good valid lines (Chinese and English, single and multi-turn) and a handful of bad ones."""
    good, bad = [], []
    line_no = 0
    with path.open("w", encoding="utf-8") as f:
        for i in range(n_good):
            if i % 3 == 0:
                rec = {"id": f"g{i}", "messages": [{"role": "user", "content": f"你好 {i}"},
                                                   {"role": "assistant", "content": "你好!"},
                                                   {"role": "user", "content": "写一首诗"}]}
            elif i % 3 == 1:
                rec = {"id": f"g{i}", "prompt": f"帮我写一份去西安的旅游计划 {i}"}
            else:
                rec = {"id": f"g{i}", "prompt": f"Explain recursion, case {i}."}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            line_no += 1
            good.append(f"g{i}")
            if i in (10, 500, 777):
                f.write("{this is not json\n")
                line_no += 1
                bad.append(f"{path}:{line_no}")   # a line without a readable id gets <file>:<line>
            if i == 300:
                f.write('{"id": "b-empty", "prompt": "  "}\n')
                line_no += 1
                bad.append("b-empty")
            if i == 600:
                f.write('{"id": "b-noprompt", "text": "x"}\n')
                line_no += 1
                bad.append("b-noprompt")
    return good, bad


def _job(tmp_path: Path, model_dir: Path, inputs: list[str], n: int = 2, **extra) -> Path:
    spec = {"name": "e2e", "model": {"path": str(model_dir)}, "input": inputs,
            "sampling": {"max_new_tokens": 4, "n": n, "seed": 7},
            "output": {"path": str(tmp_path / "out")}, "shard_size": 128, **extra}
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return p


def _lines(out: Path, kind: str) -> list[dict]:
    return list(io.read_parts(str(out), kind))


def test_thousand_lines_n2_exact_multiset(tmp_path, demo_model, redis_url, ray_local):
    inp = tmp_path / "prompts.jsonl"
    good, bad = _write_inputs(inp, 1000)
    job = _job(tmp_path, demo_model, [str(inp)])
    assert run_job(str(job), redis_url=redis_url, progress=False) == 0
    out = tmp_path / "out"
    results = _lines(out, "results")
    assert collections.Counter(r["id"] for r in results) == collections.Counter({g: 2 for g in good})
    assert collections.Counter((r["id"], r["sample_index"]) for r in results) == \
        collections.Counter({(g, i): 1 for g in good for i in range(2)})
    errors = _lines(out, "errors")
    assert collections.Counter(e["id"] for e in errors) == collections.Counter(bad)
    codes = collections.Counter(e["error"]["code"] for e in errors)
    assert codes == {"invalid_json": 3, "empty_prompt": 1, "missing_prompt": 1}
    assert all(e["file"] == str(inp) and e["line"] >= 1 for e in errors)
    exp = _lines(out, "experience")
    assert len(exp) == 2000 and all(len(e["response_ids"]) == len(e["logprobs"]) for e in exp)
    sft = _lines(out, "sft")
    assert len(sft) == 2000 and any("conversations" in s for s in sft) and any("prompt" in s for s in sft)
    for r in results:
        assert r["finish_reason"] in ("stop", "length") and r["usage"]["completion_tokens"] <= 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["prompts"] == 1000 and manifest["records"]["results"] == 2000
    all_parts = [p for rows in manifest["parts"].values() for p in rows]
    assert len({p["path"] for p in all_parts}) == len(all_parts) == 4 * 8   # 4 kinds x 8 shards (1,005 lines of 128)
    for part in all_parts:
        data = (out / part["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == part["sha256"]
        assert data.count(b"\n") == part["lines"]


def test_rerun_of_completed_job_changes_nothing(tmp_path, demo_model, redis_url, ray_local):
    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"id": f"x{i}", "prompt": f"hi {i}"}) + "\n" for i in range(40)))
    job = _job(tmp_path, demo_model, [str(inp)], n=1, shard_size=16)
    assert run_job(str(job), redis_url=redis_url, progress=False) == 0
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    assert run_job(str(job), redis_url=redis_url, progress=False) == 0
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before


def test_openai_batch_job_writes_openai_lines(tmp_path, demo_model, redis_url, ray_local):
    inp = tmp_path / "batch.jsonl"
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "ziya", "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 3}}
             for i in range(20)]
    lines.append({"custom_id": "req-bad", "method": "POST", "url": "/v1/chat/completions", "body": {}})
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    job = _job(tmp_path, demo_model, [str(inp)], n=1, format="openai-batch")
    assert run_job(str(job), redis_url=redis_url, progress=False) == 0
    res = _lines(tmp_path / "out", "results")
    assert sorted(r["custom_id"] for r in res) == sorted(f"req-{i}" for i in range(20))
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in res)
    assert all(r["response"]["body"]["object"] == "chat.completion" for r in res)
    errs = _lines(tmp_path / "out", "errors")
    assert [e["custom_id"] for e in errs] == ["req-bad"] and errs[0]["error"]["code"] == "missing_prompt"


def test_a_run_whose_engine_cannot_load_stops_with_the_reason_and_resumes_once_fixed(tmp_path, demo_model, redis_url):
    """A checkpoint this node cannot load (here: its weights file cut short; on a GPU, an engine that runs out of
    memory): `run` does not turn the job's lines into errors. Its replica gives every shard back untried, the run
    stops with one error naming the cause, and the job stays queued; once the model loads, the same command
    resumes it and every id comes out once."""
    import shutil

    from ziya_batch.errors import ModelError
    from ziya_batch.queue import Broker, JobState
    from ziya_batch.spec import load_spec

    model = tmp_path / "model"
    shutil.copytree(demo_model, model)
    weights = next(model.glob("*.safetensors"))
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"hello {i}"}) + "\n" for i in range(6)))
    job = _job(tmp_path, model, [str(inp)], n=1, shard_size=2, reliability={"max_retries": 0})
    with pytest.raises(ModelError, match="engine would not load, or ran out of memory, on every one of its 1 replica"):
        run_job(str(job), redis_url=redis_url, progress=False, num_workers=1, poll_s=0.2)
    st = Broker.from_url(redis_url).status(load_spec(str(job)).identity())
    assert not st.state.is_finished() and st.retries == 0 and st.prompts_failed == 0 and st.dead_shards == 0
    weights.write_bytes(whole)
    assert run_job(str(job), redis_url=redis_url, progress=False, num_workers=1, poll_s=0.2) == 0
    out = tmp_path / "out"
    assert sorted(r["id"] for r in _lines(out, "results")) == [f"q{i}" for i in range(6)]
    assert _lines(out, "errors") == []
    assert Broker.from_url(redis_url).status(load_spec(str(job)).identity()).state == JobState.COMPLETED
