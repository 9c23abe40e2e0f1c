"""The job spec: what to generate, from what, with which model, and where to write it.

Parsed from YAML or JSON and validated when built. Defaults are defined here once and used by the CLI,
the HTTP API and the docs alike; the sampling defaults are the model card's.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    path: Optional[str] = None
    """Merged Hugging Face checkpoint directory (local path or fsspec URL)."""
    base: Optional[str] = None
    """LLaMA base checkpoint; with `delta`, merged once into the cache on first use (model card step 2)."""
    delta: Optional[str] = None
    """Ziya delta checkpoint, applied to `base`."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Weight and activation dtype on GPUs; the CPU always runs float32."""
    tensor_parallel: int = Field(1, ge=1, le=64)
    """GPU actors one replica is sharded over (heads and MLP columns split K ways)."""
    replicas: Union[Literal["auto"], int] = "auto"
    """Model copies; auto = GPUs // tensor_parallel (one on a machine without GPUs)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the checkpoint. Off unless you trust the checkpoint."""

    @field_validator("replicas")
    @classmethod
    def _replicas_positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or an integer >= 1")
        return v

    @model_validator(mode="after")
    def _path_or_delta(self):
        if self.path and (self.base or self.delta):
            raise ValueError("give either path, or base and delta, not both")
        if not self.path and not (self.base and self.delta):
            raise ValueError("give path (a merged checkpoint), or both base and delta")
        return self


class SamplingSpec(_Strict):
    max_new_tokens: int = Field(1024, ge=1, le=1_000_000)
    """Upper bound on generated tokens per sample."""
    min_new_tokens: int = Field(0, ge=0)
    """EOS is not sampled before this many tokens (the benchmark uses it to fix output lengths)."""
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    """0 means greedy."""
    top_p: float = Field(0.85, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    """0 means no top-k cut."""
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    """CTRL-style penalty on tokens already in the prompt or the response; 1.0 is off."""
    n: int = Field(1, ge=1, le=1024)
    """Samples per prompt; they share the prompt's KV blocks."""
    seed: Optional[int] = None
    """Per-request seed; a line's seed is seed + its line number, so a job is reproducible."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings; generation ends before the first one and finish_reason is 'stop'."""
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    """Keep generating past EOS up to max_new_tokens (used by benchmarks)."""

    def merged(self, override: Optional[dict]) -> "SamplingSpec":
        """A copy with a line's `sampling` object applied; raises pydantic's ValidationError."""
        if not override:
            return self
        return SamplingSpec(**{**self.model_dump(), **override})


class FiltersSpec(_Strict):
    """Which samples become SFT records. Results and experience records always hold every sample."""

    drop_truncated: bool = False
    """Drop samples whose finish_reason is 'length'."""
    min_response_tokens: int = Field(0, ge=0)
    max_response_tokens: Optional[int] = Field(None, ge=1)
    dedup: bool = False
    """Drop exact-duplicate responses (normalized hash) within a shard."""
    min_reward: Optional[float] = None
    """Drop samples whose reward is below this (needs a reward: experience.reward_model/function/url)."""
    drop_constant_reward_groups: bool = False
    """Write no experience records for a prompt whose n samples all got the same reward (zero advantage: no
    gradient for GRPO-style trainers); counted in the manifest summary. results/ and sft/ are unaffected."""


RecordKind = Literal["results", "sft", "experience"]


class OutputSpec(_Strict):
    path: str
    """Directory (local or fsspec URL) that receives results/, sft/, experience/, errors/, manifest.json."""
    records: list[RecordKind] = Field(default_factory=lambda: ["results", "sft", "experience"])
    format: Literal["jsonl", "parquet"] = "jsonl"
    """Part file format; parquet writes .parquet parts with the schema in the README."""
    filters: FiltersSpec = Field(default_factory=FiltersSpec)

    @field_validator("records")
    @classmethod
    def _records_nonempty(cls, v):
        if not v:
            raise ValueError("name at least one of results, sft, experience")
        if len(set(v)) != len(v):
            raise ValueError("each record kind may appear once")
        return v


LogprobsMode = Literal["temperature", "raw", "processed"]
# a stored spec from before experience.logprobs_mode (2026-12-06) was produced with processed logprobs: it
# resumes in that mode (stored_spec); with a reference model, where processed is refused, in temperature mode
LEGACY_LOGPROBS_MODE: LogprobsMode = "processed"


class ExperienceSpec(_Strict):
    logprobs: bool = True
    """Record each sampled token's logprob under the policy."""
    logprobs_mode: LogprobsMode = "temperature"
    """Which distribution `logprobs` (and `ref_logprobs`, `top_logprobs`) are taken under. temperature:
    log-softmax of logits / T over the full vocabulary (T the sample's temperature, 1 for greedy rows), what
    PPO/GRPO trainers recompute; raw: log-softmax of the logits; processed: the distribution sampled from,
    after repetition penalty, top_k and top_p (no reference model: it cannot reproduce the cut)."""
    top_logprobs: int = Field(0, ge=0, le=20)
    """Per response token, the k most likely token ids with their logprobs (under logprobs_mode); 0 = off."""
    reference_model: Optional[str] = None
    """Checkpoint whose logprobs of the response give ref_logprobs and per-token kl."""
    reward_model: Optional[str] = None
    """Reward checkpoint (Ziya-LLaMA-7B-Reward layout or a 1-label sequence classifier): adds rewards.model."""
    reward_function: Optional[str] = None
    """'package.module:function' or 'path/to/file.py:function', called as f(prompt, response, metadata) ->
    float on the workers (built-ins: ziya_batch.rewards:exact_match, math_answer, json_schema). Adds
    rewards.<function name>."""
    reward_url: Optional[str] = None
    """http(s) endpoint receiving POST {"items": [{prompt, response, metadata}, ...]} and answering
    {"rewards": [float|null, ...]}: a sandbox running tests, a judge. Adds rewards.url."""
    reward_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    """Per call of reward_function, and per HTTP request to reward_url; past it that sample's reward is null."""
    reward_weights: dict[str, float] = Field(default_factory=dict)
    """Weight of each reward component by name ("model", the function's name, "url"); default 1 each.
    reward = the weighted sum, null if any component is null."""

    @field_validator("reward_function")
    @classmethod
    def _function_ref(cls, v):
        from .rewards import BUILTINS

        if v is not None and v not in BUILTINS:
            target, sep, name = v.rpartition(":")
            if not sep or not target or not name.isidentifier():
                raise ValueError(f"expected a built-in ({', '.join(BUILTINS)}), 'package.module:function' or "
                                 "'path/to/file.py:function'")
        return v

    @field_validator("reward_url")
    @classmethod
    def _http_url(cls, v):
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v

    def reward_names(self) -> list[str]:
        """The reward components this spec configures, by the names `rewards` and reward_weights use."""
        names = ["model"] if self.reward_model else []
        if self.reward_function:
            names.append(self.reward_function.rpartition(":")[2])
        return names + (["url"] if self.reward_url else [])

    @model_validator(mode="after")
    def _consistent(self):
        if self.logprobs_mode == "processed" and self.reference_model:
            raise ValueError("logprobs_mode 'processed' cannot be used with a reference_model (the reference cannot "
                             "reproduce the policy's top_k/top_p cut, so kl would be biased): use 'temperature'")
        unknown = sorted(set(self.reward_weights) - set(self.reward_names()))
        if unknown:
            raise ValueError(f"reward_weights names {', '.join(unknown)}, not a configured reward (configured: "
                             f"{', '.join(self.reward_names()) or 'none'})")
        return self


class EngineSpec(_Strict):
    max_num_seqs: int = Field(256, ge=1, le=4096)
    """Most sequences decoded together in one step."""
    max_num_batched_tokens: int = Field(2048, ge=16)
    """Token budget of one step (decode tokens plus prefill chunk)."""
    block_size: int = Field(16, ge=1, le=256)
    """Tokens per KV-cache block."""
    gpu_memory_fraction: float = Field(0.90, gt=0.0, le=1.0)
    """Share of GPU memory the engine may use; the KV cache gets what is left after weights."""
    cuda_graphs: bool = True
    """Replay decode steps from CUDA graphs (GPU only)."""
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    """KV cache element type: the model's dtype, or float8 e4m3 (twice the tokens in the same memory and half
    the bytes a decode step reads; K/V are rounded to 3 mantissa bits, so outputs differ slightly)."""
    schedule: Literal["fcfs", "longest-first", "tail-longest-first"] = "tail-longest-first"
    """Which waiting prompt starts first. tail-longest-first: arrival order until the prompts left fit the batch's
    seats, then those with the most max_new_tokens first, so the end of the work is not one long prompt started
    last (W1 on an H200: +3.8%, half of it +8.9%; see docs/BENCHMARKS.md). fcfs: arrival order. longest-first:
    all by max_new_tokens (worse where the KV cache bounds the batch). It orders work only: a line's output does
    not depend on it (beyond the rounding of the batch it runs in)."""


class ReliabilitySpec(_Strict):
    lease_s: float = Field(120.0, ge=1.0)
    """A claimed shard is requeued when its worker has not renewed the lease for this long."""
    max_retries: int = Field(3, ge=0, le=100)
    """Failed attempts after which a shard or line is dead-lettered (error code retries_exhausted)."""


class JobSpec(_Strict):
    name: str = Field(..., min_length=1, max_length=200)
    model: ModelSpec
    input: list[str] = Field(..., min_length=1)
    """Input JSONL files: local paths or fsspec URLs, globs allowed."""
    format: Literal["ziya", "openai-batch"] = "ziya"
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    output: OutputSpec
    experience: ExperienceSpec = Field(default_factory=ExperienceSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    reliability: ReliabilitySpec = Field(default_factory=ReliabilitySpec)
    shard_size: int = Field(512, ge=1, le=1_000_000)
    """Prompts per leased unit of work (and per output part)."""
    priority: int = Field(0, ge=-1000, le=1000)
    """Higher runs first; jobs of equal priority share workers fairly."""

    @field_validator("input", mode="before")
    @classmethod
    def _input_list(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _filters_have_rewards(self):
        if self.output.filters.drop_constant_reward_groups and not self.experience.reward_names():
            raise ValueError("output.filters.drop_constant_reward_groups needs a reward: set experience.reward_model, "
                             "reward_function or reward_url")
        return self

    @model_validator(mode="after")
    def _samples_fit_the_batch(self):
        # a prompt's n samples decode together: more than the engine's seats could never start
        if self.sampling.n > self.engine.max_num_seqs:
            raise ValueError(f"sampling.n ({self.sampling.n}) exceeds engine.max_num_seqs "
                             f"({self.engine.max_num_seqs}): raise max_num_seqs or lower n")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)

    def identity(self) -> str:
        """Stable id of 'this spec to this output path': submitting it again finds the same job and resumes it.
        It hashes what decides the output (model, input, sampling, records, filters, ...), defaults included,
        but not RUN_FIELDS: lowering engine.gpu_memory_fraction or max_num_seqs after an out-of-memory, or
        moving to model.tensor_parallel 2, resumes the job with the new values instead of starting another."""
        d = self.model_dump(mode="json")
        for *section, name in RUN_FIELDS:
            parent = d
            for key in section:
                parent = parent[key]
            del parent[name]
        return _hash(_without_new_defaults(d))

    def legacy_identity(self) -> str:
        """The id earlier releases (until 2026-11-29) gave this spec (the hash of every field): a job started under it
        resumes under it (runtime/submit.py)."""
        return _hash(_without_new_defaults(self.model_dump(mode="json")))


# How fast and where a job runs, not what it writes: a job submitted again with other values of these is the same
# job (JobSpec.identity), and runs on with the new ones (workers read a job's spec again every few seconds and build
# their engine with them; a changed lease applies at each shard's next renewal, never shorter than the one it was
# claimed with). Two limits: sampling.n must stay within engine.max_num_seqs (checked), and where the KV cache is
# smaller than the model's context (a tiny GPU budget; never at LLaMA-13B's 2,048 tokens on a data-center card),
# the memory settings bound the prompt plus output length a line may have.
RUN_FIELDS: tuple[tuple[str, ...], ...] = (
    ("model", "tensor_parallel"), ("model", "replicas"),
    ("engine", "max_num_seqs"), ("engine", "max_num_batched_tokens"), ("engine", "block_size"),
    ("engine", "gpu_memory_fraction"), ("engine", "cuda_graphs"), ("engine", "schedule"),
    ("reliability", "lease_s"), ("reliability", "max_retries"), ("priority",))


def run_field_changes(old: JobSpec, new: JobSpec) -> list[str]:
    """'field: old -> new' for each of RUN_FIELDS that `new` sets otherwise than `old` (a job resumed with them)."""
    changes = []
    for path in RUN_FIELDS:
        a, b = old, new
        for key in path:
            a, b = getattr(a, key), getattr(b, key)
        if a != b:
            changes.append(f"{'.'.join(path)}: {a} -> {b}")
    return changes


# Fields added after jobs were already running, with the value that leaves a job's identity as it was: a spec that
# keeps the default hashes as it did before the field existed (so an upgrade does not start its job again).
NEW_FIELD_DEFAULTS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("experience", "logprobs_mode"), "temperature"), (("experience", "top_logprobs"), 0),
    (("experience", "reward_function"), None), (("experience", "reward_url"), None),
    (("experience", "reward_timeout_s"), 30.0), (("experience", "reward_weights"), {}),
    (("output", "filters", "drop_constant_reward_groups"), False))


def _without_new_defaults(d: dict) -> dict:
    for (*section, name), default in NEW_FIELD_DEFAULTS:
        parent = d
        for key in section:
            parent = parent.get(key, {})
        if name in parent and parent[name] == default:
            del parent[name]
    return d


def stored_spec(data: dict, source: str = "stored job spec") -> "JobSpec":
    """A spec as a job stored it (Redis, a manifest). One stored before experience.logprobs_mode existed ran with
    processed logprobs, so it resumes in that mode (its parts stay consistent); with a reference model, where
    processed is refused, in temperature mode (its ref_logprobs were already taken at temperature 1)."""
    exp = data.get("experience") if isinstance(data, dict) else None
    if isinstance(exp, dict) and "logprobs_mode" not in exp and not exp.get("reference_model"):
        data = {**data, "experience": {**exp, "logprobs_mode": LEGACY_LOGPROBS_MODE}}
    return parse_spec(data, source)


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _all_fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _submodel_at(loc: tuple) -> type[BaseModel]:
    """The pydantic model that owns the field at `loc` (for 'did you mean' suggestions)."""
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return model
    return model


def format_validation_error(err: ValidationError, source: str = "job spec") -> str:
    """One line naming each wrong field, what is allowed, and the closest key for unknown ones."""
    parts = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after", "function-before")))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _submodel_at(loc)
            close = difflib.get_close_matches(str(loc[-1]), _all_fields(owner), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(_all_fields(owner))})"
            parts.append(f"unknown key '{dotted}'{hint}")
        elif e["type"] == "missing":
            parts.append(f"missing required key '{dotted}'")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            parts.append(f"'{dotted}': {msg} (got {e.get('input')!r})")
    return f"{source}: " + "; ".join(parts)


def parse_spec(data: Any, source: str = "job spec") -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of keys (name, model, input, output, ...), got {type(data).__name__}")
    try:
        return JobSpec(**data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML or JSON job spec (JSON is valid YAML) and validate it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job spec file") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read job spec: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML or JSON{where}: {getattr(err, 'problem', err)}") from None
    return parse_spec(data, str(path))
