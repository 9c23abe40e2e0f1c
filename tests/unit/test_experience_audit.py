"""An independent audit of the numbers an RL trainer reads from experience records: the engine's logprobs and
top_logprobs, for random prompts and sampling settings, against a transformers forward (CPU, float32) of the
prompt and response in one pass and transformers' own logits processors; where a response ends (EOS, a stop
id) against a run that did not stop."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.tools.testing import tiny_llama

EOS = 2
ATOL = 1e-4          # float32 on the CPU: the engine's forward and transformers' differ by ~1e-6 here


def forward_logits(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """[len(response), V]: the logits that predict each response token, from one forward of prompt + response."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    return logits[len(prompt) - 1: len(prompt) + len(response) - 1]


def mode_logprobs(model, prompt: list[int], response: list[int], p: SamplingParams) -> torch.Tensor:
    """[len(response), V]: the log-distribution of each response position under p.logprobs_mode, as
    docs/EXPERIENCE.md defines it, built from transformers' logits processors."""
    logits = forward_logits(model, prompt, response)
    T = p.temperature
    if p.logprobs_mode == "raw":
        return logits.log_softmax(-1)
    if p.logprobs_mode == "temperature":
        return (logits / (T if T > 0 else 1.0)).log_softmax(-1)
    ids = torch.tensor([prompt + response])
    out = []
    for j in range(len(response)):
        seen = ids[:, : len(prompt) + j]
        x = logits[j:j + 1].clone()
        if p.repetition_penalty != 1.0:
            x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(seen, x)
        if j < p.min_new_tokens:
            x[0, list(p.stop_token_ids) + ([] if p.ignore_eos else [EOS])] = float("-inf")
        if T > 0:
            x = TemperatureLogitsWarper(T)(seen, x)
            if p.top_k:
                x = TopKLogitsWarper(p.top_k)(seen, x)
            if p.top_p < 1.0:
                x = TopPLogitsWarper(p.top_p)(seen, x)
        out.append(x.log_softmax(-1)[0])
    return torch.stack(out)


def check_completion(model, prompt: list[int], c, p: SamplingParams) -> None:
    assert len(c.logprobs) == len(c.token_ids)
    if not c.token_ids:
        return
    want = mode_logprobs(model, prompt, c.token_ids, p)
    chosen = want.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float32), chosen, atol=ATOL, rtol=0)
    if not p.top_logprobs:
        assert c.top_logprobs is None
        return
    assert len(c.top_logprobs) == len(c.token_ids)
    for pos, top in enumerate(c.top_logprobs):
        values, ids = torch.topk(want[pos], p.top_logprobs)
        finite = [(int(i), float(v)) for i, v in zip(ids, values) if math.isfinite(v)]
        assert [i for i, _ in top] == [i for i, _ in finite]
        assert [v for _, v in top] == pytest.approx([v for _, v in finite], abs=ATOL)


# ---- the engine over random prompts and settings -----------------------------------------------------------------
_params = st.builds(
    SamplingParams,
    max_new_tokens=st.integers(1, 12),
    temperature=st.sampled_from([0.0, 0.7, 1.0, 1.3]),
    top_p=st.sampled_from([1.0, 0.85, 0.5]),
    top_k=st.sampled_from([0, 1, 7, 50]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.8]),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    min_new_tokens=st.integers(0, 3),
    stop_token_ids=st.sampled_from([(), (7, 40, 123)]),
    logprobs_mode=st.sampled_from(["temperature", "raw", "processed"]),
    top_logprobs=st.sampled_from([0, 1, 5]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=_params, prompt=st.lists(st.integers(3, 299), min_size=1, max_size=30), prefix_caching=st.booleans(),
       async_scheduling=st.booleans(), small_cache=st.booleans())
def test_logprobs_and_top_logprobs_equal_an_independent_forward(p, prompt, prefix_caching, async_scheduling,
                                                                small_cache):
    """n samples of a prompt, the same prompt again (in the step and in a later call: the prefix cache) and a
    prompt sharing its first half; chunked prefill (16-token steps) and, with a small cache, preemption."""
    p = dataclasses.replace(p, min_new_tokens=min(p.min_new_tokens, p.max_new_tokens))
    model = tiny_llama()
    eng = LLMEngine.from_model(model, None, EngineConfig(
        model_path="", device="cpu", block_size=4, max_num_batched_tokens=16, prefix_caching=prefix_caching,
        async_scheduling=async_scheduling, num_kv_blocks=24 if small_cache else None))
    prompt = [1] + prompt
    prompts = [prompt, prompt, prompt[: len(prompt) // 2 + 1] + [5, 6, 7]]
    outs = eng.generate([Request(f"r{i}", q, p) for i, q in enumerate(prompts)])
    outs += eng.generate([Request("later", prompt, p)])
    if prefix_caching and len(prompt) > 4:
        assert outs[-1].num_cached_tokens > 0
    for o in outs:
        assert len(o.completions) == p.n
        for c in o.completions:
            check_completion(model, o.prompt_ids, c, p)
    # the same seed gives the same samples, whatever shared the batch
    assert [c.token_ids for c in outs[0].completions] == [c.token_ids for c in outs[1].completions] \
        == [c.token_ids for c in outs[3].completions]


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_a_response_ended_by_eos_or_a_stop_id_lacks_exactly_that_token(temperature):
    """Against runs that do not stop (same seeds: a sample depends only on its seed and its history): the
    stopped response is the free one up to the first EOS or stop id, which is neither returned nor scored."""
    model = tiny_llama()
    eng = LLMEngine.from_model(model, None, EngineConfig(model_path="", device="cpu", block_size=4))
    prompt = [1, 17, 42, 99, 5]
    stop_ids = (7, 40, 123, 200, 201, 202)
    common = dict(max_new_tokens=24, temperature=temperature, top_p=1.0, n=8, seed=11, logprobs_mode="temperature",
                  top_logprobs=2)
    free = eng.generate([Request("free", prompt, SamplingParams(ignore_eos=True, **common))])[0]
    stopped = eng.generate([Request("stop", prompt, SamplingParams(stop_token_ids=stop_ids, **common))])[0]
    ends = 0
    for f, s in zip(free.completions, stopped.completions):
        k = next((i for i, t in enumerate(f.token_ids) if t in (EOS, *stop_ids)), None)
        if k is None:
            assert s.finish_reason == "length" and s.token_ids == f.token_ids
        else:
            ends += 1
            assert s.finish_reason == "stop" and s.token_ids == f.token_ids[:k]
        # equal to float rounding: as samples finish, the two runs' steps hold different rows
        k = len(s.token_ids)
        assert s.logprobs == pytest.approx(f.logprobs[:k], abs=ATOL)
        assert [[i for i, _ in pos] for pos in s.top_logprobs] == [[i for i, _ in pos] for pos in f.top_logprobs[:k]]
        check_completion(model, prompt, s, SamplingParams(**common))
    assert ends >= 2          # the settings end several samples early (checked: the test would say nothing else)
