"""Built-in verifiable rewards, called as f(prompt, response, metadata) -> float (experience.reward_function).

`metadata` is the input line's extra fields as given (records.PromptLine.metadata), so a line like
`{"id": "q1", "prompt": "2+3?", "answer": "5"}` is scored against its own label. A function raises on a line
it cannot score (no label, a label of the wrong type): the worker turns that into `reward: null` and a
one-line `reward_error` for that sample, never a failed shard. Plain Python: no torch, no I/O.

    experience:
      reward_function: math_answer          # or ziya_batch.rewards:math_answer, or my_pkg.scoring:f, or f.py:f
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from fractions import Fraction
from typing import Any, Optional

# bare names a job may give for reward_function (equivalent to ziya_batch.rewards:<name>)
BUILTINS = ("exact_match", "math_answer", "json_schema")

_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def _label(metadata: Any, key: str) -> Any:
    if not isinstance(metadata, dict) or key not in metadata:
        raise ValueError(f"the input line has no '{key}' field to check the response against")
    return metadata[key]


def normalize_answer(text: str) -> str:
    """NFKC, lower case, whitespace runs made one space, ends stripped of spaces and final punctuation."""
    text = _WS.sub(" ", unicodedata.normalize("NFKC", str(text))).strip().lower()
    return text.rstrip(".。!！?？").strip()


def exact_match(prompt: Any, response: str, metadata: Optional[dict]) -> float:
    """1.0 if the normalised response equals the normalised metadata['answer'] (or one of a list), else 0.0."""
    answer = _label(metadata, "answer")
    answers = answer if isinstance(answer, list) else [answer]
    got = normalize_answer(response)
    return 1.0 if any(got == normalize_answer(a) for a in answers) else 0.0


def last_boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def parse_number(text: str) -> Optional[Fraction]:
    """A number written as 12, -3.5, 1,234, 3/4, \\frac{3}{4}, 50% or $7 (exact, as a Fraction), or None."""
    s = _FRAC.sub(r"(\1)/(\2)", str(text)).replace("$", "").replace(",", "").replace("\\!", "").strip()
    s = s.replace("(", "").replace(")", "").rstrip(".")
    percent = s.endswith("%") or s.endswith("\\%")
    s = s.rstrip("%").rstrip("\\").strip()
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def final_answer(response: str) -> Optional[str]:
    """What a math response answers: the last \\boxed{} if any, else its last number."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def math_answer(prompt: Any, response: str, metadata: Optional[dict]) -> float:
    """1.0 if the response's final answer (last \\boxed{}, else last number) equals metadata['answer']
    numerically (relative tolerance 1e-6), or as normalised text where either is not a number; else 0.0."""
    answer = _label(metadata, "answer")
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise ValueError(f"metadata 'answer' must be a number or a string, got {type(answer).__name__}")
    got = final_answer(response)
    if got is None:
        return 0.0
    if isinstance(answer, str):
        want_num = parse_number(last_boxed(answer) or answer)
    else:
        want_num = Fraction(answer) if math.isfinite(answer) else None
    got_num = parse_number(got)
    if want_num is not None and got_num is not None:
        return 1.0 if math.isclose(float(got_num), float(want_num), rel_tol=1e-6, abs_tol=1e-9) else 0.0
    return 1.0 if normalize_answer(got) == normalize_answer(str(answer)) else 0.0


_FENCE = re.compile(r"^```(?:json)?\s*\n(.*?)\n?```\s*$", re.S)


def json_schema(prompt: Any, response: str, metadata: Optional[dict]) -> float:
    """1.0 if the response (a ```json fence around it allowed) parses as JSON and validates against
    metadata['schema'] (a JSON Schema object, or its JSON text), else 0.0. A bad schema raises."""
    import jsonschema

    schema = _label(metadata, "schema")
    if isinstance(schema, str):
        schema = json.loads(schema)
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"metadata 'schema' must be a JSON Schema object, got {type(schema).__name__}")
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    text = response.strip()
    fenced = _FENCE.match(text)
    try:
        instance = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return 0.0
    return 1.0 if validator_cls(schema).is_valid(instance) else 0.0
