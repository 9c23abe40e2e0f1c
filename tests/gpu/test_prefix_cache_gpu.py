"""Prefix caching on a CUDA GPU: greedy output with caching on equals caching off, with CUDA-graph decode and
the Triton kernels, for a float16 and a float8 KV cache. Skipped without CUDA."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.tools.testing import chain_sequences, markov_chain, tiny_llama, trained_tiny_llama
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def greedy(n_new: int, n: int = 1) -> SamplingParams:
    return SamplingParams(max_new_tokens=n_new, min_new_tokens=n_new, temperature=0.0, n=n)


def shared_prefix_prompts(seqs: torch.Tensor, n: int, prefix_len: int, seed: int) -> list[list[int]]:
    """A prefix from one chain sequence, each prompt's suffix from another (16..80 tokens)."""
    rng = random.Random(seed)
    prefix = seqs[0, :prefix_len].tolist()
    return [prefix + seqs[1 + i, :rng.randint(16, 80)].tolist() for i in range(n)]


def run(model, prompts, params, **cfg) -> tuple[LLMEngine, list]:
    eng = LLMEngine.from_model(model, None, EngineConfig(model_path="", device="cuda", block_size=16,
                                                         num_kv_blocks=512, max_num_batched_tokens=256, **cfg))
    assert eng.runner.graphs
    outs = eng.generate([Request(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])
    return eng, [[c.token_ids for c in o.completions] for o in outs]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_caching_on_gives_the_greedy_output_of_caching_off_in_float16(kv_cache_dtype):
    """A trained model (peaked distributions, so float16 rounding of a different batch rarely flips a pick):
    at least 95% of prompts equal for 32 tokens, and the shared 200-token prefix was found in the cache."""
    hf = copy.deepcopy(trained_tiny_llama("cuda")).to(torch.float16)
    seqs = chain_sequences(41, 200, markov_chain(300, 0), seed=321)
    ps = shared_prefix_prompts(seqs, 40, 200, seed=1)
    params = [greedy(32, n=2) if i % 5 == 0 else greedy(32) for i in range(len(ps))]
    res = {}
    for on in (True, False):
        eng, res[on] = run(hf, ps, params, dtype="float16", kv_cache_dtype=kv_cache_dtype, prefix_caching=on)
        if on:
            assert eng.prefix_cache_hit_tokens >= 30 * 192
    same = sum(a == b for a, b in zip(res[True], res[False]))
    assert same >= 0.95 * len(ps), f"{same} of {len(ps)} prompts equal for 32 tokens"


def test_caching_on_gives_the_greedy_output_of_caching_off_in_float32_under_preemption():
    """40 blocks of 16 cannot hold 24 sequences of ~150 tokens: sequences are preempted, cached blocks are
    evicted, and recomputed sequences may find their own blocks again."""
    hf = tiny_llama(4)
    rng = random.Random(5)
    prefix = [rng.randrange(3, 300) for _ in range(70)]
    ps = [prefix + [rng.randrange(3, 300) for _ in range(rng.randint(1, 40))] for _ in range(24)]
    res = {}
    for on in (True, False):
        eng = LLMEngine.from_model(hf, None, EngineConfig(model_path="", dtype="float32", device="cuda",
                                                          block_size=16, num_kv_blocks=40, max_num_seqs=32,
                                                          max_num_batched_tokens=128, admission_horizon_tokens=0,
                                                          prefix_caching=on))
        outs = eng.generate([Request(str(i), p, greedy(40)) for i, p in enumerate(ps)])
        res[on] = [o.completions[0].token_ids for o in outs]
        assert eng.scheduler.num_preemptions > 0 and eng.runner.graphs
        assert (eng.prefix_cache_hit_tokens > 0) == on
    assert sum(a == b for a, b in zip(res[True], res[False])) >= 23
