"""Structured output in the engine: grammars compiled off the step's path, one matcher per constrained sample,
and each step's token masks for the constrained rows.

- A request with json_schema / regex / choice is held back from the scheduler until its grammar is compiled
  (in a thread pool; llguidance drops the GIL while it builds one), then admitted. Compiled grammars are kept
  per engine in a bounded LRU keyed by the grammar text, so a job-level schema is compiled once per worker.
- Each sample (n > 1: each forked sequence) has its own matcher, a deep copy of the compiled one, advanced
  with every token the sample keeps; it is advanced lazily, right before the sample's next mask is built,
  so asynchronous scheduling only has to hand it the token still on its way back (LLMEngine._launch).
- Masks are llguidance bitmasks ([rows, ceil(V / 32)] int32, bit t of a row = token t allowed), filled for
  all constrained rows at once by llguidance's thread pool while the GPU runs the step's forward, and
  applied on the device in sampling._process. Ids the tokenizer does not have (a model vocab padded past it)
  are never allowed. EOS is allowed only where the grammar accepts; a grammar that admits nothing more ends
  its sample with finish_reason "stop" (LLMEngine._check_finished)."""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import llguidance
import torch

from ziya_batch.engine.constraints import grammar_text
from ziya_batch.engine.scheduler import PENDING_TOKEN, Sequence
from ziya_batch.engine.types import SamplingParams

# distinct compiled grammars kept per engine: a job has one (job-level) or a few (per-line) constraints; a
# grammar evicted while samples use it stays alive in their matchers
MAX_CACHED_GRAMMARS = 128


def grammar_of(p: SamplingParams) -> Optional[str]:
    """The grammar text of a request's constraint (the cache key), None if it has none."""
    if p.json_schema is None and p.regex is None and not p.choice:
        return None
    return grammar_text(p.json_schema, p.regex, p.choice or None, p.json_whitespace)


class GrammarError(ValueError):
    """A request's constraint that the grammar library cannot compile (its reason in the message)."""


class Grammars:
    """One engine's constrained requests: compiling, matchers, masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], pin_memory: bool):
        if tokenizer is None:
            raise ValueError("structured output (json_schema, regex, choice) needs the model's tokenizer")
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self._pin = pin_memory
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        # wrapping the tokenizer takes ~1 s at a 39k vocabulary: done once, in the pool, before the first compile
        self._tokenizer: Future = self._pool.submit(self._wrap, tokenizer)
        self._compiled: OrderedDict[str, Future] = OrderedDict()   # grammar text -> Future[LLMatcher]
        self._of_request: dict[str, Future] = {}                    # request id -> its grammar's Future
        self.waiting: list[tuple[Future, Sequence]] = []            # compiling; not yet given to the scheduler
        self._matchers: dict[int, llguidance.LLMatcher] = {}        # seq_id -> matcher
        self._consumed: dict[int, int] = {}                         # seq_id -> output tokens it has consumed
        self._executor = llguidance.LLExecutor(num_threads=max(1, min(16, (os.cpu_count() or 2) - 1)))
        self._buffers: list[Optional[torch.Tensor]] = [None, None]  # pinned host masks, taken in turn
        self._flip = 0
        # host time (the benchmark's W3 profile): in masks() in all (waits for pending tokens included), and in
        # llguidance's mask fill alone
        self.mask_s = 0.0
        self.fill_s = 0.0

    def _wrap(self, tokenizer) -> llguidance.LLTokenizer:
        import llguidance.hf
        # n_vocab = the model's rows: ids past the tokenizer's get no bytes, so no mask ever allows them
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(self.vocab_size, len(tokenizer)),
                                            eos_token=self.eos_ids[0] if self.eos_ids else None)

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        m = llguidance.LLMatcher(self._tokenizer.result(), grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return m

    # ---- requests -------------------------------------------------------------------------------------------
    def add(self, seq: Sequence, grammar: str) -> None:
        """seq (a request's first sequence) waits for its grammar; ready() hands it to the scheduler."""
        fut = self._compiled.get(grammar)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self._pool.submit(self._compile, grammar)
            self._compiled[grammar] = fut
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(grammar)
        self._of_request[seq.request_id] = fut
        self.waiting.append((fut, seq))

    def ready(self, block: bool) -> tuple[list[Sequence], list[tuple[Sequence, BaseException]]]:
        """(sequences whose grammar is compiled, (sequence, error) of those whose grammar failed); with block,
        waits for the first one if none is ready yet."""
        if block and self.waiting and not any(f.done() for f, _ in self.waiting):
            self.waiting[0][0].exception()          # waits, raises nothing
        ok, failed, still = [], [], []
        for fut, seq in self.waiting:
            if not fut.done():
                still.append((fut, seq))
            elif fut.exception() is not None:
                failed.append((seq, fut.exception()))
            else:
                ok.append(seq)
        self.waiting = still
        return ok, failed

    def is_constrained(self, seq: Sequence) -> bool:
        return seq.request_id in self._of_request

    def drop_request(self, request_id: str, seq_ids: list[int]) -> None:
        self._of_request.pop(request_id, None)
        self.waiting = [(f, s) for f, s in self.waiting if s.request_id != request_id]
        for i in seq_ids:
            self.drop(i)

    def drop(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)
        self._consumed.pop(seq_id, None)

    # ---- matchers -------------------------------------------------------------------------------------------
    def advance(self, seq: Sequence, pending_token: Optional[Callable[[Sequence], int]] = None
                ) -> llguidance.LLMatcher:
        """seq's matcher, advanced over every output token not consumed yet (a PENDING_TOKEN last one is read
        with pending_token; without it, it is left for later)."""
        m = self._matchers.get(seq.seq_id)
        if m is None:
            m = self._of_request[seq.request_id].result().deep_copy()
            self._matchers[seq.seq_id] = m
            self._consumed[seq.seq_id] = 0
        done, out = self._consumed[seq.seq_id], seq.num_output_tokens
        for pos in range(seq.num_prompt_tokens + done, seq.num_prompt_tokens + out):
            t = seq.token_ids[pos]
            if t == PENDING_TOKEN:
                if pending_token is None:
                    break
                t = pending_token(seq)
            # a refused token puts the matcher in its error state: masks then allow only EOS (never reached
            # with masks applied, except by a row async scheduling runs once past its sample's end)
            m.consume_token(t)
            done += 1
        self._consumed[seq.seq_id] = done
        return m

    def finished(self, seq: Sequence) -> bool:
        """The sample's grammar admits no more tokens (complete, or ended by EOS)."""
        m = self.advance(seq)
        return m.is_stopped()

    def masks(self, rows: list[Sequence], pending_token: Callable[[Sequence], int]
              ) -> Optional[tuple[list[int], torch.Tensor]]:
        """(row indices, host bitmask [len(indices), ceil(V/32)] int32) of the constrained rows, or None."""
        idx = [i for i, s in enumerate(rows) if s.request_id in self._of_request]
        if not idx:
            return None
        t0 = time.perf_counter()
        words = -(-self._tokenizer.result().vocab_size // 32)
        buf = self._buffer(len(idx), words)
        batch = []
        for k, i in enumerate(idx):
            batch.append((self.advance(rows[i], pending_token), k))
        t1 = time.perf_counter()
        self._executor.unsafe_compute_mask_ptr(batch, buf.data_ptr(), words * 4, len(idx))
        self.fill_s += time.perf_counter() - t1
        for m, k in batch:
            if m.is_error() and self.eos_ids:
                # keep the row finite: a sample past its end (async scheduling's wasted row) draws EOS
                buf[k].zero_()
                e = self.eos_ids[0]
                buf[k, e // 32] = ((1 << (e % 32)) ^ 0x80000000) - 0x80000000     # the bit, as a signed int32
        self.mask_s += time.perf_counter() - t0
        return idx, buf

    def _buffer(self, rows: int, words: int) -> torch.Tensor:
        """[rows, words] int32 host memory; two pinned buffers in turn on CUDA, so a step's mask is written while
        the one before may still be on its way to the device."""
        self._flip ^= 1
        buf = self._buffers[self._flip]
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty(max(rows, 64), words, dtype=torch.int32, pin_memory=self._pin)
            self._buffers[self._flip] = buf
        return buf[:rows]


def apply_masks(logits: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] with -inf where the bitmask [Rc, W] of rows [Rc] forbids a token; out of place, and the
    unconstrained rows are not touched."""
    V = logits.shape[1]
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    allowed = ((bits[:, :, None] >> shifts) & 1).view(bits.shape[0], -1)[:, :V].bool()       # [Rc, V]
    if allowed.shape[1] < V:      # a mask narrower than the logits: the extra ids are not the tokenizer's
        allowed = torch.nn.functional.pad(allowed, (0, V - allowed.shape[1]), value=False)
    sub = logits.index_select(0, rows).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, rows, sub)
