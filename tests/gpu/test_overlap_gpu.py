"""Steps with prefill as two forwards at once (EngineConfig.overlap_mixed_steps): the decode rows' graph on a second
stream beside the prefill chunks' pieces. Greedy output must be what the engine gives without the overlap
(float32; float16 and FP8 weights with the float8 cache on a model whose greedy choices are clear): a memory pool,
a cuBLAS workspace or an input buffer the two streams shared would show here. Skipped without CUDA."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.model import from_hf_model
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.tools.testing import chain_sequences, hf_greedy, markov_chain, tiny_llama, trained_tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def greedy(n_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n_new, min_new_tokens=n_new, temperature=0.0)


def engine(model, dtype: str, overlap: bool, **kw) -> LLMEngine:
    eng = LLMEngine.from_model(model, None, EngineConfig(model_path="", dtype=dtype, device="cuda", max_num_seqs=32,
                                                         num_kv_blocks=600, max_num_batched_tokens=256,
                                                         overlap_mixed_steps=overlap, **kw))
    r = eng.runner
    assert r.overlap_mixed is overlap and (r.side_stream is not None) is overlap and r.mixed is not None
    assert eng.scheduler.step_buckets_prefill_only is overlap       # steps cut to the pieces' own token counts
    return eng


def count_side_replays(eng: LLMEngine) -> list[int]:
    """The bucket of every decode graph replayed on the side stream."""
    used: list[int] = []
    replay = eng.runner._replay

    def spy(decodes, bucket, src, prev, stream=None):
        if stream is not None:
            used.append(bucket)
        return replay(decodes, bucket, src, prev, stream=stream)
    eng.runner._replay = spy
    return used


def test_float32_overlapped_steps_match_transformers_and_the_joint_steps():
    hf = tiny_llama(4)
    rng = random.Random(5)
    ps = [[rng.randrange(3, 300) for _ in range(rng.randint(4, 150))] for _ in range(24)]
    res = []
    for overlap in (True, False):
        eng = engine(hf, "float32", overlap)
        side = count_side_replays(eng)
        res.append([o.completions[0].token_ids for o in
                    eng.generate([Request(str(i), p, greedy(20)) for i, p in enumerate(ps)])])
        assert bool(side) is overlap, side
    assert sum(a == b for a, b in zip(*res)) >= 23
    hf_cuda = copy.deepcopy(hf).cuda()
    for p, got in list(zip(ps, res[0]))[:6]:
        assert got == hf_greedy(hf_cuda, p, 20)[0]


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_float16_and_fp8_overlapped_steps_keep_greedy_output_on_a_trained_model(quantization):
    if quantization and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 weights need compute capability 8.9+")
    hf = copy.deepcopy(trained_tiny_llama("cuda")).to(torch.float16)
    model = from_hf_model(hf, torch.device("cuda"), torch.float16, quantization=quantization)
    seqs = chain_sequences(32, 200, markov_chain(300, 0), seed=93)
    rng = random.Random(11)
    ps = [seqs[i, :rng.randint(4, 200)].tolist() for i in range(32)]
    res = []
    for overlap in (True, False):
        eng = engine(model, "float16", overlap, kv_cache_dtype="fp8" if quantization else "auto",
                     fp8_fast_accum=quantization is not None)
        side = count_side_replays(eng)
        res.append([o.completions[0].token_ids for o in
                    eng.generate([Request(str(i), p, greedy(32)) for i, p in enumerate(ps)])])
        assert bool(side) is overlap
        del eng
    same = sum(a == b for a, b in zip(*res))
    assert same >= 30, f"{same} of 32 prompts equal with and without overlapped steps"
