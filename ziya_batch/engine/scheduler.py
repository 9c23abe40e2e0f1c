"""The scheduler: plain CPU bookkeeping, no torch. Each step it decides which tokens of which sequences run,
under a token budget (chunked prefill mixed into decode steps), admits waiting sequences every step while
seats and blocks last, and preempts the most recently admitted running sequence (recompute: its blocks are
freed and it goes back to the front of the queue, to be prefilled again with prompt + output) when blocks
run out, so a long job never dies of out-of-memory.

A sequence's state is (token_ids, num_computed): the tokens whose K/V are in the cache. A step computes the
chunk [num_computed, num_computed + k); when the chunk reaches the last token the step samples a new one.
Decode is just the chunk of length 1.

Prefix caching (prefix_caching=True): every full block, once computed, is keyed by its tokens and all before
them (kv_cache.hash_block) and stays in the pool after its sequence frees it, until its memory is needed. A
sequence being admitted takes the cached blocks of its longest keyed prefix and starts computing after them
(never all of it: the last token's logits are needed). One whose next uncached block is being computed by a
running sequence (e.g. admitted in the same step with the same system prompt) waits a step for it instead of
computing it a second time alongside."""
from __future__ import annotations

import bisect
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ziya_batch.engine.kv_cache import BlockPool, hash_block
from ziya_batch.engine.types import EngineConfig, SamplingParams
from ziya_batch.engine.types import SCHEDULE_POLICIES as POLICIES      # written once, in types.py

# The token of a launched step not yet read back (asynchronous scheduling: the engine schedules and launches the
# next step while the GPU still samples this one). advance() appends it, fill() replaces it.
PENDING_TOKEN = -1

# Steps with prefill replay graphs captured for buckets of token counts (piecewise.py), padded up to the next
# bucket. Where that bucket is much dearer than the one below (its projections' time jumps: FP8 on an H100,
# 2026-12-06, 17.7 ms over 40 layers at 768 tokens against 22.3 at 832), a step a few tokens past the bucket
# below is cut back to it: its last prefill chunk ends earlier and the rest runs in a later step, where a few
# more rows cost next to nothing (Scheduler.step_buckets; fit_bucket). W1 with FP8 weights, the float8 cache and
# fast accumulation on one H100 (2026-12-06, scripts/gpu/step_ab.py, runs alternated on one engine): 8,070 and
# 8,034 tok/s with a 10% margin and at most 64 tokens waiting, 8,097 and 8,099 (+0.6%) with these
TRIM_MARGIN = 0.05           # the next bucket's time at least this much above the one below
TRIM_MIN_SECONDS = 20e-6     # and at least this much (one layer's projections): timing noise never cuts
TRIM_MAX_TOKENS = 128        # and at most this many tokens wait


def _queue_key(seq: "Sequence") -> tuple[int, int, int]:
    """longest-first order of the waiting queue (ascending)."""
    return (0 if seq.num_preemptions else 1, -seq.params.max_new_tokens, -seq.num_prompt_tokens)


class SeqStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4

    def is_finished(self) -> bool:
        return self >= SeqStatus.FINISHED_STOPPED


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    sample_key: int = 0                  # seeds this sample's noise (see sampling.py)
    pending_forks: int = 0               # samples still to fork off when the prompt's prefill completes
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)   # if params.top_logprobs
    num_preemptions: int = 0
    block_keys: list[bytes] = field(default_factory=list)   # prefix caching: keys of full blocks of token_ids
    num_keyed: int = 0                   # leading block_ids already in the cache (hits, or cached once computed)
    num_cached_tokens: int = 0           # prompt tokens found in the cache when first admitted

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int                           # first position computed this step
    num_tokens: int
    samples: bool                        # the chunk reaches the last token: sample a new one
    children: list[Sequence] = field(default_factory=list)  # forked samples that share this chunk's logits


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    block_copies: list[tuple[int, int]]  # (src, dst) copy-on-write, done before the step runs
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_decode_only(self) -> bool:
        return all(c.num_tokens == 1 for c in self.chunks)


def fit_bucket(chunks: list[ScheduledChunk], buckets: list[tuple[int, float]]) -> Optional[tuple[int, int]]:
    """(index, new token count) of the chunk to shorten so that the step's tokens fill the bucket below instead
    of padding up to a much dearer one (TRIM_MARGIN, TRIM_MIN_SECONDS, TRIM_MAX_TOKENS); None to leave the step
    as it is. Only a chunk without forked samples is shortened, to two tokens at least (decode rows never are),
    the last such first."""
    total = sum(c.num_tokens for c in chunks)
    up = bisect.bisect_left(buckets, (total,))        # the first bucket of at least `total` tokens
    if up == 0 or up == len(buckets) or buckets[up][0] == total:
        return None
    (low, t_low), t_up = buckets[up - 1], buckets[up][1]
    excess = total - low
    if excess > TRIM_MAX_TOKENS or t_up <= t_low * (1.0 + TRIM_MARGIN) or t_up - t_low < TRIM_MIN_SECONDS:
        return None
    for k in reversed(range(len(chunks))):
        if chunks[k].num_tokens >= excess + 2 and not chunks[k].children:    # stays a prefill chunk
            return k, chunks[k].num_tokens - excess
    return None


# What a step with prefill costs beyond its projections, for one layer (the unit of the runner's bucket times): its
# prefill attention and the launches between the pieces of its graphs (an H100's W1, 2026-12-07: ~2.5 ms in float16,
# ~3.8 ms with FP8, over 40 layers), and that a smaller step admits new sequences more slowly, so the decode batch
# runs smaller. 100 us is where scripts/sim_schedule.py --adaptive, calibrated on those runs, does best for both;
# on an H100 (2026-12-07, step_ab.py overhead=US) 40 and 15 us chose smaller steps and ran float16's W1 as fast: the
# cheaper prefill tokens were paid back by 9% more steps (docs/BENCHMARKS.md)
MIXED_STEP_OVERHEAD_S = 100e-6


def step_size(decode_rows: int, buckets: list[tuple[int, float]], cap: int,
              overhead_s: float = MIXED_STEP_OVERHEAD_S) -> int:
    """The token count of a step beside `decode_rows` decode rows that costs least per prefill token it carries:
    the step's projection time (`buckets`: one layer's measured time at each token count the runner keeps) above
    what the decode rows alone would cost, plus `overhead_s`, over its prefill tokens; at most `cap`.

    With many decode rows (an H100's float16 W1: ~126) the projections cost about what reading the weights costs up
    to ~256-384 rows, so a few hundred prefill tokens ride along almost free, where larger steps pay their full
    compute (384 instead of 2,048: W1's first 512 requests 2.3% faster, docs/BENCHMARKS.md); with none, a step is
    all prefill and the largest efficient bucket wins. Always more than `decode_rows` while a bucket is."""
    if not buckets:
        return cap
    sizes = [n for n, _ in buckets]
    base = 0.0 if decode_rows <= 0 else buckets[min(bisect.bisect_left(sizes, decode_rows), len(buckets) - 1)][1]
    best, best_cost = cap, float("inf")
    for n, t in buckets:
        if n <= decode_rows or n > cap:
            continue
        cost = (overhead_s + max(0.0, t - base)) / (n - decode_rows)
        if cost < best_cost:
            best, best_cost = n, cost
    return best


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 admission_horizon_tokens: int = EngineConfig.admission_horizon_tokens, policy: str = "fcfs",
                 prefix_caching: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; choose from {', '.join(POLICIES)}")
        # "fcfs": admit in arrival order (an online server). "longest-first": admit the waiting request with
        # the largest max_new_tokens first (ties: longer prompt, then arrival); in a batch whose requests are
        # all known, the short ones then fill the end, so the final drain, when the batch shrinks and each
        # step reads the weights for fewer tokens, is short (LPT scheduling of a makespan). On W1 (H200) it
        # raised the mean decode batch from 159 to 226 but also caused preemptions: no net gain. Where the
        # KV cache bounds the batch (an H100's) it is worse: long requests together hold more of the cache.
        # "tail-longest-first" (the jobs' default): arrival order until the waiting requests (and their samples)
        # need no more seats than the batch has, then those longest first: the mix of lengths that fills the
        # cache well is kept, and the end of the queue is not a long request started last that runs on alone
        # while the batch drains. A worker adds a shard's lines only once the queue is empty. On W1 (H200,
        # 2026-11-29) 5,220 -> 5,420 tok/s, and on its first 512 requests 5,016 -> 5,464 (docs/BENCHMARKS.md).
        self.policy = policy
        self._tail_sorted = False
        self.pool = BlockPool(num_blocks)
        # A waiting sequence is admitted only if the blocks left after it still cover what the running ones will
        # need over the next `horizon` steps: recompute after preemption costs a whole prefill, so over-admitting
        # and preempting later is slower than waiting a few steps. The need is the peak over those steps of
        # their growth, less the blocks of those that must have finished by then (max_new_tokens reached; see
        # _GrowthPlan), not the sum of every sequence's own growth. 0 = admit on free blocks.
        self.admission_horizon_tokens = admission_horizon_tokens
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._next_seq_id = 0
        self.num_preemptions = 0
        self.prefix_caching = prefix_caching
        # prompt tokens of admitted requests looked up in the cache, and those found (first admissions only:
        # a recompute after preemption or a forked sample is not a new prompt)
        self.prefix_cache_query_tokens = 0
        self.prefix_cache_hit_tokens = 0
        # [(token count, seconds)] ascending: the buckets steps with prefill run in and their measured projection
        # times (the engine sets them from the runner's graphs; None: steps are not cut to fit, fit_bucket)
        self.step_buckets: Optional[list[tuple[int, float]]] = None
        self.num_cut_steps = 0
        # size each step by step_size (from step_buckets) instead of filling max_num_batched_tokens
        # (EngineConfig.adaptive_step_size)
        self.adaptive_step_size = False
        self.step_overhead_s = MIXED_STEP_OVERHEAD_S       # step_size's overhead_s (scripts/gpu/step_ab.py varies it)

    def new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id - 1

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        if self.policy != "longest-first" or not self.waiting:
            if not self.waiting:
                # tail-longest-first sorts a queue once, when it fits the seats: later arrivals queue behind
                # that order until the queue has emptied, so none is overtaken by newer ones again and again
                self._tail_sorted = False
            self.waiting.append(seq)
            return
        # the queue is ordered by _queue_key: preempted sequences first (they wait at the front for recompute),
        # then the largest max_new_tokens; after its equals, so arrival order holds among them
        self.waiting.insert(bisect.bisect_right(self.waiting, _queue_key(seq), key=_queue_key), seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- blocks ---------------------------------------------------------------------------------------------
    def _blocks_needed(self, seq: Sequence, end: int) -> int:
        """Blocks to allocate so positions [num_computed, end) have slots (incl. a copy-on-write block)."""
        bs = self.block_size
        need = max(0, -(-end // bs) - len(seq.block_ids))
        if seq.num_computed % bs and self.pool.ref_counts[seq.block_ids[seq.num_computed // bs]] > 1:
            need += 1
        return need

    @staticmethod
    def _has_all_tokens(seq: Sequence) -> bool:
        """seq has all its max_new_tokens, the last one pending: it finishes once that token is read, so it is
        not scheduled (nor preempted) again. Never true of a running sequence when every step is read back
        before the next is scheduled."""
        return seq.num_output_tokens >= seq.params.max_new_tokens

    def _reserve(self, seq: Sequence, end: int, copies: list[tuple[int, int]]) -> None:
        bs = self.block_size
        if seq.num_computed % bs:
            i = seq.num_computed // bs
            old = seq.block_ids[i]
            if self.pool.ref_counts[old] > 1:
                new = self.pool.allocate()
                copies.append((old, new))
                self.pool.decref(old)
                seq.block_ids[i] = new
        while len(seq.block_ids) * bs < end:
            seq.block_ids.append(self.pool.allocate())

    def _free(self, seq: Sequence) -> None:
        # last block first: cached blocks are evicted in the order freed, and a prefix's tail is worth less than
        # its head (a later request sharing only the head still finds it)
        for b in reversed(seq.block_ids):
            self.pool.decref(b)
        seq.block_ids = []
        seq.num_keyed = 0

    # ---- prefix caching -------------------------------------------------------------------------------------
    def _keys(self, seq: Sequence) -> list[bytes]:
        """seq's block keys, extended over its full blocks whose tokens are all known."""
        bs, keys, toks = self.block_size, seq.block_keys, seq.token_ids
        while (len(keys) + 1) * bs <= len(toks):
            i = len(keys)
            if (i + 1) * bs == len(toks) and toks[-1] == PENDING_TOKEN:    # only the last token can be pending
                break
            keys.append(hash_block(keys[-1] if keys else b"", toks[i * bs:(i + 1) * bs]))
        return keys

    def _cache_computed(self, seq: Sequence) -> None:
        """Keys seq's blocks that are full and computed (as of the step just launched: a later step that reads
        them runs after it on the device)."""
        full = seq.num_computed // self.block_size
        if seq.num_keyed >= full or seq.status is not SeqStatus.RUNNING:
            return
        keys = self._keys(seq)
        end = min(full, len(keys))
        for i in range(seq.num_keyed, end):
            self.pool.cache(seq.block_ids[i], keys[i])
        seq.num_keyed = max(seq.num_keyed, end)

    def _lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks seq can start from: its longest cached prefix, short of its last token."""
        hits = self.pool.lookup(self._keys(seq))
        if hits and len(hits) * self.block_size >= len(seq.token_ids):
            hits.pop()                   # the last token is computed again: its logits are sampled
        return hits

    def _keys_in_flight(self) -> set[bytes]:
        """Keys of the full blocks that running sequences have still to compute."""
        bs = self.block_size
        return {k for s in self.running if s.num_computed < len(s.block_keys) * bs
                for k in s.block_keys[s.num_computed // bs:]}

    def _take_hits(self, seq: Sequence, hits: list[int]) -> None:
        for b in hits:
            self.pool.incref(b)
        seq.block_ids = list(hits)
        seq.num_keyed = len(hits)
        seq.num_computed = len(hits) * self.block_size
        if not seq.num_preemptions:
            seq.num_cached_tokens = min(seq.num_computed, seq.num_prompt_tokens)
            self.prefix_cache_query_tokens += seq.num_prompt_tokens
            self.prefix_cache_hit_tokens += seq.num_cached_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0         # its keyed blocks stay cached until needed: the recompute may find them
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- the step -------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        if self.adaptive_step_size and self.step_buckets:
            # only prefill chunks feel the size: step_size leaves room for every decode row
            decode_rows = sum(1 for q in self.running if len(q.token_ids) - q.num_computed == 1)
            budget = step_size(decode_rows, self.step_buckets, budget, self.step_overhead_s)
        chunks: list[ScheduledChunk] = []
        copies: list[tuple[int, int]] = []
        preempted: list[Sequence] = []
        self._forked: list[Sequence] = []    # join the running list after this step's scheduling
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._has_all_tokens(seq):
                i += 1
                continue
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            end = seq.num_computed + n
            while self._blocks_needed(seq, end) > self.pool.num_free:
                victim = next(s for s in reversed(self.running) if not self._has_all_tokens(s))
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            self._reserve(seq, end, copies)
            chunks.append(self._chunk(seq, n))
            budget -= n
            i += 1
        plan: Optional[_GrowthPlan] = None
        if (self.policy == "tail-longest-first" and not self._tail_sorted and len(self.waiting) <= self.max_num_seqs
                and sum(1 + q.pending_forks for q in self.waiting) <= self.max_num_seqs):
            self.waiting = deque(sorted(self.waiting, key=_queue_key))      # stable: arrival order among equals
            self._tail_sorted = True
        in_flight: Optional[set[bytes]] = None
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            seats = 1 + seq.pending_forks
            if len(self.running) + len(self._forked) + seats > self.max_num_seqs:
                break
            hits: list[int] = []
            if self.prefix_caching:
                hits = self._lookup(seq)
                if len(hits) < len(seq.block_keys):
                    in_flight = self._keys_in_flight() if in_flight is None else in_flight
                    if seq.block_keys[len(hits)] in in_flight:
                        break            # computed by a running sequence: shared from the next step on
            start = len(hits) * self.block_size
            n = min(len(seq.token_ids) - start, budget)
            new = -(-(start + n) // self.block_size) - len(hits)
            revived = sum(1 for b in hits if self.pool.ref_counts[b] == 0)    # cached free blocks leave the queue
            need = new + revived
            # what the running ones and this one (its own growth too, each of its samples) will need
            reserve = 0
            if self.admission_horizon_tokens:
                # samples forked this step from a running sequence's last prompt chunk grow from the next
                plan = plan or _GrowthPlan(self, self.running + self._forked)
                reserve = plan.peak(with_new=(seq, len(hits) + new, 1 + seq.pending_forks))
            if need + reserve > self.pool.num_free and (self.running or need > self.pool.num_free):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if self.prefix_caching:
                self._take_hits(seq, hits)
                if in_flight is not None:
                    in_flight.update(seq.block_keys[len(hits):])
            self._reserve(seq, start + n, copies)
            chunks.append(self._chunk(seq, n))
            if plan is not None:
                plan.add(seq, copies=1 + len(chunks[-1].children) + seq.pending_forks)
            budget -= n
        if self._forked:
            # each chunk's samples decode right behind their parent: at the end of the list, a long prompt
            # admitted after the parent would take every step's budget before them until it is prefilled
            kids = {c.seq.seq_id: c.children for c in chunks if c.children}
            order: list[Sequence] = []
            for q in self.running:
                order.append(q)
                order.extend(kids.pop(q.seq_id, ()))
            for rest in kids.values():          # a parent no longer running (none today): its samples still run
                order.extend(rest)
            self.running = order
        if self.step_buckets and (cut := fit_bucket(chunks, self.step_buckets)):
            k, n = cut
            c = chunks[k]
            # its blocks stay reserved (the rest of the chunk runs next); it no longer reaches its last token
            chunks[k] = ScheduledChunk(c.seq, c.start, n, False)
            self.num_cut_steps += 1
        return SchedulerOutput(chunks, copies, preempted)

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        samples = seq.num_computed + n == len(seq.token_ids)
        chunk = ScheduledChunk(seq, seq.num_computed, n, samples)
        if samples and seq.pending_forks:
            # the prompt is complete: the other samples start here, sharing every block of the prompt
            for k in range(seq.pending_forks):
                child = Sequence(self.new_seq_id(), seq.request_id, seq.sample_index + 1 + k, list(seq.token_ids),
                                 seq.num_prompt_tokens, seq.params, sample_key=seq.sample_key + 1 + k,
                                 block_ids=list(seq.block_ids), status=SeqStatus.RUNNING,
                                 block_keys=list(seq.block_keys))
                for b in child.block_ids:
                    self.pool.incref(b)
                chunk.children.append(child)
                self._forked.append(child)
            seq.pending_forks = 0
        return chunk

    def advance(self, out: SchedulerOutput, rows: list[Sequence]) -> dict[int, int]:
        """The step is launched: its chunks count as computed and each running sampling row gets PENDING_TOKEN
        as its next token (fill() sets it). Returns {seq_id: row} of those rows."""
        for c in out.chunks:
            c.seq.num_computed += c.num_tokens
            if self.prefix_caching:
                self._cache_computed(c.seq)
            for child in c.children:
                child.num_computed, child.num_keyed = c.seq.num_computed, c.seq.num_keyed
        pending = {}
        for i, s in enumerate(rows):
            if s.status is SeqStatus.RUNNING:
                s.token_ids.append(PENDING_TOKEN)
                pending[s.seq_id] = i
        return pending

    @staticmethod
    def fill(seq: Sequence, token: int, logprob: float) -> None:
        """Sets seq's pending token (the last: a sequence is advanced again only after it was filled)."""
        assert seq.token_ids[-1] == PENDING_TOKEN, "fill() without a pending token"
        seq.token_ids[-1] = token
        seq.logprobs.append(logprob)

    def finish(self, seq: Sequence, status: SeqStatus) -> None:
        assert status.is_finished()
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = status


class _GrowthPlan:
    """The running sequences' block needs over the next `horizon` steps, for admission. Within the horizon a
    sequence needs blocks for its whole prompt and one more token a step until it has its max_new_tokens; one
    that must have finished by some step (it can sample no more) has freed its blocks by then. The need is the
    peak over the steps of (growth of those still running) - (blocks of those finished): at most the sum of
    every sequence's own growth, which is what admission reserved before, and as safe: whatever is admitted
    now, the running sequences do not run out of blocks within the horizon unless more are admitted later.

    Steps are taken in groups of STEP_GROUP, each at its worst (the growth at its end, the frees of before its
    start). Freed blocks count only for single samples past their prompt (a block shared by forked samples is
    freed with its last holder); a sequence is taken to free its blocks two steps after its last token (with
    asynchronous scheduling that token is read back a step later); with prefix caching, only the blocks it
    holds alone are freed (blocks shared with other requests stay held). Samples that share a partly filled block
    each need a copy of it (copy-on-write) before they write. The need per group is kept as a sum, so a
    candidate costs one column, not the whole plan again."""

    STEP_GROUP = 8

    def __init__(self, sched: Scheduler, seqs: list[Sequence]):
        self.s = sched
        self.horizon = sched.admission_horizon_tokens
        g = self.STEP_GROUP
        self.ends = np.minimum(np.arange(g - 1, self.horizon + g, g), self.horizon)[:, None]     # [groups, 1]
        self.starts = self.ends - g + 1
        # a sequence still in its prompt may have samples to fork when it completes (pending_forks)
        cols: list[list[int]] = [[], [], [], [], [], [], []]
        for q in seqs:       # one list per field, not a tuple per sequence: fewer objects for the collector
            for col, v in zip(cols, self._col(q, len(q.block_ids), 1 + q.pending_forks,
                                              self._copy_due(q) + self._shared_tail(q, 1 + q.pending_forks))):
                col.append(v)
        self.need = self._need(cols)

    def _col(self, seq: Sequence, blocks: int, copies: int, copy_on_write: int) -> tuple:
        """(tokens, blocks, tokens ahead, copies, step its blocks are free, copy-on-write blocks, blocks it holds
        alone)."""
        ahead = max(0, seq.params.max_new_tokens - seq.num_output_tokens)
        prefilled = seq.num_computed >= len(seq.token_ids) - 1
        free = ahead + 2 if copies == 1 and seq.params.n == 1 and prefilled and ahead + 2 <= self.horizon else -1
        ahead = min(ahead, self.horizon)
        # one with all its tokens is not scheduled again: its last (pending) token needs no slot
        own = blocks - self._shared(seq) if free >= 0 else blocks
        return (len(seq.token_ids) if ahead else 0, blocks, ahead, copies, free, copy_on_write, own)

    def _shared(self, seq: Sequence) -> int:
        """Leading blocks seq shares with other requests (prefix caching): a block's holders also hold every
        block before it (they found the same prefix), so the shared ones come first and bisect finds their end."""
        ids = seq.block_ids
        if not self.s.prefix_caching or not ids:
            return 0
        ref = self.s.pool.ref_counts
        if ref[ids[0]] <= 1:
            return 0
        return bisect.bisect_left(ids, True, key=lambda b: ref[b] <= 1)

    def _need(self, cols) -> np.ndarray:
        """Blocks needed beyond those held, per group of steps, by the sequences of these columns (one sequence
        of each field, or one list of each field)."""
        length, blocks, ahead, copies, free, cow, own = (np.asarray(c, dtype=np.int64) for c in cols)
        grown = -(-(length + np.minimum(self.ends, ahead)) // self.s.block_size) - blocks
        freed = (free >= 0) & (free <= self.starts)
        return np.where(freed, -own, np.maximum(grown, 0) * copies + cow).sum(axis=1)

    def add(self, seq: Sequence, copies: int = 1) -> None:
        """seq was admitted this step (its blocks for this step reserved), with `copies` samples in all."""
        self.need += self._need(self._col(seq, len(seq.block_ids), copies, self._shared_tail(seq, copies)))

    def _shared_tail(self, seq: Sequence, copies: int) -> int:
        """Copies of a partly filled last prompt block that samples still to be forked will need."""
        return (copies - 1) if copies > 1 and len(seq.token_ids) % self.s.block_size else 0

    def _copy_due(self, seq: Sequence) -> int:
        """1 if a forked sample still shares its partly filled prompt block (it copies it before writing;
        counted for every sharer, one more than the copies made)."""
        bs, i = self.s.block_size, seq.num_prompt_tokens // self.s.block_size
        shared = seq.num_prompt_tokens % bs and i < len(seq.block_ids) and self.s.pool.ref_counts[seq.block_ids[i]] > 1
        return 1 if shared else 0

    def peak(self, with_new: Optional[tuple[Sequence, int, int]] = None) -> int:
        """The peak need of the planned sequences, and of (seq, blocks it is about to get, samples) if given (a
        candidate is never counted as freeing blocks: it has its prompt to compute)."""
        need = self.need
        if with_new is not None:
            seq, more, copies = with_new
            need = need + self._need(self._col(seq, len(seq.block_ids) + more, copies,
                                               self._shared_tail(seq, copies)))
        return max(0, int(need.max()))
