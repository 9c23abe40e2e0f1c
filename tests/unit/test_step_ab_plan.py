"""scripts/gpu/step_ab.py's --plan: every run it names, and one line naming the first item that is not one."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location("step_ab", Path(__file__).parents[2] / "scripts" / "gpu" / "step_ab.py")
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)


def test_every_knob_and_a_request_count():
    runs = ab.parse_plan("fp8fast:cut=off,f16:cut=0.1/64@512,fp8:order=on,fp8fast:attn=half,f16:attn=dot,"
                         "f16:schedule=fcfs@1,fp8:schedule=tail-longest-first,f16kv8:attn=half@100000,f16:budget=384@512,"
                         "fp8fast:budget=16,f16:adaptive=on@512,f16:overhead=40@512,fp8:overhead=0,f16:overhead=12.5,"
                         "f16:overhead=10000,f16:side=on@512,fp8fast:side=off")
    assert runs == [ab.Run("fp8fast", "cut", False), ab.Run("f16", "cut", True, (0.1, 64), 512),
                    ab.Run("fp8", "order", True), ab.Run("fp8fast", "attn", "half"), ab.Run("f16", "attn", "dot"),
                    ab.Run("f16", "schedule", "fcfs", None, 1), ab.Run("fp8", "schedule", "tail-longest-first"),
                    ab.Run("f16kv8", "attn", "half", None, 100_000),
                    ab.Run("f16", "budget", 384, None, 512), ab.Run("fp8fast", "budget", 16),
                    ab.Run("f16", "adaptive", True, None, 512), ab.Run("f16", "overhead", 40.0, None, 512),
                    ab.Run("fp8", "overhead", 0.0), ab.Run("f16", "overhead", 12.5), ab.Run("f16", "overhead", 10000.0),
                    ab.Run("f16", "side", True, None, 512), ab.Run("fp8fast", "side", False)]
    assert len(ab.parse_plan(ab.DEFAULT_PLAN)) == 6


@pytest.mark.parametrize("item", [
    "", "f16", "f16:", "f16:cut", "f16:cut=", "f32:cut=on", "f16:speed=on", "f16:cut=maybe", "f16:order=1/2", "f16:adaptive=1/2", "f16:adaptive=yes",
    "f16:cut=on@0", "f16:cut=on@-3", "f16:cut=on@x", "f16:cut=on@1e3", "f16:cut=on@100001", "f16:cut=on@5@6",
    "f16:cut=1/2/3", "f16:cut=a/64", "f16:cut=0.1/b", "f16:cut=1.5/64", "f16:cut=nan/64", "f16:cut=0.1/-1",
    "f16:attn=half", "fp8fast:attn=flash", "f16:schedule=lifo", "f16:schedule=on", "f16:cut=on:x", "a=b:c",
    "f16:cut=on,", ",f16:cut=on", "f16:cut=on@", "f16:cut=on@ 5", "f16:cut=on@+5", "f16:cut=on@1_0",
    "f16:overlap=on", "f16:cut=on@\u0663", "f16:cut= 0.1/ 64", "f16:cut=0.1/64\t", "f16:cut=0.1/6_4", "F16:cut=on", "f16:cut=ON",
    "f16:budget=15", "f16:budget=0", "f16:budget=on", "f16:budget=3.5", "f16:budget=-64", "f16:budget=1234567",
    "f16:budget=1/2", "f16:order=384", "f16:overhead=on", "f16:overhead=-1", "f16:overhead=10001", "f16:overhead=1e3",
    "f16:overhead=.5", "f16:overhead=5.", "f16:overhead=1.2345", "f16:overhead=nan", "f16:overhead=inf", "f16:overhead=99999", "f16:side=1", "f16:side=yes"])
def test_a_bad_item_is_one_line_naming_it(item):
    with pytest.raises(ab.PlanError) as e:
        ab.parse_plan(f"fp8:cut=on,{item}" if item and not item.startswith(",") else item)
    assert "\n" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("f16p8ast:=,@/.-0123456789onfcutrdhlmybgex \n\x00é")), max_size=40))
def test_any_plan_text_gives_runs_or_one_line(text):
    try:
        runs = ab.parse_plan(text)
    except ab.PlanError as e:
        assert "\n" not in str(e) and len(str(e)) < 400
        return
    for r in runs:
        assert r.config in ab.CONFIGS and r.knob in ab.KNOBS
        assert r.requests is None or 1 <= r.requests <= ab.MAX_REQUESTS
        assert r.limits is None or (0 <= r.limits[0] < 1 and r.limits[1] >= 0)
        assert r.knob != "budget" or (type(r.value) is int and r.value >= 16)
