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
from ziya_batch.engine.model import LlamaModel
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.tools.testing import hf_greedy, tiny_llama

from tests.gpu.test_piecewise_gpu import greedy_ids, trained_model_and_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def engine(model, dtype: str, overlap: bool, **kw) -> LLMEngine:
    eng = LLMEngine.from_model(model, None, EngineConfig(model_path="", dtype=dtype, device="cuda", max_num_seqs=32,
                                                         num_kv_blocks=600, max_num_batched_tokens=256,
                                                         overlap_mixed_steps=overlap, **kw))
    r = eng.runner
    assert r.overlap_mixed is overlap and (r.side_stream is not None) is overlap and r.mixed is not None
    # steps cut to the pieces' own token counts where they split
    assert eng.scheduler.split_rows == r.split_rows == (max(r.graph_sizes) if overlap else 0)
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
        res.append(greedy_ids(eng, ps, 20))
        assert bool(side) is overlap, side
    assert sum(a == b for a, b in zip(*res)) >= 23
    hf_cuda = copy.deepcopy(hf).cuda()
    for p, got in list(zip(ps, res[0]))[:6]:
        assert got == hf_greedy(hf_cuda, p, 20)[0]


@pytest.mark.parametrize("carveout", [0, 40])
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_float16_and_fp8_overlapped_steps_keep_greedy_output_on_a_trained_model(quantization, carveout):
    """carveout: the pieces' GEMMs captured on all SMs but that many (EngineConfig.overlap_sm_carveout)."""
    if quantization and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 weights need compute capability 8.9+")
    model, ps = trained_model_and_prompts(quantization, 93, 11)
    res = []
    for overlap in (True, False):
        eng = engine(model, "float16", overlap, kv_cache_dtype="fp8" if quantization else "auto",
                     fp8_fast_accum=quantization is not None, overlap_sm_carveout=carveout)
        side = count_side_replays(eng)
        res.append(greedy_ids(eng, ps, 32))
        assert bool(side) is overlap
        del eng
    same = sum(a == b for a, b in zip(*res))
    assert same >= 30, f"{same} of 32 prompts equal with and without overlapped steps"


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_overlapped_steps_equal_the_same_steps_on_one_stream_bit_for_bit(quantization):
    # LLaMA-13B-width layers and steps of up to 2,048 tokens: GEMMs long enough to overlap, with cuBLAS workspaces
    # (FP8: fast accumulation, the float8 cache). One engine runs the work overlapped, then with its side stream
    # made the current one (the same kernels, in order): every logprob must agree bit for bit, or the two streams
    # raced over something they share
    if quantization and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 weights need compute capability 8.9+")
    from ziya_batch.tools.bench_core import _args
    model = LlamaModel.random(_args(2), torch.device("cuda"), torch.float16, 0, quantization)
    eng = LLMEngine.from_model(model, None, EngineConfig(
        model_path="", device="cuda", max_model_len=1024, num_kv_blocks=3000, max_num_batched_tokens=2048,
        prefix_caching=False, overlap_mixed_steps=True, kv_cache_dtype="fp8" if quantization else "auto",
        fp8_fast_accum=quantization is not None))
    rng = random.Random(3)
    vocab = model.args.vocab_size
    ps = [[rng.randrange(3, vocab) for _ in range(rng.randint(20, 900))] for _ in range(64)]
    params = SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0.0, ignore_eos=True,
                            logprobs_mode="raw")
    res = []
    for serial in (False, True):
        if serial:
            eng.runner.side_stream = torch.cuda.current_stream()
        side = count_side_replays(eng)
        outs = eng.generate([Request(str(i), p, params) for i, p in enumerate(ps)])
        res.append([(o.completions[0].token_ids, o.completions[0].logprobs) for o in outs])
        assert len(side) >= 10, "too few steps split"
    for (ids0, lp0), (ids1, lp1) in zip(*res):
        assert ids0 == ids1 and lp0 == lp1
