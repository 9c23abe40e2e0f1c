"""LLMEngine: the public face of the engine. A step is three calls, as in vLLM v1's EngineCore: the scheduler
decides (CPU bookkeeping), the runner runs the model and the sampler picks tokens on the device, the
scheduler updates; then finished sequences are turned into RequestOutputs."""
from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ziya_batch.engine import quant
from ziya_batch.engine.kv_cache import (allocate_kv_cache, cache_dtype, copy_blocks, kv_bytes_per_token,
                                        num_blocks_from_memory)
from ziya_batch.engine.model import LlamaModel, ModelArgs, check_weights_fit, from_hf_model, iter_checkpoint
from ziya_batch.engine.runner import ModelRunner
from ziya_batch.engine.grammar import Grammars, grammar_of
from ziya_batch.engine.sampling import build_sampling_tensors, sample_full
from ziya_batch.engine.scheduler import Scheduler, SchedulerOutput, SeqStatus, Sequence
from ziya_batch.engine.types import Completion, EngineConfig, Request, RequestOutput

# What the KV cache leaves free on the GPU for activations, logits and graph pools, besides the memory
# fraction: a 2,048-token step of the 13B shape peaks near 1.5 GB, plus the prefill attention matrices.
_GPU_RESERVE_BYTES = 3 << 30
# CPU runs have no memory probe: cap the cache so a misconfigured run cannot eat the host.
_CPU_CACHE_BYTES = 2 << 30


@dataclass
class _Group:
    request: Request
    seqs: list[Sequence] = field(default_factory=list)
    done: dict[int, Completion] = field(default_factory=dict)


@dataclass(eq=False)
class _Launched:
    """A step whose kernels are queued: its plan, its sampling rows and their results on the way to the host."""
    out: SchedulerOutput
    rows: list[Sequence]
    t0: float
    host_s: float
    events: Optional[tuple] = None
    tokens: Optional[torch.Tensor] = None      # [R] int64 on the device: the next step's inputs read them there
    host: Optional[torch.Tensor] = None        # [2, R] float64 tokens and logprobs, filled by a non-blocking copy
    ready: Optional[torch.cuda.Event] = None   # recorded after that copy (CUDA)
    pending: dict[int, int] = field(default_factory=dict)   # seq_id -> row of each row given a pending token
    top: Optional[torch.Tensor] = None         # [2, R, k] float32 top_logprobs ids and values, if any row asks


@dataclass
class StepStats:
    """What the last step did (the benchmark's profile)."""
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_seqs: int = 0
    context_tokens: int = 0        # tokens of KV read by the step's attention
    decode_only: bool = False
    host_s: float = 0.0            # CPU time from scheduling to the last kernel launch of the forward
    wall_s: float = 0.0            # from the previous step's completion (or this one's launch, if later) to this
    #                                one's: with async scheduling the steps' wall times add up to the run's
    gpu_s: Optional[float] = None  # with time_gpu: from the forward's first launch (or the end of the step before,
    #                                if it was still running) to sampling's end, on the GPU


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LLMEngine:
    def __init__(self, config: EngineConfig, tensor_parallel: tuple[int, int] = (0, 1), tp_group=None):
        """Loads the checkpoint at config.model_path. tensor_parallel = (rank, world_size) loads only that rank's
        shard of the weights and joins the ranks' process group (tp_group, or the default one) before the cache
        is sized; every rank of a replica builds its engine this way (tp.py)."""
        from transformers import AutoConfig, AutoTokenizer
        trc = config.trust_remote_code
        hf_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=trc)
        tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=trc)
        device = resolve_device(config.device)
        args = ModelArgs.from_hf_config(hf_config)
        check_weights_fit(args, config.model_path)
        tensors = iter_checkpoint(config.model_path, tp=tensor_parallel, args=args)
        model = LlamaModel.from_state_dict(args, tensors, device, _dtype_for(config, device), tp=tensor_parallel,
                                           quantization=config.quantization)
        if tensor_parallel[1] > 1:
            from ziya_batch.engine.tp import attach_tp
            model = attach_tp(model, *tensor_parallel, group=tp_group)
        self._setup(model, tokenizer, config, device, _eos_ids(hf_config, tokenizer))

    @classmethod
    def from_model(cls, model, tokenizer, config: EngineConfig) -> "LLMEngine":
        """An engine over an already-built model: a transformers LlamaForCausalLM (its weights are copied into
        the engine's layout) or our LlamaModel (used as is)."""
        self = cls.__new__(cls)
        if isinstance(model, LlamaModel):
            device = model.embed.device
            eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
        else:
            device = resolve_device(config.device) if config.device != "auto" else next(model.parameters()).device
            eos = _eos_ids(model.config, tokenizer)
            model = from_hf_model(model, device, _dtype_for(config, device), config.quantization)
        self._setup(model, tokenizer, config, device, eos)
        return self

    def _setup(self, model: LlamaModel, tokenizer, config: EngineConfig, device: torch.device,
               eos_ids: list[int]) -> None:
        self.config, self.model, self.tokenizer, self.device = config, model, tokenizer, device
        self.eos_ids = eos_ids
        # before any graph captures the projections
        if quant.set_fast_accum(model, config.fp8_fast_accum) == 0 and config.fp8_fast_accum:
            raise ValueError("fp8_fast_accum applies to FP8 weights: this model has none (quantization fp8)")
        a = model.args
        bs = config.block_size
        kv_heads = model.layers[0].local_kv_heads
        kv_dtype = cache_dtype(config.kv_cache_dtype, model.embed.dtype)
        per_block = kv_bytes_per_token(a.num_layers, kv_heads, a.head_dim, kv_dtype) * bs
        max_len = min(config.max_model_len or a.max_position_embeddings, a.max_position_embeddings)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif device.type == "cuda":
            num_blocks = num_blocks_from_memory(device, per_block, config.gpu_memory_fraction, _GPU_RESERVE_BYTES)
        else:
            num_blocks = min(config.max_num_seqs * -(-max_len // bs), _CPU_CACHE_BYTES // per_block)
        if tp_hook := getattr(model, "agree_num_blocks", None):
            num_blocks = tp_hook(num_blocks)       # tensor parallel ranks must build identical caches
        # one sequence must always fit, or preemption could never make room for it
        self.max_model_len = min(max_len, num_blocks * bs)
        if self.max_model_len < 2:
            raise ValueError(f"the KV cache ({num_blocks} blocks of {bs}) is too small for any sequence")
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_cache(a.num_layers, num_blocks, bs, kv_heads, a.head_dim, kv_dtype, device)
        self.scheduler = Scheduler(num_blocks, bs, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.admission_horizon_tokens, config.schedule,
                                   prefix_caching=config.prefix_caching)
        on_gpu = device.type == "cuda"
        from ziya_batch.engine import attention
        self.runner = ModelRunner(model, self.kv_caches, bs, config.max_num_seqs, self.max_model_len, device,
                                  use_graphs=on_gpu and config.cuda_graphs,
                                  use_triton=on_gpu and attention.triton is not None,
                                  mixed_graphs=config.mixed_step_graphs,
                                  max_num_batched_tokens=config.max_num_batched_tokens)
        self.scheduler.step_buckets = self.runner.step_buckets()
        self.scheduler.adaptive_step_size = config.adaptive_step_size
        self._groups: dict[str, _Group] = {}
        self._rng = random.Random(int.from_bytes(os.urandom(8), "little"))
        self.last_step: Optional[StepStats] = StepStats()
        self._inflight: Optional[_Launched] = None
        self._carried: list[RequestOutput] = []      # finished by a call that then raised: the next call returns them
        self._pinned: Optional[list[torch.Tensor]] = None
        self._flip = 0
        self._last_done = 0.0
        self.plan_hook = None     # tensor parallel: rank 0 broadcasts each step's plan (tp.py)
        self._grammars: Optional[Grammars] = None     # structured output, made with the first constrained request
        self.time_gpu = False     # the benchmark: time each step on the GPU too (StepStats.gpu_s)

    # ---- requests -------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        p = request.params
        if not request.prompt_ids:
            raise ValueError(f"request {request.request_id}: prompt_ids is empty")
        if len(request.prompt_ids) >= self.max_model_len:
            raise ValueError(f"request {request.request_id}: prompt of {len(request.prompt_ids)} tokens does not "
                             f"fit max_model_len {self.max_model_len}")
        if p.n < 1 or p.max_new_tokens < 1:
            raise ValueError(f"request {request.request_id}: n and max_new_tokens must be at least 1")
        if p.n > self.config.max_num_seqs:
            raise ValueError(f"request {request.request_id}: n={p.n} exceeds max_num_seqs {self.config.max_num_seqs}")
        if request.request_id in self._groups:
            raise ValueError(f"request {request.request_id} is already running")
        fits = self.max_model_len - len(request.prompt_ids)
        if p.max_new_tokens > fits:
            p = dataclasses.replace(p, max_new_tokens=fits)
        key = p.seed if p.seed is not None else self._rng.getrandbits(62)
        seq = Sequence(self.scheduler.new_seq_id(), request.request_id, 0, list(request.prompt_ids),
                       len(request.prompt_ids), p, sample_key=key, pending_forks=p.n - 1)
        grammar = grammar_of(p)
        if grammar is not None and self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.model.args.vocab_size, self.eos_ids,
                                      pin_memory=self.device.type == "cuda")
        self._groups[request.request_id] = _Group(request, [seq])
        if grammar is not None:
            self._grammars.add(seq, grammar)        # compiled in a thread; _admit_compiled schedules it
        else:
            self.scheduler.add(seq)

    @property
    def prefix_cache_query_tokens(self) -> int:
        """Prompt tokens looked up in the prefix cache since the engine was built (cumulative)."""
        return self.scheduler.prefix_cache_query_tokens

    @property
    def prefix_cache_hit_tokens(self) -> int:
        """Of those, the tokens found cached (not computed)."""
        return self.scheduler.prefix_cache_hit_tokens

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_unfinished() or self._inflight is not None or bool(self._carried)
                or (self._grammars is not None and bool(self._grammars.waiting)))

    def abort(self, request_id: str) -> None:
        """Drops a request: its sequences free their blocks and no output of it is returned, not even one that
        a call which then raised had already finished."""
        self._carried = [o for o in self._carried if o.request_id != request_id]
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        seqs = [s for s in list(self.scheduler.running) + list(self.scheduler.waiting) if s.request_id == request_id]
        for s in seqs:
            self.scheduler.finish(s, SeqStatus.FINISHED_ABORTED)
        if self._grammars is not None:
            self._grammars.drop_request(request_id, [s.seq_id for s in seqs])

    def generate(self, requests: list[Request]) -> list[RequestOutput]:
        for r in requests:
            self.add_request(r)
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                done[out.request_id] = out
        return [done[r.request_id] for r in requests]

    # ---- the step -------------------------------------------------------------------------------------------
    # A step is launched (scheduled, its kernels and sampling queued on the device, its sampled tokens on their
    # way to the host) and later completed (tokens read back, stop conditions checked). With async_scheduling,
    # step() launches step N+1 before it completes step N: the host schedules and prepares N+1 while the GPU
    # still runs N, and N+1 reads N's tokens on the device. A sequence that N ends by EOS or a stop string
    # costs one wasted row in N+1; one that N ends by length is not scheduled again (Scheduler._has_all_tokens).
    # Under tensor parallelism steps are completed one at a time, in order: the plan sent to the other ranks
    # carries token values.
    def _overlap(self) -> bool:
        return self.config.async_scheduling and self.plan_hook is None

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the requests that finished with the step completed by this call. last_step
        describes that step (None if the call completed none). If it raises, requests it had finished are
        returned by the next call."""
        prev, self._inflight = self._inflight, None
        finished, self._carried = self._carried, []
        self.last_step = None
        try:
            if prev is not None and not self._overlap():
                finished, prev = finished + self._complete(prev), None
            try:
                cur = self._launch(prev)
            except BaseException:
                self._inflight = prev     # still read back by the next call, whatever the caller aborts meanwhile
                raise
            if prev is not None:
                finished += self._complete(prev)
            if cur is not None:
                cur.pending = self.scheduler.advance(cur.out, cur.rows)
                if self._overlap():
                    self._inflight = cur
                else:
                    finished += self._complete(cur)
        except BaseException:
            self._carried = finished + self._carried
            raise
        return finished

    def _launch(self, prev: Optional[_Launched]) -> Optional[_Launched]:
        t0 = time.perf_counter()
        if self._grammars is not None and self._grammars.waiting:
            self._admit_compiled(block=prev is None and not self.scheduler.has_unfinished())
        out = self.scheduler.schedule()
        if not out.chunks:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("the scheduler cannot admit any waiting request (a bug: add_request checks sizes)")
            return None
        if self.plan_hook is not None:
            self.plan_hook(out)
        copy_blocks(self.kv_caches, out.block_copies)
        events = None
        if self.time_gpu and self.device.type == "cuda":
            if prev is not None and prev.events is not None:
                events = (prev.events[1], torch.cuda.Event(enable_timing=True))   # the GPU starts it after prev
            else:
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
        logits, rows = self.runner.execute(out, *((prev.tokens, prev.pending) if prev is not None else ()))
        host_s = time.perf_counter() - t0
        step = _Launched(out, rows, t0, host_s, events)
        if rows:
            bans = [self._bans(s) for s in rows]
            # built while the GPU runs the forward; a row whose last token is still on its way waits for it
            allowed = self._grammars.masks(rows, self._pending_reader(prev)) if self._grammars is not None else None
            tensors = build_sampling_tensors(rows, logits.shape[1], self.device, bans,
                                             *((prev.tokens, prev.pending) if prev is not None else ()),
                                             allowed=allowed)
            sampled = sample_full(logits, tensors)
            step.tokens, lp = sampled.tokens, sampled.logprobs
            if events is not None:
                events[1].record()
            step.host = self._host_buffer(len(rows))
            step.host.copy_(torch.stack([step.tokens.double(), lp.double()]), non_blocking=True)
            if sampled.top_ids is not None:
                # ids as float32 are exact below 2^24 (vocabularies are far smaller); pinned, so the copy is async
                top = torch.stack([sampled.top_ids.float(), sampled.top_logprobs])
                step.top = torch.empty(top.shape, pin_memory=self.device.type == "cuda")
                step.top.copy_(top, non_blocking=True)
            if self.device.type == "cuda":
                step.ready = torch.cuda.Event()
                step.ready.record()       # after events[1]: once it is reached, both events are complete
        elif events is not None:
            events[1].record()
        return step

    def _host_buffer(self, n: int) -> torch.Tensor:
        """[2, n] float64 for a step's tokens and logprobs: on CUDA a slice of one of two pinned buffers, taken
        in turn (a step's copy lands while the one before is being read)."""
        if self.device.type != "cuda":
            return torch.empty(2, n, dtype=torch.float64)
        if self._pinned is None:
            self._pinned = [torch.empty(2 * self.config.max_num_seqs, dtype=torch.float64, pin_memory=True)
                            for _ in range(2)]
        self._flip ^= 1
        return self._pinned[self._flip][:2 * n].view(2, n)

    def _complete(self, step: _Launched) -> list[RequestOutput]:
        out, rows = step.out, step.rows
        sampled = [[], []]
        if rows:
            if step.ready is not None:
                step.ready.synchronize()
            sampled = step.host.tolist()
        done = [s for i, s in enumerate(rows) if step.pending.get(s.seq_id) == i and not s.status.is_finished()]
        top = step.top.tolist() if step.top is not None else None
        for s in done:
            i = step.pending[s.seq_id]
            self.scheduler.fill(s, int(sampled[0][i]), sampled[1][i])
            if top is not None and s.params.top_logprobs:
                k = s.params.top_logprobs
                s.top_logprobs.append([(int(t), v) for t, v in zip(top[0][i][:k], top[1][i][:k])
                                       if v != float("-inf")])
        now = time.perf_counter()
        ev = step.events
        self.last_step = StepStats(
            num_prefill_tokens=sum(c.num_tokens for c in out.chunks if c.num_tokens > 1),
            num_decode_tokens=sum(1 for c in out.chunks if c.num_tokens == 1),
            num_seqs=len(out.chunks), context_tokens=sum(c.start + c.num_tokens for c in out.chunks),
            decode_only=out.is_decode_only, host_s=step.host_s, wall_s=now - max(step.t0, self._last_done),
            gpu_s=ev[0].elapsed_time(ev[1]) / 1e3 if ev is not None and rows else None)
        self._last_done = now
        finished: list[RequestOutput] = []
        error = None
        for s in done:
            if s.status.is_finished():        # a sibling's failed check below aborted its request
                continue
            # a preempted (waiting) sequence is checked too: it may have sampled EOS before it was preempted
            try:
                result = self._check_finished(s)
            except Exception as err:  # noqa: BLE001 - e.g. the tokenizer failing on a stop-string check
                # this request cannot be finished: drop it rather than leave it holding seats and blocks
                # (one with all its tokens would never be scheduled, nor checked, again); raise once the
                # others are checked, and return what they finished with the next call
                self.abort(s.request_id)
                error = error or err
                continue
            if result is not None:
                finished.extend(result)
        if error is not None:
            self._carried.extend(finished)
            raise error
        return finished

    # ---- structured output (grammar.py) ---------------------------------------------------------------------
    def _admit_compiled(self, block: bool) -> None:
        """Schedules the requests whose grammar is compiled (with block, waits for one: nothing else can run); a
        request whose grammar failed is dropped and its error raised, as _complete does for a failed check."""
        ready, failed = self._grammars.ready(block)
        for seq in ready:
            self.scheduler.add(seq)
        for seq, _ in failed:
            self.abort(seq.request_id)
        if failed:
            seq, err = failed[0]
            raise ValueError(f"request {seq.request_id}: its constraint cannot be compiled: {err}")

    @staticmethod
    def _pending_reader(prev: Optional[_Launched]):
        """Reads a row's token of the step before from the host, once that step's copy has landed."""
        def read(seq: Sequence) -> int:
            if prev.ready is not None:
                prev.ready.synchronize()
            return int(prev.host[0, prev.pending[seq.seq_id]])
        return read

    def _bans(self, s: Sequence) -> list[int]:
        p = s.params
        constrained = self._grammars is not None and self._grammars.is_constrained(s)
        if s.num_output_tokens >= p.min_new_tokens or constrained:
            return []               # a grammar decides where a constrained sample may end
        return list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_ids)

    def _check_finished(self, s: Sequence) -> Optional[list[RequestOutput]]:
        p = s.params
        last = s.token_ids[-1]
        tokens, logprobs, text, status = None, None, None, None
        if self._grammars is not None and self._grammars.is_constrained(s) and self._grammars.finished(s):
            # the grammar is complete (or ended by EOS, allowed only once it accepted): EOS is not returned
            keep = s.num_output_tokens - (last in self.eos_ids)
            tokens, logprobs, status = s.output_ids[:keep], s.logprobs[:keep], SeqStatus.FINISHED_STOPPED
        elif (last in p.stop_token_ids) or (not p.ignore_eos and last in self.eos_ids):
            tokens, logprobs, status = s.output_ids[:-1], s.logprobs[:-1], SeqStatus.FINISHED_STOPPED
        elif p.stop and self.tokenizer is not None:
            hit = self._find_stop(s.output_ids, p.stop)
            if hit is not None:
                keep, text = hit
                tokens, logprobs, status = s.output_ids[:keep], s.logprobs[:keep], SeqStatus.FINISHED_STOPPED
        if status is None and s.num_output_tokens >= p.max_new_tokens:
            tokens, logprobs, status = s.output_ids, list(s.logprobs), SeqStatus.FINISHED_LENGTH
        if status is None:
            return None
        self.scheduler.finish(s, status)
        if self._grammars is not None:
            self._grammars.drop(s.seq_id)
        if text is None:
            text = self._decode(tokens)
        group = self._groups.get(s.request_id)
        if group is None:
            return None
        reason = "stop" if status is SeqStatus.FINISHED_STOPPED else "length"
        top = s.top_logprobs[:len(tokens)] if s.params.top_logprobs else None
        group.done[s.sample_index] = Completion(s.sample_index, list(tokens), text, reason, list(logprobs), top)
        if len(group.done) < group.request.params.n:
            return None
        del self._groups[s.request_id]
        if self._grammars is not None:
            self._grammars.drop_request(s.request_id, [])
        comps = [group.done[i] for i in range(group.request.params.n)]
        return [RequestOutput(group.request.request_id, list(group.request.prompt_ids), comps,
                              num_cached_tokens=group.seqs[0].num_cached_tokens)]

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _find_stop(self, ids: list[int], stops: tuple[str, ...]) -> Optional[tuple[int, str]]:
        """If a stop string appears in the decoded output: (tokens to keep, their text). The kept tokens are the
        longest prefix whose text lies wholly before the stop string, and the text is theirs: a token that also
        makes part of the stop string (its first characters, or a word's leading space) is dropped with its
        characters, so the response text is the decode of the response ids that experience records carry."""
        text = self._decode(ids)
        hits = [i for i in (text.find(st) for st in stops if st) if i >= 0]
        if not hits:
            return None
        before = text[:min(hits)]
        keep, kept = len(ids), text
        # a prefix ending inside a character's byte tokens decodes to U+FFFD, not a prefix of the text: dropped too
        while not before.startswith(kept):
            keep -= 1
            kept = self._decode(ids[:keep])
        return keep, kept


def _dtype_for(config: EngineConfig, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[config.dtype]


def _eos_ids(hf_config, tokenizer) -> list[int]:
    ids: list[int] = []
    for src in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids
