"""Logprob modes and top_logprobs on a CUDA GPU (the Triton sampler for temperature/raw rows, the sorted path for
processed top-k), against a transformers forward in float32, and the reference scorer's KL against the policy
itself. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.sampling import build_sampling_tensors, sample_full, sample_torch
from ziya_batch.engine.scoring import ReferenceScorer
from ziya_batch.tools.testing import tiny_llama
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT = [1, 17, 42, 99, 5, 230, 8]


class _Row:
    def __init__(self, params, key):
        self.params, self.sample_key, self.num_output_tokens, self.token_ids, self.seq_id = params, key, 0, [1], key


@pytest.mark.parametrize("mode", ["temperature", "raw", "processed"])
def test_sample_full_on_cuda_matches_the_cpu_path(mode):
    torch.manual_seed(0)
    logits = torch.randn(64, 39424) * 3
    rows = [_Row(SamplingParams(temperature=[0.0, 0.7, 1.0, 1.3][i % 4], top_p=0.85, top_k=[0, 40][i % 2],
                                logprobs_mode=mode, top_logprobs=5), i) for i in range(64)]
    got = sample_full(logits.cuda(), build_sampling_tensors(rows, 39424, torch.device("cuda"), [[]] * 64))
    want = sample_full(logits, build_sampling_tensors(rows, 39424, torch.device("cpu"), [[]] * 64))
    same = got.tokens.cpu() == want.tokens
    assert same.float().mean() > 0.95          # the nucleus' edge may round differently (see sample_triton)
    assert torch.allclose(got.logprobs.cpu()[same], want.logprobs[same], atol=1e-4)
    assert torch.equal(got.top_ids.cpu(), want.top_ids)
    assert torch.allclose(got.top_logprobs.cpu(), want.top_logprobs, atol=1e-4)


@pytest.mark.parametrize("mode", ["temperature", "raw"])
def test_engine_logprobs_equal_a_float32_forward_and_kl_to_itself_is_zero(tmp_path, mode):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "ref", safe_serialization=True)
    eng = LLMEngine.from_model(tiny_llama(), None, EngineConfig(model_path="", device="cuda", dtype="float32",
                                                                max_num_seqs=32, num_kv_blocks=400))
    p = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True, logprobs_mode=mode,
                       top_logprobs=3)
    c = eng.generate([Request("a", PROMPT, p)])[0].completions[0]
    ref = ReferenceScorer(tmp_path / "ref", device="cuda", dtype="float32")
    [ref_lp] = ref.logprobs([PROMPT], [c.token_ids], temperatures=[0.7 if mode == "temperature" else 1.0])
    assert max(abs(a - b) for a, b in zip(c.logprobs, ref_lp)) < 2e-3
    assert all(len(t) == 3 and t[0][1] >= lp - 1e-4 for t, lp in zip(c.top_logprobs, c.logprobs))


def test_processed_top_logprobs_on_cuda_stay_inside_the_nucleus():
    torch.manual_seed(1)
    logits = torch.randn(8, 1000).cuda() * 4
    rows = [_Row(SamplingParams(temperature=1.0, top_p=0.5, logprobs_mode="processed", top_logprobs=20), i)
            for i in range(8)]
    t = build_sampling_tensors(rows, 1000, torch.device("cuda"), [[]] * 8)
    out = sample_full(logits, t)
    tok, lp, (ids, tlp) = sample_torch(logits, t, num_top=20)
    assert torch.equal(out.tokens, tok) and torch.equal(out.top_ids, ids)
    # the nucleus of 0.5 holds a few tokens: the rest of the 20 are -inf, and the kept ones are the whole
    # processed distribution
    finite = torch.isfinite(out.top_logprobs)
    assert bool((finite.sum(dim=1) < 20).all())
    mass = torch.where(finite, out.top_logprobs.exp(), 0.0).sum(dim=1)
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-4)
