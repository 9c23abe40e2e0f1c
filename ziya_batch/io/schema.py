"""Part encodings: JSONL, and Parquet with one explicit Arrow schema per record kind.

JSONL parts hold the records exactly as records.py builds them, one JSON object per line, UTF-8
(``ensure_ascii=False``; only U+2028, U+2029 and U+0085, which str.splitlines() and JavaScript take for line ends,
are written as ``\\u`` escapes). A non-finite float (NaN, ±inf) is written as ``null``, because strict JSON
readers (pyarrow, ``datasets``) reject ``NaN``/``Infinity``; Parquet parts do the same, so both formats
hold the same values.

Parquet parts (``output.format: parquet``) use these schemas, fixed up front so that every part of a
kind has the same schema (an empty part included) and ``datasets.load_dataset("parquet", ...)`` or
``pyarrow.dataset`` read a whole directory without schema merging. All fields are nullable.

``results/`` (format ``ziya``)::

    id              string
    sample_index    int32
    prompt          string              single-turn query as given; null for multi-turn lines
    messages        list<struct<role: string, content: string>>
                                        multi-turn conversation as given (JSONL writes it under "prompt")
    response        string
    finish_reason   string              "stop" | "length"
    usage           struct<prompt_tokens: int32, completion_tokens: int32>
    metadata        string              JSON text of the input line's other fields (labels), as given

``sft/``::

    id              string
    sample_index    int32
    prompt          string              single-turn lines
    response        string              single-turn lines
    conversations   list<struct<from: string, value: string>>   multi-turn lines (ShareGPT style)
    metadata        string              JSON text, as in results/

``experience/``::

    id              string
    sample_index    int32
    group_id        string              samples of one prompt share it (GRPO-style grouping)
    prompt_ids      list<int32>
    response_ids    list<int32>
    logprobs        list<float32>       policy logprob of each response token
    ref_logprobs    list<float32>       reference-model logprobs (null without experience.reference_model)
    kl              list<float32>       per-token k1 = logprobs - ref_logprobs
    kl_k3           list<float32>       per-token k3 estimator
    reward          float64             weighted sum of `rewards` (null without a reward, or if one is null)
    rewards         struct<model: float64, url: float64, function: float64>
                                        components; JSONL names the function's component by its name,
                                        Parquet under "function"
    reward_error    string              why a component is null (one line)
    group_reward_mean float64           mean reward of the prompt's n samples (null without rewards)
    group_reward_std  float64           their sample standard deviation
    advantage       float64             (reward - mean) / (std + eps), GRPO-style
    finish_reason   string
    response_length int32
    total_length    int32
    top_logprobs    list<list<struct<id: int32, logprob: float32>>>   per response token (experience.top_logprobs)
    metadata        string              JSON text, as in results/

``errors/``::

    id              string
    file            string
    line            int64
    error           struct<code: string, message: string>

``results/`` and ``errors/`` of format ``openai-batch`` (the OpenAI Batch API's output line)::

    id              string
    custom_id       string
    response        struct<status_code: int32, request_id: string, body: struct<
                        id: string, object: string, created: int64, model: string,
                        choices: list<struct<index: int32, message: struct<role: string, content: string>,
                                             text: string, finish_reason: string, logprobs: string>>,
                        usage: struct<prompt_tokens: int32, completion_tokens: int32, total_tokens: int32>>>
    error           struct<code: string, message: string, line: int64, file: string>
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterator

from ..errors import InputError

KINDS = ("results", "sft", "experience", "errors")
EXTENSIONS = {"jsonl": "jsonl", "parquet": "parquet"}


def _schemas() -> dict[str, Any]:
    # pyarrow is imported only when a Parquet part is written or read: workers writing JSONL and the
    # submit path never pay for it
    import pyarrow as pa

    f32s = pa.list_(pa.float32())
    i32s = pa.list_(pa.int32())
    usage3 = pa.struct([("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
                        ("total_tokens", pa.int32())])
    choice = pa.struct([
        ("index", pa.int32()),
        ("message", pa.struct([("role", pa.string()), ("content", pa.string())])),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("logprobs", pa.string()),
    ])
    body = pa.struct([("id", pa.string()), ("object", pa.string()), ("created", pa.int64()),
                      ("model", pa.string()), ("choices", pa.list_(choice)), ("usage", usage3)])
    return {
        "results": pa.schema([
            ("id", pa.string()),
            ("sample_index", pa.int32()),
            ("prompt", pa.string()),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("response", pa.string()),
            ("finish_reason", pa.string()),
            ("usage", pa.struct([("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32())])),
            ("metadata", pa.string()),
        ]),
        "sft": pa.schema([
            ("id", pa.string()),
            ("sample_index", pa.int32()),
            ("prompt", pa.string()),
            ("response", pa.string()),
            ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
            ("metadata", pa.string()),
        ]),
        "experience": pa.schema([
            ("id", pa.string()),
            ("sample_index", pa.int32()),
            ("group_id", pa.string()),
            ("prompt_ids", i32s),
            ("response_ids", i32s),
            ("logprobs", f32s),
            ("ref_logprobs", f32s),
            ("kl", f32s),
            ("kl_k3", f32s),
            ("reward", pa.float64()),
            ("rewards", pa.struct([("model", pa.float64()), ("url", pa.float64()), ("function", pa.float64())])),
            ("reward_error", pa.string()),
            ("group_reward_mean", pa.float64()),
            ("group_reward_std", pa.float64()),
            ("advantage", pa.float64()),
            ("finish_reason", pa.string()),
            ("response_length", pa.int32()),
            ("total_length", pa.int32()),
            ("top_logprobs", pa.list_(pa.list_(pa.struct([("id", pa.int32()), ("logprob", pa.float32())])))),
            ("metadata", pa.string()),
        ]),
        "errors": pa.schema([
            ("id", pa.string()),
            ("file", pa.string()),
            ("line", pa.int64()),
            ("error", pa.struct([("code", pa.string()), ("message", pa.string())])),
        ]),
        "openai-batch": pa.schema([
            ("id", pa.string()),
            ("custom_id", pa.string()),
            ("response", pa.struct([("status_code", pa.int32()), ("request_id", pa.string()),
                                    ("body", body)])),
            ("error", pa.struct([("code", pa.string()), ("message", pa.string()), ("line", pa.int64()),
                                 ("file", pa.string())])),
        ]),
    }


_SCHEMAS: dict[str, Any] | None = None


def parquet_schema(kind: str, input_format: str = "ziya"):
    """The Arrow schema of a kind's Parquet parts (see the module docstring)."""
    global _SCHEMAS
    if _SCHEMAS is None:
        _SCHEMAS = _schemas()
    if input_format == "openai-batch" and kind in ("results", "errors"):
        return _SCHEMAS["openai-batch"]
    if kind not in _SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    return _SCHEMAS[kind]


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# characters JSON allows raw in a string that str.splitlines() (and JavaScript) take for line ends: written raw, a
# record holding one spans two "lines" for such readers, and a part more lines than the manifest says
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def jsonl_line(rec: Any) -> str:
    """One JSONL line (without its newline): UTF-8 text as is, except U+2028, U+2029 and U+0085 as \\u escapes,
    which every JSON reader turns back into the same characters. A non-finite float is written as null."""
    try:
        line = json.dumps(rec, ensure_ascii=False, allow_nan=False)
    except ValueError:     # NaN or inf somewhere: strict readers would reject the whole part
        line = json.dumps(_finite(rec), ensure_ascii=False, allow_nan=False)
    for ch, esc in _LINE_BREAKS.items():
        if ch in line:
            line = line.replace(ch, esc)
    return line


def encode_jsonl(records: list[dict]) -> bytes:
    out = [jsonl_line(rec) for rec in records]
    return ("\n".join(out) + "\n").encode("utf-8") if out else b""


def _to_parquet_row(kind: str, rec: dict, schema, openai: bool) -> dict:
    if kind == "results" and isinstance(rec.get("prompt"), list):
        # a multi-turn result: JSONL keeps the conversation under "prompt"; Parquet needs one type per column
        rec = {**rec, "messages": rec["prompt"], "prompt": None}
    if openai:                                        # a choice's logprobs object is kept as JSON text
        body = rec["response"].get("body") if isinstance(rec.get("response"), dict) else None
        if body and body.get("choices"):
            choices = [{**c, "logprobs": None if c.get("logprobs") is None else json.dumps(c["logprobs"])}
                       for c in body["choices"]]
            rec = {**rec, "response": {**rec["response"], "body": {**body, "choices": choices}}}
    if kind in ("results", "sft", "experience") and not openai:
        rec = _plain_columns(kind, rec)
    extra = set(rec) - set(schema.names)
    if extra:
        raise ValueError(f"{kind} record has fields the Parquet schema lacks: {', '.join(sorted(extra))} "
                         "(update ziya_batch/io/schema.py)")
    return _finite(rec)


def _plain_columns(kind: str, rec: dict) -> dict:
    """metadata as JSON text (any object fits one column); top_logprobs pairs as structs; the reward function's
    component (named after the function in JSONL) under "function"."""
    rec = dict(rec)
    if rec.get("metadata") is not None:
        rec["metadata"] = json.dumps(_finite(rec["metadata"]), ensure_ascii=False, allow_nan=False, default=str)
    if kind == "experience":
        if rec.get("top_logprobs") is not None:
            rec["top_logprobs"] = [[{"id": i, "logprob": lp} for i, lp in pos] for pos in rec["top_logprobs"]]
        if rec.get("rewards") is not None:
            rw = rec["rewards"]
            others = [v for k, v in rw.items() if k not in ("model", "url")]
            rec["rewards"] = {"model": rw.get("model"), "url": rw.get("url"),
                              "function": others[0] if others else None}
    return rec


def encode_parquet(kind: str, records: list[dict], input_format: str = "ziya") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if input_format == "ziya" and kind in ("results", "errors") and records and "custom_id" in records[0]:
        input_format = "openai-batch"
    schema = parquet_schema(kind, input_format)
    openai = input_format == "openai-batch" and kind in ("results", "errors")
    rows = [_to_parquet_row(kind, r, schema, openai) for r in records]
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        # an empty part gets no row group at all: readers that size batches by the first row group
        # (datasets' parquet builder) fail on a row group of 0 rows
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return sink.getvalue().to_pybytes()


def encode_part(kind: str, records: list[dict], fmt: str, input_format: str = "ziya") -> bytes:
    if fmt == "jsonl":
        return encode_jsonl(records)
    if fmt == "parquet":
        return encode_parquet(kind, records, input_format)
    raise ValueError(f"unknown output format {fmt!r}; expected jsonl or parquet")


def part_format(path: str) -> str:
    """The format a part at `path` was written in, told by its name (parts are part-N.jsonl or part-N.parquet)."""
    return "parquet" if path.endswith(".parquet") else "jsonl"


def decode_part(data: bytes, fmt: str, where: str = "part") -> list[dict]:
    """Records of a part's bytes (Parquet rows come back as dicts; nulls stay None)."""
    return list(iter_part(data, fmt, where))


def iter_part(data: bytes, fmt: str, where: str = "part") -> Iterator[Any]:
    """The records of a part's bytes one at a time (JSONL a line at a time, Parquet a batch of rows at a time), so
    no more than one record's objects exist besides the bytes. A part this module did not write (a line that is
    not JSON or not UTF-8, nests too deeply; a file that is not Parquet) is an InputError naming `where` and the
    line. (No line is too long to be ours: one OpenAI-batch line holds all n choices with their logprobs.)"""
    if fmt != "jsonl":
        yield from _parquet_rows(data, where)
        return
    start, line_no = 0, 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        line_no += 1
        line, start = data[start:end], end + 1
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except (ValueError, RecursionError) as err:     # JSONDecodeError and UnicodeDecodeError are ValueErrors
            why = "nests too deeply" if isinstance(err, RecursionError) else \
                ("is not UTF-8" if isinstance(err, UnicodeDecodeError) else "is not JSON")
            raise InputError(f"{where}: line {line_no} {why}: not a part ziya-batch wrote, or damaged") from None


def _parquet_rows(data: bytes, where: str) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise InputError(f"{where}: not a Parquet file ziya-batch can read ({str(err)[:200]})") from None
