"""Plain data passed between layers, and the JSON records written to the output (the README's Outputs)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from .engine.types import SamplingParams
from .errors import MESSAGE_CHARS, short_text, utf8_safe  # noqa: F401 - re-exported: line records' message bound

if TYPE_CHECKING:
    from .spec import SamplingSpec


@dataclass(frozen=True)
class ShardRef:
    """One leased unit of work: a byte range of one input file. Redis stores this, never the prompts."""

    job_id: str
    index: int          # shard number = output part number
    file: str           # fsspec URL or local path of the input file
    start: int          # first byte (inclusive)
    end: int            # last byte (exclusive); the range holds whole lines
    first_line: int     # 1-based line number of the line at `start`
    num_lines: int
    # a local file's "st_dev:st_ino" as the indexer opened it: read_shard refuses any other file found at `file`
    # later (a symlink swapped in after the HTTP API checked where it points; io.inputs.same_file). A string, so
    # Redis's Lua never rounds it. None: nothing to compare (object storage; shards queued before 2026-12-07)
    identity: Optional[str] = None


# the OpenAI endpoints this server answers: an openai-batch line's url is one of them (a batch's endpoint too)
CHAT_COMPLETIONS = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OPENAI_ENDPOINTS = (CHAT_COMPLETIONS, COMPLETIONS)


@dataclass(frozen=True)
class PromptLine:
    """One valid input line, ready to generate."""

    id: str
    file: str
    line: int                                   # 1-based
    text: str                                   # the full Ziya-format prompt
    sampling: "SamplingSpec"
    query: Optional[str] = None                 # single-turn prompt as given
    messages: Optional[list] = None             # multi-turn conversation as given
    endpoint: Optional[str] = None              # openai-batch: the request's endpoint, one of OPENAI_ENDPOINTS
    model_name: Optional[str] = None            # openai-batch: body.model, echoed back
    metadata: Optional[dict] = None             # the line's other fields (labels: an answer, a schema), as given
    logprobs_mode: str = SamplingParams.logprobs_mode    # experience.logprobs_mode of the job
    top_logprobs: int = SamplingParams.top_logprobs      # per token (the job's, or an OpenAI request's)
    want_logprobs: bool = False                 # openai-batch: the request asked for logprobs

    @property
    def openai_chat(self) -> bool:
        """An openai-batch request to /v1/chat/completions: answered as a chat.completion (the endpoint alone
        decides; the parser refused a body written for the other one)."""
        return self.endpoint == CHAT_COMPLETIONS


@dataclass
class SampleOutput:
    """One generated sample of one prompt, as the engine returns it plus scoring added by the worker."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str                          # "stop" | "length"
    logprobs: Optional[list[float]] = None
    ref_logprobs: Optional[list[float]] = None
    reward: Optional[float] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None   # per token [(id, logprob), ...]
    rewards: Optional[dict[str, Optional[float]]] = None           # reward components by name
    reward_error: Optional[str] = None                             # why a component is null (one line)
    openai_logprobs: Optional[dict] = None                         # openai-batch: the choice's logprobs object


@dataclass
class LineResult:
    """Everything generated for one PromptLine."""

    line: PromptLine
    prompt_ids: list[int]
    samples: list[SampleOutput]
    cached_tokens: int = 0           # prompt tokens whose KV the engine found in its prefix cache


class TooLongLine(bytes):
    """Stands in for an input line longer than the reader's limit (io.inputs.MAX_LINE_BYTES), which is never
    read into memory whole: it holds the line's first bytes. Parsing it gives a line_too_long error."""

    def __new__(cls, head: bytes, length: int, limit: int):
        self = super().__new__(cls, head)
        self.length, self.limit = length, limit
        return self


@dataclass
class LineFailure:
    """One input line rejected (bad input) or given up on (retries exhausted).

    Built from whatever a hostile line held, so it makes itself safe to write: an id that is not a string
    that encodes as UTF-8 becomes <file>:<line>, and the message becomes one short line. An error record
    that could not be written would fail its whole shard, and a dead-lettered shard forever."""

    id: str
    file: str
    line: int
    code: str
    message: str

    def __post_init__(self):
        if not (isinstance(self.id, str) and utf8_safe(self.id)):
            self.id = f"{self.file}:{self.line}"
        self.message = short_text(self.message)

    def record(self) -> dict:
        return {"id": self.id, "file": self.file, "line": self.line,
                "error": {"code": self.code, "message": self.message}}


def result_record(r: LineResult, s: SampleOutput) -> dict:
    return {
        "id": r.line.id,
        "sample_index": s.index,
        "prompt": r.line.query if r.line.query is not None else r.line.messages,
        "response": s.text,
        "finish_reason": s.finish_reason,
        "usage": {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(s.token_ids)},
        "metadata": r.line.metadata,
    }


def sft_record(r: LineResult, s: SampleOutput) -> dict:
    """ShareGPT-style conversations for multi-turn lines, prompt/response for single-turn ones."""
    rec: dict[str, Any] = {"id": r.line.id, "sample_index": s.index}
    if r.line.messages is not None:
        conv = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in r.line.messages]
        conv.append({"from": "gpt", "value": s.text})
        rec["conversations"] = conv
    else:
        rec["prompt"] = r.line.query
        rec["response"] = s.text
    rec["metadata"] = r.line.metadata
    return rec


def kl_terms(logprobs: list[float], ref_logprobs: list[float]) -> tuple[list[float], list[float]]:
    """Per-token KL estimators as OpenRLHF computes them: k1 = log p - log q; k3 = (r - 1) - log r with
    log r = log q - log p."""
    import math

    k1 = [lp - rp for lp, rp in zip(logprobs, ref_logprobs)]
    k3 = [math.expm1(rp - lp) - (rp - lp) for lp, rp in zip(logprobs, ref_logprobs)]
    return k1, k3


def experience_record(r: LineResult, s: SampleOutput, group_id: Optional[str] = None) -> dict:
    rec: dict[str, Any] = {
        "id": r.line.id,
        "sample_index": s.index,
        "group_id": group_id if group_id is not None else r.line.id,
        "prompt_ids": r.prompt_ids,
        "response_ids": s.token_ids,
        "logprobs": s.logprobs,
        "ref_logprobs": s.ref_logprobs,
        "kl": None,
        "kl_k3": None,
        "reward": s.reward,
        "rewards": s.rewards,
        "reward_error": s.reward_error,
        "finish_reason": s.finish_reason,
        "response_length": len(s.token_ids),
        "total_length": len(r.prompt_ids) + len(s.token_ids),
        "top_logprobs": None if s.top_logprobs is None else [[[i, lp] for i, lp in pos] for pos in s.top_logprobs],
        "metadata": r.line.metadata,
    }
    if s.logprobs is not None and s.ref_logprobs is not None:
        rec["kl"], rec["kl_k3"] = kl_terms(s.logprobs, s.ref_logprobs)
    return rec


def openai_batch_record(r: LineResult) -> dict:
    """One OpenAI Batch output line for a request: all n samples as choices of one response."""
    created = int(time.time())
    prompt_tokens = len(r.prompt_ids)
    completion_tokens = sum(len(s.token_ids) for s in r.samples)
    chat = r.line.openai_chat
    if chat:
        choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text},
                    "finish_reason": s.finish_reason, "logprobs": s.openai_logprobs} for s in r.samples]
        obj = "chat.completion"
    else:
        choices = [{"index": s.index, "text": s.text, "finish_reason": s.finish_reason,
                    "logprobs": s.openai_logprobs} for s in r.samples]
        obj = "text_completion"
    req_id = uuid.uuid4().hex
    rec = {
        "id": f"batch_req_{req_id[:24]}",
        "custom_id": r.line.id,
        "response": {
            "status_code": 200,
            "request_id": req_id,
            "body": {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{req_id[:24]}",
                "object": obj,
                "created": created,
                "model": r.line.model_name or "ziya-llama-13b",
                "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            },
        },
        "error": None,
    }
    if r.line.metadata:
        # the request line's own extra fields (labels), as on ziya-format records; OpenAI's client ignores it
        rec["metadata"] = r.line.metadata
    return rec


def token_piece(piece: str) -> tuple[str, list[int]]:
    """(text, UTF-8 bytes) of a sentencepiece piece: '▁' is a space, '<0x0A>' a raw byte."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            b = [int(piece[3:5], 16)]
            return bytes(b).decode("utf-8", errors="replace"), b
        except ValueError:
            pass
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def openai_logprobs(token_ids: list[int], logprobs: list[float], top: Optional[list[list[tuple[int, float]]]],
                    pieces, chat: bool) -> dict:
    """The logprobs object of an OpenAI choice. chat: {"content": [{token, logprob, bytes, top_logprobs:
    [{token, logprob, bytes}]}]}; completions: {tokens, token_logprobs, top_logprobs: [{token: logprob}],
    text_offset}. `pieces(ids)` gives the tokenizer's pieces of token ids."""
    names = [token_piece(p) for p in pieces(list(token_ids))]
    top = top or [[] for _ in token_ids]
    top_names = [[token_piece(p) for p in pieces([i for i, _ in pos])] for pos in top]
    if chat:
        return {"content": [
            {"token": t, "logprob": lp, "bytes": b,
             "top_logprobs": [{"token": tt, "logprob": tlp, "bytes": tb}
                              for (tt, tb), (_, tlp) in zip(tn, pos)]}
            for (t, b), lp, pos, tn in zip(names, logprobs, top, top_names)]}
    offsets, at = [], 0
    for t, _ in names:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _ in names], "token_logprobs": list(logprobs),
            "top_logprobs": [{tt: tlp for (tt, _), (_, tlp) in zip(tn, pos)} for pos, tn in zip(top, top_names)],
            "text_offset": offsets}


def openai_batch_error(f: LineFailure) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": f.id, "response": None,
            "error": {"code": f.code, "message": f.message, "line": f.line, "file": f.file}}


@dataclass
class ShardOutput:
    """What a worker produced for one shard: the lines of each part, ready to commit."""

    shard: ShardRef
    parts: dict[str, list[dict]] = field(default_factory=dict)   # kind -> records
    prompts_done: int = 0
    samples_done: int = 0
    prompts_failed: int = 0
    output_tokens: int = 0
