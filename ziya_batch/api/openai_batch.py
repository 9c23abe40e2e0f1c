"""The OpenAI Batch API subset: /v1/files and /v1/batches, enough for the official `openai` client to
upload an input file, create a batch, watch it, cancel it and download its output and error files.

A batch is a job: its input is the uploaded file (format openai-batch), its model is the server's
(--model), its output goes to storage under batches/<id>/output. Objects live in storage, not Redis:

    {storage}/files/<file_id>/meta.json      the File object
    {storage}/files/<file_id>/content        the bytes
    {storage}/batches/<batch_id>.json        the Batch object as last seen, plus the job id
    {storage}/batches/<batch_id>/output/     the job's output (results/, errors/, manifest.json)

The batch's output file is the concatenation of the manifest's results parts and its error file that of
the errors parts, written once when the job is finished under ids derived from the batch id, so that
two readers racing to write them write the same thing.
"""
from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
import uuid
from typing import Annotated, Iterator, Literal, Optional

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .. import io, jobs
from ..errors import ZiyaBatchError, utf8_safe
from ..records import TooLongLine
from ..io.schema import jsonl_line
from ..io.storage import move_atomic, put_atomic, read_bytes
from ..spec import JobSpec
from .http_errors import ApiError
from .settings import MODEL_ENV, ApiSettings

MAX_UPLOAD_BYTES = 200 * 2**20          # OpenAI's own limit for batch input files
MAX_BATCH_REQUESTS = 50_000             # OpenAI's own limit of requests in one batch
MAX_CUSTOM_ID_CHARS = 512
MAX_LISTED_ERRORS = 100                 # validation errors a failed batch lists (the first ones, by line)
VALIDATE_SHARD_LINES = 4096             # lines a ranged read of the input takes while a batch is validated
COMPLETION_WINDOW_S = 24 * 3600
VALIDATE_TIMEOUT_S = 3600           # a batch validating longer than this lost its submitting thread
log = logging.getLogger(__name__)
_FILE_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,80}$")
_BATCH_ID = re.compile(r"^batch_[A-Za-z0-9]{1,64}$")
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
# job state -> batch status while the job runs; finished states are handled in _refresh
_LIVE_STATUS = {"queued": "in_progress", "running": "in_progress", "finalizing": "finalizing",
                "cancelling": "cancelling"}
_STATUS_STAMP = {"in_progress": "in_progress_at", "finalizing": "finalizing_at", "cancelling": "cancelling_at",
                 "completed": "completed_at", "failed": "failed_at", "cancelled": "cancelled_at",
                 "expired": "expired_at"}
_TERMINAL = ("completed", "failed", "cancelled", "expired")


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(..., min_length=1, max_length=100)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"]
    # OpenAI's own bounds: up to 16 pairs, keys up to 64 characters, values up to 512 (stored with the batch and
    # returned by every read of it, so unbounded metadata would be anyone's way to fill Redis and storage)
    metadata: Optional[dict[Annotated[str, StringConstraints(max_length=64)],
                            Annotated[str, StringConstraints(max_length=512)]]] = Field(None, max_length=16)


class _Store:
    """Files and batch records in storage (any fsspec URL)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or url
        self._opened: Optional[tuple] = None      # (filesystem, root): opened at first use, kept after

    def _fs(self):
        """The store's (filesystem, root), opened once: every method needs it, and opening parses the URL and
        may build a client (object stores). Lazily, so that a store that cannot be opened fails the request that
        uses it, not the API's start. Two threads opening it at once both get a working one."""
        if self._opened is None:
            self._opened = io.open_output_fs(self.url)
        return self._opened

    def path(self, *parts: str) -> str:
        fs, root = self._fs()
        return io.join_url(root, *parts)

    def url_of(self, *parts: str) -> str:
        return io.join_url(io.normalize_url(self.url), *parts)

    def put(self, data: bytes, *parts: str) -> None:
        fs, _ = self._fs()
        put_atomic(fs, self.path(*parts), data)

    def get(self, *parts: str) -> Optional[bytes]:
        fs, _ = self._fs()
        path = self.path(*parts)
        fs.invalidate_cache(path)
        return read_bytes(fs, path)

    def get_json(self, *parts: str) -> Optional[dict]:
        data = self.get(*parts)
        return json.loads(data) if data is not None else None

    def put_json(self, obj: dict, *parts: str) -> None:
        self.put(json.dumps(obj, ensure_ascii=False).encode("utf-8"), *parts)

    def list_json(self, folder: str) -> list[dict]:
        fs, _ = self._fs()
        path = self.path(folder)
        fs.invalidate_cache(path)
        try:
            names = [p for p in fs.ls(path, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                out.append(json.loads(fs.cat_file(name)))
            except (FileNotFoundError, json.JSONDecodeError):
                continue        # a record being replaced right now
        return out


def _request_lines(url: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of a batch input's non-blank lines, as the job's reader gives them to the
    workers (io.read_shard: a BOM at the start dropped, CRLF, a line past io.inputs.MAX_LINE_BYTES as a
    TooLongLine, never held whole), so that validation and the job agree on every line and its number."""
    for ref in io.shard_refs("", [url], VALIDATE_SHARD_LINES):
        yield from io.read_shard(ref)


def _file_object(file_id: str, size_bytes: int, filename: str, purpose: str, created_at: int) -> dict:
    return {"id": file_id, "object": "file", "bytes": size_bytes, "created_at": created_at, "filename": filename,
            "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None}


def _public(record: dict) -> dict:
    """The Batch object a client sees (our bookkeeping keys start with '_')."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _fail_list(code: str, message: str) -> dict:
    return {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}


class Batches:
    """The batch logic, independent of HTTP (routes below are thin)."""

    def __init__(self, settings: ApiSettings, brokers):
        self.settings, self.brokers = settings, brokers
        self.store = _Store(settings.storage_url)
        # serialises the read-modify-write of a record between a cancel and the submitting thread
        self._record_lock = threading.Lock()
        # one writer of a finished batch's files at a time in this process: polls that arrive while a large
        # output is copied wait for it instead of each copying it again
        self._results_locks: dict[str, threading.Lock] = {}

    # -- files ------------------------------------------------------------------------------------------
    def save_upload(self, stream, filename: str, purpose: str) -> dict:
        """An uploaded file, copied from the request in blocks (never whole in memory)."""
        def blocks():
            while True:
                block = stream.read(1 << 20)
                if not block:
                    return
                yield block

        return self._write_file(f"file-{uuid.uuid4().hex[:24]}", blocks(), filename, purpose, MAX_UPLOAD_BYTES)

    def _write_file(self, file_id: str, chunks: Iterator[bytes], filename: str, purpose: str,
                    max_bytes: Optional[int] = None) -> dict:
        """Stream `chunks` aside, move them into place, and only then write meta.json, which is what makes
        the file exist: a reader never sees half of one (a batch's output can be far larger than memory)."""
        fs, _ = self.store._fs()
        final = self.store.path("files", file_id, "content")
        tmp = self.store.path("files", file_id, f".content.{uuid.uuid4().hex[:12]}.tmp")
        fs.makedirs(self.store.path("files", file_id), exist_ok=True)
        size_bytes = 0
        with fs.open(tmp, "wb") as f:
            for chunk in chunks:
                size_bytes += len(chunk)
                if max_bytes is not None and size_bytes > max_bytes:
                    break
                f.write(chunk)
        if max_bytes is not None and size_bytes > max_bytes:
            fs.rm(self.store.path("files", file_id), recursive=True)
            raise ApiError(413, f"file is larger than {max_bytes // 2**20} MiB; split it into several batches")
        move_atomic(fs, tmp, final)
        meta = _file_object(file_id, size_bytes, filename, purpose, int(time.time()))
        self.store.put_json(meta, "files", file_id, "meta.json")
        return meta

    def _write_lines(self, file_id: str, records: Iterator[dict], filename: str, purpose: str) -> dict:
        lines = ((jsonl_line(_client_line(r)) + "\n").encode("utf-8") for r in records)
        return self._write_file(file_id, lines, filename, purpose)

    def file(self, file_id: str) -> dict:
        meta = self.store.get_json("files", file_id, "meta.json") if _FILE_ID.match(file_id) else None
        if meta is None:
            raise ApiError(404, f"no file {file_id!r}: upload one with POST /v1/files", "not_found")
        return meta

    def files(self, purpose: Optional[str]) -> list[dict]:
        fs, _ = self.store._fs()
        root = self.store.path("files")
        fs.invalidate_cache(root)
        try:
            ids = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        except FileNotFoundError:
            return []
        metas = [m for m in (self.store.get_json("files", i, "meta.json") for i in ids if _FILE_ID.match(i)) if m]
        return [m for m in metas if purpose is None or m["purpose"] == purpose]

    def content_stream(self, file_id: str):
        self.file(file_id)
        fs, _ = self.store._fs()
        path = self.store.path("files", file_id, "content")

        def chunks():
            with fs.open(path, "rb") as f:
                while True:
                    block = f.read(1 << 20)
                    if not block:
                        return
                    yield block

        return chunks()

    # -- batches ----------------------------------------------------------------------------------------
    def create(self, req: BatchCreate) -> dict:
        if not self.settings.model:
            raise ApiError(400, f"this server has no model for batches: start `ziya-batch serve` with "
                                f"--model DIR or set {MODEL_ENV}")
        in_file = self.file(req.input_file_id)
        if in_file["purpose"] != "batch":
            raise ApiError(400, f"file {req.input_file_id} has purpose '{in_file['purpose']}'; upload the input "
                                "with purpose 'batch'")
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        record = {
            "id": batch_id, "object": "batch", "endpoint": req.endpoint, "errors": None,
            "input_file_id": req.input_file_id, "completion_window": req.completion_window,
            "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + COMPLETION_WINDOW_S, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": req.metadata, "model": self.settings.model_name(),
            "_job_id": None, "_output": self.store.url_of("batches", batch_id, "output"),
        }
        # kept with the batch, so that a server restarted with other settings resumes the same job
        record["_spec"] = self.job_spec(record).model_dump(mode="json")
        self._save(record)
        # indexing a large input takes a while: answer 'validating' now, submit in the background
        threading.Thread(target=self._submit, args=(record,), name=f"validate-{batch_id}", daemon=True).start()
        return _public(record)

    def _validate(self, record: dict) -> Optional[list[dict]]:
        """What OpenAI checks of a batch's input before it runs, one error a line (1-based, the first
        MAX_LISTED_ERRORS), naming the parameter at fault: every non-blank line a JSON object with a custom_id
        string of its own (no other line has it: results are matched to requests by it), method POST where given,
        a url that is the batch's endpoint, at most MAX_BATCH_REQUESTS requests. None when the input passes. A
        request's body is checked as it runs, and a bad one is that request's line in the error file.

        The url is required, as OpenAI requires it: the job's reader sends a request to its url, and a line without
        one to the endpoint its body is written for, which in a chat batch answered a completion body as a
        text_completion."""
        url = self.store.url_of("files", record["input_file_id"], "content")
        seen: set[str] = set()
        errors: list[dict] = []
        requests = 0

        def bad(code: str, message: str, line: int, param: Optional[str] = None) -> None:
            if len(errors) < MAX_LISTED_ERRORS:
                errors.append({"code": code, "message": message, "param": param, "line": line})

        for line_no, raw in _request_lines(url):
            requests += 1
            if isinstance(raw, TooLongLine):
                bad("line_too_long", f"this line is longer than {io.inputs.MAX_LINE_BYTES:,} bytes", line_no)
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError):
                bad("invalid_json_line", "this line is not parseable as valid JSON", line_no)
                continue
            if not isinstance(obj, dict):
                bad("invalid_json_line", "this line is not a JSON object", line_no)
                continue
            cid = obj.get("custom_id")
            # a lone surrogate (a JSON escape) cannot be written back: the job named such a line's error by its
            # place, the server's storage path of the input, which became the custom_id a client saw
            if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID_CHARS or not utf8_safe(cid):
                bad("missing_required_parameter" if cid is None else "invalid_custom_id",
                    f"the custom_id of a request must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} "
                    "Unicode characters", line_no, "custom_id")
            elif cid in seen:
                bad("duplicate_custom_id", "the custom_id for this request is a duplicate of another request; "
                    "the custom_id parameter must be unique for each request in a batch", line_no, "custom_id")
            elif requests <= MAX_BATCH_REQUESTS:    # past it the batch fails anyway: no more memory for ids
                seen.add(cid)
            if obj.get("method", "POST") != "POST":
                bad("invalid_method", "the method of a batch request must be POST", line_no, "method")
            if "url" not in obj:
                bad("missing_required_parameter", f"the url of a request is required: the batch's endpoint "
                    f"{record['endpoint']}", line_no, "url")
            elif obj["url"] != record["endpoint"]:
                bad("mismatched_url", f"the url of this request is not the batch's endpoint "
                    f"{record['endpoint']}", line_no, "url")
        if requests > MAX_BATCH_REQUESTS:
            errors.insert(0, {"code": "too_many_requests", "message": f"the input holds {requests:,} requests, more "
                              f"than the {MAX_BATCH_REQUESTS:,} a batch may hold", "param": None, "line": None})
        return errors or None

    def _submit(self, record: dict) -> None:
        """Check and index the input and queue the job; the record goes to in_progress, or failed with the
        reasons."""
        try:
            invalid = self._validate(record)
            if invalid is not None:
                self._end_unqueued(record, {"object": "list", "data": invalid[:MAX_LISTED_ERRORS]})
                return
            status = jobs.submit_job(JobSpec(**record["_spec"]), self.brokers.get())
        except ZiyaBatchError as err:
            self._end_unqueued(record, _fail_list("invalid_input", str(err)))
            return
        except Exception as err:  # noqa: BLE001 - the batch must end, not stay validating
            log.exception("batch %s: submitting failed", record["id"])
            self._end_unqueued(record, _fail_list("server_error", f"{type(err).__name__}: {err}; see the server log"))
            return
        with self._record_lock:
            latest = self.store.get_json("batches", f"{record['id']}.json") or record
            latest.update(status="in_progress", in_progress_at=int(time.time()), _job_id=status.job_id)
            latest["request_counts"] = {"total": status.prompts_total, "completed": 0, "failed": 0}
            if latest.get("_cancel_requested"):          # cancelled while validating
                jobs.cancel_job(self.brokers.get(), status.job_id, hint=jobs.API_HINT)
                latest["status"] = "cancelling"
            self._save(latest)

    def _end_unqueued(self, record: dict, errors: dict) -> dict:
        """A batch whose job was not queued ends: failed with `errors`, or cancelled (the errors kept) where a
        cancel came while it validated. The record is read again under the lock, as cancel() writes it too: saving
        the submitter's own copy lost the cancel (cancelling_at back to null). One that meanwhile got its job or
        ended is left as it is. Returns the record as saved."""
        with self._record_lock:
            latest = self.store.get_json("batches", f"{record['id']}.json") or record
            if latest.get("_job_id") or latest["status"] in _TERMINAL:
                return latest
            now = int(time.time())
            if latest.get("_cancel_requested"):
                latest.update(status="cancelled", cancelled_at=now, errors=errors)
            else:
                latest.update(status="failed", failed_at=now, errors=errors)
            self._save(latest)
            return latest

    def job_spec(self, record: dict) -> JobSpec:
        return JobSpec(
            name=f"openai-{record['id']}", model={"path": self.settings.model},
            input=[self.store.url_of("files", record["input_file_id"], "content")], format="openai-batch",
            sampling={"max_new_tokens": self.settings.batch_max_new_tokens},
            output={"path": record["_output"], "records": ["results"]},
            shard_size=self.settings.batch_shard_size,
        )

    def _save(self, record: dict) -> None:
        self.store.put_json(record, "batches", f"{record['id']}.json")

    def _load(self, batch_id: str) -> dict:
        rec = self.store.get_json("batches", f"{batch_id}.json") if _BATCH_ID.match(batch_id) else None
        if rec is None:
            raise ApiError(404, f"no batch {batch_id!r}: list batches with GET /v1/batches", "not_found")
        return rec

    def get(self, batch_id: str) -> dict:
        return _public(self._refresh(self._load(batch_id)))

    def cancel(self, batch_id: str) -> dict:
        rec = self._refresh(self._load(batch_id))
        if rec["status"] in _TERMINAL or rec["status"] == "cancelling":
            return _public(rec)
        if not rec.get("_job_id"):
            with self._record_lock:
                rec = self._load(batch_id)
                if not rec.get("_job_id"):              # still validating: the submitter cancels the job
                    rec.update(_cancel_requested=True, status="cancelling", cancelling_at=int(time.time()))
                    self._save(rec)
                    return _public(rec)
        jobs.cancel_job(self.brokers.get(), rec["_job_id"], hint=jobs.API_HINT)
        rec["_cancel_requested"] = True
        return _public(self._refresh(rec, force_save=True))

    def list(self, after: Optional[str], limit: int) -> dict:
        records = sorted(self.store.list_json("batches"), key=lambda r: (r.get("created_at", 0), r["id"]),
                         reverse=True)
        if after:
            ids = [r["id"] for r in records]
            records = records[ids.index(after) + 1:] if after in ids else []
        page = [_public(self._refresh(r)) for r in records[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(records) > limit}

    # -- following the job --------------------------------------------------------------------------------
    def _refresh(self, rec: dict, force_save: bool = False) -> dict:
        """Bring a record up to date with its job; persist it when something changed."""
        if rec["status"] in _TERMINAL:
            return rec
        if not rec.get("_job_id"):
            if time.time() - rec["created_at"] > VALIDATE_TIMEOUT_S:     # its submitter died with its process
                return self._end_unqueued(rec, _fail_list(
                    "validation_interrupted", "the server stopped while validating this batch; create it again"))
            return rec
        before = json.dumps(rec, sort_keys=True)
        broker = self.brokers.get()
        status = broker.find_job(rec["_job_id"])
        now = int(time.time())
        stopped = bool(rec.get("_cancel_requested") or rec.get("_expired"))
        if status is None and not stopped:
            # Redis lost the job (or it was forgotten): submit it again, which resumes from the parts storage holds
            try:
                status = jobs.submit_job(JobSpec(**rec["_spec"]), broker)
            except ZiyaBatchError as err:
                log.warning("batch %s: resubmitting its lost job failed: %s", rec["id"], err)
        if status is None and stopped:
            # cancelled (or expired), and its job forgotten or lost before this record caught up: it ends so; submitted
            # again, the job would reopen and run what the cancel stopped
            state, error = "cancelled", None
        elif status is None:
            state, error = "failed", "the job is gone from the queue and could not be resubmitted; create the batch again"
        else:
            status = jobs.finish_empty_job(broker, status)
            state, error = status.state.value, status.error
            rec["request_counts"] = {"total": status.prompts_total, "completed": status.prompts_done,
                                     "failed": status.prompts_failed}
        if state in _LIVE_STATUS and rec.get("expires_at") and now > rec["expires_at"]:
            state = jobs.cancel_job(broker, rec["_job_id"], abandon_running=True, hint=jobs.API_HINT).state.value
            rec["_expired"] = True
        if state in _LIVE_STATUS:
            new = "cancelling" if rec.get("_expired") else _LIVE_STATUS[state]
        elif state == "cancelled":
            new = "expired" if rec.get("_expired") else "cancelled"
        else:
            new = state                        # completed | failed
        if new in _TERMINAL:
            self._write_results(rec, broker, new)
            if new == "failed" and error:
                rec["errors"] = _fail_list("job_failed", error)
        self._move_to(rec, new, now)
        if force_save or json.dumps(rec, sort_keys=True) != before:
            self._save(rec)
        return rec

    @staticmethod
    def _move_to(rec: dict, new: str, now: int) -> None:
        if rec["status"] == new:
            return
        rec["status"] = new
        stamp = _STATUS_STAMP.get(new)
        if stamp and rec.get(stamp) is None:
            rec[stamp] = now

    def _write_results(self, rec: dict, broker, new: str = "completed") -> None:
        """Output and error files from the manifest's parts (the manifest is written when the job finishes;
        a cancelled job gets one here if no worker wrote it). A batch that ends cancelled or expired also lists
        each request it did not finish in its error file (code batch_cancelled / batch_expired), as OpenAI's
        does: every request is then in one of the two files."""
        out = rec["_output"]
        manifest = io.read_manifest(out)
        if manifest is None and rec.get("_job_id"):
            try:
                jobs.finalize_if_ready(broker, rec["_job_id"])
            except Exception:  # noqa: BLE001 - the batch still reports its state without files
                pass
            manifest = io.read_manifest(out)
        if manifest is None:
            return
        hex_id = rec["id"].split("_", 1)[1]
        counts = manifest.get("records", {})
        parts = manifest.get("parts", {})
        with self._record_lock:
            lock = self._results_locks.setdefault(rec["id"], threading.Lock())
        with lock:          # polls arriving while the files are written wait, then find them written
            unfinished: list[dict] = []
            if new in ("cancelled", "expired") and not self._written(f"file-{hex_id}-errors"):
                done = {r.get("custom_id") for kind in ("results", "errors") if parts.get(kind)
                        for r in io.read_parts(out, kind)}
                unfinished = list(self._unfinished(rec, done, f"batch_{new}"))
            for kind, key, suffix in (("results", "output_file_id", "output"),
                                      ("errors", "error_file_id", "errors")):
                file_id = f"file-{hex_id}-{suffix}"
                written = self._written(file_id)
                extra = unfinished if kind == "errors" else []
                if not written and (not parts.get(kind) or counts.get(kind) == 0) and not extra:
                    continue            # no lines of this kind: no file, as OpenAI gives none (null)
                if not written:
                    lines = itertools.chain(io.read_parts(out, kind) if parts.get(kind) else (), extra)
                    self._write_lines(file_id, lines, f"{rec['id']}_{suffix}.jsonl", "batch_output")
                rec[key] = file_id
        with self._record_lock:
            self._results_locks.pop(rec["id"], None)      # written: later polls find the files
        if rec["request_counts"].get("total", 0) == 0:
            done, failed = counts.get("results", 0), counts.get("errors", 0)
            rec["request_counts"] = {"total": done + failed, "completed": done, "failed": failed}

    def _written(self, file_id: str) -> bool:
        return self.store.get_json("files", file_id, "meta.json") is not None

    def _unfinished(self, rec: dict, done: set, code: str) -> Iterator[dict]:
        """An error line for each request of the input whose custom_id has no line in `done`."""
        why = "the batch was cancelled before this request ran" if code == "batch_cancelled" else \
            "the batch expired before this request ran"
        for line_no, raw in _request_lines(self.store.url_of("files", rec["input_file_id"], "content")):
            if isinstance(raw, TooLongLine):
                continue
            try:
                cid = json.loads(raw.decode("utf-8")).get("custom_id")
            except (ValueError, RecursionError, AttributeError):
                continue
            if isinstance(cid, str) and cid not in done:
                done.add(cid)
                yield {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": cid, "response": None,
                       "error": {"code": code, "message": why, "line": line_no}}


def _client_line(rec: dict) -> dict:
    """An output line as the client sees it: error lines lose the server's storage path of the input."""
    err = rec.get("error")
    if isinstance(err, dict) and "file" in err:
        rec = {**rec, "error": {k: v for k, v in err.items() if k != "file"}}
    return rec


def batch_router(batches: Batches) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai-batch"])

    @router.post("/files", summary="Upload a batch input file (multipart: file, purpose=batch)")
    def upload(file: UploadFile = File(...), purpose: str = Form(...)) -> dict:
        if purpose != "batch":
            raise ApiError(400, f"purpose {purpose!r} is not supported here; upload batch input with purpose 'batch'")
        return batches.save_upload(file.file, file.filename or "upload.jsonl", purpose)

    @router.get("/files", summary="Uploaded and output files")
    def list_files(purpose: Optional[str] = None) -> dict:
        return {"object": "list", "data": batches.files(purpose), "has_more": False}

    @router.get("/files/{file_id}", summary="A file's metadata")
    def get_file(file_id: str) -> dict:
        return batches.file(file_id)

    @router.get("/files/{file_id}/content", summary="A file's bytes", response_class=StreamingResponse)
    def file_content(file_id: str) -> StreamingResponse:
        return StreamingResponse(batches.content_stream(file_id), media_type="application/octet-stream")

    @router.post("/batches", summary="Create a batch from an uploaded input file")
    def create(req: BatchCreate) -> dict:
        return batches.create(req)

    @router.get("/batches", summary="Batches, newest first")
    def list_batches(after: Optional[str] = None, limit: int = Query(20, ge=1, le=100)) -> dict:
        return batches.list(after, limit)

    @router.get("/batches/{batch_id}", summary="A batch, with its status and request counts")
    def get_batch(batch_id: str) -> dict:
        return batches.get(batch_id)

    @router.post("/batches/{batch_id}/cancel", summary="Cancel a batch (running requests finish)")
    def cancel(batch_id: str) -> dict:
        return batches.cancel(batch_id)

    return router
