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


def _sampling(base: SamplingSpec, override: Any) -> SamplingSpec:
    if override is None:
        return base
    if not isinstance(override, dict):
        raise LineError(errors.INVALID_SAMPLING, "'sampling' must be an object")
    try:
        return base.merged(override)
    except ValidationError as err:
        raise LineError(errors.INVALID_SAMPLING, format_validation_error(err, "sampling")) from None
    except TypeError as err:
        raise LineError(errors.INVALID_SAMPLING, f"sampling: {err}") from None


# the fields a line's format gives a meaning to; every other field is the line's metadata (labels for rewards)
_ZIYA_FIELDS = ("id", "prompt", "messages", "sampling")
_OPENAI_FIELDS = ("custom_id", "method", "url", "body")


def _metadata(obj: dict, known: tuple[str, ...]) -> dict:
    return {k: v for k, v in obj.items() if k not in known}


def _openai_logprobs(body: dict) -> tuple[bool, int]:
    """(logprobs asked, top_logprobs k) of an OpenAI request: chat has logprobs: bool + top_logprobs: int,
    the legacy completions endpoint logprobs: int (the k)."""
    want, k = body.get("logprobs"), body.get("top_logprobs")
    if isinstance(want, int) and not isinstance(want, bool):
        want, k = True, want if k is None else k
    if want is not None and not isinstance(want, bool):
        raise LineError(errors.INVALID_SAMPLING, "'body.logprobs' must be true/false (or an integer 0..20)")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 20):
        raise LineError(errors.INVALID_SAMPLING, f"'body.top_logprobs' must be an integer 0..20, got {k!r}")
    return bool(want), int(k or 0) if want else 0


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
        sampling=_sampling(sampling, obj.get("sampling")), metadata=_metadata(obj, _ZIYA_FIELDS),
    )


def _parse_openai(obj: dict, file: str, line_no: int, sampling: SamplingSpec) -> PromptLine:
    custom_id = obj.get("custom_id")
    line_id = default_id(file, line_no) if custom_id is None else str(custom_id)
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError(errors.MISSING_PROMPT, "openai-batch line has no 'body' object")
    override = {ours: body[theirs] for theirs, ours in _OPENAI_SAMPLING.items() if body.get(theirs) is not None}
    want_logprobs, top_logprobs = _openai_logprobs(body)
    if isinstance(override.get("stop"), str):
        override["stop"] = [override["stop"]]
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
        metadata=_metadata(obj, _OPENAI_FIELDS), want_logprobs=want_logprobs, top_logprobs=top_logprobs,
    )
