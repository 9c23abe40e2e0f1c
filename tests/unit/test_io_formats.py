"""Both part formats load with pyarrow and `datasets` without custom code, with the documented schemas."""
from __future__ import annotations

import dataclasses
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ziya_batch.io import (committed_shards, manifest_part_urls, parquet_schema, promote_shard, read_parts,
                           stage_shard, write_manifest)
from ziya_batch.records import LineFailure, LineResult, PromptLine, SampleOutput, openai_batch_error, \
    openai_batch_record
from ziya_batch.spec import SamplingSpec

KINDS = ("results", "sft", "experience", "errors")


@pytest.fixture()
def hf_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return str(tmp_path / "hf-cache")


def _commit(shard_parts, out: str, fmt: str, shards: int = 3) -> dict:
    for i in range(shards):
        # shard 1 is empty
        parts = shard_parts(2, start=2 * i) if i != 1 else {"results": [], "sft": [], "experience": []}
        stage_shard(out, i, 100 + i, parts, fmt)
        promote_shard(out, i, 100 + i)
    return write_manifest(out, "{}", {"state": "completed"}, committed_shards(out))


def test_parquet_parts_have_the_documented_schema_and_round_trip(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    manifest = _commit(shard_parts, out, "parquet")
    for kind in KINDS:
        for url in manifest_part_urls(out, kind, manifest):
            assert url.endswith(".parquet")
            assert pq.read_schema(url).equals(parquet_schema(kind), check_metadata=False)
    table = pq.read_table(os.path.join(out, "experience"))         # a whole directory, no schema merging
    assert table.num_rows == 8
    row = table.slice(0, 1).to_pylist()[0]
    assert row["prompt_ids"] == [1, 2, 3, 4] and row["response_ids"] == [5, 6, 7]
    assert row["logprobs"] == pytest.approx([-0.5, -0.25, -1.0])
    assert row["ref_logprobs"] is None and row["kl"] is None and row["reward"] is None   # shard 0, line 0: no ref
    with_ref = [r for r in table.to_pylist() if r["ref_logprobs"] is not None][0]
    assert with_ref["kl"] == pytest.approx([0.1, -0.05, 0.5], abs=1e-6) and with_ref["reward"] == 0.5
    results = list(read_parts(out, "results", verify=True))
    single = [r for r in results if r["prompt"] is not None]
    multi = [r for r in results if r["messages"] is not None]
    assert single and multi and len(results) == 8
    assert multi[0]["messages"][-1]["role"] == "user" and multi[0]["prompt"] is None
    assert single[0]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3}
    sft = list(read_parts(out, "sft"))
    assert any(r["conversations"] and r["conversations"][-1]["from"] == "gpt" for r in sft)
    errors = list(read_parts(out, "errors"))
    assert errors[0]["error"] == {"code": "invalid_json", "message": "not valid JSON"}


def test_parquet_parts_load_with_datasets(tmp_path, hf_offline, shard_parts):
    import datasets

    out = str(tmp_path / "out")
    manifest = _commit(shard_parts, out, "parquet")
    for kind in KINDS:
        ds = datasets.load_dataset("parquet", data_files=manifest_part_urls(out, kind, manifest), split="train",
                                   cache_dir=hf_offline)
        assert ds.num_rows == manifest["records"][kind]
    ds = datasets.load_dataset("parquet", data_files=os.path.join(out, "experience", "*.parquet"), split="train",
                               cache_dir=hf_offline)
    assert ds.features["prompt_ids"].feature.dtype == "int32"
    assert ds[0]["response_ids"] == [5, 6, 7]


def test_jsonl_parts_load_with_datasets_and_pyarrow(tmp_path, hf_offline, shard_parts):
    import datasets
    import pyarrow.json as pj

    out = str(tmp_path / "out")
    manifest = _commit(shard_parts, out, "jsonl")
    # experience, sft and errors have one JSON type per key: every part loads as is
    # (empty parts included: shard 1 produced nothing)
    for kind in ("experience", "sft", "errors"):
        files = manifest_part_urls(out, kind, manifest)
        ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=hf_offline)
        assert ds.num_rows == manifest["records"][kind]
    ds = datasets.load_dataset("json", data_files=manifest_part_urls(out, "experience", manifest)[0],
                               split="train", cache_dir=hf_offline)
    assert ds[0]["prompt_ids"] == [1, 2, 3, 4]
    table = pj.read_json(manifest_part_urls(out, "errors", manifest)[0])
    assert table.num_rows == 1 and table.column("line").to_pylist() == [99]
    # results mix a string prompt (single turn) and a list (multi turn) under one key: datasets types it Json
    ds = datasets.load_dataset("json", data_files=manifest_part_urls(out, "results", manifest), split="train",
                               cache_dir=hf_offline)
    assert ds.num_rows == 8 and {type(p) for p in ds["prompt"]} == {str, list}
    single = str(tmp_path / "single")
    stage_shard(single, 0, 1, {"results": [r for r in shard_parts(3)["results"] if isinstance(r["prompt"], str)]},
                "jsonl")
    write_manifest(single, "{}", {}, {0: promote_shard(single, 0, 1)})
    ds = datasets.load_dataset("json", data_files=manifest_part_urls(single, "results"), split="train",
                               cache_dir=hf_offline)
    assert ds.num_rows == 4 and ds[0]["usage"]["prompt_tokens"] == 4


def test_openai_batch_results_and_errors_in_parquet(tmp_path, line_result):
    out = str(tmp_path / "out")
    chat = line_result(1, multi_turn=True)
    chat = dataclasses.replace(chat, line=dataclasses.replace(chat.line, endpoint="/v1/chat/completions"))
    line = PromptLine(id="c1", file="in.jsonl", line=1, text="t", sampling=SamplingSpec(), query="hi",
                      endpoint="/v1/completions", model_name="ziya")
    completion = LineResult(line=line, prompt_ids=[1, 2], samples=[SampleOutput(0, [3], "ok", "length")])
    failure = openai_batch_error(LineFailure("c2", "in.jsonl", 2, "invalid_json", "bad"))
    stage_shard(out, 0, 1, {"results": [openai_batch_record(chat), openai_batch_record(completion)],
                            "errors": [failure]}, "parquet", input_format="openai-batch")
    # an empty shard still gets the openai-batch schema, so a directory of parts reads as one table
    stage_shard(out, 1, 1, {"results": []}, "parquet", input_format="openai-batch")
    promote_shard(out, 0, 1)
    promote_shard(out, 1, 1)
    write_manifest(out, "{}", {}, committed_shards(out))
    results = list(read_parts(out, "results", verify=True))
    assert [r["custom_id"] for r in results] == ["m1", "c1"]
    assert results[0]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    assert results[1]["response"]["body"]["choices"][0]["text"] == "ok"
    assert results[1]["response"]["body"]["usage"]["total_tokens"] == 3
    assert list(read_parts(out, "errors"))[0]["error"]["code"] == "invalid_json"
    assert pq.read_table(os.path.join(out, "results")).num_rows == 2


def test_parquet_takes_the_records_the_worker_builds(tmp_path, line_result):
    """Experience records as the worker writes them (group fields added) fit the schema."""
    from ziya_batch.filters import add_group_fields

    out = str(tmp_path / "out")
    r = line_result(3, n=3)
    for k, s in enumerate(r.samples):
        s.reward = float(k)
    from ziya_batch.records import experience_record

    records = add_group_fields([experience_record(r, s) for s in r.samples])
    stage_shard(out, 0, 1, {"experience": records}, "parquet")
    write_manifest(out, "{}", {}, {0: promote_shard(out, 0, 1)})
    rows = list(read_parts(out, "experience", verify=True))
    assert [row["advantage"] for row in rows] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-3)
    assert rows[0]["group_reward_mean"] == 1.0 and rows[0]["group_id"] == "s3"


def test_parquet_refuses_a_record_field_the_schema_lacks(tmp_path):
    with pytest.raises(ValueError, match="surprise"):
        stage_shard(str(tmp_path / "out"), 0, 1, {"sft": [{"id": "x", "surprise": 1}]}, "parquet")


def test_parquet_schema_types():
    exp = parquet_schema("experience")
    assert exp.field("prompt_ids").type == pa.list_(pa.int32())
    assert exp.field("logprobs").type == pa.list_(pa.float32())
    assert exp.field("reward").type == pa.float64() and exp.field("reward").nullable
    assert parquet_schema("results").field("usage").type.num_fields == 2


def test_jsonl_parts_hold_one_record_per_line_for_every_line_splitter(tmp_path, line_result):
    """A response (or prompt, or label) holding U+2028, U+2029 or U+0085 is valid JSON written raw, but Python's
    str.splitlines() and JavaScript readers break a line there: such a part held more "lines" than the manifest
    says. They are written as \\u escapes, which every JSON reader turns back into the same text."""
    import json

    from ziya_batch.io.schema import encode_jsonl
    from ziya_batch.records import result_record

    text = "a\u2028b\u2029c\x85d 😀 中文"
    r = line_result(1)
    r = dataclasses.replace(r, line=dataclasses.replace(r.line, query=text, metadata={"label": text}))
    r.samples[0].text = text
    records = [result_record(r, s) for s in r.samples]
    data = encode_jsonl(records)
    assert len(data.decode("utf-8").splitlines()) == data.count(b"\n") == len(records)
    assert [json.loads(line) for line in data.decode("utf-8").splitlines()] == records
    assert "😀 中文".encode() in data                                   # other text stays UTF-8, unescaped
    out = str(tmp_path / "out")
    stage_shard(out, 0, 1, {"results": records}, "jsonl")
    manifest = write_manifest(out, "{}", {}, {0: promote_shard(out, 0, 1)})
    path = os.path.join(out, manifest["parts"]["results"][0]["path"])
    with open(path, encoding="utf-8") as f:
        assert len(f.read().splitlines()) == manifest["parts"]["results"][0]["lines"] == len(records)
    assert list(read_parts(out, "results", verify=True)) == records
