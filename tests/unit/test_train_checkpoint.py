"""scripts/gpu/bench_stack.py's training of the quality gate's checkpoint: AdamW stepped inside the backward pass
(where bfloat16 weights, gradients and both moments would not fit on the card, the 13B shape on an H100) makes
the same updates as one optimizer stepped after it, clipping aside."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

_spec = importlib.util.spec_from_file_location("bench_stack",
                                               Path(__file__).parents[2] / "scripts" / "gpu" / "bench_stack.py")
stack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stack)


def test_the_13b_shape_steps_in_backward_on_an_h100_and_not_on_an_h200():
    n = 12_733_000_000                                   # 40 layers of 13B's shape, the demo's 4,096-row vocabulary
    assert stack.adamw_in_backward(n, 79 * 2 ** 30)       # 95 GiB of weights, gradients, moments: no
    assert not stack.adamw_in_backward(n, 139 * 2 ** 30)
    assert not stack.adamw_in_backward(30_000_000, 8 * 2 ** 30)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.timeout(300)
def test_adamw_in_backward_updates_as_one_optimizer_does(tmp_path, monkeypatch):
    # without clipping (the in-backward optimizers cannot clip to a global norm), both are plain AdamW per tensor
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: None)
    args = dict(layers=2, shape="small", steps=3, lr=3e-3, embed_lr_mult=10.0, batch=2, seq=64)
    once = stack.train_checkpoint(tmp_path / "once", in_backward=False, **args)
    hooked = stack.train_checkpoint(tmp_path / "hooked", in_backward=True, **args)
    assert not once["adamw_in_backward"] and hooked["adamw_in_backward"]
    a, b = _weights(tmp_path / "once"), _weights(tmp_path / "hooked")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and training moved the weights (not two untouched copies)
    fresh = tmp_path / "fresh"
    stack.train_checkpoint(fresh, in_backward=False, **{**args, "steps": 1, "lr": 0.0})
    c = _weights(fresh)
    assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("steps", [1, 7, 10, 95, 700])
def test_the_schedule_by_steps_is_unchanged_where_the_clock_does_not_bind(steps):
    warmup = max(1, steps // 10)
    for step in range(steps):
        old = (step + 1) / warmup if step < warmup else \
            0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        assert stack.lr_scale(step, steps) == old                              # no time limit
        assert stack.lr_scale(step, steps, elapsed_s=step * 0.01, max_s=1e6) == old   # one never reached


def test_a_run_the_clock_stops_has_annealed_by_then():
    """With max_s, progress is the larger of steps and time: the rate warms up over the first tenth of either and
    reaches its floor (a tenth) as the time runs out, however many steps that was."""
    max_s, steps = 300.0, 2000
    assert stack.lr_scale(0, steps, 0.0, max_s) < 0.01
    assert stack.lr_scale(10, steps, 30.0, max_s) == pytest.approx(1.0)           # end of warm-up by time
    assert stack.lr_scale(10, steps, max_s, max_s) == pytest.approx(0.1)          # 11 of 2,000 steps, time up
    assert stack.lr_scale(1999, steps, 1.0, max_s) == pytest.approx(0.1, abs=1e-5)  # steps up first
    assert stack.lr_scale(100, steps, 30.0, max_s) == pytest.approx(1.0)          # warmed up by both at once
    after_warmup = [stack.lr_scale(s, steps, t, max_s) for s, t in zip(range(100, 600, 10), range(30, 300, 5))]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:])) and after_warmup[-1] > 0.1
