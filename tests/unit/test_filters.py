"""SFT filters and the GRPO group fields."""
import math
import statistics
import subprocess
import sys

import pytest

from ziya_batch.filters import (
    DUPLICATE, LOW_REWARD, NO_REWARD, TOO_LONG, TOO_SHORT, TRUNCATED, SftFilter, add_group_fields,
    add_group_fields_by_prompt, filter_sft, group_stats, normalize_response, response_hash,
)
from ziya_batch.records import LineResult, PromptLine, SampleOutput, experience_record
from ziya_batch.spec import FiltersSpec, SamplingSpec


def _sample(i, text="ok", n_tokens=5, finish="stop", reward=None):
    return SampleOutput(index=i, token_ids=list(range(n_tokens)), text=text, finish_reason=finish, reward=reward)


def _line(id_, samples):
    line = PromptLine(id=id_, file="f", line=1, text="<human>:q\n<bot>:", sampling=SamplingSpec(), query="q")
    return LineResult(line=line, prompt_ids=[1, 2, 3], samples=samples)


def test_default_filters_keep_everything():
    results = [_line("a", [_sample(0, finish="length"), _sample(1, n_tokens=0), _sample(2)])]
    assert len(filter_sft(results, FiltersSpec())) == 3


def test_each_filter_drops_with_its_reason():
    spec = FiltersSpec(drop_truncated=True, min_response_tokens=2, max_response_tokens=10, min_reward=0.5, dedup=True)
    f = SftFilter(spec)
    cases = [
        (_sample(0, "a", finish="length", reward=1.0), TRUNCATED),
        (_sample(1, "b", n_tokens=1, reward=1.0), TOO_SHORT),
        (_sample(2, "c", n_tokens=11, reward=1.0), TOO_LONG),
        (_sample(3, "d", reward=None), NO_REWARD),
        (_sample(4, "e", reward=0.49), LOW_REWARD),
        (_sample(5, "f", n_tokens=2, reward=0.5), None),      # bounds are inclusive
        (_sample(6, "f", n_tokens=10, reward=0.9), DUPLICATE),
    ]
    for s, reason in cases:
        assert f.drop_reason(s) == reason, s
        assert f.keep(s) is (reason is None)
    assert f.kept == 1
    assert f.dropped == {TRUNCATED: 1, TOO_SHORT: 1, TOO_LONG: 1, NO_REWARD: 1, LOW_REWARD: 1, DUPLICATE: 1}


def test_dedup_uses_the_normalized_text_within_one_shard_only():
    assert normalize_response("  Ｈｅｌｌｏ,\n\n  世界\t! ") == "Hello, 世界 !"
    assert response_hash("Hello  world") == response_hash(" Hello\nworld ")
    assert response_hash("Hello world") != response_hash("hello world")
    spec = FiltersSpec(dedup=True)
    shard = [_line("a", [_sample(0, "同一个答案"), _sample(1, "同一个答案 ")]), _line("b", [_sample(0, "同一个答案"), _sample(1, "另一个")])]
    kept = filter_sft(shard, spec)
    assert [(r.line.id, s.index) for r, s in kept] == [("a", 0), ("b", 1)]
    # a new shard starts with nothing seen
    assert len(filter_sft([_line("c", [_sample(0, "同一个答案")])], spec)) == 1


def test_a_dropped_sample_does_not_hide_a_later_good_duplicate():
    f = SftFilter(FiltersSpec(dedup=True, min_reward=0.0))
    assert not f.keep(_sample(0, "same", reward=-1.0))
    assert f.keep(_sample(1, "same", reward=1.0))


def test_group_stats():
    assert group_stats([1.0, 2.0, 3.0, None]) == (2.0, pytest.approx(statistics.stdev([1.0, 2.0, 3.0])))
    assert group_stats([0.7]) == (0.7, 0.0)
    assert group_stats([None, None]) == (None, None)
    assert group_stats([]) == (None, None)
    assert group_stats([float("nan"), 1.0]) == (1.0, 0.0)


def test_add_group_fields_to_experience_records():
    samples = [_sample(i, reward=r) for i, r in enumerate([1.0, 0.0, 0.5, None])]
    res = _line("p1", samples)
    recs = [experience_record(res, s) for s in samples]
    out = add_group_fields(recs)
    mean, std = 0.5, statistics.stdev([1.0, 0.0, 0.5])
    assert [r["group_id"] for r in out] == ["p1"] * 4
    assert all(r["group_reward_mean"] == pytest.approx(mean) and r["group_reward_std"] == pytest.approx(std) for r in out)
    assert [r["advantage"] for r in out[:3]] == pytest.approx([(x - mean) / (std + 1e-6) for x in (1.0, 0.0, 0.5)])
    assert out[3]["advantage"] is None
    assert "advantage" not in recs[0]  # inputs are not modified
    assert sum(r["advantage"] for r in out[:3]) == pytest.approx(0.0, abs=1e-9)


def test_equal_rewards_give_zero_advantage_not_nan():
    out = add_group_fields([{"id": "x", "reward": 0.3}, {"id": "x", "reward": 0.3}], group_id="g")
    assert [r["advantage"] for r in out] == [0.0, 0.0] and out[0]["group_id"] == "g"
    assert not any(math.isnan(r["group_reward_std"]) for r in out)


def test_group_fields_by_prompt_keeps_order_and_groups():
    recs = [{"id": "a", "reward": 1.0}, {"id": "b", "reward": 5.0}, {"id": "a", "reward": 3.0}, {"id": "b", "reward": 5.0}]
    out = add_group_fields_by_prompt(recs)
    assert [r["id"] for r in out] == ["a", "b", "a", "b"]
    assert [r["group_reward_mean"] for r in out] == [2.0, 5.0, 2.0, 5.0]
    assert out[0]["advantage"] < 0 < out[2]["advantage"] and out[1]["advantage"] == 0.0


def test_filters_module_does_not_import_torch():
    code = "import sys, ziya_batch.filters; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
