"""Structured-output constraints as plain data: a sampling's json_schema, regex or choice turned into one grammar
text for llguidance, and checked there, without a tokenizer, when a spec or a line is parsed.

The grammar text is the constraint's identity: the engine compiles each distinct text once per worker
(grammar.py) and two requests with the same text share the compiled grammar. No torch here, so the spec and
prompt parsers can check a constraint without loading torch and turn the library's reason into an
invalid_sampling error line or a spec error. It lives in engine/ because grammar.py needs grammar_text and
engine/ imports nothing above it.

Why llguidance rather than xgrammar (measured 2026-12-06, README "Structured output"): no dependencies (one
abi3 wheel; xgrammar pulls triton, apache-tvm-ffi and pins torch/transformers), it refuses schema keywords it
cannot enforce (uniqueItems...) instead of ignoring them, and its per-token mask is fast enough to be hidden
behind the GPU's forward pass."""
from __future__ import annotations

import functools
import json
import re
from typing import Optional

import llguidance

from .types import JSON_WHITESPACE, SamplingParams


def grammar_text(json_schema: Optional[object] = None, regex: Optional[str] = None,
                 choice: Optional[list[str] | tuple[str, ...]] = None,
                 json_whitespace: str = SamplingParams.json_whitespace) -> Optional[str]:
    """The llguidance grammar for the one constraint given (json_schema: a dict or its JSON text), or None
    without any. The caller checks that at most one is given (SamplingSpec does)."""
    if json_schema is not None:
        schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
        # compact: no free whitespace between JSON tokens (",", ":" separators), fewer tokens, one spelling
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": json_whitespace == "flexible"})
    if regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(regex)
    if choice:
        # JSON string literals are valid Lark literals: quotes, backslashes and newlines stay exact
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choice))
    return None


@functools.lru_cache(maxsize=1024)
def grammar_error(grammar: str) -> Optional[str]:
    """The library's reason a grammar cannot be enforced (an unsupported keyword, a bad regex, an unsatisfiable
    schema), or None. Cached: a job-level schema is checked for every line that overrides other fields."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
    return _one_line(messages[0]) if is_error else None


def _one_line(reason: str) -> str:
    """The library's reason on one line: without its caret pointers and its echo of the grammar ("1 | ...")."""
    keep = [ln.strip() for ln in reason.splitlines()
            if ln.strip() and not set(ln.strip()) <= set("^ ") and not re.match(r"\s*\d+ \|", ln)]
    return " ".join(keep)


def check(json_schema=None, regex=None, choice=None, json_whitespace: str = SamplingParams.json_whitespace) -> None:
    """Raises ValueError (the message says what to fix) unless the fields name at most one constraint that
    the grammar library can enforce."""
    given = [name for name, v in (("json_schema", json_schema), ("regex", regex), ("choice", choice))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of json_schema, regex and choice (got {' and '.join(given)})")
    if json_schema is not None and not isinstance(json_schema, dict):
        raise ValueError("json_schema must be a JSON Schema object")
    if choice is not None and (not choice or not all(isinstance(c, str) and c for c in choice)):
        raise ValueError("choice must be a non-empty list of non-empty strings")
    if json_whitespace not in JSON_WHITESPACE:
        raise ValueError(f"json_whitespace must be one of {', '.join(JSON_WHITESPACE)}")
    if not given:
        return
    try:
        grammar = grammar_text(json_schema, regex, choice, json_whitespace)
    except (TypeError, ValueError) as err:          # e.g. a schema that does not serialise
        raise ValueError(f"{given[0]} cannot be compiled: {err}") from None
    reason = grammar_error(grammar)
    if reason is not None:
        raise ValueError(f"{given[0]} cannot be compiled: {reason}")
