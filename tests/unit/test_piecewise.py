"""Steps with prefill in pieces around the attention (engine/piecewise.py), run eagerly on the CPU: the pieces,
their padding to a bucket and their static buffers must compute what the plain forward computes."""
from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ziya_batch.engine import piecewise
from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.piecewise import (BUCKET_STEP, MAX_TOKENS, PRUNE_MARGIN, MixedStepGraphs, mixed_buckets,
                                        projection_seconds, prune_buckets)
from ziya_batch.engine.quant import quantize_model
from ziya_batch.engine.types import Request, SamplingParams
from ziya_batch.tools.testing import hf_greedy, tiny_llama

from tests.unit.test_engine import check_against_hf, greedy, make_engine, random_prompts


@given(st.integers(1, 20000))
def test_every_step_size_up_to_the_budget_has_a_bucket(max_tokens):
    b = mixed_buckets(max_tokens)
    assert b == sorted(set(b)) and all(x % BUCKET_STEP == 0 for x in b)
    assert b[-1] >= min(max_tokens, MAX_TOKENS) and b[-1] - min(max_tokens, MAX_TOKENS) < BUCKET_STEP
    assert len(b) <= 2048 // BUCKET_STEP + (MAX_TOKENS - 2048) // 256
    gaps = [y - x for x, y in zip([0, *b], b)]
    assert max(gaps) <= 256 and all(g <= BUCKET_STEP for x, g in zip(b, gaps) if x <= 2048)


@given(st.lists(st.tuples(st.integers(1, 10000), st.floats(1e-6, 1.0)), min_size=1, max_size=40,
                unique_by=lambda r: r[0]))
def test_pruned_buckets_keep_the_largest_and_drop_only_sizes_a_larger_kept_one_beats(rows):
    sizes, secs = [n for n, _ in rows], [t for _, t in rows]
    t = dict(rows)
    kept = prune_buckets(sizes, secs)
    assert kept == sorted(set(kept)) and set(kept) <= set(sizes) and kept[-1] == max(sizes)
    for n in set(sizes) - set(kept):            # dropped: a larger kept size is faster by more than the margin
        assert any(k > n and t[k] < t[n] * (1 - PRUNE_MARGIN) for k in kept)
    for i, a in enumerate(kept):                # kept: no larger kept size is faster by more than the margin
        assert all(t[a] * (1 - PRUNE_MARGIN) <= t[b] for b in kept[i + 1:])


def test_the_h100_s_slow_row_count_is_dropped_and_proportional_times_keep_every_size():
    # one layer's float16 projections on an H100 (2026-12-06, ms over 40 layers): 832 rows slower than 1,024
    assert prune_buckets([512, 800, 832, 1024], [21.00, 32.18, 47.05, 38.57]) == [512, 800, 1024]
    sizes = mixed_buckets(2048)
    assert prune_buckets(sizes, [n * 1e-6 for n in sizes]) == sizes
    assert prune_buckets(sizes, [1e-3] * len(sizes)) == sizes        # equal times: nothing to gain by padding
    with pytest.raises(ValueError):
        prune_buckets([64, 128], [1.0])


class _ClockEvent:
    """torch.cuda.Event's interface over the host clock: projection_seconds runs on the CPU in these tests."""

    def __init__(self, enable_timing: bool = False):
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_ClockEvent") -> float:
        return 1e3 * (end.t - self.t)


@pytest.mark.parametrize("fp8", [False, True])
def test_projection_times_run_each_projection_of_a_layer_at_every_size(monkeypatch, fp8):
    monkeypatch.setattr(torch.cuda, "Event", _ClockEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    eng = make_engine(2)
    if fp8:
        quantize_model(eng.model)
    layer = eng.model.layers[0]
    calls = []
    real = piecewise.linear
    monkeypatch.setattr(piecewise, "linear", lambda x, w: calls.append((x.shape, id(w))) or real(x, w))
    sizes = [1, 3, 16, 40]
    secs = projection_seconds(eng.model, sizes, reps=3)
    assert len(secs) == len(sizes) and all(t > 0 for t in secs)
    projs = [layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj]
    # two sweeps over the sizes; each size: a warm-up, then reps
    want = [((n, p.shape[1]), id(p)) for _ in range(2) for n in sizes for _ in range(1 + 3) for p in projs]
    assert calls == want


def test_projection_times_take_the_least_of_the_sweeps(monkeypatch):
    eng = make_engine(2)
    sweep = iter([[3.0, 9.0, 5.0, 7.0], [4.0, 2.0, 6.0, 1.0]])
    times = iter(t for s in sweep for t in s)
    monkeypatch.setattr(piecewise, "gpu_seconds", lambda fn, reps: next(times))
    assert projection_seconds(eng.model, [1, 2, 3, 4], reps=3) == [3.0, 2.0, 5.0, 1.0]


def pieces_engine(num_kv_heads=4, buckets=(8, 16, 24, 40), **kw) -> LLMEngine:
    """test_engine's CPU engine (budget 64 tokens) with its steps run through the pieces of these buckets."""
    eng = make_engine(num_kv_heads, **kw)
    eng.runner.mixed = MixedStepGraphs(eng.model, eng.kv_caches, list(buckets), eng.runner.scratch_slot, eng.device,
                                       capture=False)
    return eng


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_pieces_padded_to_buckets_match_transformers(num_kv_heads):
    # budget 64 > the largest bucket 40: steps above it take the plain forward, the others the pieces, padded
    eng = pieces_engine(num_kv_heads)
    used = []
    run = eng.runner.mixed.run
    eng.runner.mixed.run = lambda ids, *a: used.append(ids.shape[0]) or run(ids, *a)
    prompts = random_prompts(10, seed=7 + num_kv_heads)
    outs = eng.generate([Request(f"r{i}", p, greedy(12)) for i, p in enumerate(prompts)])
    for p, o in zip(prompts, outs):
        check_against_hf(tiny_llama(num_kv_heads), p, o.completions[0], 12)
    assert any(t not in (8, 16, 24, 40) for t in used), "no step was padded"


def test_padding_rows_write_only_the_scratch_slot():
    prompts = random_prompts(3, seed=3, lo=5, hi=9)
    caches = []
    for pieces in (False, True):
        eng = pieces_engine(buckets=(64,)) if pieces else make_engine()
        for i, p in enumerate(prompts):
            eng.add_request(Request(f"r{i}", p, greedy(1)))
        eng.step()
        slot = eng.runner.scratch_slot
        caches.append([(k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])) for k, v in eng.kv_caches])
    for (k0, v0), (k1, v1) in zip(*caches):
        keep = torch.ones(k0.shape[0], dtype=torch.bool)
        keep[slot] = False
        assert torch.allclose(k0[keep], k1[keep], atol=1e-6) and torch.allclose(v0[keep], v1[keep], atol=1e-6)
        assert k0[keep].abs().sum() > 0


def test_pieces_with_fp8_weights_and_cache_equal_the_plain_forward():
    # the CPU runs FP8 weights in float32 emulation; the same rounding in both paths, so the same tokens
    prompts = random_prompts(6, seed=11)
    outs = []
    for pieces in (False, True):
        eng = pieces_engine(kv_cache_dtype="fp8") if pieces else make_engine(kv_cache_dtype="fp8")
        quantize_model(eng.model)
        res = eng.generate([Request(f"r{i}", p, greedy(10)) for i, p in enumerate(prompts)])
        outs.append([(o.completions[0].token_ids, o.completions[0].logprobs) for o in res])
    for (ids0, lp0), (ids1, lp1) in zip(*outs):
        assert ids0 == ids1
        assert torch.allclose(torch.tensor(lp0), torch.tensor(lp1), atol=1e-4)


def test_n_samples_and_decode_steps_with_children_go_through_the_pieces():
    eng = pieces_engine(buckets=(16, 64))
    prompt = random_prompts(1, seed=5, lo=20, hi=30)[0]
    out = eng.generate([Request("r", prompt, SamplingParams(max_new_tokens=6, min_new_tokens=6, temperature=0.0,
                                                            n=3, logprobs_mode="processed"))])[0]
    ref, _ = hf_greedy(tiny_llama(), prompt, 6)
    assert [c.token_ids for c in out.completions] == [ref] * 3


def test_the_bench_s_synthetic_step_with_prefill_runs_the_same_through_the_pieces():
    from ziya_batch.tools.bench_core import mixed_step_inputs
    eng = pieces_engine(buckets=(64,), num_kv_blocks=64)
    ids, pos, meta, rows = mixed_step_inputs(eng, decode=5, context=20, prefill=(16, 8))
    assert ids.shape[0] == 29 and meta.num_decode == 5 and rows.tolist()[-2:] == [20, 28]
    want = eng.model(ids, pos, eng.kv_caches, meta, rows)
    got = eng.runner.mixed.run(ids, pos, meta, rows)
    assert got.shape == want.shape == (7, eng.model.args.vocab_size)
    assert torch.allclose(got, want, atol=1e-4)


def test_the_synthetic_steps_draw_blocks_without_repeats_while_the_cache_holds_them():
    # a block read by two sequences could come from L2: the profile would look faster than HBM allows
    from ziya_batch.tools.bench_core import distinct_blocks, mixed_step_inputs
    g = torch.Generator().manual_seed(0)
    ids = distinct_blocks(100, 8, 12, g)
    assert ids.shape == (8, 12) and ids.dtype == torch.int32 and len(set(ids.flatten().tolist())) == 96
    more = distinct_blocks(10, 3, 5, g)                 # more than the cache has: each block at most twice
    assert sorted(more.flatten().tolist()).count(0) <= 2 and set(more.flatten().tolist()) == set(range(10))
    eng = pieces_engine(buckets=(64,), num_kv_blocks=64)
    bs = eng.runner.block_size
    _, _, meta, _ = mixed_step_inputs(eng, decode=5, context=10_000, prefill=(16, 8))
    # the chunks take their blocks (twice their tokens: as many cached before them); the 5 sequences share the rest
    pre = -(-32 // bs) + -(-16 // bs)
    per = (64 - pre) // 5
    assert meta.context_lens.tolist() == [per * bs] * 5
    used = meta.block_tables[:, :per].flatten().tolist()
    for i, (_, n, _) in enumerate(meta.prefill.chunks):
        used += meta.prefill.block_tables[i, :-(-2 * n // bs)].tolist()
    assert len(used) == len(set(used)) == 5 * per + pre


def test_the_runner_keeps_the_sizes_every_tensor_parallel_rank_agrees_on(monkeypatch):
    # the runner prunes by the times agree_seconds returns (tensor parallel: the slowest rank's), not its own
    from ziya_batch.engine import runner as runner_mod
    eng = make_engine(2)
    sizes = [64, 128, 192, 256]
    monkeypatch.setattr(runner_mod, "projection_seconds", lambda model, s: [1.0, 2.0, 3.0, 4.0])
    assert eng.runner._prune("mixed", sizes) == sizes
    eng.model.agree_seconds = lambda secs: [secs[0], 9.0, secs[2], secs[3]]      # another rank is slow at 128
    eng.runner.mixed = MixedStepGraphs(eng.model, eng.kv_caches, eng.runner._prune("mixed", sizes),
                                       eng.runner.scratch_slot, eng.device, capture=False)
    assert eng.runner.mixed.buckets == [64, 192, 256]
    assert eng.runner.bucket_seconds["mixed"] == [(64, 1.0), (128, 9.0), (192, 3.0), (256, 4.0)]
    assert eng.runner.dropped_buckets() == {"mixed": [128]}
