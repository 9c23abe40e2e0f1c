"""Ziya's prompt format (model card) and the parsing of input lines in both formats.

Single turn:  "<human>:" + query.strip() + "\n<bot>:"
Multi turn:   "<human>:q1\n<bot>:a1</s><human>:q2\n<bot>:"
"""
from __future__ import annotations

import json
from typing import Any, Optional

from pydantic import ValidationError

from . import errors
from .errors import LineError
from .records import PromptLine
from .spec import SamplingSpec, format_validation_error

HUMAN = "<human>:"
BOT = "\n<bot>:"
EOS_TEXT = "</s>"

# OpenAI body fields we map onto our sampling; others (model, logit_bias...) are accepted and ignored
_OPENAI_SAMPLING = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "n",
    "seed": "seed",
    "stop": "stop",
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
            raise LineError(errors.MISSING_PROMPT, f"messages[{i}].role must be 'user' or 'assistant', got {role!r}")
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
    except TypeError as err:
        raise LineError(errors.INVALID_SAMPLING, f"sampling: {err}") from None


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


def parse_line(raw: bytes | str, fmt: str, file: str, line_no: int, sampling: SamplingSpec) -> PromptLine:
    """Parse one JSONL line (line_no is 1-based) into a PromptLine, or raise LineError."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LineError(errors.INVALID_JSON, f"not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise LineError(errors.INVALID_JSON, f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "openai-batch":
        return _parse_openai(obj, file, line_no, sampling)
    line_id = obj.get("id")
    line_id = default_id(file, line_no) if line_id is None else str(line_id)
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
        sampling=_sampling(sampling, obj.get("sampling")),
    )


def _parse_openai(obj: dict, file: str, line_no: int, sampling: SamplingSpec) -> PromptLine:
    custom_id = obj.get("custom_id")
    line_id = default_id(file, line_no) if custom_id is None else str(custom_id)
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError(errors.MISSING_PROMPT, "openai-batch line has no 'body' object")
    override = {ours: body[theirs] for theirs, ours in _OPENAI_SAMPLING.items() if body.get(theirs) is not None}
    if isinstance(override.get("stop"), str):
        override["stop"] = [override["stop"]]
    if body.get("response_format") is not None:
        override.update(_response_format(body["response_format"]))
    messages = None
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list):
            raise LineError(errors.MISSING_PROMPT, "'body.messages' must be a list of {role, content}")
        text = build_chat_prompt(messages)
        endpoint = "/v1/chat/completions"
    elif "prompt" in body:
        if not isinstance(body["prompt"], str) or not body["prompt"].strip():
            raise LineError(errors.EMPTY_PROMPT, "'body.prompt' must be a non-empty string")
        text = build_prompt(body["prompt"])
        endpoint = "/v1/completions"
    else:
        raise LineError(errors.MISSING_PROMPT, "openai-batch body has neither 'prompt' nor 'messages'")
    return PromptLine(
        id=line_id, file=file, line=line_no, text=text,
        query=body.get("prompt") if messages is None else None, messages=messages,
        sampling=_sampling(sampling, override or None),
        endpoint=str(obj.get("url") or endpoint), model_name=str(body.get("model") or "ziya-llama-13b"),
    )
