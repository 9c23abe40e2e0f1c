"""The engine on the CPU in float32 against transformers' own generate on tiny random LLaMA models."""
from __future__ import annotations

import random

import pytest
import torch

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.tools.testing import hf_greedy, tiny_llama


def make_engine(num_kv_heads=4, **kw) -> LLMEngine:
    cfg = dict(model_path="", device="cpu", max_num_batched_tokens=64, block_size=4)
    cfg.update(kw)
    return LLMEngine.from_model(tiny_llama(num_kv_heads), None, EngineConfig(**cfg))


def greedy(max_new: int, **kw) -> SamplingParams:
    # min_new_tokens = max_new masks EOS exactly as transformers' min_new_tokens does in the reference, whose
    # scores are the processed distribution's
    return SamplingParams(max_new_tokens=max_new, min_new_tokens=max_new, temperature=0.0,
                          logprobs_mode="processed", **kw)


def random_prompts(n: int, seed: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def check_against_hf(model, prompt: list[int], completion, max_new: int) -> None:
    ref, logits = hf_greedy(model, prompt, max_new)
    assert completion.token_ids == ref
    want = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ref)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(completion.logprobs), want, atol=1e-4)
    assert completion.finish_reason == "length"


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_greedy_matches_transformers_over_mixed_prompt_lengths(num_kv_heads):
    eng = make_engine(num_kv_heads)
    prompts = random_prompts(10, seed=num_kv_heads)
    outs = eng.generate([Request(f"r{i}", p, greedy(16)) for i, p in enumerate(prompts)])
    assert [o.request_id for o in outs] == [f"r{i}" for i in range(10)]
    for p, o in zip(prompts, outs):
        check_against_hf(tiny_llama(num_kv_heads), p, o.completions[0], 16)


@pytest.mark.parametrize("policy", ["longest-first", "tail-longest-first"])
def test_longest_first_schedules_give_the_same_greedy_output(policy):
    prompts = random_prompts(8, seed=11)
    lengths = [4, 20, 9, 20, 1, 13, 6, 17]
    reqs = [Request(f"r{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(prompts, lengths))]
    eng = make_engine(max_num_seqs=3, schedule=policy)
    outs = eng.generate(reqs)
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]
    for p, n, o in zip(prompts, lengths, outs):
        check_against_hf(tiny_llama(), p, o.completions[0], n)


def test_greedy_matches_transformers_under_preemption():
    # 24 blocks of 4 tokens cannot hold 8 sequences of up to ~75 tokens: sequences are preempted and recomputed
    eng = make_engine(num_kv_blocks=24, admission_horizon_tokens=0)
    prompts = random_prompts(8, seed=7, lo=20, hi=55)
    outs = eng.generate([Request(f"r{i}", p, greedy(20)) for i, p in enumerate(prompts)])
    assert eng.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        check_against_hf(tiny_llama(), p, o.completions[0], 20)
    assert eng.scheduler.pool.num_free == eng.num_blocks          # every block came back


def test_requests_arriving_mid_run_match_transformers():
    eng = make_engine()
    prompts = random_prompts(6, seed=3)
    for i in range(3):
        eng.add_request(Request(f"r{i}", prompts[i], greedy(12)))
    done = {}
    for step in range(200):
        if step == 4:
            for i in range(3, 6):
                eng.add_request(Request(f"r{i}", prompts[i], greedy(12)))
        for out in eng.step():
            done[out.request_id] = out
        if not eng.has_unfinished() and step > 4:
            break
    assert sorted(done) == [f"r{i}" for i in range(6)]
    for i, p in enumerate(prompts):
        check_against_hf(tiny_llama(), p, done[f"r{i}"].completions[0], 12)


@pytest.mark.parametrize("num_kv_blocks", [None, 30])
def test_n_greedy_samples_share_the_prompt_and_all_match_transformers(num_kv_blocks):
    eng = make_engine(num_kv_blocks=num_kv_blocks)
    prompts = random_prompts(5, seed=11, lo=5, hi=30)          # lengths not multiples of the block size: COW
    outs = eng.generate([Request(f"r{i}", p, greedy(14, n=3)) for i, p in enumerate(prompts)])
    for p, o in zip(prompts, outs):
        assert [c.index for c in o.completions] == [0, 1, 2]
        for c in o.completions:
            check_against_hf(tiny_llama(), p, c, 14)
    assert eng.scheduler.pool.num_free == eng.num_blocks


def sampled(max_new=12, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=0.9, ignore_eos=True, **kw)


def test_seed_reproduces_samples_regardless_of_batch():
    p = random_prompts(1, seed=5, lo=10, hi=10)[0]
    alone = make_engine().generate([Request("a", p, sampled(seed=123))])[0].completions[0]
    others = [Request(f"o{i}", q, sampled()) for i, q in enumerate(random_prompts(5, seed=6))]
    crowd = make_engine(num_kv_blocks=30).generate(others + [Request("a", p, sampled(seed=123))])[-1]
    assert crowd.completions[0].token_ids == alone.token_ids
    assert crowd.completions[0].logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    other_seed = make_engine().generate([Request("a", p, sampled(seed=124))])[0].completions[0]
    assert other_seed.token_ids != alone.token_ids


def test_decode_rows_run_longest_context_first_and_the_order_changes_no_output():
    prompts = random_prompts(7, seed=21, lo=2, hi=40)
    runs = {}
    for longest in (True, False):
        eng = make_engine(max_num_batched_tokens=32)
        eng.runner.decode_longest_first = longest
        run_step, orders = eng.runner._run_step, []

        def spy(chunks, nd, *rest, run_step=run_step, orders=orders):
            orders.append([c.start for c in chunks[:nd]])
            return run_step(chunks, nd, *rest)
        eng.runner._run_step = spy
        reqs = [Request(f"r{i}", p, sampled(seed=40 + i, n=2 if i == 3 else 1) if i % 2 else greedy(10))
                for i, p in enumerate(prompts)]
        runs[longest] = ([[(c.token_ids, c.logprobs) for c in o.completions] for o in eng.generate(reqs)], orders)
    (on, on_orders), (off, off_orders) = runs[True], runs[False]
    assert all(o == sorted(o, reverse=True) for o in on_orders)
    assert any(o != sorted(o, reverse=True) for o in off_orders)     # the scheduler's own order differs
    assert [[t for t, _ in r] for r in on] == [[t for t, _ in r] for r in off]
    for r_on, r_off in zip(on, off):
        for (_, lp_on), (_, lp_off) in zip(r_on, r_off):
            assert lp_on == pytest.approx(lp_off, abs=1e-5)


def mixed_requests(prompts, seed: int, forked: int) -> list[Request]:
    """Every third prompt sampled (seeded from `seed`; prompt `forked` with n=2), the others greedy for 9 tokens."""
    return [Request(f"r{i}", p, sampled(seed=seed + i, n=2 if i == forked else 1) if i % 3 == 0 else greedy(9))
            for i, p in enumerate(prompts)]


def assert_same_output(got, want) -> None:
    """The same tokens for every completion, and their logprobs within float32 rounding."""
    for g, w in zip(got, want):
        assert [c.token_ids for c in g.completions] == [c.token_ids for c in w.completions]
        for cg, cw in zip(g.completions, w.completions):
            assert cg.logprobs == pytest.approx(cw.logprobs, abs=1e-5)


def test_adaptive_step_sizes_give_the_same_output():
    prompts = random_prompts(10, seed=29, lo=20, hi=60)

    def reqs():
        return mixed_requests(prompts, 80, forked=4)
    plain = make_engine(max_num_batched_tokens=64)
    assert plain.config.adaptive_step_size and not plain.scheduler.step_buckets      # on, but no times on the CPU
    want = plain.generate(reqs())
    eng = make_engine(max_num_batched_tokens=64, max_num_seqs=4)
    s = eng.scheduler
    # step times a GPU's runner could measure: flat up to 16 tokens, dear above, so scheduler.step_size gives 16
    # beside any decode row and 64 (the cap) beside none
    s.step_buckets = [(8, 1e-3), (16, 1e-3), (32, 2.5e-3), (64, 4e-3)]
    sizes, schedule = [], s.schedule

    def spy():
        out = schedule()
        if not out.is_decode_only:
            sizes.append((sum(c.num_tokens == 1 for c in out.chunks), out.num_tokens))
        return out
    s.schedule = spy
    got = eng.generate(reqs())
    assert sizes[0] == (0, 64) and all(total <= 16 for rows, total in sizes if rows)
    assert sum(1 for rows, _ in sizes if rows) >= 5
    assert_same_output(got, want)


def test_steps_cut_back_to_a_bucket_give_the_same_output():
    prompts = random_prompts(8, seed=23, lo=5, hi=50)

    def reqs():
        return mixed_requests(prompts, 60, forked=3)
    plain = make_engine(max_num_batched_tokens=48)
    want = plain.generate(reqs())
    eng = make_engine(max_num_batched_tokens=48)
    # 16 -> 24 and 32 -> 48 are dear steps up: steps of 17-23 and 33-47 tokens are cut back where a chunk allows
    s = eng.scheduler
    s.step_buckets = [(8, 1e-4), (16, 1e-4), (24, 3e-4), (32, 3e-4), (48, 9e-4)]
    s.adaptive_step_size = False        # the cut alone (adaptive sizes: the test below)
    cut_totals, schedule = [], s.schedule

    def spy():
        before = s.num_cut_steps
        out = schedule()
        if s.num_cut_steps > before:
            cut_totals.append(sum(c.num_tokens for c in out.chunks))
        return out
    s.schedule = spy
    got = eng.generate(reqs())
    assert cut_totals and set(cut_totals) <= {16, 32} and plain.scheduler.num_cut_steps == 0
    assert_same_output(got, want)
    for i, (p, o) in enumerate(zip(prompts, got)):
        if i % 3:
            check_against_hf(tiny_llama(), p, o.completions[0], 9)


def test_sample_i_of_n_uses_seed_plus_i():
    p = random_prompts(1, seed=8, lo=9, hi=9)[0]
    eng = make_engine()
    group = eng.generate([Request("g", p, sampled(seed=40, n=3))])[0]
    singles = eng.generate([Request(f"s{i}", p, sampled(seed=40 + i)) for i in range(3)])
    assert [c.token_ids for c in group.completions] == [s.completions[0].token_ids for s in singles]
    assert len({tuple(c.token_ids) for c in group.completions}) > 1


def test_sampled_logprobs_are_those_of_the_processed_distribution():
    eng = make_engine()
    out = eng.generate([Request("a", [5, 6, 7], SamplingParams(max_new_tokens=8, temperature=0.7, top_k=5,
                                                              ignore_eos=True, seed=1))])[0].completions[0]
    assert all(lp <= 0.0 for lp in out.logprobs) and len(out.logprobs) == 8
    # with top_k 5 no token can be less likely than 1/5 on average; a log-prob of -inf would mean a masked pick
    assert min(out.logprobs) > -30


def test_max_new_tokens_is_clamped_to_max_model_len_and_long_prompts_are_refused():
    eng = make_engine(max_model_len=40)
    out = eng.generate([Request("a", list(range(3, 33)), greedy(50))])[0].completions[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    with pytest.raises(ValueError):
        eng.add_request(Request("b", list(range(3, 43)), greedy(5)))
    with pytest.raises(ValueError):
        eng.add_request(Request("c", [], greedy(5)))


def test_stop_token_ids_and_eos_end_with_stop_and_are_not_returned():
    eng = make_engine()
    p = random_prompts(1, seed=2)[0]
    ref = eng.generate([Request("a", p, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))])[0]
    toks = ref.completions[0].token_ids
    stop_at = toks[5]
    first = toks.index(stop_at)
    out = eng.generate([Request("b", p, SamplingParams(max_new_tokens=12, temperature=0,
                                                       stop_token_ids=(stop_at,)))])[0].completions[0]
    assert out.finish_reason == "stop" and out.token_ids == toks[:first]
    assert len(out.logprobs) == first
    # min_new_tokens masks the stop id until enough tokens exist
    late = eng.generate([Request("c", p, SamplingParams(max_new_tokens=12, temperature=0, min_new_tokens=first + 1,
                                                        stop_token_ids=(stop_at,)))])[0].completions[0]
    assert stop_at not in late.token_ids[:first + 1]


class CharTokenizer:
    """Each id decodes to one letter: enough to test stop strings without a real vocabulary."""
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i == 2))


def test_stop_strings_cut_text_and_tokens():
    tok = CharTokenizer()
    eng = LLMEngine.from_model(tiny_llama(), tok, EngineConfig(model_path="", device="cpu", block_size=4))
    p = random_prompts(1, seed=4)[0]
    free = eng.generate([Request("a", p, SamplingParams(max_new_tokens=16, temperature=0,
                                                       ignore_eos=True))])[0].completions[0]
    assert free.text == tok.decode(free.token_ids)
    stop = free.text[6:8]
    cut = free.text.find(stop)
    out = eng.generate([Request("b", p, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True,
                                                       stop=(stop,)))])[0].completions[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:cut] and out.token_ids == free.token_ids[:cut]


def test_abort_frees_the_request():
    eng = make_engine()
    eng.add_request(Request("a", [5, 6, 7], greedy(30)))
    eng.add_request(Request("b", [8, 9], greedy(3)))
    eng.step()
    eng.abort("a")
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.request_id for o in outs] == ["b"]
    assert eng.scheduler.pool.num_free == eng.num_blocks


def test_n_above_max_num_seqs_is_refused():
    eng = make_engine(max_num_seqs=4)
    with pytest.raises(ValueError):
        eng.add_request(Request("a", [5, 6], greedy(3, n=5)))


def test_fp8_kv_cache_computes_exactly_what_a_float32_cache_of_the_rounded_values_computes(monkeypatch):
    """kv_cache_dtype fp8 stores K/V as float8 e4m3 and computes attention from them in float32: the same
    tokens and logprobs as a float32 cache into which every K/V is written rounded through float8, over
    chunked prefill, preemption and n=2 samples (copy-on-write copies the float8 bytes)."""
    from ziya_batch.engine import attention

    prompts = random_prompts(8, seed=13, lo=10, hi=50)
    params = [greedy(12, n=2) if i % 3 == 0 else greedy(12) for i in range(len(prompts))]

    def run(kv_dtype):
        eng = make_engine(num_kv_blocks=40, admission_horizon_tokens=0, kv_cache_dtype=kv_dtype)
        outs = eng.generate([Request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])
        return eng, [[(c.token_ids, c.logprobs) for c in o.completions] for o in outs]

    fp8_engine, fp8 = run("fp8")
    assert fp8_engine.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert fp8_engine.scheduler.num_preemptions > 0
    real_write = attention.write_kv

    def write_rounded(k_flat, v_flat, slots, k, v):
        f8 = torch.float8_e4m3fn
        real_write(k_flat, v_flat, slots, k.to(f8).to(k.dtype), v.to(f8).to(v.dtype))

    monkeypatch.setattr(attention, "write_kv", write_rounded)
    _, emulated = run("auto")
    assert fp8 == emulated


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        make_engine(kv_cache_dtype="int4")


def test_fp8_cache_writes_clamp_out_of_range_values_instead_of_storing_nan():
    from ziya_batch.engine.attention import write_kv

    kf = torch.zeros(4, 1, 2, dtype=torch.float8_e4m3fn)
    vf = torch.zeros_like(kf)
    k = torch.tensor([[[1000.0, -1000.0]], [[1.5, -2.0]]])
    write_kv(kf, vf, torch.tensor([0, 3]), k, -k)
    assert not kf.float().isnan().any() and not vf.float().isnan().any()
    assert kf[0].float().tolist() == [[448.0, -448.0]] and vf[0].float().tolist() == [[-448.0, 448.0]]
    assert kf[3].float().tolist() == [[1.5, -2.0]]


def test_packed_step_tables_start_16_byte_aligned():
    """Triton specialises kernels on pointer alignment: tables at step-dependent offsets would compile new
    kernel variants in the middle of a run."""
    import numpy as np
    from ziya_batch.engine.runner import _packed
    rng = np.random.default_rng(0)
    for sizes in ([3, 5, 1, 7], [1, 1, 1, 1], [0, 2, 9, 4]):
        wide = [rng.integers(0, 1000, n) for n in sizes]
        narrow = [rng.integers(0, 1000, n + 1) for n in sizes] + [rng.integers(0, 1000, 6)]
        w, n = _packed(wide, narrow, torch.device("cpu"))
        assert all(t.data_ptr() % 16 == 0 for t in w + n)
        assert [t.dtype for t in w] == [torch.int64] * 4 and [t.dtype for t in n] == [torch.int32] * 5
        assert [t.tolist() for t in w] == [a.tolist() for a in wide]
        assert [t.tolist() for t in n] == [a.tolist() for a in narrow]


def test_async_scheduling_gives_what_completing_each_step_in_order_gives(monkeypatch):
    """With async_scheduling a step is launched before the one before it is read back: its inputs take that
    step's tokens on the device, a sequence ended by a stop token costs one discarded row, and preemption
    may pick a sequence whose last token is still pending. Tokens and finish reasons must equal those of the
    engine that reads every step back before scheduling the next (logprobs up to float32 rounding)."""
    from ziya_batch.engine import runner

    # seeds chosen so that a sequence is preempted right after sampling its stop token, before it is read back
    prompts = random_prompts(12, seed=25, lo=8, hi=40)
    free = make_engine().generate([Request("x", prompts[0], sampled(seed=3))])[0].completions[0].token_ids
    stops = tuple(free[2:8])          # tokens this tiny model draws: some requests stop early, at varied steps

    def params(i):
        if i % 4 == 0:
            return sampled(max_new=14, seed=i, n=2, stop_token_ids=stops)
        if i % 4 == 1:
            return greedy(10 + i)
        return sampled(max_new=6 + 2 * i, seed=100 + i, top_k=8, stop_token_ids=stops)

    reads = []
    take = runner._take_pending
    monkeypatch.setattr(runner, "_take_pending", lambda *a: (reads.append(1), take(*a))[1])

    def run(async_scheduling):
        eng = make_engine(num_kv_blocks=40, admission_horizon_tokens=0, async_scheduling=async_scheduling)
        outs = eng.generate([Request(f"r{i}", p, params(i)) for i, p in enumerate(prompts)])
        assert eng.scheduler.pool.num_free == eng.num_blocks and not eng.has_unfinished()
        return eng, [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.completions] for o in outs]

    sync_engine, in_order = run(False)
    assert not reads
    async_engine, overlapped = run(True)
    assert reads                                    # steps did read their inputs from the step before on the device
    assert async_engine.scheduler.num_preemptions > 0 and sync_engine.scheduler.num_preemptions > 0
    assert {r for o in in_order for _, r, _ in o} == {"stop", "length"}
    assert [[c[:2] for c in o] for o in overlapped] == [[c[:2] for c in o] for o in in_order]
    # the steps hold other rows (discarded ones): float32 sums may differ in the last bits
    for o, ref in zip(overlapped, in_order):
        for c, r in zip(o, ref):
            assert c[2] == pytest.approx(r[2], abs=1e-5)


def test_repetition_penalty_under_async_scheduling_reads_the_pending_token_on_the_device():
    """The penalty covers every token so far; the last one may still be on the device (not read back): the
    engine must penalise it there. Output equals the one of an engine that reads each step back first."""
    prompts = random_prompts(6, seed=22, lo=3, hi=12)
    reqs = [Request(f"r{i}", p, greedy(14, repetition_penalty=3.0) if i % 2 else
                    sampled(max_new=14, seed=i, repetition_penalty=2.0)) for i, p in enumerate(prompts)]
    eng = make_engine()
    for r in reqs:
        eng.add_request(r)
    outs, overlapped = {}, 0
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
        overlapped += eng._inflight is not None
    assert overlapped > 10
    ref = make_engine(async_scheduling=False).generate(reqs)
    got = [outs[r.request_id].completions[0].token_ids for r in reqs]
    assert got == [o.completions[0].token_ids for o in ref]
    # the penalty matters here: without it, greedy rows repeat tokens
    plain = make_engine().generate([Request(r.request_id, r.prompt_ids, greedy(14)) for r in reqs[1::2]])
    assert [o.completions[0].token_ids for o in plain] != got[1::2]


def test_a_step_that_raises_loses_nothing_of_the_step_before():
    """The step before a failing one is still in flight (async scheduling): it is read back by the next call,
    so its tokens are neither lost nor left pending, and the run can go on."""
    prompts = random_prompts(4, seed=23)
    reqs = [Request(f"r{i}", p, greedy(10)) for i, p in enumerate(prompts)]
    ref = make_engine().generate(reqs)
    eng = make_engine()
    for r in reqs:
        eng.add_request(r)
    execute, calls = eng.runner.execute, []

    def flaky(*a):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("device error")
        return execute(*a)

    eng.runner.execute = flaky
    outs = {}
    while eng.has_unfinished():
        try:
            for o in eng.step():
                outs[o.request_id] = o
        except RuntimeError:
            assert eng._inflight is not None
    assert len(calls) > 5
    assert [outs[r.request_id].completions[0].token_ids for r in reqs] == [o.completions[0].token_ids for o in ref]


def test_requests_finished_by_a_call_that_raises_are_returned_by_the_next():
    """When the overlap stops between two calls (here: a plan hook is installed, as tensor parallelism does) the
    step in flight is read back first; if launching the next step then raises, what that read-back finished is
    returned by the following call, never dropped. Tried at every step of a short run."""
    prompts = random_prompts(4, seed=24, lo=2, hi=6)
    reqs = [Request(f"r{i}", p, greedy(1 + i)) for i, p in enumerate(prompts)]
    want = {o.request_id: o.completions[0].token_ids for o in make_engine(async_scheduling=False).generate(reqs)}

    def boom(out):
        raise RuntimeError("broadcast failed")

    for fail_at in range(1, 6):
        eng = make_engine()
        for r in reqs:
            eng.add_request(r)
        got, calls = {}, 0
        while eng.has_unfinished():
            calls += 1
            eng.plan_hook = boom if calls == fail_at else None
            try:
                outs = eng.step()
            except RuntimeError:
                continue
            for o in outs:
                assert o.request_id not in got
                got[o.request_id] = o.completions[0].token_ids
        assert got == want, fail_at
    # an aborted request's output is not returned, even one finished by the call that raised
    eng = make_engine()
    for r in reqs:
        eng.add_request(r)
    eng.step()
    eng.plan_hook = boom
    with pytest.raises(RuntimeError):
        eng.step()
    aborted = {o.request_id for o in eng._carried}
    for rid in aborted:
        eng.abort(rid)
    eng.plan_hook = None
    rest = []
    while eng.has_unfinished():
        rest += [o.request_id for o in eng.step()]
    assert aborted and not aborted & set(rest) and set(rest) | aborted == set(want)


def test_a_finish_check_that_raises_drops_its_request_and_the_others_go_on():
    """A stop-string check can fail (a tokenizer error). The request is dropped (its blocks freed), the error
    raised, and the run goes on: a sequence holding all its tokens must not be left running, never scheduled
    nor checked again, which made every later step() return nothing forever."""
    prompts = random_prompts(3, seed=25, lo=3, hi=9)
    reqs = [Request(f"r{i}", p, greedy(6)) for i, p in enumerate(prompts)]
    want = {o.request_id: o.completions[0].token_ids for o in make_engine().generate(reqs)}
    for async_scheduling in (True, False):
        eng = make_engine(async_scheduling=async_scheduling)
        for r in reqs:
            eng.add_request(r)
        check, fired = eng._check_finished, []

        def flaky(s):
            if s.request_id == "r1" and s.num_output_tokens == 6 and not fired:
                fired.append(1)
                raise RuntimeError("tokenizer failed")
            return check(s)

        eng._check_finished = flaky
        got, errors = {}, 0
        for _ in range(100):
            if not eng.has_unfinished():
                break
            try:
                got.update((o.request_id, o.completions[0].token_ids) for o in eng.step())
            except RuntimeError:
                errors += 1
        assert errors == 1 and not eng.has_unfinished()
        assert got == {k: v for k, v in want.items() if k != "r1"}
        assert eng.scheduler.pool.num_free == eng.num_blocks


def test_last_step_is_none_when_a_call_completes_no_step():
    eng = make_engine()
    eng.add_request(Request("a", [5, 6, 7], greedy(3)))
    eng.step()
    assert eng.last_step is None                    # launched only: nothing read back yet
    eng.step()
    assert eng.last_step is not None and eng.last_step.num_prefill_tokens == 3
