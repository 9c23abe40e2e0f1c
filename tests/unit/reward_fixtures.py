"""Reward functions for tests/unit/test_reward_runner.py, importable by name from spawned pool processes."""
import os
import time


def length(prompt, response, metadata):
    return float(len(response))


def label_or_raise(prompt, response, metadata):
    if metadata.get("boom"):
        raise RuntimeError("no label\nfor this line")
    return float(metadata["score"])


def hang_on(prompt, response, metadata):
    if response == "hang":
        time.sleep(60)
    return 1.0


def die_on(prompt, response, metadata):
    if response == "die":
        os._exit(3)
    return 2.0


def not_a_number(prompt, response, metadata):
    return "high"


def echo_prompt_kind(prompt, response, metadata):
    return 1.0 if isinstance(prompt, list) else 0.0


def length_unless_constant(prompt, response, metadata):
    """A label-driven reward: constant for lines marked so (their groups have zero advantage)."""
    return 1.0 if metadata.get("constant") else float(len(response)) + float(metadata["bonus"])


def always_hang(prompt, response, metadata):
    time.sleep(60)
    return 1.0


def numpy_reward(prompt, response, metadata):
    import numpy as np

    return np.float32(1.5) if response == "f" else np.int64(2)


def raise_undecodable(prompt, response, metadata):
    # a label read as bytes that are not UTF-8 (os.fsdecode, errors="surrogateescape") holds lone surrogates
    raise ValueError("no label in " + b"labels-\xff.txt".decode("utf-8", "surrogateescape"))
