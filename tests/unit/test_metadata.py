"""Input lines' extra fields travel as metadata; OpenAI requests' logprobs settings are read from the body."""
import json

import pytest

from ziya_batch.errors import LineError
from ziya_batch.io.schema import decode_part, encode_part
from ziya_batch.prompts import parse_line
from ziya_batch.records import LineResult, SampleOutput, experience_record, openai_logprobs, result_record, sft_record
from ziya_batch.spec import SamplingSpec

S = SamplingSpec()


def test_ziya_extras_are_metadata_exactly_as_given():
    line = {"id": "a", "prompt": "hi", "sampling": {"n": 2}, "answer": "4", "meta": {"x": [1, None]}, "n": 1.5}
    pl = parse_line(json.dumps(line), "ziya", "f", 1, S)
    assert pl.metadata == {"answer": "4", "meta": {"x": [1, None]}, "n": 1.5}
    assert parse_line('{"messages": [{"role": "user", "content": "q"}]}', "ziya", "f", 2, S).metadata == {}


def test_openai_extras_and_logprobs():
    line = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "label": 7,
            "body": {"messages": [{"role": "user", "content": "q"}], "logprobs": True, "top_logprobs": 4}}
    pl = parse_line(json.dumps(line), "openai-batch", "f", 1, S)
    assert pl.metadata == {"label": 7} and pl.want_logprobs and pl.top_logprobs == 4
    legacy = {"custom_id": "d", "body": {"prompt": "q", "logprobs": 3}}
    pl = parse_line(json.dumps(legacy), "openai-batch", "f", 1, S)
    assert pl.want_logprobs and pl.top_logprobs == 3
    plain = parse_line(json.dumps({"custom_id": "e", "body": {"prompt": "q", "top_logprobs": 3}}), "openai-batch",
                       "f", 1, S)
    assert not plain.want_logprobs and plain.top_logprobs == 0
    for bad in ({"logprobs": True, "top_logprobs": 21}, {"logprobs": "yes"}, {"logprobs": True, "top_logprobs": 1.5}):
        with pytest.raises(LineError, match="logprobs"):
            parse_line(json.dumps({"custom_id": "x", "body": {"prompt": "q", **bad}}), "openai-batch", "f", 1, S)


def test_openai_output_lines_carry_the_request_lines_labels():
    from ziya_batch.records import openai_batch_record

    line = {"custom_id": "c", "url": "/v1/chat/completions", "label": {"answer": "72"},
            "body": {"messages": [{"role": "user", "content": "q"}]}}
    pl = parse_line(json.dumps(line), "openai-batch", "f", 1, S)
    rec = openai_batch_record(LineResult(pl, [1, 2], [SampleOutput(0, [5], "ok", "stop", [-0.5])]))
    assert rec["metadata"] == {"label": {"answer": "72"}} and rec["custom_id"] == "c"
    plain = parse_line(json.dumps({"custom_id": "d", "body": {"prompt": "q"}}), "openai-batch", "f", 1, S)
    assert "metadata" not in openai_batch_record(LineResult(plain, [1], [SampleOutput(0, [5], "ok", "stop", [])]))


def _result():
    pl = parse_line(json.dumps({"id": "a", "prompt": "hi", "answer": {"v": 1}}), "ziya", "f", 1, S)
    s = SampleOutput(0, [5, 6], "ok", "stop", [-0.5, -1.0], top_logprobs=[[(5, -0.5), (9, -2.0)], [(6, -1.0)]],
                     reward=1.0, rewards={"model": 0.5, "math_answer": 0.5})
    return LineResult(pl, [1, 2], [s]), s


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_records_carry_metadata_in_both_formats(fmt):
    r, s = _result()
    recs = {"results": [result_record(r, s)], "sft": [sft_record(r, s)], "experience": [experience_record(r, s)]}
    for kind, records in recs.items():
        back = decode_part(encode_part(kind, records, fmt), fmt)[0]
        meta = back["metadata"] if fmt == "jsonl" else json.loads(back["metadata"])
        assert meta == {"answer": {"v": 1}}
    exp = decode_part(encode_part("experience", recs["experience"], fmt), fmt)[0]
    if fmt == "jsonl":
        assert exp["top_logprobs"] == [[[5, -0.5], [9, -2.0]], [[6, -1.0]]]
        assert exp["rewards"] == {"model": 0.5, "math_answer": 0.5}
    else:
        assert exp["top_logprobs"] == [[{"id": 5, "logprob": -0.5}, {"id": 9, "logprob": -2.0}],
                                       [{"id": 6, "logprob": -1.0}]]
        assert exp["rewards"] == {"model": 0.5, "url": None, "function": 0.5}


def test_openai_logprobs_objects():
    def pieces(ids):
        return [{5: "\u2581hi", 6: "<0x0A>", 9: "x"}[i] for i in ids]

    chat = openai_logprobs([5, 6], [-0.5, -1.0], [[(5, -0.5), (9, -2.0)], [(6, -1.0)]], pieces, chat=True)
    assert chat["content"][0] == {"token": " hi", "logprob": -0.5, "bytes": [32, 104, 105], "top_logprobs": [
        {"token": " hi", "logprob": -0.5, "bytes": [32, 104, 105]}, {"token": "x", "logprob": -2.0, "bytes": [120]}]}
    assert chat["content"][1]["token"] == "\n" and chat["content"][1]["bytes"] == [10]
    legacy = openai_logprobs([5, 6], [-0.5, -1.0], None, pieces, chat=False)
    assert legacy == {"tokens": [" hi", "\n"], "token_logprobs": [-0.5, -1.0], "top_logprobs": [{}, {}],
                      "text_offset": [0, 3]}
