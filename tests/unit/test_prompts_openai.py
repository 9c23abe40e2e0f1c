"""OpenAI Batch request lines as the job's reader takes them: the endpoint a request goes to (its url, or without
one the endpoint its body is written for), and a body that must be written for that endpoint. The output line
answers as that endpoint does (chat.completion or text_completion), whatever the batch or the body said."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ziya_batch import errors
from ziya_batch.errors import LineError
from ziya_batch.prompts import parse_line
from ziya_batch.records import LineResult, SampleOutput, openai_batch_record
from ziya_batch.spec import SamplingSpec

S = SamplingSpec()
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def _parse(line: dict):
    return parse_line(json.dumps(line), "openai-batch", "in.jsonl", 1, S)


def _answer(line: dict) -> dict:
    pl = _parse(line)
    return openai_batch_record(LineResult(pl, [1, 2], [SampleOutput(0, [5], "ok", "stop")]))["response"]["body"]


@pytest.mark.parametrize("line,code,words", [
    # a chat request whose body is a completion's was answered as a text_completion (and the other way round)
    ({"url": CHAT, "body": {"prompt": "p"}}, errors.MISSING_PROMPT, "gives 'body.messages'"),
    ({"url": COMP, "body": {"messages": MESSAGES}}, errors.MISSING_PROMPT, "gives 'body.prompt'"),
    ({"url": CHAT, "body": {"messages": MESSAGES, "prompt": "p"}}, errors.INVALID_LINE, "'body.prompt' is a"),
    ({"url": COMP, "body": {"prompt": "p", "messages": MESSAGES}}, errors.INVALID_LINE, "'body.messages' is a"),
    ({"body": {"messages": MESSAGES, "prompt": "p"}}, errors.INVALID_LINE, "give 'body.messages' only"),
    # endpoints this server does not answer were answered as whichever the body looked like
    ({"url": "/v1/embeddings", "body": {"prompt": "p"}}, errors.INVALID_LINE, "'url' must be"),
    ({"url": "/v1/responses", "body": {"messages": MESSAGES}}, errors.INVALID_LINE, "'url' must be"),
    ({"url": CHAT + "/../x", "body": {"messages": MESSAGES}}, errors.INVALID_LINE, "'url' must be"),
    ({"url": "/v1/chat/completions ", "body": {"messages": MESSAGES}}, errors.INVALID_LINE, "'url' must be"),
    ({"url": None, "body": {"messages": MESSAGES}}, errors.INVALID_LINE, "'url' must be"),
    ({"url": 5, "body": {"prompt": "p"}}, errors.INVALID_LINE, "'url' must be"),
    ({"url": [CHAT], "body": {"messages": MESSAGES}}, errors.INVALID_LINE, "'url' must be"),
    ({"method": "GET", "url": CHAT, "body": {"messages": MESSAGES}}, errors.INVALID_LINE, "'method' must be POST"),
    ({"method": None, "body": {"prompt": "p"}}, errors.INVALID_LINE, "'method' must be POST"),
    # one prompt a request: OpenAI's list of prompts (or token ids) is not read, and is no empty prompt
    ({"url": COMP, "body": {"prompt": ["a", "b"]}}, errors.MISSING_PROMPT, "must be a string"),
    ({"url": COMP, "body": {"prompt": 5}}, errors.MISSING_PROMPT, "must be a string"),
    ({"url": COMP, "body": {"prompt": "  "}}, errors.EMPTY_PROMPT, "is empty"),
    ({"url": CHAT, "body": {}}, errors.MISSING_PROMPT, "neither"),
])
def test_a_body_not_written_for_its_endpoint_is_its_error_line(line, code, words):
    with pytest.raises(LineError) as err:
        _parse({"custom_id": "c", **line})
    assert err.value.code == code and words in err.value.message, err.value.message


@pytest.mark.parametrize("line,endpoint,obj", [
    ({"url": CHAT, "method": "POST", "body": {"messages": MESSAGES}}, CHAT, "chat.completion"),
    ({"url": COMP, "method": "POST", "body": {"prompt": "p"}}, COMP, "text_completion"),
    # format openai-batch outside the HTTP API: a line may be custom_id and body alone
    ({"body": {"messages": MESSAGES}}, CHAT, "chat.completion"),
    ({"body": {"prompt": "p"}}, COMP, "text_completion"),
    # a null field is an absent one (what serialisers of request objects write for fields left unset)
    ({"url": CHAT, "body": {"messages": MESSAGES, "prompt": None}}, CHAT, "chat.completion"),
    ({"body": {"prompt": "p", "messages": None}}, COMP, "text_completion"),
])
def test_a_request_is_answered_as_its_endpoint(line, endpoint, obj):
    assert _parse({"custom_id": "c", **line}).endpoint == endpoint
    assert _answer({"custom_id": "c", **line})["object"] == obj


_urls = st.one_of(st.just(None), st.sampled_from([CHAT, COMP, "/v1/embeddings", "/v1/responses", CHAT.upper(), "",
                                                  CHAT + "/", "/v1/completions/../chat/completions"]),
                  st.text(max_size=30), st.integers())
_prompts = st.one_of(st.none(), st.just("p"), st.just(MESSAGES), st.text(max_size=5), st.integers(),
                     st.lists(st.text(max_size=3), max_size=2))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=_urls, has_url=st.booleans(), method=st.sampled_from([None, "POST", "GET", "post"]),
       has_method=st.booleans(), prompt=_prompts, has_prompt=st.booleans(), messages=_prompts,
       has_messages=st.booleans())
def test_every_request_is_refused_or_answered_as_the_endpoint_it_names(url, has_url, method, has_method, prompt,
                                                                       has_prompt, messages, has_messages):
    body = {**({"prompt": prompt} if has_prompt else {}), **({"messages": messages} if has_messages else {})}
    line = {"custom_id": "c", "body": body, **({"url": url} if has_url else {}),
            **({"method": method} if has_method else {})}
    try:
        pl = _parse(line)
    except LineError:
        return
    if has_url:
        assert pl.endpoint == url
    if has_method:
        assert method == "POST"
    chat = pl.endpoint == CHAT
    assert pl.endpoint in (CHAT, COMP)
    # the body is written for that endpoint alone: its field given, the other one's absent
    assert (body.get("messages") is not None, body.get("prompt") is not None) == (chat, not chat)
    assert _answer(line)["object"] == ("chat.completion" if chat else "text_completion")


_INTEGER_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "n": "n", "seed": "seed"}
_NUMBER_FIELDS = {"temperature": "temperature", "top_p": "top_p"}
_not_integers = st.one_of(st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
                          st.lists(st.integers(1, 9), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                   max_size=1))


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(_INTEGER_FIELDS)), value=_not_integers)
def test_a_body_integer_of_another_json_type_is_refused(field, value):
    """The spec's lax parsing read "9" or 9.0 as 9 and true as 1 (max_tokens: true gave one token), where OpenAI
    answers 400: each is now the line's invalid_sampling error, naming the body field."""
    with pytest.raises(LineError) as err:
        _parse({"custom_id": "c", "body": {"prompt": "p", field: value}})
    assert err.value.code == errors.INVALID_SAMPLING and f"'body.{field}' must be an integer" in err.value.message


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(sorted(_NUMBER_FIELDS)),
       value=st.one_of(st.booleans(), st.text(max_size=6), st.lists(st.floats(0, 1), max_size=2)))
def test_a_body_number_of_another_json_type_is_refused(field, value):
    with pytest.raises(LineError) as err:
        _parse({"custom_id": "c", "body": {"prompt": "p", field: value}})
    assert err.value.code == errors.INVALID_SAMPLING and f"'body.{field}' must be a number" in err.value.message


@pytest.mark.parametrize("field,value", [("max_tokens", 7), ("max_completion_tokens", 7), ("n", 3), ("seed", 0),
                                         ("temperature", 0), ("temperature", 0.5), ("top_p", 1), ("top_p", 0.25)])
def test_a_body_field_of_its_type_is_read(field, value):
    ours = {**_INTEGER_FIELDS, **_NUMBER_FIELDS}[field]
    assert getattr(_parse({"custom_id": "c", "body": {"prompt": "p", field: value}}).sampling, ours) == value


@pytest.mark.parametrize("stop,ok", [("\n", ["\n"]), (["a", "b"], ["a", "b"]), ([], []), (5, None), ([1], None),
                                     (["a", None], None), ({"a": "b"}, None), (True, None)])
def test_stop_is_a_string_or_a_list_of_strings(stop, ok):
    line = {"custom_id": "c", "body": {"prompt": "p", "stop": stop}}
    if ok is None:
        with pytest.raises(LineError, match="stop") as err:
            _parse(line)
        assert err.value.code == errors.INVALID_SAMPLING
    else:
        assert _parse(line).sampling.stop == ok


def test_max_tokens_and_max_completion_tokens_together_are_refused():
    """As OpenAI refuses them together; one of the two was dropped without a word (max_completion_tokens won)."""
    with pytest.raises(LineError, match="not both") as err:
        _parse({"custom_id": "c", "body": {"messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 7}})
    assert err.value.code == errors.INVALID_SAMPLING
    for field in ("max_tokens", "max_completion_tokens"):
        body = {"messages": MESSAGES, field: 7, "max_tokens" if field != "max_tokens" else "max_completion_tokens": None}
        assert _parse({"custom_id": "c", "body": body}).sampling.max_new_tokens == 7


@pytest.mark.parametrize("url,body,asked", [
    (CHAT, {"logprobs": True, "top_logprobs": 4}, (True, 4)),
    (CHAT, {"logprobs": True}, (True, 0)),
    (CHAT, {"logprobs": False}, (False, 0)),
    (CHAT, {"logprobs": False, "top_logprobs": None}, (False, 0)),
    (COMP, {"logprobs": 3}, (True, 3)),
    (COMP, {"logprobs": 0}, (True, 0)),
    (COMP, {"top_logprobs": 3}, (False, 0)),                 # not a /v1/completions parameter: ignored
    # a chat request's top_logprobs without logprobs: true asked for nothing, and got nothing without a word
    (CHAT, {"top_logprobs": 3}, "needs 'body.logprobs': true"),
    (CHAT, {"logprobs": False, "top_logprobs": 3}, "needs 'body.logprobs': true"),
    # each endpoint's logprobs given the other's way, as OpenAI refuses it
    (CHAT, {"logprobs": 3}, "must be true or false"),
    (COMP, {"logprobs": True}, "an integer 0..20"),
    (COMP, {"logprobs": 21}, "an integer 0..20"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "an integer 0..20"),
])
def test_logprobs_are_read_as_the_endpoint_takes_them(url, body, asked):
    messages = {"messages": MESSAGES} if url == CHAT else {"prompt": "p"}
    line = {"custom_id": "c", "url": url, "body": {**messages, **body}}
    if isinstance(asked, str):
        with pytest.raises(LineError, match=asked) as err:
            _parse(line)
        assert err.value.code == errors.INVALID_SAMPLING
    else:
        pl = _parse(line)
        assert (pl.want_logprobs, pl.top_logprobs) == asked
