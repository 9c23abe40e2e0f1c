"""The engine on a CUDA GPU: float16 parity with transformers, the Triton paged-decode kernel against the
torch reference, CUDA-graph decode against eager decode, and preemption. Skipped without CUDA."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from ziya_batch.engine.attention import (PrefillBatch, decode_attention_torch, decode_attention_triton,
                                         decode_variants, prefill_attention_torch, prefill_attention_triton,
                                         prefill_batch)
from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.sampling import build_sampling_tensors, sample_torch, sample_triton
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.tools.testing import chain_sequences, hf_greedy, markov_chain, tiny_llama, trained_tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def prompts(n: int, seed: int, lo=4, hi=120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def prefill_case(shapes: list[tuple[int, int]], nblocks: int, blocks_per_seq: int) -> tuple[PrefillBatch, int]:
    """Chunks of (new tokens, cached tokens) laid end to end, each over its own scattered blocks; returns the
    batch and the number of query rows."""
    chunks, tok = [], 0
    for n, ctx0 in shapes:
        chunks.append((tok, n, ctx0))
        tok += n
    perm = torch.randperm(nblocks, device="cuda")
    bt = perm[:len(shapes) * blocks_per_seq].view(len(shapes), blocks_per_seq).to(torch.int32)
    return prefill_batch(chunks, bt), tok


def greedy(n_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n_new, min_new_tokens=n_new, temperature=0.0)


@pytest.mark.parametrize("cache", [torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("heads,kv_heads", [(40, 40), (32, 8)])
def test_triton_paged_decode_matches_torch_reference(heads, kv_heads, cache):
    """Every configuration the tuner may pick (both kernels: CUDA-core and tensor-core) over float16 and float8
    caches, MHA and GQA, against the float32 reference of the same cache values."""
    torch.manual_seed(0)
    B, D, bs, nblocks = 37, 128, 16, 1700
    kc = torch.randn(nblocks * bs, kv_heads, D, device="cuda").to(cache)
    vc = torch.randn(nblocks * bs, kv_heads, D, device="cuda").to(cache)
    lens = torch.randint(1, 700, (B,), device="cuda", dtype=torch.int32)
    lens[0] = 1
    perm = torch.randperm(nblocks, device="cuda")
    bt = perm[:B * 44].view(B, 44).to(torch.int32)          # scattered blocks, 44 * 16 >= 700
    lens[1] = 128                                            # full tiles only, no remainder
    lens[2] = 0                                              # a CUDA-graph padding row: zeros, nothing read
    q = torch.randn(B, heads, D, device="cuda", dtype=torch.float16)
    ref = decode_attention_torch(q.float(), kc.float(), vc.float(), bt, lens, bs)
    # block-table columns past a row's blocks hold garbage in a real step: any read of one faults here
    used = (lens + bs - 1) // bs
    bad = torch.arange(bt.shape[1], device="cuda")[None, :] >= used[:, None]
    bt_poisoned = bt.masked_fill(bad, 2 ** 30)
    for config in [None] + decode_variants(cache):        # the default, the tuner's candidates, "half"
        out = torch.full_like(q, float("nan"))
        decode_attention_triton(q, kc, vc, bt_poisoned, lens, bs, out, config)
        torch.cuda.synchronize()
        err = (out.float() - ref).norm() / ref.norm()
        assert not out.isnan().any() and err < 3e-3, config
        assert (out[2] == 0).all(), config


@pytest.mark.parametrize("heads,kv_heads", [(40, 40), (32, 8)])
def test_triton_paged_prefill_matches_torch_reference(heads, kv_heads):
    """Chunks with and without cached context, lengths that are not multiples of the query block, scattered
    blocks: one kernel launch against one SDPA call per chunk."""
    torch.manual_seed(0)
    D, bs, nblocks = 128, 16, 1700
    kc = torch.randn(nblocks * bs, kv_heads, D, device="cuda", dtype=torch.float16)
    vc = torch.randn_like(kc)
    shapes = [(1, 0), (5, 0), (64, 0), (65, 0), (300, 0), (17, 33), (128, 512), (200, 1), (3, 700)]  # (n, ctx0)
    pre, tok = prefill_case(shapes, nblocks, 48)                                # 48 * 16 >= 703
    q = torch.randn(tok, heads, D, device="cuda", dtype=torch.float16)
    out = torch.full_like(q, float("nan"))
    prefill_attention_triton(q, kc, vc, pre, bs, out)
    ref = torch.zeros(tok, heads, D, device="cuda")
    prefill_attention_torch(q.float(), kc.float(), vc.float(), pre, bs, ref)
    err = (out.float() - ref).norm() / ref.norm()
    assert not out.isnan().any() and err < 3e-3


class _Row:
    def __init__(self, params: SamplingParams, key: int):
        self.params, self.sample_key, self.num_output_tokens, self.token_ids = params, key, key % 7, [1, 2]


def test_triton_sampler_draws_what_the_sorting_sampler_draws():
    """The sort-free kernel (bisection for the top_k/top_p cut-offs) against the reference: same noise, so the
    same tokens, for greedy rows, top_p alone, top_k alone, both, bans, peaked and near-uniform rows."""
    torch.manual_seed(0)
    R, V = 96, 39424
    logits = torch.randn(R, V, device="cuda") * torch.linspace(0.05, 8, R, device="cuda")[:, None]
    logits[:, :64] = logits[:, :64].round()                 # exact ties among the top values
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.85),
             SamplingParams(temperature=0.7, top_k=40, top_p=1.0), SamplingParams(temperature=1.3, top_k=200, top_p=0.5),
             SamplingParams(temperature=1.0, top_p=1.0), SamplingParams(temperature=1.0, top_p=0.05)]
    rows = [_Row(kinds[i % len(kinds)], 1000 + i) for i in range(R)]
    bans = [[5, 7, int(logits[i].argmax())] if i % 5 == 0 else [] for i in range(R)]
    t = build_sampling_tensors(rows, V, torch.device("cuda"), bans)
    logits = logits.index_put((t.banned[0], t.banned[1]), torch.tensor(float("-inf"), device="cuda"))
    same = total = 0
    for trial in range(4):
        t.keys = t.keys + 7919 * trial
        a_tok, a_lp = sample_torch(logits, t)
        b_tok, b_lp = sample_triton(logits, t)
        eq = a_tok == b_tok
        same, total = same + int(eq.sum()), total + R
        assert (a_lp - b_lp)[eq].abs().max() < 1e-4
        assert not any(int(b_tok[i]) in bans[i] for i in range(R))
    assert same >= total - 2            # float rounding of the cumulative mass at the nucleus' edge, at most


def test_float16_greedy_matches_transformers_except_at_near_ties():
    """float16 parity: the first 32 greedy tokens equal transformers' float16 generate for most prompts, and
    wherever they differ, the two tokens were a near-tie in float32 (rounding, not a wrong computation)."""
    # a sharper head than the CPU tests' model: fewer near-tied greedy picks
    base = copy.deepcopy(tiny_llama(2))
    with torch.no_grad():
        base.lm_head.weight.mul_(3.0)
    hf = copy.deepcopy(base).to("cuda", torch.float16)
    ref32 = base.to("cuda")
    eng = LLMEngine.from_model(hf, None, EngineConfig(model_path="", dtype="float16", device="cuda",
                                                      block_size=16, num_kv_blocks=512))
    ps = prompts(40, seed=1)
    outs = eng.generate([Request(str(i), p, greedy(32)) for i, p in enumerate(ps)])
    same, near_tie, far = 0, 0, []
    for p, o in zip(ps, outs):
        mine, theirs = o.completions[0].token_ids, hf_greedy(hf, p, 32)[0]
        if mine == theirs:
            same += 1
            continue
        i = next(j for j, (x, y) in enumerate(zip(mine, theirs)) if x != y)
        with torch.no_grad():
            logits = ref32(torch.tensor([p + theirs[:i]], device="cuda")).logits[0, -1].float()
        gap = (logits[theirs[i]] - logits[mine[i]]).abs().item()
        if gap < 0.02 * logits.std().item():
            near_tie += 1
        else:
            far.append((i, gap, logits.std().item()))
    assert not far, f"divergences that are not near-ties: {far}"
    assert same >= 0.85 * len(ps), f"{same} of {len(ps)} prompts equal for 32 tokens ({near_tie} near-ties)"


def test_float16_greedy_equals_transformers_on_a_trained_model():
    """The issue's bar: on a model whose next-token distributions are peaked (trained for a few seconds, as
    real checkpoints are trained), the first 32 greedy tokens in float16 equal transformers' float16
    generate for at least 95% of prompts, over mixed prompt lengths, chunked prefill and CUDA-graph decode."""
    trained = trained_tiny_llama("cuda")
    hf = copy.deepcopy(trained).to(torch.float16)
    eng = LLMEngine.from_model(hf, None, EngineConfig(model_path="", dtype="float16", device="cuda", block_size=16,
                                                      num_kv_blocks=512, max_num_batched_tokens=256))
    rng = random.Random(4)
    seqs = chain_sequences(40, 200, markov_chain(300, 0), seed=777)
    ps = [seqs[i, :rng.randint(4, 200)].tolist() for i in range(40)]
    outs = eng.generate([Request(str(i), p, greedy(32)) for i, p in enumerate(ps)])
    same = sum(o.completions[0].token_ids == hf_greedy(hf, p, 32)[0] for p, o in zip(ps, outs))
    assert same >= 0.95 * len(ps), f"{same} of {len(ps)} prompts equal for 32 tokens"


def test_triton_kernels_read_a_float8_cache_like_the_torch_reference():
    torch.manual_seed(0)
    D, bs, nblocks, H = 128, 16, 1200, 40
    kc = torch.randn(nblocks * bs, H, D, device="cuda").to(torch.float8_e4m3fn)
    vc = torch.randn(nblocks * bs, H, D, device="cuda").to(torch.float8_e4m3fn)
    B = 23
    lens = torch.randint(1, 600, (B,), device="cuda", dtype=torch.int32)
    bt = torch.randperm(nblocks, device="cuda")[:B * 40].view(B, 40).to(torch.int32)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
    out = torch.full_like(q, float("nan"))
    decode_attention_triton(q, kc, vc, bt, lens, bs, out)
    ref = decode_attention_torch(q.float(), kc, vc, bt, lens, bs)
    assert not out.isnan().any() and (out.float() - ref).norm() / ref.norm() < 3e-3
    shapes = [(5, 0), (130, 0), (40, 200), (1, 50)]
    pre, tok = prefill_case(shapes, nblocks, 20)
    qp = torch.randn(tok, H, D, device="cuda", dtype=torch.float16)
    outp = torch.full_like(qp, float("nan"))
    prefill_attention_triton(qp, kc, vc, pre, bs, outp)
    refp = torch.zeros(tok, H, D, device="cuda")
    prefill_attention_torch(qp.float(), kc, vc, pre, bs, refp)
    assert not outp.isnan().any() and (outp.float() - refp).norm() / refp.norm() < 3e-3


def test_fp8_kv_cache_keeps_most_greedy_outputs_of_a_trained_model():
    """float8 K/V lose precision: on a model with peaked distributions the first 32 greedy tokens still equal
    the float16 cache's for at least 90% of prompts (a bar set before the first GPU run of this test)."""
    hf = copy.deepcopy(trained_tiny_llama("cuda")).to(torch.float16)
    seqs = chain_sequences(40, 200, markov_chain(300, 0), seed=555)
    rng = random.Random(6)
    ps = [seqs[i, :rng.randint(4, 200)].tolist() for i in range(40)]
    res = []
    for kv in ("auto", "fp8"):
        eng = LLMEngine.from_model(hf, None, EngineConfig(model_path="", dtype="float16", device="cuda",
                                                          num_kv_blocks=512, max_num_batched_tokens=256,
                                                          kv_cache_dtype=kv))
        res.append([o.completions[0].token_ids for o in eng.generate([Request(str(i), p, greedy(32))
                                                                      for i, p in enumerate(ps)])])
    assert eng.kv_caches[0][0].dtype == torch.float8_e4m3fn
    same = sum(a == b for a, b in zip(*res))
    assert same >= 0.9 * len(ps), f"{same} of {len(ps)} prompts equal for 32 tokens"


def test_cuda_graph_decode_equals_eager_decode_in_float32():
    hf = tiny_llama(4)
    ps = prompts(24, seed=2)
    res = []
    for graphs in (True, False):
        eng = LLMEngine.from_model(hf, None, EngineConfig(model_path="", dtype="float32", device="cuda",
                                                          cuda_graphs=graphs, max_num_seqs=32, num_kv_blocks=400))
        assert bool(eng.runner.graphs) == graphs
        res.append([o.completions[0].token_ids for o in
                    eng.generate([Request(str(i), p, greedy(24)) for i, p in enumerate(ps)])])
    assert sum(a == b for a, b in zip(*res)) >= 23


def test_preemption_on_gpu_keeps_greedy_output():
    hf = tiny_llama(4)
    ps = prompts(16, seed=3, lo=40, hi=100)
    res = []
    for blocks in (800, 40):
        # no admission horizon: the growth plan would admit only what the 40 blocks can finish, and preempt nothing
        eng = LLMEngine.from_model(hf, None, EngineConfig(model_path="", dtype="float32", device="cuda",
                                                          num_kv_blocks=blocks, max_num_seqs=32,
                                                          admission_horizon_tokens=0))
        res.append([o.completions[0].token_ids for o in
                    eng.generate([Request(str(i), p, greedy(40)) for i, p in enumerate(ps)])])
        if blocks == 40:
            assert eng.scheduler.num_preemptions > 0
    assert sum(a == b for a, b in zip(*res)) >= 15


def test_a_tensor_parallel_rank_never_holds_the_whole_model_on_its_gpu(tmp_path):
    """What lets a 26 GB model run over two 24 GB cards: a rank loading a checkpoint puts only its shard of the
    projections on the GPU, one layer's pieces at a time (peak allocation ~0.6 of the whole model here, where
    loading the whole model first would need at least all of it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ziya_batch.tools.testing import load_sharded
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=1024, vocab_size=300, max_position_embeddings=512)
    hf = LlamaForCausalLM(cfg).half()
    hf.save_pretrained(tmp_path / "m")
    whole = sum(p.numel() * p.element_size() for p in hf.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_sharded(str(tmp_path / "m"), 1, 2, torch.device("cuda"), torch.float16)
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() - base
    assert shard < 0.6 * whole
    assert peak < 0.75 * whole, (peak, shard, whole)


def test_a_worker_switches_models_on_the_gpu_and_frees_the_one_it_drops(tmp_path):
    """A one-GPU replica serving jobs of two models in turn (a, b, a) through the worker's ModelCache: each
    switch drops the loaded engine (weights, KV cache, CUDA graphs) before the next loads, so every engine gets
    the same size of cache, and a model loaded again gives the greedy tokens it gave the first time."""
    from ziya_batch.tools.demo_model import write_demo_model
    from ziya_batch.work.models import ModelCache
    from ziya_batch.spec import parse_spec

    specs = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = write_demo_model(tmp_path / name, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=512,
                                 seed=seed, dtype="float16")
        specs[name] = parse_spec({"name": name, "model": {"path": str(model), "dtype": "float16"},
                                  "engine": {"gpu_memory_fraction": 0.5},
                                  "input": ["unused.jsonl"], "output": {"path": str(tmp_path / f"out-{name}")}})
    cache = ModelCache("cuda")
    params = greedy(12)
    got, blocks = [], []
    for name in ("a", "b", "a"):
        eng = cache.engine(specs[name])
        assert cache.holds(specs[name]) and eng.runner.graphs
        blocks.append(eng.num_blocks)
        got.append([o.completions[0].token_ids
                    for o in eng.generate([Request(str(i), p, params) for i, p in enumerate(prompts(6, 3))])])
        del eng
    assert got[0] == got[2] and got[0] != got[1]
    # an engine left behind would hold half the card: the next one's cache would be far smaller
    assert min(blocks) >= 0.98 * max(blocks), blocks
