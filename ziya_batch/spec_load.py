"""Reading a job spec and naming it: the plain-data layer under spec.py's pydantic models.

Everything here works on plain data (what YAML, JSON or Redis gave) and on pydantic's errors, never on one of
spec.py's models by name, so spec.py builds on it and re-exports it without an import cycle: reading a spec file
within its bounds (size, aliases, duplicate keys, finite numbers), the one-line error messages, and the hashes
that are a job's identity. spec.py joins them to the models (parse_spec, load_spec, JobSpec.identity).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import reprlib
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import SpecError, short_text, utf8_safe
from .redact import mask_text


# How fast and where a job runs, not what it writes: a job submitted again with other values of these is the same
# job (JobSpec.identity), and runs on with the new ones (workers read a job's spec again every few seconds and build
# their engine with them; a changed lease applies at each shard's next renewal, never shorter than the one it was
# claimed with). Two limits: sampling.n must stay within engine.max_num_seqs (checked), and where the KV cache is
# smaller than the model's context (a tiny GPU budget; never at LLaMA-13B's 2,048 tokens on a data-center card),
# the memory settings bound the prompt plus output length a line may have.
RUN_FIELDS: tuple[tuple[str, ...], ...] = (
    ("model", "tensor_parallel"), ("model", "replicas"),
    ("engine", "max_num_seqs"), ("engine", "max_num_batched_tokens"), ("engine", "block_size"),
    ("engine", "gpu_memory_fraction"), ("engine", "cuda_graphs"), ("engine", "schedule"),
    ("engine", "prefix_caching"), ("engine", "adaptive_step_size"),
    ("reliability", "lease_s"), ("reliability", "max_retries"), ("priority",))


def run_field_changes(old: BaseModel, new: BaseModel) -> list[str]:
    """'field: old -> new' for each of RUN_FIELDS that `new` sets otherwise than `old` (a job resumed with them)."""
    changes = []
    for path in RUN_FIELDS:
        a, b = old, new
        for key in path:
            a, b = getattr(a, key), getattr(b, key)
        if a != b:
            changes.append(f"{'.'.join(path)}: {a} -> {b}")
    return changes


# Fields added after jobs were already running, with the value that leaves a job's identity as it was: a spec that
# keeps the default hashes as it did before the field existed (so an upgrade does not start its job again).
NEW_FIELD_DEFAULTS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("experience", "logprobs_mode"), "temperature"), (("experience", "top_logprobs"), 0),
    (("experience", "reward_function"), None), (("experience", "reward_url"), None),
    (("experience", "reward_timeout_s"), 30.0), (("experience", "reward_weights"), {}),
    (("output", "filters", "drop_constant_reward_groups"), False), (("model", "quantization"), None),
    (("sampling", "json_schema"), None), (("sampling", "regex"), None), (("sampling", "choice"), None),
    (("sampling", "json_whitespace"), "compact"), (("engine", "fp8_fast_accum"), False))


def _without_new_defaults(d: dict) -> dict:
    for (*section, name), default in NEW_FIELD_DEFAULTS:
        parent = d
        for key in section:
            parent = parent.get(key, {})
        if name in parent and parent[name] == default:
            del parent[name]
    return d


def identity_hash(dumped: dict) -> str:
    """JobSpec.identity of a spec's JSON dump: the hash of every field but RUN_FIELDS, a new field at its
    default left out."""
    for *section, name in RUN_FIELDS:
        parent = dumped
        for key in section:
            parent = parent[key]
        del parent[name]
    return _hash(_without_new_defaults(dumped))


def legacy_identity_hash(dumped: dict) -> str:
    """JobSpec.legacy_identity of a spec's JSON dump: the hash of every field the releases until 2026-11-29 had."""
    for name in ("prefix_caching", "adaptive_step_size"):   # added since: not part of those ids
        dumped["engine"].pop(name, None)
    return _hash(_without_new_defaults(dumped))


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


MAX_SPEC_BYTES = 2**20          # a job spec file is a few hundred bytes; refuse anything past this before parsing
MAX_SPEC_SIZE = 4 * 2**20       # a spec's size with every YAML alias expanded (strings by length, others 1 each)
VALUE_CHARS = 80                # how much of a wrong value an error message quotes
MAX_FIELD_ERRORS = 5            # fields one error message names (a spec of 1,000 wrong keys is still one line)

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = VALUE_CHARS
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxtuple, _SHOW.maxset = 2, 4, 4, 4, 4


def show_value(value: Any) -> str:
    """A short repr of a value from a spec or a line: never longer than VALUE_CHARS, never built in full (an
    aliased YAML tree's full repr can be gigabytes), never raising (a repr of a huge int does)."""
    try:
        # a string masked before repr cuts it (its middle may be a password's end): show_text masks the rest
        text = _SHOW.repr(mask_text(value) if isinstance(value, str) else value)
    except Exception:  # noqa: BLE001 - repr of any value a user can write
        text = f"<{type(value).__name__}>"
    return show_text(text)


def show_text(text: str, limit: int = VALUE_CHARS) -> str:
    """`text` as one line of at most `limit` characters that encodes as UTF-8 (records.short_text, at the
    length a spec error quotes a value)."""
    return short_text(text, limit)


def validation_error_line(err: ValidationError, root: type[BaseModel], source: str = "job spec") -> str:
    """One line naming each wrong field, what is allowed, and the closest key for unknown ones; a wrong value is
    quoted by at most its first VALUE_CHARS characters. `root` is the model that was validated (JobSpec
    for a whole spec): unknown keys are matched against the fields of its part they sit in."""
    parts = []
    errs = err.errors()
    for e in errs[:MAX_FIELD_ERRORS]:
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after", "function-before")))
        dotted = show_text(".".join(str(p) for p in loc)) if loc else "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _submodel_at(root, loc)
            close = difflib.get_close_matches(str(loc[-1])[:VALUE_CHARS], _all_fields(owner), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(_all_fields(owner))})"
            parts.append(f"unknown key '{dotted}'{hint}")
        elif e["type"] == "missing":
            parts.append(f"missing required key '{dotted}'")
        else:
            msg = " ".join(str(e["msg"]).split())
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            parts.append(f"'{dotted}': {msg[:200]} (got {show_value(e.get('input'))})")
    if len(errs) > MAX_FIELD_ERRORS:
        parts.append(f"and {len(errs) - MAX_FIELD_ERRORS} more")
    return f"{source}: " + "; ".join(parts)


def _all_fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _submodel_at(root: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The pydantic model that owns the field at `loc` (for 'did you mean' suggestions)."""
    model = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return model
    return model


def check_spec_data(data: Any, source: str = "job spec") -> None:
    """Bounds on a spec's data before pydantic sees it, whatever it came from (a YAML file, an HTTP body, Redis):
    its size with shared (aliased) parts counted at each use, no cycles, and finite numbers only (a NaN
    temperature or an infinite lease would pass the fields' range checks or break the job later). Iterative,
    and linear in the data as stored (each shared part is sized once)."""
    sizes: dict[int, int] = {}                 # id(container) -> its expanded size
    open_: set[int] = set()                    # containers whose parts are being sized (a cycle comes back to one)
    stack: list[tuple[Any, str, bool]] = [(data, "", False)]
    while stack:
        node, path, done = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            raise SpecError(f"{source}: '{show_text(path) or '(top level)'}': {node} is not a finite number")
        if isinstance(node, str) and not utf8_safe(node):
            raise SpecError(f"{source}: '{show_text(path) or '(top level)'}': not UTF-8 text (a lone surrogate "
                            "escape \\ud800-\\udfff)")
        if not isinstance(node, (dict, list, tuple)):
            continue
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        bad_key = next((k for k, _ in items if isinstance(k, str) and not utf8_safe(k)), None) \
            if isinstance(node, dict) and not done else None
        if bad_key is not None:
            raise SpecError(f"{source}: a key in '{show_text(path) or '(top level)'}' is not UTF-8 text "
                            f"('{show_text(bad_key)}': a lone surrogate escape \\ud800-\\udfff)")
        if done:
            total = 1 + sum(_size(k) + sizes.get(id(v), _size(v)) for k, v in items)
            if total > MAX_SPEC_SIZE:
                raise SpecError(f"{source}: too large with its YAML aliases expanded (over {MAX_SPEC_SIZE} units at "
                                f"'{show_text(path) or '(top level)'}'): write the values out, or share less")
            sizes[id(node)] = total
            open_.discard(id(node))
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_:
            raise SpecError(f"{source}: '{show_text(path) or '(top level)'}' contains itself (a recursive YAML alias)")
        open_.add(id(node))
        stack.append((node, path, True))
        for k, v in items:
            if id(v) not in sizes:
                stack.append((v, f"{path}.{k}" if path else str(k), False))


def _size(leaf: Any) -> int:
    return len(leaf) if isinstance(leaf, (str, bytes)) else 1


class _SpecLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """yaml.safe_load that refuses a key given twice in one mapping (YAML keeps the last silently, so a
    second `sampling:` would drop the first without a word). On libyaml where installed: the pure-Python
    scanner is quadratic in nesting depth (a line of 2,000 '[' took seconds), libyaml refuses deep nesting at
    once."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise SpecError(f"duplicate key '{show_text(key_node.value)}' at line {key_node.start_mark.line + 1} "
                                    f"(first at line {seen[key]}): give each key once")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_spec_file(path: str | Path) -> Any:
    """The data of a YAML or JSON job spec file (JSON is valid YAML), not yet validated (spec.load_spec does
    that). Only a regular file of at most MAX_SPEC_BYTES is read; whatever its content, the result is data or one
    SpecError line."""
    p = Path(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{path}: not a regular file; a job spec is a YAML or JSON file")
        if st.st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: {st.st_size} bytes, over the {MAX_SPEC_BYTES}-byte limit for a job spec")
        with open(p, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job spec file") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read job spec: {err.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: over the {MAX_SPEC_BYTES}-byte limit for a job spec")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text (byte {err.start}); save the spec as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = show_text(str(getattr(err, "problem", None) or err))
        raise SpecError(f"{path}: not valid YAML or JSON{where}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a job spec") from None
    except Exception as err:  # noqa: BLE001 - e.g. an int past 4300 digits, a date out of range: one line
        raise SpecError(f"{path}: cannot read a value: {show_text(str(err))}") from None
    return data
