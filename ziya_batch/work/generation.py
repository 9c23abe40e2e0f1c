"""Turning one shard's lines into output records with the engine: parse, tokenize, generate, score, format.

Plain Python over the engine (no Redis, no Ray), so it is tested directly on the CPU.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from .. import errors, filters
from ..engine.types import Request
from ..errors import LineError
from ..prompts import default_id, line_id_of, parse_line
from ..records import (LineFailure, LineResult, PromptLine, SampleOutput, TooLongLine, experience_record,
                       openai_batch_error, openai_batch_record, openai_logprobs, result_record, sft_record)
from ..spec import ExperienceSpec, JobSpec, sampling_params
from .rewarding import score_rewards

if TYPE_CHECKING:
    from ..protocols import GenerationEngine
from .failures import EngineOutOfMemory, StorageAway, engine_calls

log = logging.getLogger(__name__)


def line_seed(seed: Optional[int], file: str, line: int) -> Optional[int]:
    """Each line's own seed, so a job's samples do not depend on batching, shards or workers."""
    if seed is None:
        return None
    return (seed * 1_000_003 + zlib.crc32(f"{file}:{line}".encode())) & 0x7FFF_FFFF


@dataclass
class ShardWork:
    """The parsed lines of one shard: what to generate and what is already an error line."""

    prompts: list[tuple[PromptLine, list[int]]] = field(default_factory=list)
    failures: list[LineFailure] = field(default_factory=list)


def parse_shard(lines: Iterable[tuple[int, bytes]], file: str, spec: JobSpec, tokenizer, max_model_len: int,
                bad_lines: frozenset = frozenset()) -> ShardWork:
    """Each line becomes a prompt or its own error line, whatever it holds: nothing a line does here fails the
    shard (only an out-of-memory, which is no line's fault, is raised)."""
    work = ShardWork()
    for line_no, raw in lines:
        if line_no in bad_lines:
            work.failures.append(LineFailure(line_id(raw, file, line_no, spec.format), file, line_no,
                                             errors.RETRIES_EXHAUSTED,
                                             "this line crashed generation on every attempt and was set aside"))
            continue
        try:
            pl = parse_line(raw, spec.format, file, line_no, spec.sampling)
            pl = replace(pl, logprobs_mode=spec.experience.logprobs_mode,
                         top_logprobs=max(pl.top_logprobs, spec.experience.top_logprobs))
            if pl.sampling.n > spec.engine.max_num_seqs:
                # a prompt's samples decode together: as the job's own n is checked at submit
                raise LineError(errors.INVALID_SAMPLING, f"sampling.n is {pl.sampling.n}, above the job's "
                                f"engine.max_num_seqs ({spec.engine.max_num_seqs}): its samples could never run "
                                "together")
            ids = tokenizer(pl.text).input_ids
            if len(ids) >= max_model_len:
                raise LineError(errors.PROMPT_TOO_LONG,
                                f"prompt is {len(ids)} tokens; the model's context is {max_model_len}")
            work.prompts.append((pl, ids))
        except LineError as err:
            work.failures.append(LineFailure(line_id(raw, file, line_no, spec.format), file, line_no,
                                             err.code, err.message))
        except Exception as err:  # noqa: BLE001 - the per-line boundary (the tokenizer on a hostile text, ...)
            if isinstance(err, MemoryError):     # the host ran out, not this line's fault (work/failures.py)
                raise
            work.failures.append(LineFailure(line_id(raw, file, line_no, spec.format), file, line_no,
                                             errors.INVALID_LINE, f"cannot prepare this line: {type(err).__name__}: {err}"))
    return work


def line_id(raw: bytes, file: str, line_no: int, fmt: str) -> str:
    """The id an error line carries: the line's own id (custom_id for openai-batch) if it can be read,
    else <file>:<line>. Never raises, whatever the line holds: a dead-lettered shard's lines all pass here.
    Plain json.loads, not the line parser's strict one: a line refused for a NaN still has a readable id."""
    import json

    if isinstance(raw, TooLongLine):
        return default_id(file, line_no)      # only its head was read
    try:
        obj = json.loads(raw)
        key = "custom_id" if fmt == "openai-batch" else "id"
        if isinstance(obj, dict):
            return line_id_of(obj.get(key), file, line_no)
    except Exception:  # noqa: BLE001 - an unreadable line (or id) is named by its place
        pass
    return default_id(file, line_no)


def dead_letter_failures(shard, fmt: str, message: str, read_lines: Callable) -> list[LineFailure]:
    """A dead-lettered shard's lines as retries_exhausted errors: the one thing left to do with it, so it cannot
    fail, or the shard would be dead-lettered again on every claim and its job never finish. `read_lines(shard)`
    gives its (line number, bytes); where the input cannot be read back (deleted, changed), each of the shard's
    num_lines lines is still written, numbered from its first line (blank lines between would shift them). A store
    that did not answer (StorageAway) is raised: the shard goes back untried and its lines keep their ids."""
    try:
        lines = list(read_lines(shard))
    except StorageAway:
        raise
    except Exception as err:  # noqa: BLE001 - whatever storage says, the shard's lines are given up on
        why = f"{message}; its input could not be read back ({type(err).__name__}: {err})"
        return [LineFailure(default_id(shard.file, shard.first_line + i), shard.file, shard.first_line + i,
                            errors.RETRIES_EXHAUSTED, why) for i in range(shard.num_lines)]
    return [LineFailure(line_id(raw, shard.file, no, fmt), shard.file, no, errors.RETRIES_EXHAUSTED, message)
            for no, raw in lines]


class ShardStream:
    """The requests of one or more shards in one engine at once, so the next shard's lines fill the batch while
    the last lines of the one before finish. Each shard's prompts are added under a key unique in the engine;
    a step turns finished requests into LineResults and reports the shards whose every line has finished."""

    def __init__(self, engine: "GenerationEngine"):
        self.engine = engine
        self._lines: dict[str, tuple[str, PromptLine, list[int]]] = {}   # request id -> (key, line, prompt ids)
        self._results: dict[str, list[LineResult]] = {}                  # key -> results so far
        self._left: dict[str, int] = {}                                  # key -> requests not finished

    def add(self, key: str, prompts: list[tuple[PromptLine, list[int]]]) -> None:
        self._results[key], self._left[key] = [], len(prompts)
        # lines that share a prompt prefix (a template's system prompt, a repeated prompt) start close together,
        # so its cached KV blocks are reused before they are evicted; step() puts results back in line order
        for pl, ids in sorted(prompts, key=lambda p: p[1]):
            request_id = f"{key}:{pl.file}:{pl.line}"
            self._lines[request_id] = (key, pl, ids)
            params = sampling_params(pl.sampling, seed=line_seed(pl.sampling.seed, pl.file, pl.line),
                                     logprobs_mode=pl.logprobs_mode, top_logprobs=pl.top_logprobs)
            with engine_calls():
                self.engine.add_request(Request(request_id, ids, params))

    def _pieces(self, ids: list[int]) -> list[str]:
        tok = getattr(self.engine, "tokenizer", None)
        return tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]

    def admitted(self) -> bool:
        """Every line added has been admitted by the scheduler: the batch has room for another shard."""
        return not self.engine.scheduler.waiting

    def step(self) -> list[tuple[str, list[LineResult]]]:
        """One engine step; the shards now finished (key, results), forgotten here."""
        with engine_calls():
            outs = self.engine.step()
        for out in outs:
            key, pl, ids = self._lines.pop(out.request_id)
            samples = [SampleOutput(c.index, c.token_ids, c.text, c.finish_reason, c.logprobs,
                                    top_logprobs=c.top_logprobs) for c in out.completions]
            if pl.want_logprobs:
                for smp in samples:
                    smp.openai_logprobs = openai_logprobs(smp.token_ids, smp.logprobs, smp.top_logprobs,
                                                          self._pieces, pl.openai_chat)
            self._results[key].append(LineResult(pl, ids, samples, cached_tokens=out.num_cached_tokens))
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


def generate_lines(engine: "GenerationEngine", prompts: list[tuple[PromptLine, list[int]]],
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
        except EngineOutOfMemory:
            raise                # not a line's failure: the worker gives the shard back (failures.decide)
        except Exception as err:  # noqa: BLE001 - any other engine failure is isolated to its line
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
        kept = filters.experience_groups(results, spec.output.filters)
        parts["experience"] = [rec for r in kept for rec in filters.add_group_fields(
            [experience_record(r, s) for s in r.samples])]
        if not spec.experience.logprobs:
            # kl and kl_k3 are made of the logprobs (kl + ref_logprobs gives them back): none of the three is written
            for rec in parts["experience"]:
                rec["logprobs"] = rec["kl"] = rec["kl_k3"] = None
    parts["errors"] = [f.record() for f in failures]
    return parts


def score_results(results: list[LineResult], ref_scorer=None, reward_scorer=None,
                  experience: Optional[ExperienceSpec] = None) -> None:
    """Add reference logprobs and rewards to every sample, in batches over the whole shard. ref_logprobs use
    the policy's logprobs definition (temperature mode: the sample's temperature; raw: 1)."""
    pairs = [(r, s) for r in results for s in r.samples]
    if not pairs:
        return
    if ref_scorer is not None:
        temps = [r.line.sampling.temperature if r.line.logprobs_mode == "temperature" else 1.0 for r, _ in pairs]
        ref = ref_scorer.logprobs([r.prompt_ids for r, _ in pairs], [s.token_ids for _, s in pairs], temps)
        for (_, s), lp in zip(pairs, ref):
            s.ref_logprobs = lp
    score_rewards(pairs, reward_scorer, experience)

