"""Random and adversarial input lines through the per-line path: each line yields exactly one prompt or one
error record, nothing escapes, and every record its line leads to serialises (as a dead-lettered shard's
retries_exhausted line too)."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ziya_batch import errors
from ziya_batch.io.schema import encode_jsonl
from ziya_batch.records import MESSAGE_CHARS, LineFailure, LineResult, SampleOutput, TooLongLine
from ziya_batch.work.generation import build_parts, line_id, parse_shard
from ziya_batch.spec import parse_spec

BASE = {"name": "h", "model": {"path": "m"}, "input": ["in.jsonl"], "output": {"path": "o"}}
SPECS = {fmt: parse_spec({**BASE, "format": fmt}) for fmt in ("ziya", "openai-batch")}


class CharTokenizer:
    """One token per character, as a tokenizer would, and it refuses what sentencepiece cannot encode."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text: str):
        text.encode("utf-8")
        return self._Out([ord(c) % 30000 for c in text])


def deep(n: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * n + close * n).encode()


HUGE_INT = "9" * 5000
ADVERSARIAL = [
    deep(100_000),
    b'{"id": "x", "prompt": "p", "extra": ' + deep(100_000) + b"}",
    b'{"id": ' + deep(900) + b', "prompt": "p"}',
    b'{"id": ' + deep(60) + b', "prompt": "p"}',
    deep(50_000, '{"a":', "}")[:-50_000] + b"1" + b"}" * 50_000,
    f'{{"id": {HUGE_INT}, "prompt": "p"}}'.encode(),
    f'{{"id": "x", "prompt": "p", "sampling": {{"seed": {HUGE_INT}}}}}'.encode(),
    f'{{"id": "x", "messages": [{{"role": "user", "content": {HUGE_INT}}}]}}'.encode(),
    ('{"id": "x", "prompt": "p", "sampling": {"seed": ' + "9" * 4000 + "}}").encode(),
    ('{"id": ' + "9" * 4000 + ', "prompt": "p"}').encode(),
    b'{"id": "x", "prompt": "p", "sampling": {"temperature": NaN}}',
    b'{"id": "x", "prompt": "p", "sampling": {"top_p": Infinity}}',
    b'{"id": "x", "prompt": "p", "sampling": {"temperature": -Infinity}}',
    b'{"id": "x", "prompt": "p", "sampling": {"temperature": 1e999}}',
    b'{"id": "\\ud800", "prompt": "p"}',
    b'{"id": "x", "prompt": "\\udfff lone"}',
    b'{"id": "x", "prompt": "p", "\\ud800": 1}',
    b'{"id": "x", "prompt": "\xed\xa0\x80"}',
    b'{"id": "x", "prompt": "\x00\x01\x1b control"}',
    b'{"id": "x", "prompt": "p\\u0000\\u001b"}',
    b'\xef\xbb\xbf{"id": "bom", "prompt": "p"}',
    b'{"id": "\xef\xbb\xbf", "prompt": "\xef\xbb\xbf"}',
    b'{"id": "x", "prompt": "\xff\xfe bad utf8"}',
    b"\xff\xfe\x00{",
    b'{"id": "x", "prompt": "' + b"y" * 2_000_000 + b'"}',
    b'{"id": "' + b"i" * 1_000_000 + b'", "prompt": 5}',
    b'{"id": "x", "messages": [{"role": "' + b"r" * 1_000_000 + b'", "content": "c"}]}',
    b'{"id": "x", "prompt": "p", "sampling": {"' + b"k" * 100_000 + b'": 1}}',
    b'{"id": "x", "prompt": "p", "sampling": {"stop": "' + b"s" * 100_000 + b'"}}',
    b'{"id": "x", "prompt": "p", "sampling": {"stop": [' + b"1," * 10_000 + b'1]}}',
    b'{"id": "x", "prompt": "p", "sampling": {"n": true, "max_new_tokens": "lots"}}',
    b'{"id": [], "prompt": {}, "messages": 3, "sampling": []}',
    b'{"id": {"a": [1, {"b": null}]}, "messages": [null, 1, "x", []]}',
    b'{"custom_id": ' + deep(5000) + b', "body": {"prompt": "p"}}',
    f'{{"custom_id": {HUGE_INT}, "body": {{"prompt": "p", "max_tokens": {HUGE_INT}}}}}'.encode(),
    b'{"custom_id": "c", "body": {"messages": [{"role": "user", "content": "hi"}], "model": ' + deep(60) + b"}}",
    b'{"custom_id": "c", "url": ' + deep(60) + b', "body": {"prompt": "p", "stop": 5, "n": -1}}',
    b"[]", b"null", b"1", b'"str"', b"{", b"}", b"{}", b"{{}}", b",", b"\x00", b"\\",
    TooLongLine(b'{"id": "x", "prompt": "', 20 * 2**20, 16 * 2**20),
]

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                       st.text(max_size=20))
_json = st.recursive(_json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                     max_leaves=20)
_keys = st.sampled_from(["id", "custom_id", "prompt", "messages", "sampling", "body", "role", "content", "n",
                         "temperature", "top_p", "stop", "seed", "max_new_tokens", "url", "model", "extra"])
_shaped = st.recursive(_json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                          st.dictionaries(_keys, kids, max_size=5)), max_leaves=25)
_fragments = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b'"\\ud800"', b'"\\udc00x"', HUGE_INT.encode(),
                              b"\xff", b"\xef\xbb\xbf", b"\x00", b"[[[[[[", b"]]}}", b'"', b"\\", b"\r", b"\t", b","])


@st.composite
def mutated(draw) -> bytes:
    """A plausible line with hostile pieces spliced in."""
    base = json.dumps(draw(_shaped), ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(base)))
        base = base[:at] + draw(_fragments) + base[at:]
    return base


_lines = st.one_of(
    st.binary(max_size=60).filter(lambda b: b"\n" not in b),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    _json.map(lambda v: json.dumps(v).encode()),
    _shaped.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"id": _json, "prompt": _json}, optional={"sampling": _shaped, "messages": _shaped})
      .map(lambda v: json.dumps(v).encode()),
    mutated(),
    st.sampled_from(ADVERSARIAL),
)


def _check_shard(raws: list[bytes], fmt: str) -> None:
    spec = SPECS[fmt]
    lines = [(no, raw) for no, raw in enumerate(raws, 1)]
    work = parse_shard(lines, "in.jsonl", spec, CharTokenizer(), max_model_len=10**9)
    seen = sorted([pl.line for pl, _ in work.prompts] + [f.line for f in work.failures])
    assert seen == list(range(1, len(raws) + 1))           # one outcome per line, none lost, none doubled
    for f in work.failures:
        assert f.code in {errors.INVALID_JSON, errors.INVALID_LINE, errors.INVALID_SAMPLING, errors.MISSING_PROMPT,
                          errors.EMPTY_PROMPT, errors.LINE_TOO_LONG}, f
        assert "\n" not in f.message and len(f.message) <= MESSAGE_CHARS
    # every record the shard's lines lead to serialises: results echo the prompt, errors the id
    results = [LineResult(pl, ids[:3], [SampleOutput(0, [5, 6], "out", "stop", [-0.5, -0.25])])
               for pl, ids in work.prompts]
    for records in build_parts(spec, results, work.failures).values():
        json.loads(b"[" + encode_jsonl(records).replace(b"\n", b",").rstrip(b",") + b"]")
    # the dead-letter path: every line's retries_exhausted record
    dead = [LineFailure(line_id(raw, "in.jsonl", no, fmt), "in.jsonl", no, errors.RETRIES_EXHAUSTED, "gave up")
            for no, raw in lines]
    encode_jsonl(build_parts(spec, [], dead)["errors"])


@pytest.mark.parametrize("fmt", ["ziya", "openai-batch"])
@pytest.mark.parametrize("raw", ADVERSARIAL, ids=lambda r: repr(r[:30]))
def test_each_adversarial_line_is_its_own_outcome(raw, fmt):
    _check_shard([b'{"id": "good", "prompt": "p", "custom_id": "good", "body": {"prompt": "p"}}', raw,
                  b'{"id": "good2", "prompt": "q", "custom_id": "good2", "body": {"prompt": "q"}}'], fmt)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raws=st.lists(_lines, min_size=1, max_size=6), fmt=st.sampled_from(["ziya", "openai-batch"]))
def test_random_lines_never_escape_their_line(raws, fmt):
    _check_shard(raws, fmt)


def test_known_hostile_lines_get_the_right_codes():
    work = parse_shard([(1, deep(100_000)), (2, f'{{"id": {HUGE_INT}, "prompt": "p"}}'.encode()),
                        (3, b'{"id": "n", "prompt": "p", "sampling": {"temperature": NaN}}'),
                        (4, b'{"id": "\\ud800", "prompt": "p"}'), (5, b'{"id": 12345, "prompt": "fine"}')],
                       "f", SPECS["ziya"], CharTokenizer(), 10**9)
    assert [(f.id, f.line, f.code) for f in work.failures] == [
        ("f:1", 1, errors.INVALID_JSON), ("f:2", 2, errors.INVALID_JSON), ("n", 3, errors.INVALID_JSON),
        ("f:4", 4, errors.INVALID_JSON)]
    assert "4300 digits" in work.failures[1].message and "nested deeper" in work.failures[0].message
    assert [(pl.id, pl.line) for pl, _ in work.prompts] == [("12345", 5)]


def test_a_line_whose_tokenizer_raises_is_its_own_error():
    class Broken(CharTokenizer):
        def __call__(self, text):
            if "boom" in text:
                raise RuntimeError("tokenizer\nexploded " + "x" * 1000)
            return super().__call__(text)

    work = parse_shard([(1, b'{"prompt": "boom"}'), (2, b'{"prompt": "ok"}')], "f", SPECS["ziya"], Broken(), 10**9)
    (f,) = work.failures
    assert f.code == errors.INVALID_LINE and "\n" not in f.message and len(f.message) <= MESSAGE_CHARS
    assert [pl.line for pl, _ in work.prompts] == [2]


def test_a_lines_n_above_the_seats_is_its_invalid_sampling_error():
    """The job's own n is checked at submit; a line's n above engine.max_num_seqs could never run either, and is
    that line's invalid_sampling error, not a failure of generation."""
    spec = parse_spec({"name": "n", "model": {"path": "/m"}, "input": ["in.jsonl"], "output": {"path": "o"},
                       "engine": {"max_num_seqs": 2}})
    lines = [(1, b'{"id": "a", "prompt": "p", "sampling": {"n": 3}}'),
             (2, b'{"id": "b", "prompt": "p", "sampling": {"n": 2}}')]
    work = parse_shard(lines, "in.jsonl", spec, CharTokenizer(), max_model_len=10**9)
    [failure] = work.failures
    assert failure.id == "a" and failure.code == errors.INVALID_SAMPLING and "engine.max_num_seqs (2)" in failure.message
    assert [pl.id for pl, _ in work.prompts] == ["b"]
