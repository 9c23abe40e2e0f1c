"""The engine's logprobs and top_logprobs under each experience.logprobs_mode equal a transformers forward of the
same tokens (CPU, float32), and the reference scorer uses the same definition: KL of the policy against itself 0."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.scoring import ReferenceScorer
from ziya_batch.tools.testing import tiny_llama
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams

PROMPT = [1, 17, 42, 99, 5, 230, 8]
T, TOP_K, TOP_P, PENALTY = 0.7, 40, 0.9, 1.3


def params(mode: str, top: int = 0, temperature: float = T) -> SamplingParams:
    return SamplingParams(max_new_tokens=12, temperature=temperature, top_k=TOP_K, top_p=TOP_P,
                          repetition_penalty=PENALTY, seed=3, ignore_eos=True, logprobs_mode=mode,
                          top_logprobs=top)


def generate(p: SamplingParams):
    eng = LLMEngine.from_model(tiny_llama(), None, EngineConfig(model_path="", device="cpu", block_size=4))
    return eng.generate([Request("a", PROMPT, p)])[0].completions[0]


def expected_logprobs(tokens: list[int], mode: str, temperature: float = T) -> torch.Tensor:
    """[n, V]: the mode's log-distribution of each response position, from one transformers forward."""
    model = tiny_llama()
    ids = torch.tensor([PROMPT + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(PROMPT) - 1: -1].float()                  # [n, V]
    if mode == "raw":
        return logits.log_softmax(-1)
    if mode == "temperature":
        return (logits / (temperature if temperature > 0 else 1.0)).log_softmax(-1)
    out = []
    for j in range(len(tokens)):
        seen = ids[:, : len(PROMPT) + j]
        x = RepetitionPenaltyLogitsProcessor(PENALTY)(seen, logits[j:j + 1].clone())
        if temperature > 0:
            x = TemperatureLogitsWarper(temperature)(seen, x)
            x = TopKLogitsWarper(TOP_K)(seen, x)
            x = TopPLogitsWarper(TOP_P)(seen, x)
        out.append(x.log_softmax(-1)[0])
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["temperature", "raw", "processed"])
@pytest.mark.parametrize("temperature", [T, 0.0])
def test_logprobs_and_top_logprobs_equal_a_transformers_forward(mode, temperature):
    c = generate(params(mode, top=5, temperature=temperature))
    want = expected_logprobs(c.token_ids, mode, temperature)
    got = torch.tensor(c.logprobs)
    assert torch.allclose(got, want.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0], atol=1e-4)
    assert len(c.top_logprobs) == len(c.token_ids)
    for pos, top in enumerate(c.top_logprobs):
        values, ids = torch.topk(want[pos], 5)
        finite = [(int(i), float(v)) for i, v in zip(ids, values) if torch.isfinite(v)]
        assert [i for i, _ in top] == [i for i, _ in finite]
        assert [v for _, v in top] == pytest.approx([v for _, v in finite], abs=1e-4)


def test_modes_differ_and_the_draw_does_not_depend_on_the_mode():
    runs = {m: generate(params(m)) for m in ("temperature", "raw", "processed")}
    assert len({tuple(c.token_ids) for c in runs.values()}) == 1
    assert runs["temperature"].logprobs != pytest.approx(runs["raw"].logprobs, abs=1e-3)
    assert runs["processed"].logprobs != pytest.approx(runs["temperature"].logprobs, abs=1e-3)
    assert runs["temperature"].top_logprobs is None


@pytest.mark.parametrize("mode,temperature", [("temperature", T), ("temperature", 0.0), ("raw", T)])
def test_reference_equal_to_the_policy_gives_zero_kl(tmp_path, mode, temperature):
    tiny_llama().save_pretrained(tmp_path / "ref", safe_serialization=True)
    c = generate(params(mode, temperature=temperature))
    ref = ReferenceScorer(tmp_path / "ref")
    ref_t = temperature if mode == "temperature" else 1.0
    [ref_lp] = ref.logprobs([PROMPT], [c.token_ids], temperatures=[ref_t])
    assert max(abs(a - b) for a, b in zip(c.logprobs, ref_lp)) < 1e-4
