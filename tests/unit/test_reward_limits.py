"""A reward function that always hangs costs a shard a few timeouts, not one per sample; numpy's numbers are
rewards like Python's."""
from __future__ import annotations

import os
import time

from ziya_batch.work.reward_runner import FunctionRewards, as_reward

HERE = os.path.dirname(__file__)


def _ref(name: str) -> str:
    return f"{os.path.join(HERE, 'reward_fixtures.py')}:{name}"


def test_a_function_that_always_hangs_is_given_up_after_a_few_rounds():
    runner = FunctionRewards(_ref("always_hang"), timeout_s=1.0, processes=1)
    try:
        t0 = time.monotonic()
        out = runner.score([("p", f"r{i}", {}) for i in range(10)])
        took = time.monotonic() - t0
    finally:
        runner.close()
    assert [v for v, _ in out] == [None] * 10
    assert [why for _, why in out[:3]] == ["timed out after 1 s"] * 3
    assert all(why.startswith("not called: every call timed out") for _, why in out[3:])
    # 3 timeouts and their pool restarts, not 10
    assert took < 3 * 1.0 + 3 * 15, took


def test_numpy_numbers_are_rewards_and_bools_are_not():
    import numpy as np
    import pytest

    assert as_reward(np.float32(1.5)) == 1.5 and as_reward(np.int64(2)) == 2.0
    for bad in (True, np.bool_(True), "1", None, float("nan")):
        with pytest.raises((TypeError, ValueError)):
            as_reward(bad)
