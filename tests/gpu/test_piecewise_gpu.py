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
        # every bucket but those prune_buckets dropped (a tiny model's times are launch-bound: some may go)
        kept = sorted(eng.runner.mixed.graphs)
        assert kept == eng.runner.mixed.buckets and set(kept) <= set(mixed_buckets(256)) and kept[-1] == 256
        assert sorted(kept + eng.runner.dropped_buckets()["mixed"]) == mixed_buckets(256)
        assert all(len(g) == eng.model.args.num_layers + 1 for g in eng.runner.mixed.graphs.values())
    else:
        assert eng.runner.mixed is None
    return eng


def greedy_ids(eng: LLMEngine, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    return [o.completions[0].token_ids for o in
            eng.generate([Request(str(i), p, greedy(n_new)) for i, p in enumerate(prompts)])]


def trained_model_and_prompts(quantization, chain_seed: int, prompt_seed: int):
    """The trained tiny model in float16 (FP8 weights with quantization "fp8") and 32 prompts of 4..200 tokens of
    its chains."""
    hf = copy.deepcopy(trained_tiny_llama("cuda")).to(torch.float16)
    model = from_hf_model(hf, torch.device("cuda"), torch.float16, quantization=quantization)
    seqs = chain_sequences(32, 200, markov_chain(300, 0), seed=chain_seed)
    rng = random.Random(prompt_seed)
    return model, [seqs[i, :rng.randint(4, 200)].tolist() for i in range(32)]


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
    model, ps = trained_model_and_prompts(quantization, 91, 9)
    res = []
    for mixed in (True, False):
        eng = engine(model, "float16", mixed, kv_cache_dtype="fp8" if quantization else "auto")
        used = count_pieces(eng) if mixed else []
        res.append(greedy_ids(eng, ps, 32))
        assert not mixed or used
        del eng
    same = sum(a == b for a, b in zip(*res))
    assert same >= 30, f"{same} of 32 prompts equal with and without mixed-step graphs"


@pytest.mark.parametrize("cache", ["float16", "fp8"])
def test_rope_with_kv_writes_equals_rope_then_write_kv_byte_for_byte(cache):
    from ziya_batch.engine import fused
    from ziya_batch.engine.attention import write_kv
    if cache == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 conversions need compute capability 8.9+")
    assert fused.check_fused(torch.device("cuda"), torch.float16, 512, 4, 128, 1024)
    if cache == "fp8":
        assert fused._FP8_KV_FUSED[(torch.cuda.current_device(), torch.float16)], \
            "float8 caches fell back to the two-step path"
    g = torch.Generator(device="cuda").manual_seed(3)
    T, hq, hkv, D = 300, 8, 2, 128
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device="cuda", generator=g).mul(100).half()   # past +-448 too
    qkv[5, (hq + hkv) * D + 3] = float("nan")          # a NaN value reaches the cache as NaN, as write_kv stores it
    pos = torch.randint(0, 2048, (T,), device="cuda", generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    emb = torch.outer(torch.arange(2048, device="cuda").float(), inv)
    cos, sin = torch.cat((emb, emb), -1).cos().half(), torch.cat((emb, emb), -1).sin().half()
    slots = torch.randperm(4 * T, device="cuda", generator=g)[:T]
    cdt = torch.float16 if cache == "float16" else torch.float8_e4m3fn
    want = [torch.zeros(4 * T, hkv, D, device="cuda", dtype=cdt) for _ in range(2)]
    ref = qkv.clone()
    fused.rope_(ref, pos, cos, sin, hq + hkv, D)
    write_kv(*want, slots, ref[:, hq * D:(hq + hkv) * D].view(T, hkv, D), ref[:, (hq + hkv) * D:].view(T, hkv, D))
    got = [torch.zeros_like(w) for w in want]
    out = qkv.clone()
    fused.rope_write_kv_(out, pos, cos, sin, hq, hkv, D, slots, *got)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))       # bit for bit (the NaN included)
    for a, b in zip(got, want):
        nan = b.float().isnan()
        assert torch.equal(a.float().isnan(), nan)        # (a NaN's sign and payload bits may differ)
        bits = torch.int16 if cache == "float16" else torch.uint8       # one element, one code
        assert torch.equal(a.view(bits)[~nan], b.view(bits)[~nan])
    assert got[1].float().isnan().sum() == 1


def test_graph_sizes_slower_than_a_larger_one_are_dropped_and_steps_pad_past_them(monkeypatch):
    # the projections made to look slow at decode size 8 and mixed bucket 128: neither is captured, steps that
    # would take them pad to the next size, and greedy output is what the engine gives with every size
    from ziya_batch.engine import runner as runner_mod
    measure = runner_mod.projection_seconds
    slow = {8, 128}
    monkeypatch.setattr(runner_mod, "projection_seconds",
                        lambda model, sizes: [t + (1.0 if n in slow else 0.0)          # a second slower there
                                              for n, t in zip(sizes, measure(model, sizes))])
    hf = tiny_llama(4)
    rng = random.Random(6)
    ps = [[rng.randrange(3, 300) for _ in range(rng.randint(4, 120))] for _ in range(12)]
    eng = engine(hf, "float32", True)
    dropped = eng.runner.dropped_buckets()
    assert 8 not in eng.runner.graph_sizes and 8 not in eng.runner.graphs and 8 in dropped["decode"]
    assert 128 not in eng.runner.mixed.graphs and 128 in dropped["mixed"]
    got = [o.completions[0].token_ids for o in
           eng.generate([Request(str(i), p, greedy(16)) for i, p in enumerate(ps)])]
    monkeypatch.setattr(runner_mod, "projection_seconds", measure)
    want = [o.completions[0].token_ids for o in
            engine(hf, "float32", False).generate([Request(str(i), p, greedy(16)) for i, p in enumerate(ps)])]
    assert sum(a == b for a, b in zip(got, want)) >= 11


def test_prefill_attention_on_a_side_stream_gives_the_same_output_bit_for_bit(monkeypatch):
    from ziya_batch.engine import attention
    model, ps = trained_model_and_prompts(None, 91, 9)
    # one engine (its kernels tuned once), no prefix cache (every run prefills every prompt again)
    eng = engine(model, "float16", True, prefix_caching=False)
    used = count_pieces(eng)
    side_stream, sides, res = attention._side_stream, [], []
    monkeypatch.setattr(attention, "_side_stream", lambda device: sides.append(1) or side_stream(device))
    sampling = SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0.8, seed=3)
    for on in (False, True, False):
        monkeypatch.setattr(attention, "PREFILL_ON_SIDE_STREAM", on)
        outs = eng.generate([Request(str(i), p, sampling) for i, p in enumerate(ps)])
        res.append([(o.completions[0].token_ids, o.completions[0].logprobs) for o in outs])
        assert bool(sides) == on and used, "the side stream is used exactly when switched on, in pieced steps"
        sides.clear()
    assert res[0] == res[2], "two runs without the side stream agree (the comparison means something)"
    assert res[1] == res[0]
