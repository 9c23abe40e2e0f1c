"""Every default has one home and every environment variable one reader: the engine's SamplingParams and
EngineConfig hold the sampling.* and engine.* defaults, the spec reads them from there and converts by field
name, the spec's Literal types are engine/types.py's tuples of allowed values, and only ziya_batch/settings.py
reads the environment. These tests fail when a second definition or a field-by-field mapping creeps back in."""
from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest

from ziya_batch import spec as spec_module
from ziya_batch.engine import kv_cache, scheduler
from ziya_batch.engine import types as engine_types
from ziya_batch.engine.types import EngineConfig, SamplingParams
from ziya_batch.spec import EngineSpec, ExperienceSpec, ModelSpec, SamplingSpec, engine_config, parse_spec, sampling_params

PACKAGE = Path(spec_module.__file__).resolve().parent
HOME = PACKAGE / "engine" / "types.py"
BASE = {"name": "t", "model": {"path": "m"}, "input": ["a.jsonl"], "output": {"path": "out"}}

# spec fields the engine does not read (none today); a new one must be named here on purpose
SAMPLING_SPEC_ONLY: frozenset[str] = frozenset()
# SamplingParams fields a job sets under experience.* (the worker passes them to spec.sampling_params)
SAMPLING_FROM_EXPERIENCE = frozenset({"logprobs_mode", "top_logprobs"})
ENGINE_SPEC_ONLY: frozenset[str] = frozenset()
# EngineConfig fields a job spec does not set: where they come from instead
ENGINE_CONFIG_NOT_IN_SPEC = {"model_path", "device", "num_kv_blocks", "max_model_len", "admission_horizon_tokens",
                             "async_scheduling", "mixed_step_graphs"}


def _default(model, name):
    field = model.model_fields[name]
    return field.default_factory() if field.default_factory is not None else field.default


def _fields(dc) -> dict:
    return {f.name: f for f in dataclasses.fields(dc)}


def test_every_sampling_field_has_the_engines_name_and_default():
    engine = _fields(SamplingParams)
    for name in SamplingSpec.model_fields:
        if name in SAMPLING_SPEC_ONLY:
            continue
        assert name in engine, f"sampling.{name} has no SamplingParams field of that name"
        want = engine[name].default
        got = _default(SamplingSpec, name)
        assert (tuple(got) if isinstance(got, list) else got) == want, f"sampling.{name}: {got!r} != {want!r}"
    assert set(engine) - SAMPLING_FROM_EXPERIENCE <= set(SamplingSpec.model_fields), \
        "a SamplingParams field a job spec cannot set"
    for name in SAMPLING_FROM_EXPERIENCE:
        assert _default(ExperienceSpec, name) == engine[name].default, f"experience.{name} and SamplingParams differ"


def test_every_engine_field_has_the_engines_name_and_default():
    engine = _fields(EngineConfig)
    for model in (EngineSpec, ModelSpec):
        for name in model.model_fields:
            if name not in engine:
                assert model is ModelSpec or name in ENGINE_SPEC_ONLY, f"engine.{name} is not an EngineConfig field"
                continue
            assert _default(model, name) == engine[name].default, f"{model.__name__}.{name} and EngineConfig differ"
    spec_names = set(EngineSpec.model_fields) | set(ModelSpec.model_fields)
    assert set(engine) - spec_names == ENGINE_CONFIG_NOT_IN_SPEC


# the structured-output constraints exclude each other: the test below sets each in turn
CONSTRAINTS = {"json_schema": {"type": "object", "required": ["a"]}, "regex": "a+", "choice": ["yes", "no"]}


@pytest.mark.parametrize("constraint", sorted(CONSTRAINTS))
def test_sampling_params_carries_every_field(constraint):
    # a value unlike each default, so a field dropped on the way shows
    s = SamplingSpec(max_new_tokens=7, min_new_tokens=2, temperature=0.5, top_p=0.5, top_k=3, repetition_penalty=1.2,
                     n=2, seed=11, stop=["x"], stop_token_ids=[9], ignore_eos=True, json_whitespace="flexible",
                     **{constraint: CONSTRAINTS[constraint]})
    p = sampling_params(s, logprobs_mode="raw", top_logprobs=3)
    assert (p.logprobs_mode, p.top_logprobs) == ("raw", 3)
    others = set(CONSTRAINTS) - {constraint}
    for name in set(_fields(SamplingParams)) - SAMPLING_FROM_EXPERIENCE - others:
        got, want = getattr(p, name), getattr(s, name)
        if name == "json_schema":
            assert isinstance(got, str), "the engine takes a schema as its JSON text"
            got = json.loads(got)
        assert got == (tuple(want) if isinstance(want, list) else want), name
        assert getattr(p, name) != getattr(SamplingParams(), name), \
            f"{name}: the test's value must differ from the default"
    assert all(getattr(p, name) is None for name in others)
    assert sampling_params(s, seed=5).seed == 5


def test_engine_config_carries_every_field():
    s = parse_spec({**BASE, "model": {"path": "m", "dtype": "bfloat16", "trust_remote_code": True,
                                      "quantization": "fp8"},
                    "engine": {"max_num_seqs": 9, "max_num_batched_tokens": 99, "block_size": 8,
                               "gpu_memory_fraction": 0.5, "cuda_graphs": False, "kv_cache_dtype": "fp8",
                               "schedule": "fcfs", "prefix_caching": False, "fp8_fast_accum": True,
                               "adaptive_step_size": False}})
    c = engine_config(s, "/models/x", "cpu")
    assert (c.model_path, c.device, c.dtype, c.trust_remote_code) == ("/models/x", "cpu", "bfloat16", True)
    for name in EngineSpec.model_fields:
        assert getattr(c, name) == getattr(s.engine, name) != getattr(EngineConfig, name), name


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _distinctive_defaults() -> dict[str, object]:
    """Defaults that could only be a copy where they appear bound to their own name: numbers other than 0 and 1
    and names of policies (dtype names, "auto", booleans and None are everyday values)."""
    out = {}
    for dc in (SamplingParams, EngineConfig):
        for f in dataclasses.fields(dc):
            v = f.default
            if f.name in ("dtype", "device") or v is dataclasses.MISSING or v is None or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and v in (0, 1) or v in ("auto", ()):
                continue
            out[f.name] = v
    return out


def _same(node, value) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is type(value) and node.value == value


def _copies(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each distinctive default bound to its own name, and each model-card top_p, in `tree`."""
    defaults = _distinctive_defaults()
    found = []
    for node in ast.walk(tree):
        pairs = []
        if isinstance(node, ast.keyword) and node.arg in defaults:                      # f(top_p=0.85)
            pairs.append((node.arg, node.value))
        elif isinstance(node, ast.Dict):                                                  # {"top_p": 0.85}
            pairs += [(k.value, v) for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and k.value in defaults]
        elif isinstance(node, (ast.AnnAssign, ast.Assign)) and node.value is not None:   # top_p = 0.85 / Field(0.85)
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            value = node.value.args[0] if isinstance(node.value, ast.Call) and node.value.args else node.value
            pairs += [(t.id, value) for t in targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.arguments):                                             # def f(top_p=0.85)
            args = node.posonlyargs + node.args
            pairs += list(zip([a.arg for a in args[len(args) - len(node.defaults):]], node.defaults))
            pairs += [(a.arg, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
        found += [(v.lineno, f"{name}={defaults[name]!r}") for name, v in pairs
                  if name in defaults and _same(v, defaults[name])]
        # the model card's top_p is distinctive enough to be a copy wherever it appears
        if _same(node, SamplingParams.top_p):
            found.append((node.lineno, repr(SamplingParams.top_p)))
    return found


def test_no_default_is_spelled_outside_its_home():
    assert {"top_p", "max_num_seqs", "max_new_tokens", "gpu_memory_fraction", "schedule"} <= \
        set(_distinctive_defaults())
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
             for path, tree in _sources() if path != HOME for line, what in _copies(tree)]
    assert not found, "defaults spelled again outside engine/types.py:\n" + "\n".join(sorted(set(found)))


def test_the_scan_sees_each_kind_of_copy():
    # the scan above must not pass by looking at nothing
    sample = ("def f(max_num_seqs=256): pass\n"
              "x = dict(block_size=16, top_k=3)\n"
              "class S:\n    schedule: str = Field('tail-longest-first', ge=0)\n"
              "y = {'gpu_memory_fraction': 0.9}\n"
              "admission_horizon_tokens = 256\n"
              "z = [0.85]\n"
              "ok = dict(max_num_seqs=255, n=1, dtype='float16')\n")
    assert sorted(line for line, _ in _copies(ast.parse(sample))) == [1, 2, 4, 5, 6, 7]


# each string setting with a fixed set of values: (the spec model, its field, the engine's tuple of allowed values)
ALLOWED_VALUES = [(SamplingSpec, "json_whitespace", "JSON_WHITESPACE"),
                  (ExperienceSpec, "logprobs_mode", "LOGPROBS_MODES"),
                  (EngineSpec, "schedule", "SCHEDULE_POLICIES"), (EngineSpec, "kv_cache_dtype", "KV_CACHE_DTYPES")]


@pytest.mark.parametrize("model,name,home", ALLOWED_VALUES, ids=[n for _, n, _ in ALLOWED_VALUES])
def test_each_spec_literal_is_the_engines_tuple(model, name, home):
    allowed = getattr(engine_types, home)
    assert typing.get_origin(model.model_fields[name].annotation) is typing.Literal
    assert typing.get_args(model.model_fields[name].annotation) == allowed, f"{model.__name__}.{name}"
    assert _default(model, name) in allowed


def test_the_engine_modules_export_the_same_tuples():
    # the modules that enforce them re-export the one tuple, not a copy (the bench and scripts import them there)
    assert scheduler.POLICIES is engine_types.SCHEDULE_POLICIES
    assert kv_cache.KV_CACHE_DTYPES is engine_types.KV_CACHE_DTYPES


def _value_lists(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, home) for each tuple, list, set or dict keys in `tree` that spells two or more values of one home
    tuple: a second list of allowed values (`Literal["auto", "fp8"]`, `mode in ("raw", "processed")`)."""
    homes = {home: set(getattr(engine_types, home)) for _, _, home in ALLOWED_VALUES}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        strings = {e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        found += [(node.lineno, home) for home, values in homes.items() if len(strings & values) >= 2]
    return found


def test_allowed_values_are_spelled_only_in_their_home():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: values of {home}"
             for path, tree in _sources() if path != HOME for line, home in _value_lists(tree)]
    assert not found, "allowed values listed again outside engine/types.py:\n" + "\n".join(sorted(found))


def test_the_value_scan_sees_each_kind_of_list():
    sample = ("x: Literal['fcfs', 'longest-first'] = 'fcfs'\n"
              "if m not in ('temperature', 'raw', 'processed'): pass\n"
              "p.add_argument('--kv', choices=['auto', 'fp8'])\n"
              "w = {'compact': 0, 'flexible': 1}\n"
              "ok = ('auto', 'float16') if mode == 'raw' else {'fp8'}\n")
    assert sorted(_value_lists(ast.parse(sample))) == [(1, "SCHEDULE_POLICIES"), (2, "LOGPROBS_MODES"),
                                                         (3, "KV_CACHE_DTYPES"), (4, "JSON_WHITESPACE")]


def test_only_the_settings_module_reads_the_environment():
    readers = []
    for path, tree in _sources():
        if path == PACKAGE / "settings.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                    and node.attr in ("environ", "getenv", "putenv", "unsetenv"):
                readers.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: os.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                    any(a.name in ("environ", "getenv") for a in node.names):
                readers.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: from os import ...")
    assert not readers, "environment read outside ziya_batch/settings.py:\n" + "\n".join(readers)


@pytest.mark.parametrize("name,value,read", [
    ("ZIYA_BATCH_HOME", "/tmp/zb-home", lambda s: str(s.home_dir())),
    ("ZIYA_BATCH_REDIS_URL", "redis://h:1/0", lambda s: s.redis_url()),
    ("RAY_ADDRESS", "h:6379", lambda s: s.ray_address()),
    ("ZIYA_BATCH_ALLOWED_PREFIXES", "/a/, s3://b/,", lambda s: s.allowed_prefixes()),
])
def test_settings_read_when_asked_and_flags_win(monkeypatch, name, value, read):
    from ziya_batch import settings

    monkeypatch.setenv(name, value)
    want = ("/a/", "s3://b/") if name == "ZIYA_BATCH_ALLOWED_PREFIXES" else value
    assert read(settings) == want
    assert settings.redis_url("redis://flag") == "redis://flag" and settings.ray_address("flag:1") == "flag:1"
    monkeypatch.setenv(name, "")
    assert read(settings) in (None, (), str(Path.home() / ".cache" / "ziya-batch"))
