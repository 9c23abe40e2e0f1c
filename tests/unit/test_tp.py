"""Tensor parallelism on the CPU: 2 gloo processes give the same greedy tokens as one process."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.multiprocessing as mp

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.testing import tiny_llama, tp_generate_worker
from ziya_batch.engine.tp import apply_tp
from ziya_batch.engine.model import from_hf_model
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams


def test_apply_tp_refuses_a_split_that_does_not_divide():
    model = from_hf_model(tiny_llama(2), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError):
        apply_tp(model, 0, 4)             # 2 key/value heads over 4 ranks


@pytest.mark.parametrize("num_kv_heads", [2])   # 4 heads, 2 key/value heads: 2 + 1 per rank
def test_two_gloo_ranks_match_one_process_token_for_token(tmp_path, num_kv_heads):
    rng = random.Random(num_kv_heads)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(3, 40))] for _ in range(6)]
    # few blocks: the tensor-parallel run also preempts and recomputes, and n=2 forks share blocks
    args = (2, str(tmp_path / "init"), num_kv_heads, prompts, 10, 2, 40, str(tmp_path / "out.json"))
    mp.spawn(tp_generate_worker, args=args, nprocs=2, join=True)
    got = json.loads((tmp_path / "out.json").read_text())
    # the same path as the ranks (our model, no tokenizer, so no EOS id), unsharded
    whole = apply_tp(from_hf_model(tiny_llama(num_kv_heads), torch.device("cpu"), torch.float32), 0, 1)
    eng = LLMEngine.from_model(whole, None, EngineConfig(model_path="", device="cpu", block_size=4))
    want = [[c.token_ids for c in o.completions] for o in eng.generate(
        [Request(str(i), p, SamplingParams(max_new_tokens=10, min_new_tokens=10, temperature=0.0, n=2))
         for i, p in enumerate(prompts)])]
    assert got["tokens"] == want
    assert got["preemptions"] > 0
