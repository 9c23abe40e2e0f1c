"""Steps with prefill replayed from CUDA graphs captured in pieces around the attention (engine/piecewise.py):
every bucket captured, the pieces used for the steps with prefill, and greedy output equal to eager steps (float32,
and float16 / FP8 weights with the float8 cache on a model whose greedy choices are clear). Skipped without CUDA."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.piecewise import mixed_buckets
from ziya_batch.engine.model import from_hf_model
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.tools.testing import chain_sequences, hf_greedy, markov_chain, tiny_llama, trained_tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def greedy(n_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n_new, min_new_tokens=n_new, temperature=0.0)


def engine(model, dtype: str, mixed: bool, **kw) -> LLMEngine:
    eng = LLMEngine.from_model(model, None, EngineConfig(model_path="", dtype=dtype, device="cuda", max_num_seqs=32,
                                                         num_kv_blocks=600, max_num_batched_tokens=256,
                                                         mixed_step_graphs=mixed, **kw))
    if mixed:
        assert eng.runner.mixed is not None and sorted(eng.runner.mixed.graphs) == mixed_buckets(256)
        assert all(len(g) == eng.model.args.num_layers + 1 for g in eng.runner.mixed.graphs.values())
    else:
        assert eng.runner.mixed is None
    return eng


def count_pieces(eng: LLMEngine) -> list[int]:
    used: list[int] = []
    run = eng.runner.mixed.run
    eng.runner.mixed.run = lambda ids, *a: used.append(ids.shape[0]) or run(ids, *a)
    return used


def test_float32_pieces_match_transformers_and_eager_steps():
    hf = tiny_llama(4)
    rng = random.Random(4)
    ps = [[rng.randrange(3, 300) for _ in range(rng.randint(4, 150))] for _ in range(24)]
    res = []
    for mixed in (True, False):
        eng = engine(hf, "float32", mixed)
        used = count_pieces(eng) if mixed else []
        res.append([o.completions[0].token_ids for o in
                    eng.generate([Request(str(i), p, greedy(20)) for i, p in enumerate(ps)])])
        if mixed:
            assert len(used) >= 2 and any(t % 64 for t in used), used      # padded steps went through the pieces
    assert sum(a == b for a, b in zip(*res)) >= 23
    hf_cuda = copy.deepcopy(hf).cuda()
    for p, got in list(zip(ps, res[0]))[:6]:
        assert got == hf_greedy(hf_cuda, p, 20)[0]


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_float16_and_fp8_pieces_keep_eager_greedy_output_on_a_trained_model(quantization):
    if quantization and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 weights need compute capability 8.9+")
    hf = copy.deepcopy(trained_tiny_llama("cuda")).to(torch.float16)
    model = from_hf_model(hf, torch.device("cuda"), torch.float16, quantization=quantization)
    seqs = chain_sequences(32, 200, markov_chain(300, 0), seed=91)
    rng = random.Random(9)
    ps = [seqs[i, :rng.randint(4, 200)].tolist() for i in range(32)]
    res = []
    for mixed in (True, False):
        eng = engine(model, "float16", mixed, kv_cache_dtype="fp8" if quantization else "auto")
        used = count_pieces(eng) if mixed else []
        res.append([o.completions[0].token_ids for o in
                    eng.generate([Request(str(i), p, greedy(32)) for i, p in enumerate(ps)])])
        assert not mixed or used
        del eng
    same = sum(a == b for a, b in zip(*res))
    assert same >= 30, f"{same} of 32 prompts equal with and without mixed-step graphs"
