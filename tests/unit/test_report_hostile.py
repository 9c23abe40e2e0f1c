"""`ziya-batch report` on output directories it did not write, or that were damaged: records of other shapes are
counted, not used, and never a traceback; parts and commit markers that cannot be read are one error line naming
them; -o replaces only an earlier report, and only once the new page is whole; a pipe nobody reads is an error,
not a hang. Random JSON values as records (hypothesis) never make anything but a page or an InputError."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ziya_batch import report
from ziya_batch.errors import InputError
from ziya_batch.report import compute_stats, render_html, write_report

KINDS = ("results", "errors", "experience")


def crafted(out: Path, parts: dict[str, bytes]) -> Path:
    """An output directory with a manifest listing one part of each kind given, holding exactly these bytes."""
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for kind, data in parts.items():
        (out / kind).mkdir(exist_ok=True)
        (out / kind / "part-00000.jsonl").write_bytes(data)
        rows[kind] = [{"path": f"{kind}/part-00000.jsonl", "lines": 1, "sha256": "0" * 64}]
    (out / "manifest.json").write_text(json.dumps({"job_id": "0123456789abcdef", "spec": {"name": "x"},
                                                   "parts": rows}))
    return out


def lines(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_records_of_other_shapes_are_counted_not_used(tmp_path):
    good = {"id": "a", "sample_index": 0, "finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    bad = [{"usage": {"prompt_tokens": "abc"}}, {"usage": {"prompt_tokens": None}}, {"usage": {"prompt_tokens": [1]}},
           {"usage": {"completion_tokens": 10 ** 400}}, {"usage": {"prompt_tokens": -3}}, {"usage": "x"}, [1, 2], "s",
           7, None, {"custom_id": "c", "response": {"body": {"choices": ["x"], "usage": {"completion_tokens": 2}}}},
           {"custom_id": "c", "response": {"body": "str"}}]
    out = crafted(tmp_path / "out", {
        "results": lines(good, *bad) + b'{"usage": {"prompt_tokens": NaN}}\n',
        "errors": lines({"error": "a string"}, {"error": {"code": ["x"]}}, "not a record", {"error": {"code": "oom"}}),
        "experience": lines({"reward": 1e308}, {"reward": -1.7e308}, {"reward": 1.7e308}, {"reward": "1"},
                            {"reward": True}, [0.5])})
    s = compute_stats(str(out))
    assert s.prompt_tokens[5] == 1 and s.response_tokens[2] >= 1
    assert s.skipped >= 10
    assert s.error_codes["oom"] == 1 and s.error_codes["unknown"] == 1 and s.error_codes["list"] == 1
    page = render_html(s)
    assert "records not counted" in page
    s.rewards = [1e20] * 5 + [1e20]                              # equal and past 2^53: one bin, not a division by 0
    render_html(s)


@pytest.mark.parametrize("data,why", [
    (b'{"a": 1}\n{oops\n', "line 2 is not JSON"), (b'{"a": "\xff\xfe"}\n', "line 1 is not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 1 nests too deeply")])
def test_a_part_that_cannot_be_read_is_one_line_naming_it(tmp_path, data, why):
    out = crafted(tmp_path / "out", {"results": data})
    with pytest.raises(InputError, match=f"results/part-00000.jsonl: {why}"):
        compute_stats(str(out))


def test_a_parquet_part_that_is_not_parquet(tmp_path):
    out = crafted(tmp_path / "out", {})
    (out / "results").mkdir()
    (out / "results" / "part-00000.parquet").write_bytes(b"PAR1 not really")
    (out / "manifest.json").write_text(json.dumps({"job_id": "j", "parts": {"results": [
        {"path": "results/part-00000.parquet", "lines": 1, "sha256": "0" * 64}]}}))
    with pytest.raises(InputError, match="results/part-00000.parquet: not a Parquet file"):
        compute_stats(str(out))


@pytest.mark.parametrize("marker", [b"{bad", b'{"index": 0}', b"[1]", b"\xff", b'{"index": 0, "token": 1, "format": '
                                    b'"jsonl", "parts": {}, "stats": {"prompts_done": "many"}}',
                                    b'{"index": 0.5, "token": 1, "format": "jsonl", "parts": {}}'])
def test_a_damaged_commit_marker_is_one_line_naming_it(tmp_path, marker):
    out = tmp_path / "out"
    (out / "_committed").mkdir(parents=True)
    (out / "_committed" / "part-00000.json").write_bytes(marker)
    with pytest.raises(InputError, match=r"_committed/part-00000.json is not a commit marker ziya-batch wrote"):
        compute_stats(str(out))


def test_minus_o_replaces_only_a_file_that_begins_as_a_report(tmp_path, job_output):
    out = job_output(tmp_path / "out")
    part = next((out / "results").glob("part-*"))
    title = b"<title>ziya-batch report: x"
    victims = [part, tmp_path / "in.jsonl", tmp_path / "notes.md"]
    part.write_bytes(part.read_bytes() + b'{"prompt": "Write an HTML page starting ' + title + b'"}\n')
    (tmp_path / "in.jsonl").write_bytes(b'{"prompt": "' + title + b'"}\n')
    (tmp_path / "notes.md").write_bytes(b"# notes\n<TITLE>Ziya-Batch Report: old</TITLE>\n")
    for victim in victims:
        before = victim.read_bytes()
        with pytest.raises(InputError, match="not a ziya-batch report"):
            write_report(str(out), victim)
        assert victim.read_bytes() == before


def test_an_earlier_report_stays_whole_when_the_new_one_fails(tmp_path, job_output):
    out = job_output(tmp_path / "out")
    page = tmp_path / "r.html"
    write_report(str(out), page)
    before = page.read_bytes()
    bad = crafted(tmp_path / "bad", {"results": b"{oops\n"})
    with pytest.raises(InputError):
        write_report(str(bad), page)
    assert page.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.html")] == []


def test_text_that_is_not_utf8_is_written_as_its_escape(tmp_path):
    out = crafted(tmp_path / "out", {"results": b'{"finish_reason": "\\ud800", "usage": {"completion_tokens": 1}}\n'})
    page = write_report(str(out), tmp_path / "r.html").read_text(encoding="utf-8")
    assert "\\ud800" in page


def test_links_and_pipes_as_the_target(tmp_path, job_output):
    out = job_output(tmp_path / "out")
    (tmp_path / "dangling").symlink_to(tmp_path / "elsewhere" / "r.html")
    with pytest.raises(InputError, match="symbolic link to nothing"):
        write_report(str(out), tmp_path / "dangling")
    assert not (tmp_path / "elsewhere").exists()
    write_report(str(out), tmp_path / "r.html")
    (tmp_path / "link.html").symlink_to(tmp_path / "r.html")
    with pytest.raises(InputError, match="is a symbolic link"):
        write_report(str(out), tmp_path / "link.html")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="no process reads"):
        write_report(str(out), fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    # the reader opens the pipe; the report is written to it once it does
    for _ in range(200):
        try:
            write_report(str(out), fifo)
            break
        except InputError:
            threading.Event().wait(0.01)
    reader.join(10)
    assert got and got[0].startswith(report.REPORT_HEAD.encode())


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                     max_leaves=8)
_usage_like = st.fixed_dictionaries({}, optional={
    "usage": st.one_of(_json, st.fixed_dictionaries({}, optional={"prompt_tokens": _json, "completion_tokens": _json})),
    "finish_reason": _json, "sample_index": _json, "custom_id": _json, "reward": _json, "error": _json,
    "response": st.one_of(_json, st.fixed_dictionaries({}, optional={"body": st.one_of(_json, st.fixed_dictionaries(
        {}, optional={"usage": _json, "choices": _json}))}))})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.dictionaries(st.sampled_from(KINDS), st.lists(st.one_of(_json, _usage_like), max_size=5)))
def test_any_json_records_make_a_page_or_one_error_line(tmp_path_factory, records):
    out = crafted(tmp_path_factory.mktemp("o") / "out",
                  {k: b"".join(json.dumps(r, allow_nan=True).encode() + b"\n" for r in v) for k, v in records.items()})
    try:
        s = compute_stats(str(out))
    except InputError:
        return
    page = render_html(s).encode("utf-8", "backslashreplace")
    assert page.startswith(report.REPORT_HEAD.encode())


def test_a_part_path_that_is_a_directory_or_climbs_out_says_so(tmp_path):
    out = crafted(tmp_path / "out", {"results": lines({"a": 1})})
    (out / "results" / "part-00000.jsonl").unlink()
    (out / "results" / "part-00000.jsonl").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        compute_stats(str(out))
    assert e.value.filename.endswith("results/part-00000.jsonl")
    (out / "manifest.json").write_text(json.dumps({"job_id": "j", "parts": {"results": [
        {"path": "../../../../etc/hostname", "lines": 1, "sha256": "0" * 64}]}}))
    with pytest.raises(InputError, match=r"'../../../../etc/hostname' names a place outside the output directory"):
        compute_stats(str(out))
