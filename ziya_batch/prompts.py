"""Ziya's prompt format (model card) and the parsing of input lines in both formats.

Single turn:  "<human>:" + query.strip() + "\n<bot>:"
Multi turn:   "<human>:q1\n<bot>:a1</s><human>:q2\n<bot>:"
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

from pydantic import ValidationError

from . import errors
from .errors import LineError
from .records import CHAT_COMPLETIONS, COMPLETIONS, OPENAI_ENDPOINTS, PromptLine, TooLongLine, short_text
from .spec import SamplingSpec, format_validation_error

HUMAN = "<human>:"
BOT = "\n<bot>:"
EOS_TEXT = "</s>"

# OpenAI body fields we map onto our sampling, with the JSON type OpenAI takes for each (str: a string or a list
# of strings); others (model, logit_bias...) are accepted and ignored
_OPENAI_SAMPLING = {
    "max_tokens": ("max_new_tokens", int),
    "max_completion_tokens": ("max_new_tokens", int),
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "n": ("n", int),
    "seed": ("seed", int),
    "stop": ("stop", str),
}


def build_prompt(query: str) -> str:
    return HUMAN + query.strip() + BOT


def build_chat_prompt(messages: list[dict]) -> str:
    """Turns alternate user/assistant, start and end with the user; a system message is refused."""
    if not messages:
        raise LineError(errors.MISSING_PROMPT, "'messages' is empty")
    out = []
    expect = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LineError(errors.MISSING_PROMPT, f"messages[{i}] is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise LineError(errors.MISSING_PROMPT,
                           f"messages[{i}].role must be 'user' or 'assistant', got {short_text(repr(role), 40)}")
        if role != expect:
            raise LineError(errors.MISSING_PROMPT, f"messages[{i}] should be a {expect} turn (turns alternate, starting with user)")
        if not isinstance(content, str):
            raise LineError(errors.MISSING_PROMPT, f"messages[{i}].content must be a string")
        if role == "user":
            if not content.strip():
                raise LineError(errors.EMPTY_PROMPT, f"messages[{i}].content is empty")
            out.append(HUMAN + content.strip() + BOT)
        else:
            out.append(content.strip() + EOS_TEXT)
        expect = "assistant" if role == "user" else "user"
    if messages[-1].get("role") != "user":
        raise LineError(errors.MISSING_PROMPT, "the last message must be a user turn")
    return "".join(out)


_CONSTRAINTS = ("json_schema", "regex", "choice")


def _sampling(base: SamplingSpec, override: Any) -> SamplingSpec:
    if override is None:
        return base
    if not isinstance(override, dict):
        raise LineError(errors.INVALID_SAMPLING, "'sampling' must be an object")
    if any(override.get(k) is not None for k in _CONSTRAINTS):
        # a line's constraint replaces the job's, whichever kind each is (only one may be in force)
        override = {**{k: None for k in _CONSTRAINTS}, **override}
    try:
        return base.merged(override)
    except ValidationError as err:
        raise LineError(errors.INVALID_SAMPLING, format_validation_error(err, "sampling")) from None
    except Exception as err:  # noqa: BLE001 - whatever a hostile override raises is this line's error
        raise LineError(errors.INVALID_SAMPLING, f"sampling: {type(err).__name__}: {short_text(err)}") from None


# the fields a line's format gives a meaning to; every other field is the line's metadata (labels for rewards)
_ZIYA_FIELDS = ("id", "prompt", "messages", "sampling")
_OPENAI_FIELDS = ("custom_id", "method", "url", "body")


def _metadata(obj: dict, known: tuple[str, ...]) -> dict:
    return {k: v for k, v in obj.items() if k not in known}


def _openai_sampling(body: dict) -> dict:
    """The sampling fields a request's body sets, each of the JSON type OpenAI takes: the spec's lax parsing read
    "9" or 9.0 as 9 and true as 1 (max_tokens: true gave one token), where OpenAI answers 400. Like OpenAI, a body
    may set max_tokens or max_completion_tokens, not both (one of them was dropped without a word)."""
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise LineError(errors.INVALID_SAMPLING, "give one of 'body.max_tokens' and 'body.max_completion_tokens', "
                                                 "not both")
    override = {}
    for theirs, (ours, kind) in _OPENAI_SAMPLING.items():
        value = body.get(theirs)
        if value is None:
            continue
        if kind is str:
            value = [value] if isinstance(value, str) else value
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            want = "a string or a list of strings"
        else:
            ok = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
            want = "an integer" if kind is int else "a number"
        if not ok:
            raise LineError(errors.INVALID_SAMPLING,
                            f"'body.{theirs}' must be {want}, got {short_text(repr(body[theirs]), 40)}")
        override[ours] = value
    return override


def _openai_logprobs(body: dict, endpoint: str) -> tuple[bool, int]:
    """(logprobs asked, top_logprobs k) of an OpenAI request, as its endpoint takes them: a chat request has
    logprobs: bool and top_logprobs: int, which asks for nothing without logprobs: true (OpenAI refuses it; it was
    dropped without a word); a completion has logprobs: int, the k (up to 20 here, 5 at OpenAI), and no
    top_logprobs. Either one's logprobs given the other's way (a chat request's logprobs: 3) is refused too."""
    want, k = body.get("logprobs"), body.get("top_logprobs")
    if endpoint == COMPLETIONS:
        if want is None:
            return False, 0
        if not isinstance(want, int) or isinstance(want, bool) or not 0 <= want <= 20:
            raise LineError(errors.INVALID_SAMPLING, f"'body.logprobs' of a {COMPLETIONS} request is how many most "
                            "likely tokens to list at each position, an integer 0..20; got "
                            f"{short_text(repr(want), 40)}")
        return True, want
    if want is not None and not isinstance(want, bool):
        raise LineError(errors.INVALID_SAMPLING, f"'body.logprobs' of a {CHAT_COMPLETIONS} request must be true or "
                        f"false (top_logprobs gives how many tokens to list); got {short_text(repr(want), 40)}")
    if k is None:
        return bool(want), 0
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 20:
        raise LineError(errors.INVALID_SAMPLING, f"'body.top_logprobs' must be an integer 0..20, got "
                                                 f"{short_text(repr(k), 40)}")
    if not want:
        raise LineError(errors.INVALID_SAMPLING, "'body.top_logprobs' needs 'body.logprobs': true")
    return True, k


def _response_format(fmt: Any) -> dict:
    """OpenAI's response_format as our sampling fields: json_schema -> its schema, json_object -> any object."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise LineError(errors.INVALID_SAMPLING, "response_format.json_schema.schema must be a JSON Schema object")
        return {"json_schema": schema}
    raise LineError(errors.INVALID_SAMPLING, "response_format.type must be 'text', 'json_object' or 'json_schema', "
                                             f"got {kind!r}")


def default_id(file: str, line_no: int) -> str:
    return f"{file}:{line_no}"


MAX_DEPTH = 64       # nesting a line may have: output echoes it, and json.dumps must never hit the recursion limit
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def load_json(raw: bytes | str) -> Any:
    """json.loads for one input line, or LineError(invalid_json) whatever it raised: NaN, Infinity and
    numbers beyond a float are refused (no JSON reader elsewhere takes them back), as is nesting deeper than
    MAX_DEPTH or a lone surrogate (neither could be written back out)."""
    if isinstance(raw, TooLongLine):
        raise LineError(errors.LINE_TOO_LONG, f"line is {raw.length} bytes, over the limit of {raw.limit} bytes; "
                                              "split the prompt or shorten it")
    try:
        obj = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise LineError(errors.INVALID_JSON, f"not valid JSON: nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise LineError(errors.INVALID_JSON, "not valid JSON: not UTF-8 text") from None
    except ValueError as err:
        text = str(err)
        if "integer string conversion" in text:
            text = "a number has more than 4300 digits"
        raise LineError(errors.INVALID_JSON, f"not valid JSON: {short_text(text)}") from None
    except Exception as err:  # noqa: BLE001 - a line is never more than its own error
        raise LineError(errors.INVALID_JSON, f"not valid JSON: {type(err).__name__}") from None
    _check_tree(obj)
    return obj


def _check_tree(obj: Any) -> None:
    """Depth and text of a parsed line, without recursion (the line chose the depth)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise LineError(errors.INVALID_JSON, "not valid JSON text: a lone surrogate escape (\\ud800-\\udfff) "
                                                     "is not a Unicode character")
        elif isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                raise LineError(errors.INVALID_JSON, f"not valid JSON: nested deeper than {MAX_DEPTH} levels")
            if isinstance(node, dict):
                stack.extend((k, depth) for k in node)
                stack.extend((v, depth + 1) for v in node.values())
            else:
                stack.extend((v, depth + 1) for v in node)


def line_id_of(value: Any, file: str, line_no: int) -> str:
    """A line's id as text: <file>:<line> without one. str() of a hostile id may raise (a deep structure)."""
    if value is None:
        return default_id(file, line_no)
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception as err:  # noqa: BLE001 - str() of any JSON value; its failure is the line's error
        raise LineError(errors.INVALID_LINE, f"'id' cannot be turned into text: {type(err).__name__}") from None


def parse_line(raw: bytes | str, fmt: str, file: str, line_no: int, sampling: SamplingSpec) -> PromptLine:
    """Parse one JSONL line (line_no is 1-based) into a PromptLine, or raise LineError.

    Whatever a line holds, this raises only LineError: a line costs no more than its own error record."""
    try:
        obj = load_json(raw)
        if not isinstance(obj, dict):
            raise LineError(errors.INVALID_JSON, f"expected a JSON object, got {type(obj).__name__}")
        if fmt == "openai-batch":
            return _parse_openai(obj, file, line_no, sampling)
        return _parse_ziya(obj, file, line_no, sampling)
    except LineError:
        raise
    except Exception as err:  # noqa: BLE001 - the per-line boundary: anything else is this line's error too
        raise LineError(errors.INVALID_LINE, f"cannot prepare this line: {type(err).__name__}: {short_text(err)}") \
            from None


def _parse_ziya(obj: dict, file: str, line_no: int, sampling: SamplingSpec) -> PromptLine:
    line_id = line_id_of(obj.get("id"), file, line_no)
    messages: Optional[list] = None
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list):
            raise LineError(errors.MISSING_PROMPT, "'messages' must be a list of {role, content}")
        text = build_chat_prompt(messages)
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise LineError(errors.MISSING_PROMPT, "'prompt' must be a string")
        if not obj["prompt"].strip():
            raise LineError(errors.EMPTY_PROMPT, "'prompt' is empty")
        text = build_prompt(obj["prompt"])
    else:
        raise LineError(errors.MISSING_PROMPT, "line has neither 'prompt' nor 'messages'")
    return PromptLine(
        id=line_id, file=file, line=line_no, text=text,
        query=obj.get("prompt") if messages is None else None, messages=messages,
        sampling=_sampling(sampling, obj.get("sampling")), metadata=_metadata(obj, _ZIYA_FIELDS),
    )


def _openai_endpoint(obj: dict, body: dict) -> str:
    """The endpoint an openai-batch request goes to: its url, which must be one this server answers (the HTTP API
    also checks that it is the batch's before the batch runs). A line without a url (format openai-batch outside
    the API, where a line may be just custom_id and body) goes where its body is written for."""
    method = obj.get("method", "POST")
    if method != "POST":
        raise LineError(errors.INVALID_LINE, f"'method' must be POST, got {short_text(repr(method), 40)}")
    if "url" not in obj:
        return CHAT_COMPLETIONS if body.get("messages") is not None else COMPLETIONS
    url = obj["url"]
    if not isinstance(url, str) or url not in OPENAI_ENDPOINTS:
        raise LineError(errors.INVALID_LINE, f"'url' must be {CHAT_COMPLETIONS} or {COMPLETIONS}, the endpoints "
                                             f"this server answers; got {short_text(repr(url), 60)}")
    return url


def _openai_prompt(body: dict, endpoint: str) -> tuple[str, Optional[str], Optional[list]]:
    """(Ziya prompt, query, messages) of a request's body, which must be written for its endpoint: a chat request
    gives `messages` and no `prompt`, a completion `prompt` and no `messages` (a null field counts as absent). A
    body for the other endpoint was answered as that one's, whatever the url or the batch said."""
    own, other = ("messages", "prompt") if endpoint == CHAT_COMPLETIONS else ("prompt", "messages")
    others = COMPLETIONS if endpoint == CHAT_COMPLETIONS else CHAT_COMPLETIONS
    if body.get(own) is None:
        if body.get(other) is None:
            raise LineError(errors.MISSING_PROMPT, f"openai-batch body has neither 'prompt' nor 'messages' (a "
                                                   f"{endpoint} request gives 'body.{own}')")
        raise LineError(errors.MISSING_PROMPT, f"a {endpoint} request gives 'body.{own}'; this body has "
                                               f"'body.{other}', which is for {others}")
    if body.get(other) is not None:
        raise LineError(errors.INVALID_LINE, f"'body.{other}' is a {others} parameter, not a {endpoint} one: give "
                                             f"'body.{own}' only")
    if endpoint == CHAT_COMPLETIONS:
        messages = body["messages"]
        if not isinstance(messages, list):
            raise LineError(errors.MISSING_PROMPT, "'body.messages' must be a list of {role, content}")
        return build_chat_prompt(messages), None, messages
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise LineError(errors.MISSING_PROMPT, "'body.prompt' must be a string (one prompt a request: a list of "
                                               "prompts or of token ids is not read)")
    if not prompt.strip():
        raise LineError(errors.EMPTY_PROMPT, "'body.prompt' is empty")
    return build_prompt(prompt), prompt, None


def _parse_openai(obj: dict, file: str, line_no: int, sampling: SamplingSpec) -> PromptLine:
    line_id = line_id_of(obj.get("custom_id"), file, line_no)
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError(errors.MISSING_PROMPT, "openai-batch line has no 'body' object")
    endpoint = _openai_endpoint(obj, body)
    text, query, messages = _openai_prompt(body, endpoint)
    override = _openai_sampling(body)
    want_logprobs, top_logprobs = _openai_logprobs(body, endpoint)
    if body.get("response_format") is not None:
        override.update(_response_format(body["response_format"]))
    return PromptLine(
        id=line_id, file=file, line=line_no, text=text, query=query, messages=messages,
        sampling=_sampling(sampling, override or None), endpoint=endpoint,
        model_name=short_text(body.get("model") or "ziya-llama-13b"),
        metadata=_metadata(obj, _OPENAI_FIELDS), want_logprobs=want_logprobs, top_logprobs=top_logprobs,
    )
