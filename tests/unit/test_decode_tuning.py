"""The decode-attention tuner's synthetic batch and its candidate configurations, without a GPU (the kernels and
the timing run in tests/gpu)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ziya_batch.engine.attention import (DECODE_CONFIGS, DEFAULT_DECODE_CONFIG, HALF_DECODE_CONFIGS, decode_variants,
                                         synthetic_decode_batch)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 3000), block_size=st.sampled_from([1, 8, 16, 32]), batch=st.integers(1, 300),
       max_context=st.integers(1, 2048), seed=st.integers(0, 2 ** 31))
def test_the_synthetic_batch_fits_the_cache_on_blocks_of_its_own(num_blocks, block_size, batch, max_context, seed):
    per_seq = -(-max_context // block_size)
    if per_seq > num_blocks:                    # the tuner does not tune a cache that holds no whole sequence
        return
    lens, bt = synthetic_decode_batch(num_blocks, block_size, batch, max_context, torch.Generator().manual_seed(seed))
    n = lens.shape[0]
    assert 1 <= n <= batch and bt.shape == (n, per_seq) and bt.dtype == lens.dtype == torch.int32
    assert ((lens >= min(32, max_context)) & (lens <= max_context)).all()
    need = (lens + block_size - 1) // block_size
    used = torch.cat([bt[i, :int(need[i])] for i in range(n)])
    assert used.unique().numel() == used.numel()               # no block read by two sequences (no L2 reuse)
    assert ((used >= 0) & (used < num_blocks)).all()
    if n < batch:                                              # stopped because the next one would not fit
        lens_all = torch.randint(min(32, max_context), max_context + 1, (batch,),
                                 generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
        assert int(need.sum()) + -(-int(lens_all[n]) // block_size) > num_blocks


def test_every_candidate_names_a_kernel_and_an_order():
    for bn, warps, stages, kind, order in DECODE_CONFIGS + HALF_DECODE_CONFIGS + [DEFAULT_DECODE_CONFIG]:
        assert kind in ("fma", "dot", "half") and order in ("seqs", "heads")
        assert bn & (bn - 1) == 0 and warps in (1, 2, 4, 8) and stages >= 1
    fp8 = decode_variants(torch.float8_e4m3fn)
    assert len(set(fp8)) == len(fp8)


def test_half_precision_tiles_run_over_float8_caches_only_and_are_not_the_tuners_candidates():
    """Over a float16 (or float32) cache the tile math stays float32: 16-bit sums would cost accuracy a 16-bit
    cache still has; a float8 cache's values have 4 significant bits. The tuner does not time them (W1 ran no
    faster with them on an H100)."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert decode_variants(dtype) == DECODE_CONFIGS
    assert all(kind != "half" for *_, kind, _ in DECODE_CONFIGS)
    assert {c for c in decode_variants(torch.float8_e4m3fn) if c[3] == "half"} == set(HALF_DECODE_CONFIGS) != set()


def test_the_runner_tunes_decode_on_its_own_cache_and_a_batch_like_its_own(monkeypatch):
    """Start-up and a later retune (a script timing one kernel's configurations) call the tuner the same way: over
    the first layer's cache as slots, as many rows as run (up to 256), contexts as long (up to 1,024)."""
    from ziya_batch.engine import runner as runner_mod
    from ziya_batch.engine.engine import LLMEngine
    from ziya_batch.engine.types import EngineConfig
    from ziya_batch.tools.testing import tiny_llama

    eng = LLMEngine.from_model(tiny_llama(2), None, EngineConfig(model_path="", device="cpu", block_size=4,
                                                                  max_num_batched_tokens=64))
    calls = []
    monkeypatch.setattr(runner_mod, "tune_decode_kernel",
                        lambda *a, **kw: calls.append((a, kw)) or [(("cfg",), 1e-3)])
    monkeypatch.setattr(runner_mod, "tune_prefill_kernel", lambda *a, **kw: [])
    k, v = eng.kv_caches[0]
    for max_num_seqs, max_model_len, batch, context in ((300, 2048, 256, 1024), (8, 100, 8, 100)):
        calls.clear()
        r = runner_mod.ModelRunner(eng.runner.model, eng.kv_caches, 4, max_num_seqs, max_model_len,
                                   torch.device("cpu"), use_graphs=False, use_triton=True)
        assert r.decode_tuning == [(("cfg",), 1e-3)]
        assert r.tune_decode([DEFAULT_DECODE_CONFIG]) == [(("cfg",), 1e-3)]
        assert len(calls) == 2
        for (k_flat, v_flat, heads, block_size), kw, configs in zip([c[0] for c in calls], [c[1] for c in calls],
                                                                    (None, [DEFAULT_DECODE_CONFIG])):
            assert k_flat.data_ptr() == k.data_ptr() and v_flat.data_ptr() == v.data_ptr()
            assert k_flat.shape == (k.shape[0] * k.shape[1], k.shape[2], k.shape[3]) == v_flat.shape
            assert heads == eng.runner.model.layers[0].local_heads and block_size == 4
            assert kw == dict(batch=batch, max_context=context, q_dtype=eng.runner.model.embed.dtype,
                              configs=configs)


def test_the_tuners_keep_their_choice_under_the_key_the_kernels_look_up(monkeypatch):
    # one key function for both sides: a choice kept under another key would never be used
    from ziya_batch.engine import attention
    keys = []
    monkeypatch.setattr(attention, "_keep_fastest", lambda configs, run, chosen, key, agrees=None: keys.append(key)
                        or [])
    k_flat = torch.zeros(64 * 16, 2, 32, dtype=torch.float16)
    attention.tune_decode_kernel(k_flat, k_flat.clone(), 8, 16, batch=4, max_context=64, q_dtype=torch.float32)
    attention.tune_prefill_kernel(k_flat, k_flat.clone(), 8, 16, chunk=32, num_chunks=2, q_dtype=torch.float32)
    want = attention.kernel_key(8, torch.float32, k_flat)
    assert want == (8, 2, 32, torch.float32, torch.float16) and keys == [want, want]
