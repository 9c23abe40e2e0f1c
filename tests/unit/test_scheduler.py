"""The scheduler as plain CPU bookkeeping: token budget, chunked prefill, admission, preemption, forks."""
from __future__ import annotations

from ziya_batch.engine.scheduler import Scheduler, SeqStatus, Sequence
from ziya_batch.engine.types import SamplingParams


def seq(s: Scheduler, prompt_len: int, n: int = 1, max_new: int = 8, rid: str = "r") -> Sequence:
    q = Sequence(s.new_seq_id(), rid, 0, list(range(3, 3 + prompt_len)), prompt_len,
                 SamplingParams(max_new_tokens=max_new, n=n), pending_forks=n - 1)
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


def test_status_order_and_is_finished():
    assert not SeqStatus.RUNNING.is_finished() and not SeqStatus.WAITING.is_finished()
    assert all(x.is_finished() for x in (SeqStatus.FINISHED_STOPPED, SeqStatus.FINISHED_LENGTH,
                                          SeqStatus.FINISHED_ABORTED))


def test_long_prompt_is_prefilled_in_chunks_under_the_token_budget():
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=8, max_num_batched_tokens=16)
    a = seq(s, 40)
    sizes = []
    for _ in range(3):
        out = run_step(s)
        sizes.append([(c.start, c.num_tokens, c.samples) for c in out.chunks])
    assert sizes == [[(0, 16, False)], [(16, 16, False)], [(32, 8, True)]]
    assert a.num_computed == 40 and a.output_ids == [7] and len(a.block_ids) == 10


def test_decodes_and_a_new_prefill_share_one_step():
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=8, max_num_batched_tokens=16)
    seq(s, 5)
    run_step(s)                                   # the first prompt is prefilled
    seq(s, 30)
    out = run_step(s)
    assert [(c.num_tokens, c.samples) for c in out.chunks] == [(1, True), (15, False)]
    assert out.num_tokens == 16 and not out.is_decode_only


def test_admission_stops_at_max_num_seqs_counting_forked_samples():
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    seq(s, 3, n=3, rid="a")
    seq(s, 3, n=2, rid="b")
    run_step(s)
    assert len(s.running) == 3 and len(s.waiting) == 1     # b would need 2 more seats


def test_forked_samples_share_prompt_blocks_and_copy_the_partial_block_on_write():
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    parent = seq(s, 6, n=3)
    out = run_step(s)
    children = out.chunks[0].children
    assert len(children) == 2 and [c.sample_key for c in children] == [1, 2]
    assert all(c.block_ids == parent.block_ids for c in children)
    assert [s.pool.ref_counts[b] for b in parent.block_ids] == [3, 3]
    out = run_step(s)                              # each writes position 6 into the shared, half-full block 1
    assert len(out.block_copies) == 2              # the first two copy; the last one owns the original
    firsts = {x.block_ids[0] for x in (parent, *children)}
    lasts = {x.block_ids[1] for x in (parent, *children)}
    assert len(firsts) == 1 and len(lasts) == 3
    assert s.pool.ref_counts[parent.block_ids[0]] == 3


def test_preemption_frees_the_newest_sequence_and_recomputes_it_later():
    s = Scheduler(num_blocks=6, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                  admission_horizon_tokens=0)
    a, b = seq(s, 8, rid="a"), seq(s, 8, rid="b")
    run_step(s)                                    # 2 + 2 blocks used, positions 0..7; both sampled a token
    assert s.pool.num_free == 2
    for _ in range(5):
        run_step(s)                                # positions 8..12: a third block each, then a fourth
    assert s.num_preemptions >= 1 and b.num_preemptions >= 1 and a.num_preemptions == 0
    while b.status is not SeqStatus.RUNNING or b.num_computed < len(b.token_ids) - 1:
        s.finish(a, SeqStatus.FINISHED_LENGTH) if a.status is SeqStatus.RUNNING else None
        run_step(s)
    assert b.token_ids[:8] == list(range(3, 11)) and set(b.output_ids) == {7}
    s.finish(b, SeqStatus.FINISHED_LENGTH)
    assert s.pool.num_free == 6


def test_admission_horizon_keeps_room_for_running_sequences_to_grow():
    s = Scheduler(num_blocks=10, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                  admission_horizon_tokens=16)
    seq(s, 8, max_new=100, rid="a")
    run_step(s)                                    # a: 2 blocks, 9 tokens; 16 ahead needs 5 more blocks
    seq(s, 16, rid="b")                            # b needs 4 blocks: 4 + 5 > the 8 free
    run_step(s)
    assert [x.request_id for x in s.running] == ["a"] and len(s.waiting) == 1
    loose = Scheduler(num_blocks=10, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                      admission_horizon_tokens=0)
    seq(loose, 8, max_new=100, rid="a")
    run_step(loose)
    seq(loose, 16, rid="b")
    run_step(loose)
    assert len(loose.running) == 2


def test_finish_returns_every_block():
    # 24 blocks: each request's two samples may grow to 15 tokens (4 blocks each, one a copy of the shared
    # partly filled prompt block), so all three are admitted at once
    s = Scheduler(num_blocks=24, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    xs = [seq(s, 7, n=2, rid=str(i)) for i in range(3)]
    for _ in range(3):
        run_step(s)
    assert len(s.running) == 6
    for x in list(s.running):
        s.finish(x, SeqStatus.FINISHED_STOPPED)
    assert s.pool.num_free == 24 and not s.has_unfinished()
    assert all(x.status is SeqStatus.FINISHED_STOPPED for x in xs)


def test_longest_first_admits_the_largest_max_new_tokens_first_and_keeps_arrival_order_among_equals():
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=2, max_num_batched_tokens=64, policy="longest-first")
    short, long1, mid, long2 = (seq(s, 4, max_new=m, rid=r) for m, r in
                                ((8, "short"), (64, "long1"), (16, "mid"), (64, "long2")))
    assert [q.request_id for q in s.waiting] == ["long1", "long2", "mid", "short"]
    out = run_step(s)
    assert [c.seq.request_id for c in out.chunks] == ["long1", "long2"]      # two seats


def test_longest_first_keeps_a_preempted_sequence_at_the_front():
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, policy="longest-first")
    a = seq(s, 4, max_new=8, rid="a")
    run_step(s)
    s._preempt(a)                                  # back to the front of the queue, to be recomputed
    seq(s, 4, max_new=500, rid="b")
    assert [q.request_id for q in s.waiting] == ["a", "b"]


def test_tail_longest_first_keeps_arrival_order_until_the_waiting_fit_the_seats_then_starts_the_longest():
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=2, max_num_batched_tokens=64,
                  policy="tail-longest-first")
    for m, r in ((8, "a"), (64, "b"), (16, "c"), (64, "d")):
        seq(s, 4, max_new=m, rid=r)
    admitted = []

    def step():
        out = run_step(s)
        admitted.extend(c.seq.request_id for c in out.chunks if c.start == 0)
        for q in list(s.running):
            if q.num_output_tokens >= q.params.max_new_tokens:
                s.finish(q, SeqStatus.FINISHED_LENGTH)

    step()
    assert admitted == ["a", "b"]                       # 4 waiting, 2 seats: arrival order
    assert [q.request_id for q in s.waiting] == ["c", "d"]
    step()
    assert [q.request_id for q in s.waiting] == ["d", "c"]   # 2 waiting, 2 seats: the longest first
    # a late arrival queues behind that order, however long: once sorted, nobody is overtaken by newer requests
    # until the queue has emptied (a worker adds a shard's lines only then)
    seq(s, 4, max_new=200, rid="e")
    while s.has_unfinished():
        step()
    assert admitted == ["a", "b", "d", "c", "e"]
    # the next queue starts in arrival order and is sorted once it fits the seats
    for m, r in ((8, "f"), (64, "g")):
        seq(s, 4, max_new=m, rid=r)
    step()
    assert admitted[-2:] == ["g", "f"]


def test_tail_longest_first_counts_the_seats_of_every_sample():
    """Two requests of 3 samples need 6 seats: with 4, the queue is not yet the batch's tail."""
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                  policy="tail-longest-first")
    seq(s, 4, n=3, max_new=8, rid="short")
    seq(s, 4, n=3, max_new=64, rid="long")
    out = run_step(s)
    assert [c.seq.request_id for c in out.chunks] == ["short"]


def test_tail_longest_first_preempts_nothing_when_the_horizon_covers_every_output():
    import random

    for seed in range(20):
        rng = random.Random(seed)
        s = Scheduler(num_blocks=rng.choice([24, 40, 80]), block_size=4, max_num_seqs=6, max_num_batched_tokens=16,
                      admission_horizon_tokens=64, policy="tail-longest-first")
        for i in range(24):
            seq(s, rng.randint(1, 20), n=rng.choice([1, 1, 2]), max_new=rng.randint(1, 20), rid=str(i))
        _drive(s)
        assert s.num_preemptions == 0 and s.pool.num_free == s.pool.num_blocks, seed


def test_fcfs_is_arrival_order_and_unknown_policies_are_refused():
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    for m, r in ((8, "x"), (64, "y")):
        seq(s, 4, max_new=m, rid=r)
    assert [q.request_id for q in s.waiting] == ["x", "y"]
    import pytest
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        Scheduler(num_blocks=10, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, policy="random")


def test_a_sequence_whose_last_token_is_pending_is_neither_scheduled_nor_preempted():
    """With asynchronous scheduling the next step is planned before this one's tokens are read back: a sequence
    that has sampled its max_new_tokens-th token waits only to be finished, so it gets no chunk and is never the
    victim of a preemption (recomputing it would generate past its limit)."""
    from ziya_batch.engine.scheduler import PENDING_TOKEN

    s = Scheduler(num_blocks=6, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, admission_horizon_tokens=0)
    done = seq(s, 8, max_new=1, rid="done")        # 2 blocks; finishes with its first token
    grow = seq(s, 8, max_new=20, rid="grow")       # 2 blocks now, more as it decodes
    out = s.schedule()
    rows = [c.seq for c in out.chunks if c.samples]
    assert s.advance(out, rows) == {done.seq_id: 0, grow.seq_id: 1}
    assert done.token_ids[-1] == grow.token_ids[-1] == PENDING_TOKEN
    s.fill(grow, 7, -1.0)                          # only grow's token is read back
    for _ in range(12):                            # grow needs a 7th block at its 17th token: someone must make room
        out = s.schedule()
        assert [c.seq for c in out.chunks] in ([grow], [])
        assert done.status is SeqStatus.RUNNING and len(done.block_ids) == 2
        if not out.chunks:
            break
        s.advance(out, [grow])
        s.fill(grow, 7, -1.0)
    assert grow.status is SeqStatus.WAITING and s.num_preemptions == 1   # grow preempted itself, not done


def test_admission_counts_the_blocks_of_sequences_that_must_finish_within_the_horizon():
    """b waits while a running sequence may still grow through the horizon, and is admitted when that sequence
    must finish (max_new_tokens) within it, since its blocks are free again by the time the others need them."""
    got = {}
    for a_max_new in (100, 3):
        s = Scheduler(num_blocks=10, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                      admission_horizon_tokens=16)
        seq(s, 8, max_new=a_max_new, rid="a")
        run_step(s)                            # a: 2 blocks, 9 tokens
        seq(s, 16, rid="b")                    # 4 blocks: 8 free, less a's growth
        run_step(s)
        got[a_max_new] = [x.request_id for x in s.running]
    assert got == {100: ["a"], 3: ["a", "b"]}


def _drive(s: Scheduler) -> int:
    """Runs every sequence to its max_new_tokens (the worst case for memory) as the engine's asynchronous
    pipeline does: step k is scheduled before step k - 1's tokens are read back. Returns the steps."""
    steps, prev = 0, None

    def read_back(step):
        rows, pending = step
        for i, x in enumerate(rows):
            if pending.get(x.seq_id) == i and not x.status.is_finished():
                s.fill(x, 7, -1.0)
                if x.num_output_tokens >= x.params.max_new_tokens:
                    s.finish(x, SeqStatus.FINISHED_LENGTH)
    while s.has_unfinished() or prev:
        out = s.schedule()
        rows = [x for c in out.chunks if c.samples for x in (c.seq, *c.children)]
        if prev:
            read_back(prev)
        prev = (rows, s.advance(out, rows)) if out.chunks else None
        steps += 1
    return steps


def test_admission_never_leads_to_preemption_when_the_horizon_covers_every_output(monkeypatch):
    """Requests of 1-3 samples that all run to max_new_tokens, on caches from tight to loose (each request fits
    alone), chunked prefill, the asynchronous pipeline: with the horizon at least the longest output, admission
    keeps every running sample's blocks for its whole life (copies of shared prompt blocks included), so nothing
    is ever preempted; and counting the blocks of sequences bound to finish admits sooner than reserving every
    sequence's own growth (no more steps for the same tokens)."""
    import random

    from ziya_batch.engine import scheduler as sched

    for seed in range(40):
        rng = random.Random(seed)
        reqs = [(rng.randint(1, 20), rng.randint(1, 20), rng.choice([1, 1, 2, 3])) for _ in range(24)]
        nb = rng.choice([24, 40, 80])
        steps = {}
        for credit in (True, False):
            if not credit:
                monkeypatch.setattr(sched._GrowthPlan, "_col", _no_credit_col)
            s = Scheduler(num_blocks=nb, block_size=4, max_num_seqs=16, max_num_batched_tokens=16,
                          admission_horizon_tokens=64)
            for i, (p, o, n) in enumerate(reqs):
                seq(s, p, n=n, max_new=o, rid=str(i))
            steps[credit] = _drive(s)
            assert s.num_preemptions == 0, (seed, credit)
            assert s.pool.num_free == nb
            monkeypatch.undo()
        assert steps[True] <= steps[False], (seed, steps)


def _no_credit_col(self, seq, blocks, copies, copy_on_write):
    col = _ORIGINAL_COL(self, seq, blocks, copies, copy_on_write)
    return col[:4] + (-1,) + col[5:]            # never freed within the horizon: the old rule's reserve


from ziya_batch.engine.scheduler import _GrowthPlan  # noqa: E402

_ORIGINAL_COL = _GrowthPlan._col


# ---- cutting a step back to the bucket below (fit_bucket) -----------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ziya_batch.engine.scheduler import (TRIM_MARGIN, TRIM_MAX_TOKENS, TRIM_MIN_SECONDS,  # noqa: E402
                                         ScheduledChunk, fit_bucket)


def _chunks(sizes: list[int], forked: frozenset = frozenset()) -> list[ScheduledChunk]:
    s = Scheduler(num_blocks=10, block_size=4, max_num_seqs=8, max_num_batched_tokens=16)
    out = []
    for i, n in enumerate(sizes):
        q = Sequence(s.new_seq_id(), f"r{i}", 0, list(range(3, 3 + n + 5)), n + 5, SamplingParams())
        out.append(ScheduledChunk(q, 0, n, False, [q] if i in forked else []))
    return out


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 120), min_size=1, max_size=8),
       steps=st.lists(st.integers(1, 96), min_size=1, max_size=10),
       times=st.lists(st.floats(1e-6, 1e-3), min_size=10, max_size=10),
       forked=st.frozensets(st.integers(0, 7), max_size=3))
def test_fit_bucket_only_ever_lands_a_step_exactly_on_the_bucket_below(sizes, steps, times, forked):
    buckets, b = [], 0
    for d, t in zip(steps, times):
        b += d
        buckets.append((b, t))
    chunks = _chunks(sizes, forked)
    total = sum(sizes)
    cut = fit_bucket(chunks, buckets)
    sizes_only = [n for n, _ in buckets]
    if cut is None:
        return
    k, n = cut
    assert total not in sizes_only and sizes_only[0] < total <= sizes_only[-1]
    low = max(x for x in sizes_only if x < total)
    up = min(x for x in sizes_only if x > total)
    assert dict(buckets)[up] > dict(buckets)[low] * (1 + TRIM_MARGIN)
    assert dict(buckets)[up] - dict(buckets)[low] >= TRIM_MIN_SECONDS
    assert total - low <= TRIM_MAX_TOKENS
    assert 2 <= n < sizes[k] and k not in forked
    assert total - sizes[k] + n == low
    # the chunk cut is the last one long enough
    assert all(sizes[j] < total - low + 2 or j in forked for j in range(k + 1, len(sizes)))


def test_fit_bucket_cuts_across_a_jump_and_not_where_the_next_bucket_is_about_as_dear():
    buckets = [(64, 300e-6), (128, 315e-6), (192, 450e-6), (256, 480e-6)]
    # 150 tokens: 192 is 43% dearer than 128, 22 over it: the last chunk (20 decode rows first, then 100 + 30)
    assert fit_bucket(_chunks([1] * 20 + [100, 30]), buckets) == (21, 8)
    # 100 tokens: 128 is within 5% (and 20 us) of 64: padded as before
    assert fit_bucket(_chunks([1] * 20 + [80]), buckets) is None
    # within the margin, though 40 us a layer dearer: padded
    assert fit_bucket(_chunks([1] * 20 + [80]), [(64, 1000e-6), (128, 1040e-6)]) is None
    # past the margin (and 20 us): cut
    assert fit_bucket(_chunks([1] * 20 + [80]), [(64, 1000e-6), (128, 1060e-6)]) == (20, 44)
    # exactly a bucket, below the smallest, above the largest: nothing to do
    assert fit_bucket(_chunks([1] * 28 + [100]), buckets) is None
    assert fit_bucket(_chunks([40]), buckets) is None
    assert fit_bucket(_chunks([300]), buckets) is None
    # too far past the bucket below (more than TRIM_MAX_TOKENS would wait)
    assert fit_bucket(_chunks([120, 60 + TRIM_MAX_TOKENS]), [(60, 1e-4), (600, 9e-4)]) is None
    # a jump of less than TRIM_MIN_SECONDS, however large relative to the time below (timing noise, small models)
    assert fit_bucket(_chunks([1] * 20 + [100, 30]), [(128, 10e-6), (192, 25e-6)]) is None
    # the last chunk too short or forked: the one before is cut; decode rows never are
    assert fit_bucket(_chunks([120, 10, 20]), buckets) == (0, 98)
    assert fit_bucket(_chunks([100, 50], forked=frozenset({1})), buckets) == (0, 78)
    assert fit_bucket(_chunks([1] * 150), buckets) is None


def test_a_cut_step_runs_the_rest_of_its_chunk_next_and_samples_only_then():
    s = Scheduler(num_blocks=200, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    s.step_buckets = [(16, 1e-4), (32, 1e-4), (64, 2e-4)]
    a = seq(s, 40)
    out = run_step(s)
    assert [(c.start, c.num_tokens, c.samples) for c in out.chunks] == [(0, 32, False)]
    assert s.num_cut_steps == 1 and a.num_computed == 32 and len(a.block_ids) == 10   # its blocks stay reserved
    out = run_step(s)
    assert [(c.start, c.num_tokens, c.samples) for c in out.chunks] == [(32, 8, True)]
    assert a.output_ids == [7] and s.num_cut_steps == 1


# an H100's float16 projections of one layer at each kept mixed-step bucket (seconds; 2026-12-07, 46e1e71), and
# FP8's with fast accumulation (2026-12-06): scheduler.step_size's input as the runner measures it
F16_BUCKETS = [(n, us * 1e-6) for n, us in [(64, 257), (128, 262), (192, 276), (256, 288), (320, 354), (384, 364),
                                            (448, 452), (512, 470), (576, 539), (640, 624), (704, 676), (768, 682),
                                            (896, 826), (1024, 893), (1536, 1305), (2048, 1981)]]
FP8_BUCKETS = [(n, ms * 25e-6) for n, ms in [(128, 11.17), (256, 11.82), (384, 12.94), (512, 14.57), (768, 17.68),
                                             (1024, 22.61), (1536, 30.61), (2048, 43.26)]]


def test_step_size_lets_prefill_ride_along_where_the_projections_are_flat():
    from ziya_batch.engine.scheduler import step_size

    # W1's float16 decode batch on an H100 (~126 rows): a few hundred tokens in all, where the projections cost
    # what reading the weights costs (384 measured 2.3% faster than 2,048); with no decode rows, the largest
    # efficient bucket; FP8 (~214 rows) turns compute-bound later: larger steps
    assert step_size(126, F16_BUCKETS, 2048) == 384
    assert step_size(0, F16_BUCKETS, 2048) >= 1024
    assert step_size(214, FP8_BUCKETS, 2048) >= 512
    # never above the cap, and always room for a prefill token while a bucket is above the decode rows
    assert step_size(126, F16_BUCKETS, 300) == 256
    assert step_size(3000, F16_BUCKETS, 4096) == 4096 and step_size(50, [], 2048) == 2048
    for rows in range(0, 2048, 7):
        assert rows < step_size(rows, F16_BUCKETS, 2048) <= 2048


def test_an_adaptive_scheduler_sizes_steps_with_prefill_by_its_decode_rows():
    s = Scheduler(num_blocks=4000, block_size=16, max_num_seqs=256, max_num_batched_tokens=2048)
    s.step_buckets, s.adaptive_step_size = F16_BUCKETS, True
    for _ in range(130):
        seq(s, 100, max_new=400)
    out = run_step(s)                                   # nothing decodes yet: one large step of prompts
    assert out.num_tokens >= 1024
    while any(len(q.token_ids) - q.num_computed > 1 for q in s.running) or s.waiting:
        out = run_step(s)
        decoding = sum(1 for c in out.chunks if c.num_tokens == 1)
        if decoding >= 100 and not out.is_decode_only:
            assert out.num_tokens <= 384                # beside many decode rows, a few hundred tokens at most
    s.adaptive_step_size = False                        # off: the budget as it is
    for _ in range(20):
        seq(s, 100, max_new=400)
    assert run_step(s).num_tokens > 384


def test_forked_samples_decode_right_behind_their_parent_not_behind_a_later_long_prompt():
    # the parent's prompt completes in the step that also admits a long prompt; the small budget the steps after
    # it have (adaptive step sizes beside few decode rows, or a small max_num_batched_tokens) must still reach
    # every sample of the parent, not go to the long prompt for as many steps as its prefill takes
    s = Scheduler(num_blocks=200, block_size=4, max_num_seqs=8, max_num_batched_tokens=16)
    parent = seq(s, 4, n=3, max_new=50, rid="p")
    seq(s, 200, max_new=4, rid="long")
    out = run_step(s)
    kids = out.chunks[0].children
    assert len(kids) == 2 and [c.seq.request_id for c in out.chunks] == ["p", "long"]
    assert [q.request_id for q in s.running] == ["p", "p", "p", "long"]
    assert s.running[1:3] == kids
    for _ in range(3):
        out = run_step(s)
        assert [(c.seq.seq_id, c.num_tokens) for c in out.chunks[:3]] == [(q.seq_id, 1) for q in (parent, *kids)]
        assert out.chunks[3].seq.request_id == "long" and out.chunks[3].num_tokens == 13
    assert all(len(q.output_ids) == 4 for q in (parent, *kids))
