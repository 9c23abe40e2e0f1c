"""Fixtures every suite may use. Each suite's own conftest.py adds its services and marks its tests:
tests/unit starts nothing, tests/redis a redis-server (`redis`), tests/s3 a local S3 (`s3`), tests/ray a
local Ray (`ray`), tests/gpu needs CUDA (`gpu`)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ziya_batch import io
from ziya_batch.prompts import build_prompt
from ziya_batch.records import (LineFailure, LineResult, PromptLine, SampleOutput, experience_record, result_record,
                                sft_record)
from ziya_batch.spec import SamplingSpec

FINISH = ("stop", "length")


def _shard_records(index: int, per_shard: int) -> dict[str, list[dict]]:
    results, experience, errors = [], [], []
    for j in range(per_shard):
        i = index * per_shard + j
        prompt_tokens, completion_tokens = 10 + i % 50, 5 + (i * 7) % 120
        for s in range(2):                               # n = 2 samples per prompt
            results.append({"id": f"p{i}", "sample_index": s, "prompt": "q", "response": "a",
                            "finish_reason": FINISH[(i + s) % 2],
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens + s}})
            experience.append({"id": f"p{i}", "sample_index": s, "reward": (i % 20) / 10 - 1.0 + s * 0.05,
                               "response_length": completion_tokens + s})
    if index % 2 == 0:
        errors.append({"id": f"bad{index}", "file": "in.jsonl", "line": index, "error": {"code": "invalid_json", "message": "x"}})
    if index == 3:
        errors.append({"id": "bad-r", "file": "in.jsonl", "line": 99, "error": {"code": "retries_exhausted", "message": "y"}})
    return {"results": results, "experience": experience, "errors": errors}


def _make_output(out: Path, shards: int = 4, per_shard: int = 25, manifest: bool = True, t0: float = 1.7e9) -> Path:
    """A job output as workers leave it: staged and promoted parts, commit markers a few seconds apart."""
    markers = {}
    for index in range(shards):
        parts = _shard_records(index, per_shard)
        io.stage_shard(str(out), index, 1, parts)
        stats = {"prompts_done": per_shard, "prompts_failed": len(parts["errors"]), "samples": 2 * per_shard,
                 "output_tokens": sum(r["usage"]["completion_tokens"] for r in parts["results"])}
        markers[index] = io.promote_shard(str(out), index, 1, stats=stats)
        os.utime(out / "_committed" / f"part-{index:05d}.json", (t0 + 10 * (index + 1), t0 + 10 * (index + 1)))
    if manifest:
        io.write_manifest(str(out), '{"name": "report-test"}', {"job_id": "job123", "state": "completed"}, markers)
    return out


@pytest.fixture(scope="session")
def job_output():
    """job_output(out, shards=4, per_shard=25, manifest=True, t0=1.7e9) -> Path: a job output with committed
    parts (n = 2, some error lines) as the report reads it."""
    return _make_output


def _line_result(i: int, multi_turn: bool = False, n: int = 2, ref: bool = True) -> LineResult:
    if multi_turn:
        messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                    {"role": "user", "content": f"question {i}"}]
        line = PromptLine(id=f"m{i}", file="in.jsonl", line=i, text="...", sampling=SamplingSpec(),
                          messages=messages)
    else:
        line = PromptLine(id=f"s{i}", file="in.jsonl", line=i, text=build_prompt(f"写一首诗 {i}"),
                          sampling=SamplingSpec(), query=f"写一首诗 {i}")
    samples = [SampleOutput(index=k, token_ids=[5, 6, 7 + k], text=f"答 {i}.{k}", finish_reason="stop",
                            logprobs=[-0.5, -0.25, -1.0], ref_logprobs=[-0.6, -0.2, -1.5] if ref else None,
                            reward=0.5 if ref else None) for k in range(n)]
    return LineResult(line=line, prompt_ids=[1, 2, 3, 4], samples=samples)


def _shard_parts(n_lines: int = 3, start: int = 0) -> dict[str, list[dict]]:
    results = [_line_result(i, multi_turn=i % 2 == 1, ref=i % 3 != 0) for i in range(start, start + n_lines)]
    return {
        "results": [result_record(r, s) for r in results for s in r.samples],
        "sft": [sft_record(r, s) for r in results for s in r.samples],
        "experience": [experience_record(r, s) for r in results for s in r.samples],
        "errors": [LineFailure("bad", "in.jsonl", 99, "invalid_json", "not valid JSON").record()],
    }


@pytest.fixture(scope="session")
def line_result():
    """line_result(i, multi_turn=False, n=2, ref=True) -> LineResult: one prompt line's generated samples
    (ids s{i}, or m{i} for a multi-turn line)."""
    return _line_result


@pytest.fixture(scope="session")
def shard_parts():
    """shard_parts(n_lines=3, start=0) -> {kind: records}: what a worker stages for one shard (every other line
    multi-turn, n = 2, one error line)."""
    return _shard_parts


@pytest.fixture(autouse=True)
def _own_ziya_batch_home(tmp_path, monkeypatch):
    """Every test gets a ZIYA_BATCH_HOME of its own, never the user's: without a Redis URL a command starts the
    home's private redis-server (e.g. `report JOB_ID`); one a test left running is stopped after it."""
    home = tmp_path / "zb-home"
    monkeypatch.setenv("ZIYA_BATCH_HOME", str(home))
    yield
    if (home / "redis" / "server.json").exists():
        from ziya_batch.queue import PrivateRedis

        PrivateRedis(home / "redis").shutdown()
