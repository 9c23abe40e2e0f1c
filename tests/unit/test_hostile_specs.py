"""Random and adversarial job specs through load_spec: a JobSpec or one short SpecError line, never another
exception, never slow; and the same bounds on specs that arrive as data (HTTP, Redis) through parse_spec."""
from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ziya_batch.errors import SpecError, utf8_safe
from ziya_batch.spec import MAX_SPEC_BYTES, JobSpec, load_spec, parse_spec

MESSAGE_BOUND = 1200          # one line a person reads; format_validation_error names at most 5 fields
VALID = "name: x\nmodel: {path: m}\ninput: a.jsonl\noutput: {path: o}\n"


def _load(tmp_path, text: str | bytes):
    p = tmp_path / "job.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        return load_spec(p)
    except SpecError as err:
        msg = str(err)
        assert "\n" not in msg and len(msg) < MESSAGE_BOUND, msg[:300]
        return err


def laughs(levels: int, width: int = 10) -> str:
    out = "a0: &a0 [" + ",".join(["lol"] * width) + "]\n"
    for i in range(1, levels):
        out += f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]\n"
    return out


ADVERSARIAL = {
    "laughs_as_name": "defs:\n" + "".join("  " + line + "\n" for line in laughs(9).splitlines())
                      + "name: *a8\nmodel: {path: m}\ninput: a.jsonl\noutput: {path: o}\n",
    "laughs_as_input": "x: &x [" + ",".join(["*y"] * 0) + "]\n" + laughs(8) + "name: n\nmodel: {path: m}\n"
                       "input: *a7\noutput: {path: o}\n",
    "recursive_alias": "name: &n [*n]\nmodel: {path: m}\ninput: a.jsonl\noutput: {path: o}\n",
    "recursive_map": "model: &m {path: m, self: *m}\nname: x\ninput: a.jsonl\noutput: {path: o}\n",
    "duplicate_top": VALID + "name: y\n",
    "duplicate_nested": "name: x\nmodel: {path: m, path: n}\ninput: a.jsonl\noutput: {path: o}\n",
    "inf": VALID + "sampling: {temperature: .inf}\n",
    "neg_inf": VALID + "sampling: {top_p: -.inf}\n",
    "nan": VALID + "reliability: {lease_s: .nan}\n",
    "nan_in_filter": VALID.replace("output: {path: o}", "output: {path: o, filters: {min_reward: .NaN}}"),
    "huge_int": VALID + "shard_size: " + "9" * 5000 + "\n",
    "huge_int_ok_digits": VALID + "priority: " + "9" * 4000 + "\n",
    "deep_flow": "name: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "deep_map": "name: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
    "long_name": VALID.replace("name: x", "name: " + "x" * 500_000),
    "long_key": VALID + "k" * 300_000 + ": 1\n",
    "many_errors": "".join(f"bad{i}: {i}\n" for i in range(1000)),
    "int_keys": VALID + "1: 2\n",
    "complex_key": VALID + "? [a, b]\n: 1\n",
    "python_tag": VALID + "x: !!python/object/apply:os.system ['true']\n",
    "binary": VALID + "name2: !!binary aGVsbG8=\n",
    "timestamp": VALID.replace("name: x", "name: 2001-12-14t21:59:43.10-05:00"),
    "bad_date": VALID.replace("name: x", "name: !!timestamp 2001-99-99"),
    "list_top": "- a\n- b\n",
    "scalar_top": "just text\n",
    "empty": "",
    "json": '{"name": "x", "model": {"path": "m"}, "input": ["a"], "output": {"path": "o"}, "sampling": {"temperature": NaN}}',
    "tabs": "name:\tx\n\tmodel: 1\n",
    "bom": "\ufeff" + VALID,
    "lone_surrogate": VALID.replace("name: x", 'name: "\\ud800"'),
    "control": VALID.replace("name: x", "name: \x07\x00"),
    "many_docs": VALID + "---\n" + VALID,
    "merge_keys": "base: &b {path: m}\nname: x\nmodel: {<<: *b, dtype: float16}\ninput: a.jsonl\noutput: {path: o}\n",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_specs_give_a_jobspec_or_one_line(tmp_path, name):
    got = _load(tmp_path, ADVERSARIAL[name])
    assert isinstance(got, (JobSpec, SpecError))


@pytest.mark.parametrize("name,expect", [
    ("laughs_as_name", "aliases expanded"), ("laughs_as_input", "aliases expanded"),
    ("recursive_alias", "contains itself"), ("recursive_map", "contains itself"),
    ("duplicate_top", "duplicate key 'name' at line 5 (first at line 1)"), ("duplicate_nested", "duplicate key 'path'"),
    ("inf", "'sampling.temperature': inf is not a finite number"), ("neg_inf", "not a finite number"),
    ("nan", "'reliability.lease_s': nan is not a finite number"), ("nan_in_filter", "output.filters.min_reward"),
    ("huge_int", "4300 digits"), ("json", "finite number"), ("python_tag", "not valid YAML"),
])
def test_what_each_refusal_says(tmp_path, name, expect):
    got = _load(tmp_path, ADVERSARIAL[name])
    assert isinstance(got, SpecError) and expect in str(got)


def test_merge_keys_are_not_duplicates(tmp_path):
    assert isinstance(_load(tmp_path, ADVERSARIAL["merge_keys"]), SpecError)     # "base" is no spec key ...
    ok = "name: x\nmodel: {<<: {path: m}, dtype: float16}\ninput: a.jsonl\noutput: {path: o}\n"
    assert _load(tmp_path, ok).model.path == "m"                                  # ... but merging works


def test_size_bound_before_parsing_and_non_utf8(tmp_path):
    got = _load(tmp_path, VALID + "#" * MAX_SPEC_BYTES)
    assert isinstance(got, SpecError) and "byte limit" in str(got)
    got = _load(tmp_path, b"name: \xff\xfe\n" + VALID.encode())
    assert isinstance(got, SpecError) and "not UTF-8" in str(got)


def test_a_fifo_spec_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "spec.yaml")
    with pytest.raises(SpecError, match="not a regular file"):
        load_spec(tmp_path / "spec.yaml")


def test_data_from_http_or_redis_has_the_same_bounds():
    base = {"name": "x", "model": {"path": "m"}, "input": ["a"], "output": {"path": "o"}}
    for bad in ({**base, "sampling": {"temperature": math.nan}}, {**base, "priority": math.inf},
                {**base, "engine": {"gpu_memory_fraction": math.nan}}):
        with pytest.raises(SpecError, match="finite"):
            parse_spec(bad)
    shared = ["x" * 1000] * 10
    for _ in range(4):
        shared = [shared] * 10
    with pytest.raises(SpecError, match="aliases expanded"):
        parse_spec({**base, "input": shared})
    loop: list = []
    loop.append(loop)
    with pytest.raises(SpecError, match="contains itself"):
        parse_spec({**base, "name": loop})
    # pydantic itself refuses non-finite floats (FastAPI builds JobSpec from the body without parse_spec)
    with pytest.raises(Exception, match="finite"):
        JobSpec(**{**base, "sampling": {"top_p": math.nan}})


def test_a_wrong_value_is_quoted_short(tmp_path):
    got = _load(tmp_path, VALID.replace("name: x", "name: [" + ", ".join(["y" * 5000] * 50) + "]"))
    assert isinstance(got, SpecError) and len(str(got)) < 400


_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30))
_keys = st.one_of(st.sampled_from(["name", "model", "path", "input", "output", "sampling", "temperature", "top_p",
                                   "n", "seed", "stop", "engine", "reliability", "lease_s", "shard_size", "format",
                                   "records", "filters", "experience", "dtype", "replicas", "quantization",
                                   "fp8_fast_accum", "kv_cache_dtype"]), st.text(max_size=8))
_tree = st.recursive(_scalar, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(_keys, kids, max_size=6)), max_leaves=30)
_yaml_bits = st.sampled_from(["&a ", "*a", "*b", "&b [*a, *a, *a]", "<<: ", "!!python/name:os.system", "!!binary ",
                              ".inf", ".nan", "-.Inf", "9" * 5000, "[" * 50, "}" * 5, "? ", "\t", "---\n", "...\n",
                              "\ufeff", "\x00", "'", '"', "\\", "%YAML 1.1\n", "name: dup\n", ": ", "- "])


@st.composite
def yaml_texts(draw) -> str:
    tree = draw(st.one_of(_tree, st.fixed_dictionaries(
        {"name": _tree, "model": st.fixed_dictionaries({"path": _tree}), "input": _tree,
         "output": st.fixed_dictionaries({"path": _tree})}, optional={"sampling": _tree, "engine": _tree})))
    try:
        text = yaml.safe_dump(tree, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.booleans()))
    except yaml.YAMLError:
        text = ""
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_yaml_bits) + text[at:]
    return text


@settings(max_examples=250, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(text=st.one_of(yaml_texts(), st.text(max_size=200), st.binary(max_size=200)))
def test_random_specs_give_a_jobspec_or_one_short_line(tmp_path, text):
    got = _load(tmp_path, text)
    assert isinstance(got, (JobSpec, SpecError))


def test_many_wrong_fields_are_named_five_at_a_time():
    base = {"name": "x", "model": {"path": "m"}, "input": ["a"], "output": {"path": "o"}}
    with pytest.raises(SpecError) as ei:
        parse_spec({**base, **{f"bad{i}": i for i in range(5)}})
    assert str(ei.value).count("unknown key") == 5 and "more" not in str(ei.value)
    with pytest.raises(SpecError) as ei:
        parse_spec({**base, **{f"bad{i}": i for i in range(7)}})
    assert str(ei.value).count("unknown key") == 5 and str(ei.value).endswith("; and 2 more")


@pytest.mark.parametrize("value", ["yes", 1, "true", None, [], {}, 2, 1.0, "on", "\x00" * 10_000, float("nan")])
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_fp8_fast_accum_takes_a_boolean_and_fp8_weights_or_says_why_in_one_line(quantization, value):
    base = {"name": "t", "model": {"path": "m", "quantization": quantization}, "input": ["a.jsonl"],
            "output": {"path": "o"}, "engine": {"fp8_fast_accum": value}}
    try:
        got = parse_spec(base)
    except SpecError as e:
        assert "\n" not in str(e) and len(str(e)) < 400 and "fp8_fast_accum" in str(e)
    else:
        # only a boolean's spellings pass, and only with FP8 weights when they mean true
        assert got.engine.fp8_fast_accum in (True, False)
        assert quantization == "fp8" or not got.engine.fp8_fast_accum


_wild_text = st.one_of(st.text(st.characters(exclude_categories=()), max_size=8),
                       st.sampled_from(["\ud800", "a\udfff", "\udc80x"]))
_wild_tree = st.recursive(st.one_of(_scalar, _wild_text), lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.one_of(_keys, _wild_text), kids, max_size=6)), max_leaves=30)


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


@settings(max_examples=300, deadline=2000)
@given(tree=st.fixed_dictionaries({"name": _wild_tree, "model": st.fixed_dictionaries({"path": _wild_tree}),
                                   "input": _wild_tree, "output": st.fixed_dictionaries({"path": _wild_tree})},
                                  optional={"sampling": _wild_tree, "experience": _wild_tree}))
def test_specs_as_data_with_any_text_give_a_jobspec_or_one_line(tree):
    """Data (an HTTP body, Redis) holding any text, lone surrogates in keys and values too: a JobSpec or one
    SpecError, and never a JobSpec holding text no storage, Redis key or log line can carry."""
    try:
        spec = parse_spec(tree)
    except SpecError as err:
        assert "\n" not in str(err) and len(str(err)) < MESSAGE_BOUND
        utf8_safe(str(err)) or pytest.fail(f"message not UTF-8: {err!r}")
        return
    assert all(utf8_safe(s) for s in _strings(tree))
    spec.identity()


@settings(max_examples=100, deadline=2000)
@given(depth=st.integers(0, 600), where=st.sampled_from(["input", "output", "model"]))
def test_a_location_is_at_most_256_folders_deep(depth, where):
    deep = "/d" + "/x" * depth
    spec = {"name": "x", "model": {"path": "/m"}, "input": ["/a.jsonl"], "output": {"path": "/o"}}
    spec = {**spec, "input": [deep]} if where == "input" else {**spec, where: {"path": deep}}
    if depth + 1 <= 256:
        assert isinstance(parse_spec(spec), JobSpec)
    else:
        with pytest.raises(SpecError, match="more than 256 folders deep"):
            parse_spec(spec)
