"""Error types. Every error a user can cause is a ZiyaBatchError whose message says what was wrong and
what to do; the CLI prints it as one line and exits with `exit_code`, never with a traceback."""
from __future__ import annotations

import logging
import re

from .redact import mask_logs, mask_text


class ZiyaBatchError(Exception):
    """Base of every error the user can cause or fix."""

    exit_code = 1


class SpecError(ZiyaBatchError):
    """The job spec is invalid (unknown key, wrong type or range, missing input)."""

    exit_code = 2


class InputError(ZiyaBatchError):
    """An input file cannot be read or indexed."""

    exit_code = 2


class ServiceError(ZiyaBatchError):
    """A service (Redis, Ray, storage) is missing, unreachable or unsafely configured."""

    exit_code = 3


class JobNotFound(ZiyaBatchError):
    exit_code = 4


class JobNotFinished(ZiyaBatchError):
    """An action that needs a finished job (forgetting it) asked of one that still runs, waits, or has shards leased
    to workers; HTTP 409."""

    exit_code = 6


class AccessDenied(ZiyaBatchError):
    """A job names a location (or option) the HTTP API's server does not allow, or an input that is no longer the
    file it allowed; HTTP 403 (api/access.py)."""

    exit_code = 5


class ModelError(ZiyaBatchError):
    """A model directory is missing, incomplete or of the wrong shape."""

    exit_code = 2


class LineError(Exception):
    """One input line is invalid. Not fatal: it becomes one line in errors/ with this code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# error codes written to errors/part-*.jsonl
INVALID_JSON = "invalid_json"
MISSING_PROMPT = "missing_prompt"
EMPTY_PROMPT = "empty_prompt"
INVALID_SAMPLING = "invalid_sampling"
PROMPT_TOO_LONG = "prompt_too_long"
GENERATION_FAILED = "generation_failed"
RETRIES_EXHAUSTED = "retries_exhausted"
INVALID_LINE = "invalid_line"          # valid JSON that could not be prepared (whatever Python raised on it)
LINE_TOO_LONG = "line_too_long"        # longer than io.inputs.MAX_LINE_BYTES: never read into memory


MESSAGE_CHARS = 200       # an error line's message: one short line, whatever the input held


def utf8_safe(s: str) -> bool:
    """Whether `s` encodes as UTF-8 (not when it holds a lone surrogate, as a JSON escape can make one)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def utf8_text(s: str) -> str:
    """`s` with every lone surrogate written as its escape (`\\udcff`): text that Redis, a JSONL part or an HTTP
    answer can carry (a value decoded with surrogateescape, a JSON escape, holds them)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def short_text(text: object, limit: int = MESSAGE_CHARS) -> str:
    """`text` as one line of at most `limit` characters that encodes as UTF-8 (a lone surrogate from a JSON
    escape is written as its escape), every URL in it masked (redact.mask_text: before it is cut, so no cut
    leaves part of a password unmasked). Never raises: it builds error messages from hostile values."""
    try:
        s = text if isinstance(text, str) else str(text)
    except Exception:  # noqa: BLE001 - str() of a hostile value (a huge int, a deep structure) may raise
        s = f"<{type(text).__name__} that cannot be shown>"
    s = utf8_text(" ".join(mask_text(_head(s, limit * 4)).split()))
    return s if len(s) <= limit else s[:limit - 3] + "..."


_LAST_WORD = re.compile(r"\S+\Z")
_WORD = re.compile(r"\S*")
URL_READ_ON_CHARS = 1 << 16      # how far past short_text's window a URL the window cuts is read to its end


def _head(s: str, window: int) -> str:
    """The first `window` characters of `s` to mask and show, read on to the end of a URL the cut falls in (up to
    URL_READ_ON_CHARS more). Cut inside its user part, a URL no longer says where that ends (`https://TOKEN` of
    `https://TOKEN@host` reads as a host, `redis://u:12` of a numeric password as a port, `redis://:pa@ss` of a
    password holding '@' as a password and a host), and a run of whitespace or a long password masked before it
    can bring it into the characters shown. A URL longer than that is shown up to its `scheme://`."""
    if len(s) <= window or s[window].isspace():
        return s[:window]
    head = s[:window]
    word = _LAST_WORD.search(head)
    if word is None or "://" not in word.group():
        return head
    end = _WORD.match(s, window, window + URL_READ_ON_CHARS).end()
    if end < len(s) and not s[end].isspace():
        return head[:word.start() + word.group().rindex("://") + 3]
    return s[:end]


# control characters (C0, DEL, C1), the line and paragraph separators (lines to Python's splitlines), and the
# bidirectional overrides and isolates, which reorder what follows them on the line (a name ending in U+202E
# 'gnp.exe' shows as 'exe.png', and the rest of the row reversed)
TERMINAL_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """`text` as it may reach a terminal or a log line: every control character and bidirectional override written
    as its escape (`\\x1b`, `\\u202e`), so that users' text (a job name, a file name, a path a manifest lists)
    cannot move, recolour, retitle or clear the screen, forge a line or reorder it."""
    return TERMINAL_CONTROL.sub(_escaped, text)


def escape_lines(text: str) -> str:
    """`text` (a traceback, a formatted log record) with escape_controls' escapes inside each of its lines: its line
    breaks stay, and nothing else in it can drive the terminal or forge a line."""
    return "\n".join(escape_controls(line) for line in text.split("\n"))


def _escaped(m: re.Match) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class OneLineLogFormatter(logging.Formatter):
    """Log records whose message (users' text in its arguments: a file name, an error quoting a line) is one line
    with escape_controls' escapes: no record can end early and forge the next, or drive the terminal that shows the
    log. A traceback keeps its lines, their other control characters escaped. A lone surrogate is written as its
    escape (utf8_text): a Ray worker's stderr encodes strictly, and the record would be lost to a logging error."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        # the traceback and stack lines after the message, however they were made (redact.mask_logs formats a
        # record's traceback when it is made, so formatException is not always called)
        return escape_lines(utf8_text(super().format(record)))


def log_one_line(level: int = logging.INFO) -> None:
    """logging.basicConfig for a worker process: records to stderr through OneLineLogFormatter, their URLs'
    passwords and signatures masked (redact.mask_logs)."""
    mask_logs()
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineLogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
