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
    """Keep generating past EOS up to max_new_tokens (used by benchmarks). A constrained sample ignores it: its
    grammar decides where it ends."""
    json_schema: Optional[dict[str, Any]] = None
    """Structured output: every response that finishes ('stop') is JSON valid against this JSON Schema."""
    regex: Optional[str] = None
    """Structured output: every response that finishes matches this regex as a whole (Rust regex syntax: no
    look-around or backreferences)."""
    choice: Optional[list[str]] = None
    """Structured output: every response that finishes is exactly one of these strings."""
    json_whitespace: Literal["compact", "flexible"] = "compact"
    """With json_schema: 'compact' allows no whitespace between JSON tokens; 'flexible' lets the model add it."""

    @field_validator("json_schema", "regex", "choice")
    @classmethod
    def _compiles(cls, v, info):
        # the grammar library's reason for a constraint it cannot enforce: a spec error, or the line's
        # invalid_sampling error
        from .constraints import check
        if v is not None:
            check(**{info.field_name: v})
        return v

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [k for k in ("json_schema", "regex", "choice") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json_schema, regex and choice (got {' and '.join(given)})")
        return self

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
    """Drop samples whose reward is below this (needs experience.reward_model)."""


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


class ExperienceSpec(_Strict):
    logprobs: bool = True
    """Record each sampled token's logprob under the policy."""
    reference_model: Optional[str] = None
    """Checkpoint whose logprobs of the response give ref_logprobs and per-token kl."""
    reward_model: Optional[str] = None
    """Reward checkpoint (Ziya-LLaMA-7B-Reward layout or a 1-label sequence classifier): adds reward."""


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
        return _hash(d)

    def legacy_identity(self) -> str:
        """The id earlier releases (until 2026-11-29) gave this spec (the hash of every field): a job started under it
        resumes under it (runtime/submit.py)."""
        return _hash(self.model_dump(mode="json"))


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


# Sampling fields added after job ids were first handed out: hashed only when set, so a spec without them keeps
# the id it had (a job started before them resumes).
_HASHED_WHEN_SET = {"json_schema": None, "regex": None, "choice": None, "json_whitespace": "compact"}


def _hash(fields: dict) -> str:
    sampling = fields.get("sampling")
    if isinstance(sampling, dict):
        fields = {**fields, "sampling": {k: v for k, v in sampling.items()
                                         if k not in _HASHED_WHEN_SET or v != _HASHED_WHEN_SET[k]}}
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
