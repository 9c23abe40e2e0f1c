"""The job spec: what to generate, from what, with which model, and where to write it.

Parsed from YAML or JSON and validated when built. The sampling.* and engine.* defaults are the engine's own
(SamplingParams and EngineConfig in engine/types.py, the sampling ones the model card's): the fields here read
them from there, and `sampling_params` / `engine_config` convert a spec into those objects by field name, so a
default or a field mapping is written once. Other defaults are defined here once and used by the CLI, the HTTP
API and the docs alike. Reading a spec file, its bounds, its error messages and the identity hashes are
spec_load.py's (plain data, below the models); the names are re-exported here, where callers import them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .engine.types import (JSON_WHITESPACE, KV_CACHE_DTYPES, LOGPROBS_MODES, SCHEDULE_POLICIES, EngineConfig,
                           SamplingParams)
from .errors import SpecError
from .redact import has_userinfo
from .spec_load import (check_spec_data, identity_hash, legacy_identity_hash, read_spec_file, show_text,
                        validation_error_line)
# where callers (jobs/, queue/, api/, tests) import them from: spec_load.py's names they use
from .spec_load import (MAX_FIELD_ERRORS, MAX_SPEC_BYTES, MAX_SPEC_SIZE, NEW_FIELD_DEFAULTS,  # noqa: F401
                        RUN_FIELDS, VALUE_CHARS, run_field_changes, show_value)

_SP, _EC = SamplingParams, EngineConfig      # the homes of the sampling.* and engine.* defaults

# Upper bounds a sane spec stays far below; past them a value is a typo or an attack, and would otherwise be
# queued and then fail every line (a top_k of 10**20) or hold a worker for days (a lease of a year).
MAX_TOKENS = 1_000_000          # max/min_new_tokens, filters' token counts: far past any context length
MAX_VOCAB = 1_000_000           # top_k and token ids: Ziya's vocabulary is 39,410; no tokenizer nears this
MAX_SEED = 2**63 - 1            # seeds are signed 64-bit in torch's generators
MAX_STOPS = 64                  # stop strings (and stop token ids) per request
MAX_STOP_CHARS = 1_000          # one stop string
MAX_LOCATION_CHARS = 4_096      # a path or URL (PATH_MAX on Linux)
MAX_INPUTS = 10_000             # input entries (each may be a glob)
MAX_CONSTRAINT_CHARS = 100_000  # a regex, or a JSON schema as JSON text: grammars past this are a mistake or an attack
MAX_CHOICES = 1_000             # choice strings, each at most MAX_STOP_CHARS
MAX_LEASE_S = 86_400.0          # a day: a shard that runs longer wants a smaller shard_size

MAX_LOCATION_DEPTH = 256        # slashes in a path or URL: deeper is a typo or an attack (os.makedirs recurses a level
                                # at a time: ~1,000 levels, well within PATH_MAX, ended in a RecursionError)


def _not_too_deep(value: str, info: ValidationInfo) -> str:
    # at submit only (_submitting): a job an earlier release queued with a deeper path stays readable
    if value.count("/") > MAX_LOCATION_DEPTH and _submitting(info):
        raise ValueError(f"a path more than {MAX_LOCATION_DEPTH} folders deep")
    return value


def _no_credentials(value: str, info: ValidationInfo) -> str:
    # at submit only (_submitting): a job an earlier release queued with one stays readable (shown masked)
    if has_userinfo(value) and _submitting(info):
        raise ValueError("no user or password in a URL (user:password@host): specs are kept in Redis and manifest.json "
                         "and shown by status and the API; give credentials through the environment (README)")
    return value


Location = Annotated[str, Field(min_length=1, max_length=MAX_LOCATION_CHARS), AfterValidator(_not_too_deep),
                     AfterValidator(_no_credentials)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)   # no NaN/inf in any float field


class ModelSpec(_Strict):
    path: Optional[Location] = None
    """Merged Hugging Face checkpoint directory (local path or fsspec URL)."""
    base: Optional[Location] = None
    """LLaMA base checkpoint; with `delta`, merged once into the cache on first use (model card step 2)."""
    delta: Optional[Location] = None
    """Ziya delta checkpoint, applied to `base`."""
    dtype: Literal["float16", "bfloat16", "float32"] = _EC.dtype
    """Weight and activation dtype on GPUs; the CPU always runs float32."""
    tensor_parallel: int = Field(1, ge=1, le=64)
    """GPU actors one replica is sharded over (heads and MLP columns split K ways)."""
    replicas: Union[Literal["auto"], int] = "auto"
    """Model copies; auto = GPUs // tensor_parallel (one on a machine without GPUs)."""
    trust_remote_code: bool = _EC.trust_remote_code
    """Allow custom modelling code from the checkpoint. Off unless you trust the checkpoint."""
    quantization: Optional[Literal["fp8"]] = _EC.quantization
    """fp8: the linear layers' weights in float8 e4m3 with per-output-channel scales and activations quantised
    per token (W8A8), half the weight memory and bytes a decode step reads; outputs differ slightly from
    float16. Quantised when the engine loads a float16 checkpoint, or read as is from one `ziya-batch
    quantize` wrote. Needs GPUs of compute capability 8.9 or newer (Ada, Hopper): elsewhere the engine
    refuses to load. null: weights in `dtype` (an FP8 checkpoint's are then widened to it)."""

    @field_validator("replicas")
    @classmethod
    def _replicas_positive(cls, v):
        if isinstance(v, int) and not 1 <= v <= 4096:
            raise ValueError("must be 'auto' or an integer from 1 to 4096")
        return v

    @model_validator(mode="after")
    def _path_or_delta(self):
        if self.path and (self.base or self.delta):
            raise ValueError("give either path, or base and delta, not both")
        if not self.path and not (self.base and self.delta):
            raise ValueError("give path (a merged checkpoint), or both base and delta")
        return self


class SamplingSpec(_Strict):
    max_new_tokens: int = Field(_SP.max_new_tokens, ge=1, le=MAX_TOKENS)
    """Upper bound on generated tokens per sample."""
    min_new_tokens: int = Field(_SP.min_new_tokens, ge=0, le=MAX_TOKENS)
    """EOS is not sampled before this many tokens (the benchmark uses it to fix output lengths)."""
    temperature: float = Field(_SP.temperature, ge=0.0, le=100.0)
    """0 means greedy."""
    top_p: float = Field(_SP.top_p, gt=0.0, le=1.0)
    top_k: int = Field(_SP.top_k, ge=0, le=MAX_VOCAB)
    """0 means no top-k cut."""
    repetition_penalty: float = Field(_SP.repetition_penalty, gt=0.0, le=10.0)
    """CTRL-style penalty on tokens already in the prompt or the response; 1.0 is off."""
    n: int = Field(_SP.n, ge=1, le=1024)
    """Samples per prompt; they share the prompt's KV blocks."""
    seed: Optional[int] = Field(_SP.seed, ge=0, le=MAX_SEED)
    """Per-request seed; each line samples with its own seed made from it, the input file's path and the line
    number, so a job is reproducible."""
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=lambda: list(_SP.stop), max_length=MAX_STOPS)
    """Stop strings; generation ends before the first one and finish_reason is 'stop'."""
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=MAX_VOCAB)]] = Field(
        default_factory=lambda: list(_SP.stop_token_ids), max_length=MAX_STOPS)
    ignore_eos: bool = _SP.ignore_eos
    """Keep generating past EOS up to max_new_tokens (used by benchmarks). A constrained sample ignores it: its
    grammar decides where it ends."""
    json_schema: Optional[dict[str, Any]] = _SP.json_schema
    """Structured output: every response that finishes ('stop') is JSON valid against this JSON Schema."""
    regex: Optional[str] = Field(_SP.regex, min_length=1, max_length=MAX_CONSTRAINT_CHARS)
    """Structured output: every response that finishes matches this regex as a whole (Rust regex syntax: no
    look-around or backreferences)."""
    choice: Optional[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]]] = Field(
        _SP.choice, min_length=1, max_length=MAX_CHOICES)
    """Structured output: every response that finishes is exactly one of these strings."""
    json_whitespace: Literal[JSON_WHITESPACE] = _SP.json_whitespace
    """With json_schema: 'compact' allows no whitespace between JSON tokens; 'flexible' lets the model add it."""

    @field_validator("json_schema", "regex", "choice")
    @classmethod
    def _compiles(cls, v, info):
        # the grammar library's reason for a constraint it cannot enforce: a spec error, or the line's
        # invalid_sampling error
        from .engine.constraints import check
        if info.field_name == "json_schema" and v is not None:
            size = len(json.dumps(v, ensure_ascii=False))
            if size > MAX_CONSTRAINT_CHARS:
                raise ValueError(f"is {size:,} characters as JSON; at most {MAX_CONSTRAINT_CHARS:,}")
        if v is not None:
            check(**{info.field_name: v})
        return v

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [k for k in ("json_schema", "regex", "choice") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json_schema, regex and choice (got {' and '.join(given)})")
        return self

    @model_validator(mode="after")
    def _min_within_max(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens "
                             f"({self.max_new_tokens})")
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
    min_response_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    max_response_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)
    dedup: bool = False
    """Drop exact-duplicate responses (normalized hash) within a shard."""
    min_reward: Optional[float] = None
    """Drop samples whose reward is below this (needs a reward: experience.reward_model/function/url)."""
    drop_constant_reward_groups: bool = False
    """Write no experience records for a prompt whose n samples all got the same reward (zero advantage: no
    gradient for GRPO-style trainers); counted in the manifest summary. results/ and sft/ are unaffected."""

    @model_validator(mode="after")
    def _lengths_leave_room(self, info: ValidationInfo):
        if self.max_response_tokens is not None and self.min_response_tokens > self.max_response_tokens \
                and _submitting(info):
            raise ValueError(f"output.filters.min_response_tokens ({self.min_response_tokens}) is above "
                             f"max_response_tokens ({self.max_response_tokens}): no sample could be kept")
        return self


RecordKind = Literal["results", "sft", "experience"]


class OutputSpec(_Strict):
    path: Location
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


LogprobsMode = Literal[LOGPROBS_MODES]        # Literal of a tuple: Literal["temperature", "raw", ...]
# a stored spec from before experience.logprobs_mode (2026-12-06) was produced with processed logprobs: it
# resumes in that mode (stored_spec); with a reference model, where processed is refused, in temperature mode
LEGACY_LOGPROBS_MODE: LogprobsMode = "processed"


class ExperienceSpec(_Strict):
    logprobs: bool = True
    """Record each sampled token's logprob under the policy."""
    logprobs_mode: LogprobsMode = _SP.logprobs_mode
    """Which distribution `logprobs` (and `ref_logprobs`, `top_logprobs`) are taken under. temperature:
    log-softmax of logits / T over the full vocabulary (T the sample's temperature, 1 for greedy rows), what
    PPO/GRPO trainers recompute; raw: log-softmax of the logits; processed: the distribution sampled from,
    after repetition penalty, top_k and top_p (no reference model: it cannot reproduce the cut)."""
    top_logprobs: int = Field(_SP.top_logprobs, ge=0, le=20)
    """Per response token, the k most likely token ids with their logprobs (under logprobs_mode); 0 = off."""
    reference_model: Optional[Location] = None
    """Checkpoint whose logprobs of the response give ref_logprobs and per-token kl."""
    reward_model: Optional[Location] = None
    """Reward checkpoint (Ziya-LLaMA-7B-Reward layout or a 1-label sequence classifier): adds rewards.model."""
    reward_function: Optional[str] = Field(None, max_length=4096)
    """'package.module:function' or 'path/to/file.py:function', called as f(prompt, response, metadata) ->
    float on the workers (built-ins: ziya_batch.rewards:exact_match, math_answer, json_schema). Adds
    rewards.<function name>."""
    reward_url: Optional[Location] = None
    """http(s) endpoint receiving POST {"items": [{prompt, response, metadata}, ...]} and answering
    {"rewards": [float|null, ...]}: a sandbox running tests, a judge. Adds rewards.url."""
    reward_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    """Per call of reward_function, and per HTTP request to reward_url; past it that sample's reward is null."""
    reward_weights: dict[str, float] = Field(default_factory=dict, max_length=64)
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
    max_num_seqs: int = Field(_EC.max_num_seqs, ge=1, le=4096)
    """Most sequences decoded together in one step."""
    max_num_batched_tokens: int = Field(_EC.max_num_batched_tokens, ge=16, le=MAX_TOKENS)
    """Token budget of one step (decode tokens plus prefill chunk)."""
    block_size: int = Field(_EC.block_size, ge=1, le=256)
    """Tokens per KV-cache block."""
    gpu_memory_fraction: float = Field(_EC.gpu_memory_fraction, gt=0.0, le=1.0)
    """Share of GPU memory the engine may use; the KV cache gets what is left after weights."""
    cuda_graphs: bool = _EC.cuda_graphs
    """Replay decode steps from CUDA graphs (GPU only)."""
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = _EC.kv_cache_dtype
    """KV cache element type: the model's dtype, or float8 e4m3 (twice the tokens in the same memory and half
    the bytes a decode step reads; K/V are rounded to 3 mantissa bits, so outputs differ slightly)."""
    schedule: Literal[SCHEDULE_POLICIES] = _EC.schedule
    """Which waiting prompt starts first. tail-longest-first: arrival order until the prompts left fit the batch's
    seats, then those with the most max_new_tokens first, so the end of the work is not one long prompt started
    last (W1 on an H200: +3.8%, half of it +8.9%; see docs/BENCHMARKS.md). fcfs: arrival order. longest-first:
    all by max_new_tokens (worse where the KV cache bounds the batch). It orders work only: a line's output does
    not depend on it (beyond the rounding of the batch it runs in)."""
    fp8_fast_accum: bool = _EC.fp8_fast_accum
    """With model.quantization fp8: the FP8 matrix multiplies accumulate without the tensor cores' periodic
    promotion to float32 (W1 on an H100: +5%; about 1% fewer prompts keep float16's greedy output; see
    docs/BENCHMARKS.md). Needs model.quantization fp8."""
    adaptive_step_size: bool = _EC.adaptive_step_size
    """Size each step that carries prompt tokens by what the GPU's matrix multiplies were measured to cost at each
    step size (a few hundred prompt tokens beside many decoding sequences, up to max_num_batched_tokens beside few)
    instead of always filling max_num_batched_tokens (W1 on an H100: float16 +2.8%, FP8 the same; see
    docs/BENCHMARKS.md). Off: every step fills the budget. It orders work only: since the sizes follow measured
    timings, two runs may batch prompts differently, and a line's output depends on that no more than on the
    rounding of the batch it runs in (as with schedule). GPU only (on the CPU every step fills the budget)."""
    prefix_caching: bool = _EC.prefix_caching
    """Reuse the KV blocks of a prompt prefix computed before (a shared system prompt or few-shot examples, the
    same prompt again) instead of computing it for every line; cached blocks are evicted, least recently used
    first, when memory is needed. Speed only: greedy outputs are the same with it off."""


class ReliabilitySpec(_Strict):
    lease_s: float = Field(120.0, ge=1.0, le=MAX_LEASE_S)
    """A claimed shard is requeued when its worker has not renewed the lease for this long."""
    max_retries: int = Field(3, ge=0, le=100)
    """Failed attempts after which a shard or line is dead-lettered (error code retries_exhausted)."""


class JobSpec(_Strict):
    name: str = Field(..., min_length=1, max_length=200)
    model: ModelSpec
    input: list[Location] = Field(..., min_length=1, max_length=MAX_INPUTS)
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
    def _filters_have_rewards(self, info: ValidationInfo):
        filters = self.output.filters
        for name, wanted in (("drop_constant_reward_groups", filters.drop_constant_reward_groups),
                             ("min_reward", filters.min_reward is not None and _submitting(info))):
            if wanted and not self.experience.reward_names():
                # without one every sample has no reward: min_reward would drop every SFT record
                raise ValueError(f"output.filters.{name} needs a reward: set experience.reward_model, "
                                 "reward_function or reward_url")
        return self

    @model_validator(mode="after")
    def _fast_accum_needs_fp8(self):
        if self.engine.fp8_fast_accum and self.model.quantization != "fp8":
            raise ValueError("engine.fp8_fast_accum applies to FP8 weights: set model.quantization: fp8, or leave "
                             "fp8_fast_accum out")
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
        return identity_hash(self.model_dump(mode="json"))

    def legacy_identity(self) -> str:
        """The id earlier releases (until 2026-11-29) gave this spec (the hash of every field): a job started under it
        resumes under it (jobs/submit.py)."""
        return legacy_identity_hash(self.model_dump(mode="json"))


def stored_spec(data: dict, source: str = "stored job spec") -> "JobSpec":
    """A spec as a job stored it (Redis, a manifest). One stored before experience.logprobs_mode existed ran with
    processed logprobs, so it resumes in that mode (its parts stay consistent); with a reference model, where
    processed is refused, in temperature mode (its ref_logprobs were already taken at temperature 1)."""
    exp = data.get("experience") if isinstance(data, dict) else None
    if isinstance(exp, dict) and "logprobs_mode" not in exp and not exp.get("reference_model"):
        data = {**data, "experience": {**exp, "logprobs_mode": LEGACY_LOGPROBS_MODE}}
    return parse_spec(data, source, stored=True)


def _submitting(info: ValidationInfo) -> bool:
    """Whether a spec is being submitted, not read back as a job stored it: checks added since a release are
    made at submit only, so a job an earlier release queued can still be read, run and finalized."""
    return not (isinstance(info.context, dict) and info.context.get("stored"))


_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
_ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineConfig))


def sampling_params(s: SamplingSpec, **given) -> SamplingParams:
    """The engine's SamplingParams of a (line's) sampling spec: every field of the same name, lists as tuples,
    json_schema as its JSON text (hashable: the engine's grammar cache key); `given` replaces fields (the worker
    passes each line's own seed)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in s if k in _SAMPLING_FIELDS}
    if s.json_schema is not None:
        values["json_schema"] = json.dumps(s.json_schema, sort_keys=True, ensure_ascii=False)
    return SamplingParams(**{**values, **given})


def engine_config(spec: JobSpec, model_path: str, device: str) -> EngineConfig:
    """The engine's EngineConfig of a job: its engine.* fields and the model.* fields the engine reads (dtype,
    trust_remote_code), each to the config field of the same name."""
    values = {k: v for section in (spec.model, spec.engine) for k, v in section if k in _ENGINE_FIELDS}
    return EngineConfig(model_path=model_path, device=device, **values)


# the spec's models by class name, for format_validation_error
_SPEC_MODELS: dict[str, type[BaseModel]] = {m.__name__: m for m in (
    JobSpec, ModelSpec, SamplingSpec, FiltersSpec, OutputSpec, ExperienceSpec, EngineSpec, ReliabilitySpec)}


def format_validation_error(err: ValidationError, source: str = "job spec") -> str:
    """One line naming each wrong field of a job spec (or a part of one), what is allowed, and the closest key for
    unknown ones; a wrong value is quoted by at most its first VALUE_CHARS characters. Unknown keys are matched
    against the part that was validated (pydantic names it in err.title: a line's `sampling` object is a
    SamplingSpec, whose keys are the ones to suggest), a whole JobSpec otherwise."""
    root = _SPEC_MODELS.get(getattr(err, "title", None), JobSpec)
    return validation_error_line(err, root, source)


def parse_spec(data: Any, source: str = "job spec", stored: bool = False) -> JobSpec:
    """A JobSpec from `data`, or SpecError (one line). stored: read back as a job stored it (checks added after
    a job was queued do not apply to it: _submitting)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of keys (name, model, input, output, ...), got {type(data).__name__}")
    check_spec_data(data, source)
    try:
        if stored:
            return JobSpec.model_validate(data, context={"stored": True})
        return JobSpec(**data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None
    except TypeError as err:       # keys that are not strings (YAML allows `1: x`, `? [a]: b`)
        raise SpecError(f"{source}: every key must be a string ({show_text(str(err))})") from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML or JSON job spec (JSON is valid YAML) and validate it. Only a regular file of at most
    MAX_SPEC_BYTES is read; whatever its content, the result is a JobSpec or one SpecError line."""
    return parse_spec(read_spec_file(path), str(path))
