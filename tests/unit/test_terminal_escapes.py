"""What the CLI writes to the terminal outside `status`'s tables: users' text in it (a file name a glob matched, a
part path or an owner a foreign manifest names, a job name, a worker's note) never reaches the terminal as control
characters or bidirectional overrides. An error line stays one line; ESC, OSC, CR, backspace and U+202E are
written as escapes (`\\x1b`, `\\u202e`), and the rest of the text as it is."""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ziya_batch.cli import main
from ziya_batch.errors import InputError, escape_controls
from ziya_batch.redact import mask_text

# what a terminal acts on or reorders by: C0, DEL, C1, bidirectional marks, overrides and isolates; and the line
# and paragraph separators, where Python's splitlines ends a line
RAW = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
HOSTILE = ("\x1b]8;;https://evil.example\x07click\x1b]8;;\x07", "\x1b[2J\x1b[H", "ok\rFAKE", "ab\x08\x08XY",
           "report\u202egnp.exe", "\x9b31m", "a\u2028b\x85c", "\x1b]0;title\x07",
           "[red]x[/red] [link=https://e.example]y[/link]")
hostile_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(HOSTILE)


def _error_line(err: BaseException) -> str:
    """The stderr `main` leaves for a command that raised `err`."""
    from ziya_batch import cli

    def raise_it(*a, **kw):
        raise err

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.setattr(cli, "app", raise_it)
        with pytest.raises(SystemExit):
            main(["status"])
    return stderr.getvalue()


@settings(max_examples=200, deadline=None)
@given(text=hostile_text)
def test_an_error_line_never_carries_control_characters(text):
    message = f"input not usable: {text}.jsonl (compressed: shards are byte ranges of plain JSONL)"
    err = _error_line(InputError(message))
    assert err.endswith("\n") and err.count("\n") == 1
    assert RAW.search(err[:-1]) is None
    assert err == f"ziya-batch: error: {escape_controls(mask_text(message))}\n"


def test_a_part_path_a_foreign_manifest_names_is_shown_escaped(monkeypatch, capsys, tmp_path):
    """`report` on an output directory someone else wrote: the missing part's path comes from its manifest."""
    out = tmp_path / "out"
    out.mkdir()
    path = "results/part-\x1b]8;;https://evil.example\x07x\x1b]8;;\x07\x1b[2K\r\u202elmth.jsonl"
    (out / "manifest.json").write_text(json.dumps({"job_id": "0123456789abcdef", "spec": {"name": "x"},
                                                   "parts": {"results": [{"path": path, "lines": 1,
                                                                          "sha256": "0" * 64}]}}))
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(out), "-o", str(tmp_path / "r.html"), "--redis-url", "redis://127.0.0.1:1/0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and RAW.search(err[:-1]) is None
    assert "part-\\x1b]8;;https://evil.example\\x07x\\x1b]8;;\\x07\\x1b[2K\\x0d\\u202elmth.jsonl is listed" in err


def test_escape_controls_keeps_other_text():
    assert escape_controls("写一首诗 [v2] café 🙂 a\tb") == "写一首诗 [v2] café 🙂 a\\x09b"
    assert escape_controls("\x1b[2J\x9b\u202e\u2066") == "\\x1b[2J\\x9b\\u202e\\u2066"


@settings(max_examples=100, deadline=None)
@given(note=hostile_text, change=hostile_text)
def test_submit_notes_are_escaped(note, change):
    """`submit`'s notes quote workers' notes (a model's load error, which may quote its config) and the settings a
    resubmit changed."""
    from ziya_batch import cli, jobs, spec
    from ziya_batch.queue import JobState

    class Status:
        job_id, state = "0123456789abcdef", JobState.QUEUED

    def submitted(spec_, broker, check_model_dir, changes):
        changes.append(change)
        return Status()

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(spec, "load_spec", lambda path: object())
        mp.setattr(cli, "_broker", lambda url: object())
        mp.setattr(jobs, "submit_job", submitted)
        mp.setattr(jobs, "unserved_note", lambda broker, job_id: f"none could load it ({note})")
        with pytest.raises(SystemExit) as exit_:
            main(["submit", "job.yaml"])
    assert exit_.value.code == 0 and stdout.getvalue() == "0123456789abcdef\n"
    err = stderr.getvalue().splitlines()
    assert len(err) == 2 and not any(RAW.search(line) for line in err)
    assert escape_controls(change) in err[0] and f"note: none could load it ({escape_controls(note)})" == err[1]


@settings(max_examples=100, deadline=None)
@given(name=hostile_text, path=hostile_text)
def test_run_prints_the_spec_s_text_escaped(name, path):
    from rich.console import Console

    from ziya_batch.runtime import local

    class Spec:
        pass

    class Status:
        job_id, prompts_total, shards_total = "0123456789abcdef", 3, 1
        prompts_done = prompts_failed = samples = output_tokens = 0

    class State:
        value = "completed"

    spec, status = Spec(), Status()
    spec.name = name or "x"
    spec.output = Spec()
    spec.output.path = f"/out/{path}"
    status.state = State()
    console = Console(record=True, width=1000, color_system=None)
    console.print(local._job_line(status, spec))
    line = console.export_text()
    assert RAW.search(line.rstrip("\n")) is None
    assert f"({escape_controls(spec.name)})" in line and escape_controls(spec.output.path) in line
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        local._print_summary(spec, status, 1.0)
    assert not any(RAW.search(line) for line in stdout.getvalue().splitlines())
    assert f"  output    {escape_controls(spec.output.path)} (manifest" in stdout.getvalue()


@settings(max_examples=100, deadline=None)
@given(name=hostile_text, note=hostile_text)
def test_status_json_is_the_same_json_without_raw_controls(name, note):
    """`status --json` is one JSON document a line: JSON escapes C0 itself, the rest (DEL, C1 such as U+009B, the
    bidirectional overrides) are written as \\u escapes too; the document read back is the same."""
    from ziya_batch import jobs
    from ziya_batch.runtime.status_view import show_status

    class Status:
        def to_dict(self):
            return {"job_id": "0123456789abcdef", "name": name, "error": name[::-1]}

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(jobs, "list_jobs", lambda broker: [Status()])
        mp.setattr(jobs, "waiting_notes", lambda broker, statuses: [note for _ in statuses])
        show_status(object(), None, as_json=True)
    [line] = stdout.getvalue().splitlines()
    assert RAW.search(line) is None
    assert json.loads(line) == [{"job_id": "0123456789abcdef", "name": name, "error": name[::-1], "note": note}]


@settings(max_examples=100, deadline=None)
@given(file=hostile_text, why=hostile_text)
def test_worker_log_lines_are_one_line_without_raw_controls(file, why):
    """Workers log users' text (an input file's name a glob matched, an error quoting a line): each record stays
    one line, which no text in it can end early (a forged record after it) or fill with escape sequences. A
    traceback keeps its lines (the message's own newlines among them), their other control characters escaped."""
    import logging

    from ziya_batch.errors import OneLineLogFormatter

    fmt = OneLineLogFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("ziya_batch.work.generation", logging.WARNING, __file__, 1,
                               "line %s:%d failed generation: %s", (file, 7, why), None)
    line = fmt.format(record)
    assert "\n" not in line and RAW.search(line) is None
    assert line == f"WARNING ziya_batch.work.generation: line {escape_controls(file)}:7 failed generation: " \
                   f"{escape_controls(why)}"
    try:
        raise ValueError(why)
    except ValueError as err:
        record = logging.LogRecord("ziya_batch.work.worker", logging.ERROR, __file__, 1, "shard %s/%d failed",
                                   (file, 3), (type(err), err, err.__traceback__))
    text = fmt.format(record)
    lines = text.split("\n")
    assert lines[0] == f"ERROR ziya_batch.work.worker: shard {escape_controls(file)}/3 failed"
    assert lines[1] == "Traceback (most recent call last):" and len(lines) >= 4
    assert not any(RAW.search(x) for x in lines)
    shown = "\n".join(escape_controls(part) for part in why.split("\n"))
    assert text.endswith(f"ValueError: {shown}" if why else "ValueError")


def test_warnings_a_command_logs_are_escaped(monkeypatch):
    """`run` logs warnings in its own process (a replica that died with its error, a finalize waiting on storage,
    a part that cannot be read) through logging's last resort, which writes the message as it is."""
    import logging

    from ziya_batch import cli

    monkeypatch.setattr(cli, "app", lambda *a, **kw: 0)
    with pytest.raises(SystemExit):
        main(["status"])
    record = logging.LogRecord("ziya_batch.runtime.replicas", logging.WARNING, __file__, 1, "replica %s died: %s",
                               ("run-0", "\x1b]0;owned\x07\rRuntimeError: \u202ex"), None)
    assert logging.lastResort.format(record) == "replica run-0 died: \\x1b]0;owned\\x07\\x0dRuntimeError: \\u202ex"


def test_a_worker_log_record_is_masked_and_escaped_together():
    """A worker installs both (log_one_line, redact.mask_logs): the traceback mask_logs formats when the record is
    made still has its control characters escaped, and a password in it is ***."""
    import logging

    from ziya_batch.errors import OneLineLogFormatter
    from ziya_batch.redact import mask_logs

    mask_logs()
    fmt = OneLineLogFormatter("%(levelname)s: %(message)s")
    try:
        raise OSError("s3://AKIA:TopSecret@bucket/\x1b[2Kin\u202e.jsonl unreadable")
    except OSError as err:
        record = logging.getLogger("ziya_batch.test").makeRecord(
            "ziya_batch.test", logging.ERROR, __file__, 1, "read %s", (err,), (type(err), err, err.__traceback__))
    text = fmt.format(record)
    assert "TopSecret" not in text and not any(RAW.search(line) for line in text.split("\n")), text
    assert text.splitlines()[0] == "ERROR: read s3://AKIA:***@bucket/\\x1b[2Kin\\u202e.jsonl unreadable"
    assert text.endswith("OSError: s3://AKIA:***@bucket/\\x1b[2Kin\\u202e.jsonl unreadable")


def test_a_worker_log_record_with_a_lone_surrogate_is_written(monkeypatch):
    """Ray gives a worker process a stderr that encodes UTF-8 strictly: a record quoting a lone surrogate (an error
    about a value decoded with surrogateescape) raised in the handler, which printed a 'Logging error' traceback in
    its place. It is one line, the surrogate as its escape."""
    import io
    import logging

    from ziya_batch.errors import OneLineLogFormatter

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineLogFormatter("%(levelname)s: %(message)s"))
    failed = []
    monkeypatch.setattr(handler, "handleError", lambda record: failed.append(record))
    log = logging.getLogger("ziya_batch.test_surrogate")
    log.addHandler(handler)
    log.propagate = False
    try:
        bad = b"in-\xff.jsonl".decode("utf-8", "surrogateescape")
        log.warning("line %s:%d failed generation: %s", bad, 3, ValueError(f"cannot read {bad}"))
        try:
            raise ValueError(bad)
        except ValueError:
            log.exception("shard %s failed", bad)
    finally:
        log.removeHandler(handler)
    assert not failed
    text = raw.getvalue().decode("utf-8")
    assert text.startswith("WARNING: line in-\\udcff.jsonl:3 failed generation: cannot read in-\\udcff.jsonl\n")
    assert "ERROR: shard in-\\udcff.jsonl failed\nTraceback" in text and text.endswith("ValueError: in-\\udcff.jsonl\n")


def test_a_crash_traceback_at_the_cli_s_end_is_escaped(monkeypatch, capsys):
    """A bug's traceback (exit 1) keeps its lines, but the text it quotes (an exception naming a file a glob matched,
    a value from a manifest) is shown with its control characters as escapes, as error lines and logs are."""
    from ziya_batch import cli

    def bug(*a, **kw):
        raise ValueError("results/part-\x1b]0;owned\x07\x1b[2K\r\u202elmth.jsonl")

    monkeypatch.setattr(cli, "app", bug)
    with pytest.raises(SystemExit) as exit_:
        main(["status"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("Traceback (most recent call last):"), err
    assert not any(RAW.search(line) for line in err.split("\n")), err
    assert err.endswith("ValueError: results/part-\\x1b]0;owned\\x07\\x1b[2K\\x0d\\u202elmth.jsonl\n"), err
