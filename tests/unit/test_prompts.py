import json

import pytest

from ziya_batch import errors
from ziya_batch.errors import LineError
from ziya_batch.prompts import build_chat_prompt, build_prompt, parse_line
from ziya_batch.spec import SamplingSpec

S = SamplingSpec()


def test_single_turn_is_the_model_cards_format():
    assert build_prompt("  帮我写一份去西安的旅游计划 \n") == "<human>:帮我写一份去西安的旅游计划\n<bot>:"


def test_multi_turn_format():
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert build_chat_prompt(msgs) == "<human>:q1\n<bot>:a1</s><human>:q2\n<bot>:"


@pytest.mark.parametrize("raw,code", [
    (b"{not json", errors.INVALID_JSON),
    (b"[1, 2]", errors.INVALID_JSON),
    (b'{"id": "x"}', errors.MISSING_PROMPT),
    (b'{"id": "x", "prompt": "   "}', errors.EMPTY_PROMPT),
    (b'{"id": "x", "messages": [{"role": "assistant", "content": "hi"}]}', errors.MISSING_PROMPT),
    (b'{"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}', errors.MISSING_PROMPT),
    (b'{"id": "x", "prompt": "q", "sampling": {"top_p": 7}}', errors.INVALID_SAMPLING),
    (b'{"id": "x", "prompt": "q", "sampling": {"topp": 0.5}}', errors.INVALID_SAMPLING),
])
def test_bad_lines_raise_line_errors(raw, code):
    with pytest.raises(LineError) as ei:
        parse_line(raw, "ziya", "f.jsonl", 7, S)
    assert ei.value.code == code


def test_missing_id_gets_file_and_line():
    pl = parse_line(b'{"prompt": "hello"}', "ziya", "in/a.jsonl", 12, S)
    assert pl.id == "in/a.jsonl:12" and pl.line == 12 and pl.text == "<human>:hello\n<bot>:"


def test_line_sampling_override():
    pl = parse_line(json.dumps({"id": 1, "prompt": "q", "sampling": {"temperature": 0, "n": 3}}), "ziya", "f", 1, S)
    assert pl.id == "1" and pl.sampling.temperature == 0 and pl.sampling.n == 3 and pl.sampling.top_p == 0.85


def test_openai_batch_lines():
    line = {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "ziya", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "stop": "\n"}}
    pl = parse_line(json.dumps(line), "openai-batch", "f", 1, S)
    assert pl.id == "req-1" and pl.text == "<human>:hi\n<bot>:"
    assert pl.sampling.max_new_tokens == 9 and pl.sampling.stop == ["\n"] and pl.endpoint == "/v1/chat/completions"
    comp = {"custom_id": "req-2", "url": "/v1/completions", "body": {"prompt": "写诗"}}
    assert parse_line(json.dumps(comp), "openai-batch", "f", 2, S).text == "<human>:写诗\n<bot>:"
    with pytest.raises(LineError):
        parse_line(json.dumps({"custom_id": "x"}), "openai-batch", "f", 3, S)


def test_a_lines_unknown_sampling_key_is_matched_against_the_sampling_keys():
    """A line's `sampling` object is validated on its own: its unknown key was matched against a whole spec's keys,
    so `temprature` got no suggestion and the message listed the spec's top-level keys (name, model, input...)."""
    with pytest.raises(LineError) as ei:
        parse_line(b'{"id": "x", "prompt": "q", "sampling": {"temprature": 0.5}}', "ziya", "f.jsonl", 1, S)
    assert ei.value.code == errors.INVALID_SAMPLING
    assert ei.value.message == "sampling: unknown key 'temprature' (did you mean 'temperature'?)"
    with pytest.raises(LineError) as ei:
        parse_line(b'{"id": "x", "prompt": "q", "sampling": {"zzz": 1}}', "ziya", "f.jsonl", 1, S)
    assert "(allowed: max_new_tokens, min_new_tokens, temperature" in ei.value.message
    assert "shard_size" not in ei.value.message


def test_a_specs_unknown_keys_are_still_matched_where_they_sit():
    from ziya_batch.errors import SpecError
    from ziya_batch.spec import parse_spec

    with pytest.raises(SpecError) as ei:
        parse_spec({"name": "a", "model": {"path": "m"}, "input": ["i"], "output": {"path": "o"},
                    "sampling": {"temprature": 1}, "modle": {}})
    assert "unknown key 'sampling.temprature' (did you mean 'temperature'?)" in str(ei.value)
    assert "unknown key 'modle' (did you mean 'model'?)" in str(ei.value)
