"""Batched sampling on the device (CPU here): processors against transformers', the counter-hash noise."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from ziya_batch.engine.sampling import (build_sampling_tensors, mix32, mix32_int, row_key, sample,
                                        uniform_from_hash)
from ziya_batch.engine.types import SamplingParams


@dataclass
class Row:
    params: SamplingParams
    token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    sample_key: int = 0
    num_output_tokens: int = 0


def tensors(rows, V=50, bans=None):
    return build_sampling_tensors(rows, V, torch.device("cpu"), bans or [[] for _ in rows])


def test_tensor_hash_equals_the_integer_hash():
    xs = [0, 1, 2, 12345, 2**31, 2**32 - 1]
    assert mix32(torch.tensor(xs)).tolist() == [mix32_int(x) for x in xs]


def test_greedy_rows_take_the_argmax_with_its_log_softmax():
    logits = torch.randn(3, 50)
    tok, lp = sample(logits, tensors([Row(SamplingParams(temperature=0.0))] * 3))
    assert tok.tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(lp, torch.log_softmax(logits, -1).max(-1).values)


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(2, 50) * 3
    rows = [Row(SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs_mode="processed"),
                token_ids=[4, 9, 9, 17]),
            Row(SamplingParams(temperature=0.0), token_ids=[4])]
    _, lp = sample(logits, tensors(rows))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[4, 9, 9, 17]]), logits[:1].clone())
    tok0 = ref.argmax(-1)
    assert torch.allclose(lp[0], torch.log_softmax(ref, -1)[0, tok0])


def test_top_k_and_top_p_keep_what_transformers_keeps():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    for params, warper in ((SamplingParams(temperature=1.0, top_k=5, top_p=1.0), TopKLogitsWarper(5)),
                           (SamplingParams(temperature=1.0, top_p=0.6), TopPLogitsWarper(0.6))):
        allowed = torch.isfinite(warper(None, logits.clone()))[0]
        picks = {sample(logits, tensors([Row(params, sample_key=k)]))[0].item() for k in range(300)}
        assert picks <= set(allowed.nonzero()[:, 0].tolist())
        assert len(picks) == int(allowed.sum())          # 300 draws reach every allowed token here


def test_samples_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    params = SamplingParams(temperature=1.0, top_p=1.0)
    counts = torch.zeros(3)
    for k in range(4000):
        counts[sample(logits, tensors([Row(params, sample_key=k)], V=3))[0].item()] += 1
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_noise_depends_on_key_and_position_not_on_the_batch():
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0, top_p=1.0)
    alone = sample(logits, tensors([Row(p, sample_key=77, num_output_tokens=3)]))[0].item()
    batch = torch.cat([torch.randn(4, 50), logits])
    rows = [Row(p, sample_key=k) for k in range(4)] + [Row(p, sample_key=77, num_output_tokens=3)]
    assert sample(batch, tensors(rows))[0][-1].item() == alone
    assert row_key(77, 3) != row_key(77, 4) and row_key(77, 3) != row_key(78, 3)


def test_banned_ids_are_never_sampled():
    logits = torch.zeros(1, 5)
    logits[0, 2] = 10.0
    for k in range(20):
        tok, _ = sample(logits, tensors([Row(SamplingParams(temperature=1.0, top_p=1.0), sample_key=k)], V=5,
                                        bans=[[2]]))
        assert tok.item() != 2


def test_uniform_noise_never_reaches_0_or_1():
    """The largest hash must stay below 1.0 (its noise would be +inf and win over any probability)."""
    u = uniform_from_hash(torch.tensor([0, 1, 2**31, 2**32 - 512, 2**32 - 1]))
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
