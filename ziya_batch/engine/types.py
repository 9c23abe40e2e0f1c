"""The engine's plain-data interface. Callers (the worker, the benchmark, tests) build Requests and get
RequestOutputs; nothing here imports torch, so upper layers can use these types freely.

SamplingParams and EngineConfig are the one home of their defaults: the job spec (spec.py) takes its
sampling.* and engine.* defaults from them and converts to them in one function each, and the benchmark
starts from them, so a default is never written twice."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Ziya's special token ids (model card: bos 1, eos 2, pad 0; unk shares pad's 0): the fallback where a checkpoint's
# config names none, and the ids the demo model is written with
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 0

# The allowed values of the string-valued settings below, written once: the engine checks against them, the
# job spec builds its Literal types from them and the benchmark's command line offers them.
LOGPROBS_MODES = ("temperature", "raw", "processed")              # SamplingParams.logprobs_mode
JSON_WHITESPACE = ("compact", "flexible")                         # SamplingParams.json_whitespace
SCHEDULE_POLICIES = ("fcfs", "longest-first", "tail-longest-first")  # EngineConfig.schedule (scheduler.py)
KV_CACHE_DTYPES = ("auto", "fp8")                                 # EngineConfig.kv_cache_dtype (kv_cache.py)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 1024
    min_new_tokens: int = 0          # EOS / stop ids are masked before this many tokens
    temperature: float = 1.0         # 0 = greedy
    top_p: float = 0.85
    top_k: int = 0                   # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off (CTRL-style, over prompt and response tokens)
    n: int = 1                       # samples per prompt, sharing the prompt's KV blocks
    seed: Optional[int] = None       # per-request seed; None = engine's generator
    stop: tuple[str, ...] = ()       # stop strings: the text is cut before the first one
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False         # benchmarks: run to max_new_tokens regardless of EOS (not constrained rows)
    # which distribution Completion.logprobs are taken under: "temperature" (log-softmax of logits / T over the
    # full vocabulary, T = 1 for greedy: what PPO/GRPO trainers recompute), "raw" (log-softmax of the logits) or
    # "processed" (the one sampled from: after repetition penalty, min_new_tokens bans, top_k and top_p)
    logprobs_mode: str = "temperature"
    top_logprobs: int = 0            # per token, the k most likely ids with logprobs under logprobs_mode
    # structured output, at most one (engine/grammar.py): a finished response satisfies it, whatever the weights
    json_schema: Optional[str] = None     # a JSON Schema, as JSON text (hashable, and the grammar cache's key)
    regex: Optional[str] = None           # the whole response matches it
    choice: Optional[tuple[str, ...]] = None  # the response is one of these
    json_whitespace: str = "compact"      # "compact" | "flexible": whitespace between JSON tokens


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    index: int                       # sample index in 0..n-1
    token_ids: list[int]             # generated ids; a stop string's tokens and EOS are not included
    text: str                        # the decode of token_ids (so it ends before a stop string)
    finish_reason: str               # "stop" | "length"
    logprobs: list[float]            # logprob of each returned token under params.logprobs_mode
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None   # per token [(id, logprob)...] if asked


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    completions: list[Completion]
    num_cached_tokens: int = 0       # prompt tokens whose KV came from the prefix cache (not computed)


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    dtype: str = "float16"               # used on GPU; CPU runs float32 unless forced
    device: str = "auto"                 # "auto" | "cpu" | "cuda" | "cuda:N"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    gpu_memory_fraction: float = 0.90
    cuda_graphs: bool = True
    # with cuda_graphs, steps with prefill chunks replay graphs too: captured in pieces around each layer's
    # attention, one set per bucket of token counts (piecewise.py); off, they run eagerly (A/B in the bench)
    mixed_step_graphs: bool = True
    # FP8 weights: torch._scaled_mm with use_fast_accum (Hopper's tensor cores accumulate without the periodic
    # promotion to float32: on an H100 the FP8 GEMMs 13% faster at 224 rows and 6% at 768, where W1's steps run,
    # but 1-4% slower at 128 and 384; about 10x the float32 rounding error of the product; W1 +5%;
    # scripts/gpu/fp8_gemm_accum.py, the quality gate's variant). Off by default (the job spec's
    # engine.fp8_fast_accum); needs quantization "fp8"
    fp8_fast_accum: bool = False
    # size each step with prefill by what its projections cost at each bucket the runner measured
    # (scheduler.step_size: a few hundred tokens beside many decode rows, up to max_num_batched_tokens with few)
    # instead of always filling max_num_batched_tokens; needs the mixed-step graphs' bucket times (a GPU; without
    # them every step fills the budget). W1 on an H100: float16 +2.8%, FP8 within noise (docs/BENCHMARKS.md).
    # The job spec's engine.adaptive_step_size
    adaptive_step_size: bool = True
    num_kv_blocks: Optional[int] = None  # override the memory-derived size (tests, preemption)
    max_model_len: Optional[int] = None  # default: the checkpoint's max_position_embeddings
    trust_remote_code: bool = False
    # admit a waiting request only if the KV blocks left still cover what the running sequences and it will
    # need over this many steps (each grows a token a step up to its max_new_tokens; those bound to finish
    # within them free their blocks); fewer preemptions (recompute) for a few idle blocks. 0: no reserve
    admission_horizon_tokens: int = 256
    # which waiting request is admitted first: "tail-longest-first", "fcfs" or "longest-first" (see scheduler.py);
    # the same name as the job spec's engine.schedule, so the spec converts to this config field by field name
    schedule: str = "tail-longest-first"
    # "auto" (the model's dtype) or "fp8" (float8 e4m3: twice the tokens in the same memory; see kv_cache.py)
    kv_cache_dtype: str = "auto"
    # None (linear weights in dtype) or "fp8" (float8 e4m3 weights with per-channel scales, activations
    # quantised per token: half the weight bytes a step reads; GPUs of compute capability 8.9+; see quant.py)
    quantization: Optional[str] = None
    # schedule and launch step N+1 while the device still runs step N (see LLMEngine.step)
    async_scheduling: bool = True
    # keep computed full KV blocks keyed by their token prefix and reuse them across requests (see scheduler.py)
    prefix_caching: bool = True
