"""An independent audit of the numbers an RL trainer reads from experience records: the engine's logprobs and
top_logprobs, for random prompts and sampling settings, against a transformers forward (CPU, float32) of the
prompt and response in one pass and transformers' own logits processors; where a response ends (EOS, a stop
id, a stop string) against a run that did not stop; and a job's records (ids, text, logprobs, reference
logprobs, KL) against forwards of the policy and the reference model."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.scoring import ReferenceScorer
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.spec import engine_config, parse_spec
from ziya_batch.tools.demo_model import write_demo_model, write_demo_reference_model
from ziya_batch.tools.testing import tiny_llama
from ziya_batch.work.generation import build_parts, generate_lines, parse_shard, score_results

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


# ---- stop strings with the real (sentencepiece) tokenizer --------------------------------------------------------
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_a_stop_string_cuts_text_and_tokens_at_the_same_place(demo_dir):
    """Wherever the stop string starts (mid-token, after a word's leading space, after byte tokens), the text is
    the decode of the returned tokens: every token wholly before the stop string, none that makes any of it."""
    eng = LLMEngine(EngineConfig(model_path=str(demo_dir), device="cpu", max_num_batched_tokens=256))
    tok = eng.tokenizer
    prompt = tok("<human>:介绍一下西安的历史 hello world\n<bot>:").input_ids
    params = dict(max_new_tokens=24, temperature=1.0, seed=4, ignore_eos=True, logprobs_mode="temperature")
    free = eng.generate([Request("free", prompt, SamplingParams(**params))])[0].completions[0]
    text = free.text
    assert text == tok.decode(free.token_ids, skip_special_tokens=True)
    stops = sorted({text[a:a + 2] for a in range(1, len(text) - 2) if text[a:a + 2].strip()})
    reqs = [Request(f"s{i}", prompt, SamplingParams(stop=(stop,), **params)) for i, stop in enumerate(stops)]
    for stop, out in zip(stops, eng.generate(reqs)):
        c = out.completions[0]
        before = text[:text.find(stop)]
        k = len(c.token_ids)
        assert c.finish_reason == "stop" and stop not in c.text
        assert c.token_ids == free.token_ids[:k] and c.logprobs == pytest.approx(free.logprobs[:k], abs=ATOL)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert before.startswith(c.text)
        # the next token reaches into the stop string
        assert not before.startswith(tok.decode(free.token_ids[:k + 1], skip_special_tokens=True))


# ---- a job's experience records ----------------------------------------------------------------------------------
def test_experience_records_equal_forwards_of_the_policy_and_the_reference(demo_dir, tmp_path):
    """Through the worker's path (parse, generate, score, build the parts): per-line temperatures reach the
    logprobs, the reference logprobs and the KL; results, sft and experience describe the same response."""
    ref_dir = write_demo_reference_model(tmp_path / "ref")
    spec = parse_spec({
        "name": "audit", "model": {"path": str(demo_dir)}, "input": ["a.jsonl"], "output": {"path": "o"},
        "sampling": {"max_new_tokens": 10, "n": 2, "seed": 3, "temperature": 0.7, "top_p": 0.9,
                     "repetition_penalty": 1.2},
        "experience": {"reference_model": str(ref_dir), "top_logprobs": 3}})
    lines = [{"id": "a", "prompt": "介绍西安"},
             {"id": "b", "prompt": "介绍西安", "sampling": {"temperature": 1.3, "stop": ["e", "的"]}},
             {"id": "c", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                      {"role": "user", "content": "again"}], "sampling": {"temperature": 0}},
             {"id": "d", "prompt": "介绍西安的历史", "sampling": {"temperature": 1.0, "top_k": 5, "min_new_tokens": 4}}]
    temperature = {"a": 0.7, "b": 1.3, "c": 1.0, "d": 1.0}       # c is greedy: T = 1

    def run():
        eng = LLMEngine(engine_config(spec, str(demo_dir), "cpu"))
        raw = [(i + 1, json.dumps(x, ensure_ascii=False).encode()) for i, x in enumerate(lines)]
        work = parse_shard(raw, "a.jsonl", spec, eng.tokenizer, eng.max_model_len)
        results, failures = generate_lines(eng, work.prompts)
        assert not work.failures and not failures
        score_results(results, ReferenceScorer(ref_dir), None, spec.experience)
        return eng.tokenizer, build_parts(spec, results, [])

    tok, parts = run()
    policy = LlamaForCausalLM.from_pretrained(str(demo_dir), dtype=torch.float32).eval()
    ref = LlamaForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
    assert len(parts["experience"]) == len(parts["results"]) == len(parts["sft"]) == 8
    for e, res, sft in zip(parts["experience"], parts["results"], parts["sft"]):
        assert (e["id"], e["sample_index"]) == (res["id"], res["sample_index"]) == (sft["id"], sft["sample_index"])
        prompt, response = e["prompt_ids"], e["response_ids"]
        assert prompt[0] == 1 and EOS not in response
        assert e["response_length"] == len(response) == res["usage"]["completion_tokens"]
        assert e["total_length"] == len(prompt) + len(response) and res["usage"]["prompt_tokens"] == len(prompt)
        text = sft["response"] if "response" in sft else sft["conversations"][-1]["value"]
        assert res["response"] == text == tok.decode(response, skip_special_tokens=True)
        T = temperature[e["id"]]
        lp = (forward_logits(policy, prompt, response) / T).log_softmax(-1)
        rlp = (forward_logits(ref, prompt, response) / T).log_softmax(-1)
        target = torch.tensor(response)[:, None]
        want, want_ref = lp.gather(1, target)[:, 0], rlp.gather(1, target)[:, 0]
        assert e["logprobs"] == pytest.approx(want.tolist(), abs=ATOL)
        assert e["ref_logprobs"] == pytest.approx(want_ref.tolist(), abs=ATOL)
        assert e["kl"] == pytest.approx((want - want_ref).tolist(), abs=2 * ATOL)
        assert e["kl_k3"] == pytest.approx(torch.expm1(want_ref - want).sub(want_ref - want).tolist(), abs=2 * ATOL)
        for pos, top in enumerate(e["top_logprobs"]):
            values, ids = torch.topk(lp[pos], 3)
            assert [i for i, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=ATOL)
    assert {e["finish_reason"] for e in parts["experience"] if e["id"] == "b"} == {"stop"}
    # the same seed gives the same records
    assert run()[1]["experience"] == parts["experience"]
