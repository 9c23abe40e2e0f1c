"""The engine's plain-data interface. Callers (the worker, the benchmark, tests) build Requests and get
RequestOutputs; nothing here imports torch, so upper layers can use these types freely."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
    # structured output, at most one (engine/grammar.py): a finished response satisfies it, whatever the weights
    json_schema: Optional[str] = None     # a JSON Schema, as JSON text (hashable, and the grammar cache's key)
    regex: Optional[str] = None           # the whole response matches it
    choice: tuple[str, ...] = ()          # the response is one of these
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
    text: str                        # decoded text, cut before a stop string
    finish_reason: str               # "stop" | "length"
    logprobs: list[float]            # logprob of each returned token under the (processed) policy


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    completions: list[Completion]


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
    num_kv_blocks: Optional[int] = None  # override the memory-derived size (tests, preemption)
    max_model_len: Optional[int] = None  # default: the checkpoint's max_position_embeddings
    trust_remote_code: bool = False
    # admit a waiting request only if the KV blocks left still cover what the running sequences and it will
    # need over this many steps (each grows a token a step up to its max_new_tokens; those bound to finish
    # within them free their blocks); fewer preemptions (recompute) for a few idle blocks. 0: no reserve
    admission_horizon_tokens: int = 256
    # which waiting request is admitted first: "tail-longest-first", "fcfs" or "longest-first" (see scheduler.py)
    schedule_policy: str = "tail-longest-first"
    # "auto" (the model's dtype) or "fp8" (float8 e4m3: twice the tokens in the same memory; see kv_cache.py)
    kv_cache_dtype: str = "auto"
    # schedule and launch step N+1 while the device still runs step N (see LLMEngine.step)
    async_scheduling: bool = True
