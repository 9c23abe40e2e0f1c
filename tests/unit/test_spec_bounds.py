"""Every numeric field of the spec has a sane range, at its edges: the bound itself is accepted, one past it is a
one-line SpecError naming the field; a line's sampling override goes through the same model."""
from __future__ import annotations

import pytest

from ziya_batch import spec as S
from pydantic import ValidationError

from ziya_batch.errors import LineError, SpecError
from ziya_batch.prompts import _sampling

BASE = {"name": "b", "model": {"path": "/m"}, "input": ["/in.jsonl"], "output": {"path": "/out"}}


def _with(section: str | None, **values) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    if section is None:
        data.update(values)
    else:
        data[section] = {**data.get(section, {}), **values}
    return data


# (section, field, largest accepted, smallest refused above); None: no lower edge tested here
EDGES = [
    ("sampling", "top_k", S.MAX_VOCAB, S.MAX_VOCAB + 1),
    ("sampling", "seed", S.MAX_SEED, S.MAX_SEED + 1),
    ("sampling", "max_new_tokens", S.MAX_TOKENS, S.MAX_TOKENS + 1),
    ("reliability", "lease_s", S.MAX_LEASE_S, S.MAX_LEASE_S + 1),
    ("engine", "max_num_batched_tokens", S.MAX_TOKENS, S.MAX_TOKENS + 1),
    ("model", "replicas", 4096, 4097),
    (None, "shard_size", 1_000_000, 1_000_001),
]


@pytest.mark.parametrize("section,field,ok,bad", EDGES)
def test_each_bound_holds_at_its_edge(section, field, ok, bad):
    S.parse_spec(_with(section, **{field: ok}))
    with pytest.raises(SpecError) as err:
        S.parse_spec(_with(section, **{field: bad}))
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("sampling,field", [
    ({"seed": -1}, "seed"), ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens"),
    ({"stop": ["a"] * (S.MAX_STOPS + 1)}, "stop"), ({"stop": ["a" * (S.MAX_STOP_CHARS + 1)]}, "stop"),
    ({"stop": [""]}, "stop"), ({"stop_token_ids": [S.MAX_VOCAB]}, "stop_token_ids"),
    ({"stop_token_ids": [1] * (S.MAX_STOPS + 1)}, "stop_token_ids"), ({"top_k": 10**20}, "top_k"),
])
def test_sampling_refusals_name_the_field(sampling, field):
    with pytest.raises(SpecError, match=field):
        S.parse_spec(_with("sampling", **sampling))


def test_list_and_string_lengths():
    S.parse_spec(_with(None, input=["/a"] * S.MAX_INPUTS))
    with pytest.raises(SpecError, match="input"):
        S.parse_spec(_with(None, input=["/a"] * (S.MAX_INPUTS + 1)))
    with pytest.raises(SpecError, match="output.path"):
        S.parse_spec(_with("output", path="/" + "x" * S.MAX_LOCATION_CHARS))
    with pytest.raises(SpecError, match="model.path"):
        S.parse_spec(_with("model", path=""))


def test_a_lines_override_gets_the_same_bounds():
    base = S.parse_spec(BASE).sampling
    assert _sampling(base, {"top_k": 40, "seed": 7}).top_k == 40
    for override, field in (({"top_k": 10**20}, "top_k"), ({"seed": -3}, "seed"),
                            ({"min_new_tokens": 2000}, "min_new_tokens")):
        with pytest.raises(LineError) as err:
            _sampling(base, override)
        assert err.value.code == "invalid_sampling" and field in err.value.message, err.value.message


def test_defaults_stay_inside_their_bounds():
    spec = S.parse_spec(BASE)
    assert 0 <= spec.sampling.min_new_tokens <= spec.sampling.max_new_tokens <= S.MAX_TOKENS
    assert spec.reliability.lease_s <= S.MAX_LEASE_S and spec.sampling.top_k <= S.MAX_VOCAB


@pytest.mark.parametrize("sampling", [{"regex": "a" * 100_001}, {"regex": ""}, {"choice": []},
                                      {"choice": ["x"] * 1_001}, {"choice": ["y" * 1_001]},
                                      {"json_schema": {"type": "string", "description": "z" * 100_001}}])
def test_structured_output_constraints_are_bounded(sampling):
    """A grammar is compiled on every worker: its size is bounded before the library sees it."""
    from ziya_batch.spec import SamplingSpec

    with pytest.raises(ValidationError):
        SamplingSpec(**sampling)
