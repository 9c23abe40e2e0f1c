"""Automatic prefix caching: full KV blocks keyed by their token prefix, reused across requests, evicted least
recently used first when memory is needed; greedy output the same with it on and off."""
from __future__ import annotations

import json
import random

import torch
import torch.multiprocessing as mp

from ziya_batch.engine import scheduler as sched
from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.kv_cache import BlockPool, hash_block
from ziya_batch.engine.model import from_hf_model
from ziya_batch.engine.scheduler import Scheduler, SeqStatus, Sequence
from ziya_batch.tools.testing import tiny_llama, tp_generate_worker
from ziya_batch.engine.tp import apply_tp
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams


def make_engine(prefix_caching=True, **kw) -> LLMEngine:
    cfg = dict(model_path="", device="cpu", max_num_batched_tokens=64, block_size=4, prefix_caching=prefix_caching)
    cfg.update(kw)
    return LLMEngine.from_model(tiny_llama(), None, EngineConfig(**cfg))


def greedy(max_new: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, min_new_tokens=max_new, temperature=0.0, **kw)


def shared_prefix_prompts(n: int, prefix_len: int, seed: int, lo: int = 1, hi: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 300) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(3, 300) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.completions] for o in outs]


# ---- the pool ---------------------------------------------------------------------------------------------------
def test_block_keys_chain_the_prefix():
    a, b = hash_block(b"", [1, 2, 3, 4]), hash_block(b"", [9, 2, 3, 4])
    assert a != b
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(b, [5, 6, 7, 8])       # same tokens, another prefix
    assert hash_block(a, [5, 6, 7, 8]) == hash_block(hash_block(b"", [1, 2, 3, 4]), [5, 6, 7, 8])


def test_free_cached_blocks_are_evicted_least_recently_freed_first_and_never_while_held():
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(4)]
    keys = [hash_block(b"", [i]) for i in range(4)]
    for b, k in zip(blocks, keys):
        pool.cache(b, k)
    for b in (blocks[2], blocks[0], blocks[1]):             # freed in this order; blocks[3] stays held
        pool.decref(b)
    assert pool.num_free == 3 and pool.lookup(keys[:3]) == blocks[:3]
    assert pool.allocate() == blocks[2]                      # least recently freed goes first
    assert pool.lookup(keys[:3]) == blocks[:2] and keys[2] not in pool.cached and pool.num_evicted == 1
    pool.incref(blocks[0])                                   # found again by its key: no longer free
    assert pool.num_free == 1 and pool.allocate() == blocks[1]
    assert pool.num_free == 0 and pool.cached[keys[3]] == blocks[3] and pool.cached[keys[0]] == blocks[0]


def test_uncached_free_blocks_are_reused_before_cached_ones():
    pool = BlockPool(3)
    a, b = pool.allocate(), pool.allocate()
    pool.cache(a, hash_block(b"", [1]))
    pool.decref(a)
    pool.decref(b)
    assert pool.allocate() == b and pool.allocate() == 2 and pool.allocate() == a


# ---- the scheduler ----------------------------------------------------------------------------------------------
def add(s: Scheduler, prompt: list[int], max_new: int = 4, n: int = 1, rid: str = "r") -> Sequence:
    q = Sequence(s.new_seq_id(), rid, 0, list(prompt), len(prompt), SamplingParams(max_new_tokens=max_new, n=n),
                 pending_forks=n - 1)
    s.add(q)
    return q


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    rows = [x for c in out.chunks if c.samples for x in (c.seq, *c.children)]
    pending = s.advance(out, rows)
    for x in rows:
        if x.seq_id in pending:
            s.fill(x, token, -1.0)
    return out


def caching_scheduler(**kw) -> Scheduler:
    args = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, prefix_caching=True)
    args.update(kw)
    return Scheduler(**args)


def test_a_later_request_starts_after_the_cached_prefix_and_recomputes_the_last_token():
    s = caching_scheduler()
    a = add(s, list(range(10, 22)), rid="a")                  # 3 full blocks
    run_step(s)
    assert a.num_keyed == 3
    b = add(s, list(range(10, 22)) + [5, 6], rid="b")         # the same 3 blocks, then 2 tokens
    out = run_step(s)
    chunk = next(c for c in out.chunks if c.seq is b)
    assert (chunk.start, chunk.num_tokens) == (12, 2) and b.block_ids[:3] == a.block_ids[:3]
    c = add(s, list(range(10, 22)), rid="c")                  # all of it cached: its last block is computed again
    out = run_step(s)
    chunk = next(x for x in out.chunks if x.seq is c)
    assert (chunk.start, chunk.num_tokens) == (8, 4) and c.block_ids[:2] == a.block_ids[:2]
    assert c.block_ids[2] != a.block_ids[2]
    assert (s.prefix_cache_query_tokens, s.prefix_cache_hit_tokens) == (12 + 14 + 12, 0 + 12 + 8)


def test_the_same_block_tokens_after_another_prefix_are_not_shared():
    s = caching_scheduler()
    add(s, [1, 2, 3, 4, 50, 51, 52, 53, 9], rid="a")
    run_step(s)
    b = add(s, [1, 2, 3, 5, 50, 51, 52, 53, 9], rid="b")      # block 1 has a's tokens, block 0 differs
    out = run_step(s)
    assert [(c.start, c.num_tokens) for c in out.chunks if c.seq is b] == [(0, 9)]
    assert s.prefix_cache_hit_tokens == 0


def test_requests_admitted_together_compute_a_shared_prefix_once():
    prefix = list(range(100, 140))                            # 10 blocks
    counts = {}
    for caching in (True, False):
        s = caching_scheduler(max_num_batched_tokens=256, prefix_caching=caching)
        a, b = add(s, prefix + [1, 2], rid="a"), add(s, prefix + [3], rid="b")
        computed = 0
        while not (a.output_ids and b.output_ids):
            computed += run_step(s).num_tokens
        counts[caching] = (s.prefix_cache_hit_tokens, computed)
    assert counts[True][0] == 40 and counts[False][0] == 0
    # b waits a step for a's blocks and then computes only its own token, instead of all 41 beside a
    assert counts[True][1] == 42 + 1 + 1 and counts[False][1] == 42 + 41


def test_eviction_under_pressure_keeps_running_sequences_blocks_and_frees_cached_ones():
    s = caching_scheduler(num_blocks=12, admission_horizon_tokens=0)
    old = add(s, list(range(200, 216)), max_new=1, rid="old")   # 4 blocks, cached once computed
    run_step(s)
    s.finish(old, SeqStatus.FINISHED_LENGTH)
    assert s.pool.num_free == 12 and len(s.pool.cached) == 4
    a = add(s, list(range(10, 26)), max_new=30, rid="a")
    b = add(s, list(range(30, 46)), max_new=30, rid="b")
    for _ in range(20):
        run_step(s)
        held = {blk for q in s.running for blk in q.block_ids}
        assert all(s.pool.ref_counts[blk] > 0 for blk in held)
        assert not held & set(s.pool._free)
    assert s.pool.num_evicted > 0 and s.num_preemptions > 0          # cached blocks went first, then preemption
    for q in (a, b):
        if not q.status.is_finished():
            s.finish(q, SeqStatus.FINISHED_LENGTH)
    assert s.pool.num_free == 12


def test_admission_counts_only_blocks_a_finishing_request_holds_alone():
    s = caching_scheduler(num_blocks=40, admission_horizon_tokens=16)
    prefix = list(range(100, 132))                                # 8 blocks
    a = add(s, prefix + [1], max_new=4, rid="a")
    run_step(s)
    b = add(s, prefix + [2], max_new=4, rid="b")
    run_step(s)
    assert b.block_ids[:8] == a.block_ids[:8]
    plan = sched._GrowthPlan(s, s.running)
    assert [plan._shared(q) for q in (a, b)] == [8, 8]


# ---- the engine -------------------------------------------------------------------------------------------------
def run_both(reqs_fn, **kw):
    outs = {}
    for on in (True, False):
        eng = make_engine(prefix_caching=on, **kw)
        outs[on] = (eng, eng.generate(reqs_fn()))
        assert eng.scheduler.pool.num_free == eng.num_blocks and not eng.has_unfinished()
    return outs


def test_greedy_output_is_the_same_with_caching_on_and_off_with_n_chunks_and_preemption():
    prompts = shared_prefix_prompts(10, 23, seed=3) + shared_prefix_prompts(4, 9, seed=4)
    params = [greedy(14, n=2) if i % 4 == 0 else greedy(10 + i % 5) for i in range(len(prompts))]

    def reqs():
        return [Request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    outs = run_both(reqs, num_kv_blocks=40, max_num_batched_tokens=16, admission_horizon_tokens=0)
    on, off = outs[True], outs[False]
    assert tokens(on[1]) == tokens(off[1])
    assert on[0].scheduler.num_preemptions > 0
    assert on[0].prefix_cache_hit_tokens >= 5 * 20
    assert on[0].prefix_cache_query_tokens == sum(map(len, prompts))
    assert (off[0].prefix_cache_hit_tokens, off[0].prefix_cache_query_tokens) == (0, 0)
    for a, b in zip(on[1], off[1]):
        for x, y in zip(a.completions, b.completions):
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)


def test_a_prefix_is_reused_by_a_later_generate_call_like_the_next_shard():
    prompts = shared_prefix_prompts(6, 32, seed=5)
    eng = make_engine()
    first = eng.generate([Request(f"a{i}", p, greedy(6)) for i, p in enumerate(prompts[:3])])
    hits = eng.prefix_cache_hit_tokens
    second = eng.generate([Request(f"b{i}", p, greedy(6)) for i, p in enumerate(prompts[3:])])
    assert eng.prefix_cache_hit_tokens - hits == 3 * 32            # every line of the second call found all 8 blocks
    assert [o.num_cached_tokens for o in second] == [32, 32, 32]
    assert sorted(o.num_cached_tokens for o in first) == [0, 32, 32]          # one computed it, once
    off = make_engine(prefix_caching=False).generate([Request(f"x{i}", p, greedy(6)) for i, p in enumerate(prompts)])
    assert tokens(first) + tokens(second) == tokens(off)


def test_two_gloo_ranks_with_shared_prefixes_match_one_process_without_caching(tmp_path):
    """Rank 0 decides which blocks are reused and ships the block tables; the other rank's cache holds the same
    blocks because it ran every step that computed them."""
    prompts = shared_prefix_prompts(6, 20, seed=8, lo=1, hi=6)
    args = (2, str(tmp_path / "init"), 2, prompts, 8, 2, 40, str(tmp_path / "out.json"), "")
    mp.spawn(tp_generate_worker, args=args, nprocs=2, join=True)
    got = json.loads((tmp_path / "out.json").read_text())
    whole = apply_tp(from_hf_model(tiny_llama(2), torch.device("cpu"), torch.float32), 0, 1)
    eng = LLMEngine.from_model(whole, None, EngineConfig(model_path="", device="cpu", block_size=4,
                                                         prefix_caching=False))
    want = tokens(eng.generate([Request(str(i), p, greedy(8, n=2)) for i, p in enumerate(prompts)]))
    assert got["tokens"] == want


def test_fp8_cache_gives_the_same_greedy_output_with_caching_on_and_off():
    prompts = shared_prefix_prompts(6, 17, seed=9)

    def reqs():
        return [Request(f"r{i}", p, greedy(8)) for i, p in enumerate(prompts)]
    outs = run_both(reqs, kv_cache_dtype="fp8", max_num_batched_tokens=32)
    assert tokens(outs[True][1]) == tokens(outs[False][1]) and outs[True][0].prefix_cache_hit_tokens > 0


def test_a_shard_stream_adds_lines_sharing_a_prefix_together_and_returns_them_in_line_order():
    from ziya_batch.records import PromptLine
    from ziya_batch.work.generation import ShardStream
    from ziya_batch.spec import SamplingSpec

    sampling = SamplingSpec(max_new_tokens=3, min_new_tokens=3, temperature=0.0)
    a, b = list(range(100, 124)), list(range(200, 224))          # two templates of 6 blocks, interleaved
    lines = [(PromptLine(f"l{n}", "f", n, "", sampling), (a if n % 2 else b) + [5 + n]) for n in range(8)]
    eng = make_engine(max_num_seqs=2)
    added = []
    real_add = eng.add_request
    eng.add_request = lambda r: (added.append(r.prompt_ids[0]), real_add(r))[1]
    stream = ShardStream(eng)
    stream.add("s", lines)
    assert added == [100] * 4 + [200] * 4
    done = []
    while not done:
        done = stream.step()
    results = done[0][1]
    assert [r.line.line for r in results] == list(range(8))
    assert sorted(r.cached_tokens for r in results) == [0, 0] + [24] * 6
    assert sum(r.cached_tokens for r in results) == eng.prefix_cache_hit_tokens
