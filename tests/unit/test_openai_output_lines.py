"""Every line of an openai-batch job's output and error files has the fields of OpenAI's request output object
(id, custom_id, response {status_code, request_id, body} or null, error {code, message} or null) with OpenAI's
types, whatever request lines the job read: random requests through the job's own reader and writer."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ziya_batch.api.openai_batch import _client_line
from ziya_batch.io.schema import encode_jsonl
from ziya_batch.records import LineResult, SampleOutput
from ziya_batch.spec import parse_spec
from ziya_batch.work.generation import build_parts, parse_shard

SPEC = parse_spec({"name": "o", "model": {"path": "m"}, "input": ["in.jsonl"], "output": {"path": "o"},
                   "format": "openai-batch"})
CHAT, COMP = "/v1/chat/completions", "/v1/completions"


class CharTokenizer:
    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text: str):
        return self._Out([ord(c) % 30000 for c in text])


_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 30), st.floats(-1, 3), st.text(max_size=4))
_bodies = st.fixed_dictionaries({}, optional={
    "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), _values),
    "prompt": st.one_of(st.just("hello"), _values), "model": _values, "max_tokens": _values,
    "max_completion_tokens": _values, "n": st.one_of(st.integers(1, 3), _values), "temperature": _values,
    "top_p": _values, "seed": _values, "stop": st.one_of(st.just(["\n"]), _values), "logprobs": _values,
    "top_logprobs": _values, "response_format": st.one_of(st.just({"type": "json_object"}), _values)})
_requests = st.fixed_dictionaries({"body": _bodies}, optional={
    "custom_id": st.one_of(st.text(min_size=1, max_size=8), st.integers()),
    "url": st.sampled_from([CHAT, COMP, CHAT, COMP, "/v1/embeddings", None]),
    "method": st.sampled_from(["POST", "POST", "GET"]),
    "label": _values})


def _check_line(rec: dict, want_error: bool) -> None:
    line = _client_line(json.loads(encode_jsonl([rec])))       # as a client downloads it
    assert {"id", "custom_id", "response", "error"} <= set(line)
    assert isinstance(line["id"], str) and line["id"].startswith("batch_req_")
    assert isinstance(line["custom_id"], str) and line["custom_id"]
    if want_error:
        assert line["response"] is None
        err = line["error"]
        assert isinstance(err["code"], str) and isinstance(err["message"], str) and "file" not in err
        return
    assert line["error"] is None
    resp = line["response"]
    assert type(resp["status_code"]) is int and resp["status_code"] == 200
    assert isinstance(resp["request_id"], str) and resp["request_id"]
    body = resp["body"]
    assert body["object"] in ("chat.completion", "text_completion")
    assert isinstance(body["id"], str) and type(body["created"]) is int and isinstance(body["model"], str)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    for i, choice in enumerate(body["choices"]):
        assert choice["index"] == i and choice["finish_reason"] in ("stop", "length")
        if body["object"] == "chat.completion":
            assert choice["message"] == {"role": "assistant", "content": "out"} and "text" not in choice
        else:
            assert choice["text"] == "out" and "message" not in choice


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(_requests, min_size=1, max_size=5))
def test_every_output_and_error_line_has_openais_fields_and_types(requests):
    lines = [(no, json.dumps(r).encode()) for no, r in enumerate(requests, 1)]
    work = parse_shard(lines, "in.jsonl", SPEC, CharTokenizer(), max_model_len=10**9)
    results = [LineResult(pl, ids[:3], [SampleOutput(i, [5, 6], "out", "stop") for i in range(pl.sampling.n)])
               for pl, ids in work.prompts]
    parts = build_parts(SPEC, results, work.failures)
    assert len(parts["results"]) + len(parts["errors"]) == len(requests)      # one line a request
    for rec in parts["results"]:
        _check_line(rec, want_error=False)
    for rec in parts["errors"]:
        _check_line(rec, want_error=True)
    for rec, (pl, _) in zip(parts["results"], sorted(work.prompts, key=lambda p: p[0].line)):
        chat = rec["response"]["body"]["object"] == "chat.completion"
        assert chat == (pl.endpoint == CHAT) and len(rec["response"]["body"]["choices"]) == pl.sampling.n


def test_a_batch_output_file_holds_one_line_per_request_for_every_line_splitter(tmp_path):
    """The output and error files a client downloads are written line by line as the parts are: U+2028, U+2029 and
    U+0085 in a custom_id or a response are \\u escapes there too, not raw characters that str.splitlines() (and
    JavaScript) take for the end of a line."""
    from ziya_batch.api.openai_batch import Batches
    from ziya_batch.api.settings import ApiSettings

    batches = Batches(ApiSettings(token="t" * 20, storage_url=str(tmp_path / "store")), brokers=None)
    text = "a\u2028b\u2029c\x85d 中文"
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    records = [{"id": "batch_req_1", "custom_id": f"c{text}", "error": None,
                "response": {"status_code": 200, "request_id": "r", "body": body}},
               {"id": "batch_req_2", "custom_id": "c2", "response": None,
                "error": {"code": "invalid_json", "message": text, "line": 2, "file": "/srv/in.jsonl"}}]
    batches._write_lines("file-x-output", iter(records), "x.jsonl", "batch_output")
    data = b"".join(batches.content_stream("file-x-output"))
    lines = data.decode("utf-8").splitlines()
    assert len(lines) == data.count(b"\n") == 2
    assert [json.loads(line) for line in lines] == [_client_line(r) for r in records]
    assert "中文".encode() in data
