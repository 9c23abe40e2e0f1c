"""scripts/sim_schedule.py: the scheduler alone on W1, with an H100's measured bucket times."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("sim_schedule",
                                               Path(__file__).parents[2] / "scripts" / "sim_schedule.py")
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)


def test_the_kept_buckets_leave_out_the_h100s_slow_ones():
    kept = dict(sim.kept_buckets("float16"))
    assert 832 not in kept and 768 in kept and 896 in kept and max(kept) == 2048
    assert 832 in dict(sim.kept_buckets("fp8")) and 704 not in dict(sim.kept_buckets("fp8"))


@pytest.mark.parametrize("weights", ["float16", "fp8"])
def test_cutting_steps_to_buckets_keeps_the_work_and_only_moves_prefill_tokens(weights):
    plain = sim.simulate(3859 if weights == "float16" else 9440, policy="tail-longest-first", requests=256,
                         bandwidth=2.98e12, weights=weights)
    cut = sim.simulate(3859 if weights == "float16" else 9440, policy="tail-longest-first", requests=256,
                       bandwidth=2.98e12, weights=weights, cut=True)
    assert plain["cut_steps"] == 0 and cut["cut_steps"] > 0
    # the same prompts computed (a cut that leaves one token makes it a one-token chunk, not counted as prefill;
    # a preemption recomputes a sequence's tokens)
    assert abs(cut["prefill_tokens"] - plain["prefill_tokens"]) <= 8 + 600 * (cut["preemptions"] + plain["preemptions"])
    assert cut["mixed_steps"] > plain["mixed_steps"]


def test_a_smaller_budget_spreads_the_same_prefill_over_more_steps_and_the_overhead_counts_per_mixed_step():
    big = sim.simulate(3859, policy="tail-longest-first", requests=128, bandwidth=2.98e12, weights="float16",
                       cut=True)
    small = sim.simulate(3859, policy="tail-longest-first", requests=128, bandwidth=2.98e12, weights="float16",
                         cut=True, budget=384)
    assert small["prefill_tokens"] == big["prefill_tokens"] and small["preemptions"] == big["preemptions"] == 0
    assert small["mixed_steps"] > big["mixed_steps"]
    slow = sim.simulate(3859, policy="tail-longest-first", requests=128, bandwidth=2.98e12, weights="float16",
                        cut=True, budget=384, mixed_overhead_s=0.002)
    assert slow["est_s"] == pytest.approx(small["est_s"] + 0.002 * small["mixed_steps"], abs=0.11)


def test_adaptive_step_sizes_keep_the_work_and_run_more_smaller_steps_with_prefill_in_float16():
    kw = dict(policy="tail-longest-first", requests=1024, bandwidth=2.95e12, weights="float16", cut=True,
              mixed_overhead_s=2.5e-3)
    fixed, adaptive = sim.simulate(3859, **kw), sim.simulate(3859, adaptive=True, **kw)
    assert abs(adaptive["prefill_tokens"] - fixed["prefill_tokens"]) <= 8
    assert adaptive["mixed_steps"] > fixed["mixed_steps"] and adaptive["preemptions"] == fixed["preemptions"] == 0
