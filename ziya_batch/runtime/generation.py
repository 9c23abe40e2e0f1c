"""Turning one shard's lines into output records with the engine: parse, tokenize, generate, score, format.

Plain Python over the engine (no Redis, no Ray), so it is tested directly on the CPU.
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from .. import errors, filters
from ..engine.types import Request, SamplingParams
from ..errors import LineError
from ..prompts import default_id, parse_line
from ..records import (LineFailure, LineResult, PromptLine, SampleOutput, experience_record, openai_batch_error,
                       openai_batch_record, result_record, sft_record)
from ..spec import JobSpec, SamplingSpec

log = logging.getLogger(__name__)


def line_seed(seed: Optional[int], file: str, line: int) -> Optional[int]:
    """Each line's own seed, so a job's samples do not depend on batching, shards or workers."""
    if seed is None:
        return None
    return (seed * 1_000_003 + zlib.crc32(f"{file}:{line}".encode())) & 0x7FFF_FFFF


def sampling_params(s: SamplingSpec, file: str, line: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens, temperature=s.temperature,
        top_p=s.top_p, top_k=s.top_k, repetition_penalty=s.repetition_penalty, n=s.n,
        seed=line_seed(s.seed, file, line), stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        json_schema=None if s.json_schema is None else json.dumps(s.json_schema, sort_keys=True, ensure_ascii=False),
        regex=s.regex, choice=tuple(s.choice or ()), json_whitespace=s.json_whitespace)


@dataclass
class ShardWork:
    """The parsed lines of one shard: what to generate and what is already an error line."""

    prompts: list[tuple[PromptLine, list[int]]] = field(default_factory=list)
    failures: list[LineFailure] = field(default_factory=list)


def parse_shard(lines: Iterable[tuple[int, bytes]], file: str, spec: JobSpec, tokenizer, max_model_len: int,
                bad_lines: frozenset = frozenset()) -> ShardWork:
    work = ShardWork()
    for line_no, raw in lines:
        if line_no in bad_lines:
            work.failures.append(LineFailure(line_id(raw, file, line_no, spec.format), file, line_no,
                                             errors.RETRIES_EXHAUSTED,
                                             "this line crashed generation on every attempt and was set aside"))
            continue
        try:
            pl = parse_line(raw, spec.format, file, line_no, spec.sampling)
            ids = tokenizer(pl.text).input_ids
            if len(ids) >= max_model_len:
                raise LineError(errors.PROMPT_TOO_LONG,
                                f"prompt is {len(ids)} tokens; the model's context is {max_model_len}")
            work.prompts.append((pl, ids))
        except LineError as err:
            work.failures.append(LineFailure(line_id(raw, file, line_no, spec.format), file, line_no,
                                             err.code, err.message))
    return work


def line_id(raw: bytes, file: str, line_no: int, fmt: str) -> str:
    """The id an error line carries: the line's own id (custom_id for openai-batch) if it can be read,
    else <file>:<line>."""
    import json

    try:
        obj = json.loads(raw)
        key = "custom_id" if fmt == "openai-batch" else "id"
        if isinstance(obj, dict) and obj.get(key) is not None:
            return str(obj[key])
    except (ValueError, UnicodeDecodeError):
        pass
    return default_id(file, line_no)


class ShardStream:
    """The requests of one or more shards in one engine at once, so the next shard's lines fill the batch while
    the last lines of the one before finish. Each shard's prompts are added under a key unique in the engine;
    a step turns finished requests into LineResults and reports the shards whose every line has finished."""

    def __init__(self, engine):
        self.engine = engine
        self._lines: dict[str, tuple[str, PromptLine, list[int]]] = {}   # request id -> (key, line, prompt ids)
        self._results: dict[str, list[LineResult]] = {}                  # key -> results so far
        self._left: dict[str, int] = {}                                  # key -> requests not finished

    def add(self, key: str, prompts: list[tuple[PromptLine, list[int]]]) -> None:
        self._results[key], self._left[key] = [], len(prompts)
        for pl, ids in prompts:
            request_id = f"{key}:{pl.file}:{pl.line}"
            self._lines[request_id] = (key, pl, ids)
            self.engine.add_request(Request(request_id, ids, sampling_params(pl.sampling, pl.file, pl.line)))

    def admitted(self) -> bool:
        """Every line added has been admitted by the scheduler: the batch has room for another shard."""
        return not self.engine.scheduler.waiting

    def step(self) -> list[tuple[str, list[LineResult]]]:
        """One engine step; the shards now finished (key, results), forgotten here."""
        for out in self.engine.step():
            key, pl, ids = self._lines.pop(out.request_id)
            samples = [SampleOutput(c.index, c.token_ids, c.text, c.finish_reason, c.logprobs)
                       for c in out.completions]
            self._results[key].append(LineResult(pl, ids, samples))
            self._left[key] -= 1
        done = [key for key, left in self._left.items() if left == 0]
        for key in done:
            del self._left[key]
        # in line order, as the prompts came: the order scoring batches them in
        return [(key, sorted(self._results.pop(key), key=lambda r: (r.line.file, r.line.line))) for key in done]

    def abort(self, key: Optional[str] = None) -> None:
        """Drop one shard's requests (every shard's without a key) from the engine."""
        for request_id in [r for r, (k, _, _) in self._lines.items() if key is None or k == key]:
            self.engine.abort(request_id)
            del self._lines[request_id]
        for k in [k for k in self._left if key is None or k == key]:
            del self._left[k], self._results[k]


def generate_lines(engine, prompts: list[tuple[PromptLine, list[int]]],
                   before_line: Optional[Callable[[int], None]] = None,
                   one_by_one: bool = False) -> tuple[list[LineResult], list[LineFailure]]:
    """Generate every prompt. A batch that raises is split in halves until the line that raises stands
    alone; that line becomes a generation_failed error and the rest are generated. An out-of-memory is raised
    instead (no line's fault). `one_by_one` (with `before_line` called before each) is the isolate mode used
    after a worker process died on a shard."""
    results: list[LineResult] = []
    failures: list[LineFailure] = []

    def run(batch):
        stream = ShardStream(engine)
        done = []
        try:
            stream.add("batch", batch)
            while not done:
                done = stream.step()
        except Exception:
            stream.abort()       # a failed batch's requests must not stay in the engine for the halves
            raise
        results.extend(done[0][1])

    def bisect(batch):
        try:
            run(batch)
        except Exception as err:  # noqa: BLE001 - any engine failure is isolated to its line
            if out_of_memory(err):
                raise            # not a line's failure: the worker gives the shard back (Worker._finish)
            if len(batch) == 1:
                pl = batch[0][0]
                log.warning("line %s:%d failed generation: %s", pl.file, pl.line, err)
                failures.append(LineFailure(pl.id, pl.file, pl.line, errors.GENERATION_FAILED,
                                            f"{type(err).__name__}: {err}"))
                return
            mid = len(batch) // 2
            bisect(batch[:mid])
            bisect(batch[mid:])

    if one_by_one:
        for item in prompts:
            if before_line is not None:
                before_line(item[0].line)
            bisect([item])
    elif prompts:
        bisect(prompts)
    return results, failures


def build_parts(spec: JobSpec, results: list[LineResult], failures: list[LineFailure]) -> dict[str, list[dict]]:
    """The records of every kind the spec asks for, plus errors (always present, maybe empty)."""
    results = sorted(results, key=lambda r: (r.line.file, r.line.line))
    failures = sorted(failures, key=lambda f: (f.file, f.line))
    parts: dict[str, list[dict]] = {}
    if spec.format == "openai-batch":
        parts["results"] = [openai_batch_record(r) for r in results]
        parts["errors"] = [openai_batch_error(f) for f in failures]
        return parts
    kinds = spec.output.records
    if "results" in kinds:
        parts["results"] = [result_record(r, s) for r in results for s in r.samples]
    if "sft" in kinds:
        parts["sft"] = [sft_record(r, s) for r, s in filters.filter_sft(results, spec.output.filters)]
    if "experience" in kinds:
        parts["experience"] = [rec for r in results for rec in filters.add_group_fields(
            [experience_record(r, s) for s in r.samples])]
        if not spec.experience.logprobs:
            for rec in parts["experience"]:
                rec["logprobs"] = None
    parts["errors"] = [f.record() for f in failures]
    return parts


def score_results(results: list[LineResult], ref_scorer=None, reward_scorer=None) -> None:
    """Add reference logprobs and rewards to every sample, in batches over the whole shard."""
    pairs = [(r, s) for r in results for s in r.samples]
    if not pairs:
        return
    if ref_scorer is not None:
        ref = ref_scorer.logprobs([r.prompt_ids for r, _ in pairs], [s.token_ids for _, s in pairs])
        for (_, s), lp in zip(pairs, ref):
            s.ref_logprobs = lp
    if reward_scorer is not None:
        queries = [r.line.messages if r.line.messages is not None else r.line.query for r, _ in pairs]
        rewards = reward_scorer.score(queries, [s.text for _, s in pairs])
        for (_, s), rw in zip(pairs, rewards):
            s.reward = float(rw)


def out_of_memory(err: BaseException) -> bool:
    """A device or host allocation failure (torch's OutOfMemoryError, or the text CUDA, cuBLAS and the CPU
    allocator use): the memory the settings left ran out, which no line causes alone."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return any(s in text for s in ("out of memory", "cublas_status_alloc_failed", "can't allocate memory"))
