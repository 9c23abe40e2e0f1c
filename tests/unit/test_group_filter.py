"""output.filters.drop_constant_reward_groups: which prompts' samples become experience records."""
import math

from ziya_batch import filters
from ziya_batch.records import LineResult, PromptLine, SampleOutput
from ziya_batch.work.generation import build_parts
from ziya_batch.spec import FiltersSpec, SamplingSpec, parse_spec


def line(i, rewards):
    pl = PromptLine(f"p{i}", "f", i, "", SamplingSpec(), query="q", metadata={"answer": str(i)})
    return LineResult(pl, [1, 2], [SampleOutput(k, [5], "r", "stop", [-0.1], reward=r) for k, r in enumerate(rewards)])


def test_constant_groups():
    assert filters.constant_reward(line(0, [1.0, 1.0, 1.0]).samples)
    assert filters.constant_reward(line(0, [0.5]).samples)                      # one sample: zero advantage
    assert not filters.constant_reward(line(0, [1.0, 0.0]).samples)
    assert not filters.constant_reward(line(0, [1.0, None]).samples)            # unknown: kept
    assert not filters.constant_reward(line(0, [math.nan, math.nan]).samples)


def test_dropped_groups_write_no_experience_but_keep_results():
    results = [line(0, [1.0, 1.0]), line(1, [1.0, 0.0]), line(2, [0.0, 0.0]), line(3, [None, 2.0])]
    spec = parse_spec({"name": "t", "model": {"path": "m"}, "input": ["a"],
                       "experience": {"reward_function": "exact_match"}, "output": {"path": "o", "filters": {"drop_constant_reward_groups": True}}, "sampling": {"n": 2}})
    parts = build_parts(spec, results, [])
    assert [r["id"] for r in parts["experience"]] == ["p1", "p1", "p3", "p3"]
    assert len(parts["results"]) == 8 and all(r["metadata"] == {"answer": r["id"][1:]} for r in parts["results"])
    p1 = [r for r in parts["experience"] if r["id"] == "p1"]
    assert [r["group_reward_mean"] for r in p1] == [0.5, 0.5]                  # its own group only
    assert filters.dropped_constant_reward_groups(results, spec.output.filters) == 2
    assert filters.dropped_constant_reward_groups(results, FiltersSpec()) == 0
    assert len(filters.experience_groups(results, FiltersSpec())) == 4
