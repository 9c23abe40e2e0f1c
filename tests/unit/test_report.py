"""The job report: statistics from committed parts and the manifest, rendered as one self-contained HTML
page, and checked by rendering it in headless Chromium."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest

from ziya_batch import io
from ziya_batch.report import compute_stats, histogram_svg, render_html, report_main, write_report


def test_stats_from_the_manifest(tmp_path, job_output):
    out = job_output(tmp_path / "out")
    s = compute_stats(str(out), {"job_id": "job123", "created_at": 1.7e9, "state": "completed"})
    assert s.source == "manifest" and s.name == "report-test" and s.job_id == "job123"
    assert s.shards_committed == 4 and s.prompts_done == 100 and s.samples == 200
    assert sum(s.prompt_tokens.values()) == 100                  # once per prompt, not per sample
    assert sum(s.response_tokens.values()) == 200
    assert s.finish_reasons == Counter({"stop": 100, "length": 100})
    assert s.error_codes == Counter({"invalid_json": 2, "retries_exhausted": 1})
    assert len(s.rewards) == 200 and min(s.rewards) == -1.0
    assert [c[0] for c in s.commits] == [1.7e9 + 10, 1.7e9 + 20, 1.7e9 + 30, 1.7e9 + 40]
    assert sum(c[1] for c in s.commits) == s.output_tokens > 0


def test_stats_before_the_manifest_come_from_commit_markers(tmp_path, job_output):
    out = job_output(tmp_path / "out", shards=3, manifest=False)
    (out / "_staging").mkdir(exist_ok=True)
    s = compute_stats(str(out))
    assert s.source == "commit markers" and s.shards_committed == 3 and s.prompts_done == 75
    assert sum(s.finish_reasons.values()) == 150


def test_openai_batch_lines_are_understood(tmp_path):
    out = tmp_path / "out"
    line = {"id": "batch_req_1", "custom_id": "c1", "error": None,
            "response": {"status_code": 200, "body": {"choices": [{"index": 0, "finish_reason": "length"}],
                                                      "usage": {"prompt_tokens": 7, "completion_tokens": 3}}}}
    io.stage_shard(str(out), 0, 1, {"results": [line]}, input_format="openai-batch")
    m = io.promote_shard(str(out), 0, 1, stats={"prompts_done": 1})
    io.write_manifest(str(out), "{}", {"job_id": "j"}, {0: m})
    s = compute_stats(str(out))
    assert s.prompt_tokens == Counter({7: 1}) and s.response_tokens == Counter({3: 1})
    assert s.finish_reasons == Counter({"length": 1})


def test_nothing_to_report_is_a_clear_error(tmp_path):
    from ziya_batch.errors import ZiyaBatchError

    with pytest.raises(ZiyaBatchError, match="no manifest.json and no committed parts"):
        compute_stats(str(tmp_path / "empty"))


def test_html_is_self_contained(tmp_path, job_output):
    out = job_output(tmp_path / "out")
    page = render_html(compute_stats(str(out)))
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 6
    assert "<script" not in page and "src=" not in page and "href=" not in page and "@import" not in page
    assert set(re.findall(r"https?://[^\"' )]+", page)) == {"http://www.w3.org/2000/svg"}
    for title in ("Throughput over time", "Prompt length", "Response length", "Finish reasons",
                  "Errors by code", "Reward distribution"):
        assert title in page
    assert "retries_exhausted" in page and "invalid_json" in page


def test_names_are_escaped(tmp_path, job_output):
    out = job_output(tmp_path / "out", shards=1)
    s = compute_stats(str(out))
    s.name = "<img src=x onerror=alert(1)>"
    s.error_codes = Counter({"<b>code</b>": 1})
    page = render_html(s)
    assert "<img" not in page and "<b>code" not in page and "&lt;img" in page


def test_histogram_bins_hold_every_count():
    svg = histogram_svg(Counter({1: 3, 2: 5, 100: 1}), "x", "t")
    counts = [int(m) for m in re.findall(r": (\d+)</title>", svg)]
    assert sum(counts) == 9 and len(counts) == 3
    assert "no data" in histogram_svg(Counter(), "x", "t")


def test_report_main_takes_an_output_path_without_redis(tmp_path, monkeypatch, job_output):
    monkeypatch.delenv("ZIYA_BATCH_REDIS_URL", raising=False)
    out = job_output(tmp_path / "out")
    path = report_main(str(out), tmp_path / "r" / "report.html")
    assert path.exists() and "report-test" in path.read_text()
    from ziya_batch.errors import ZiyaBatchError

    with pytest.raises(ZiyaBatchError, match="output path"):
        report_main("somejobid", tmp_path / "x.html")


def test_the_report_replaces_only_an_earlier_report(tmp_path, job_output):
    """-o names the file to write: an earlier report there is replaced, but the job's manifest, an input file or
    any other file typed by mistake is refused untouched, as is a directory; a full disk is one line too."""
    from ziya_batch.errors import InputError

    out = job_output(tmp_path / "out")
    page = tmp_path / "report.html"
    write_report(str(out), page)
    first = page.read_text()
    write_report(str(out), page)                        # an earlier report: replaced
    written = re.compile(r"report written [^<]*")      # the second may be written a second later
    assert written.sub("", page.read_text()) == written.sub("", first)
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "q"}\n')
    (tmp_path / "index.html").write_text("<!DOCTYPE html><html><title>my page</title></html>")
    for victim in (out / "manifest.json", tmp_path / "in.jsonl", tmp_path / "index.html"):
        before = victim.read_bytes()
        with pytest.raises(InputError, match="not a ziya-batch report"):
            write_report(str(out), victim)
        assert victim.read_bytes() == before
    with pytest.raises(InputError, match="is a directory"):
        write_report(str(out), tmp_path)
    (tmp_path / "empty.html").write_text("")
    write_report(str(out), tmp_path / "empty.html")     # an empty file holds nothing to lose
    if Path("/dev/full").exists():
        with pytest.raises(InputError, match="cannot write the report to /dev/full"):
            write_report(str(out), "/dev/full")


# -- rendering in Chromium --------------------------------------------------------------------------------

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0 and color in (2, 6)
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 0xFF
            elif f == 2:
                line[x] = (line[x] + b) & 0xFF
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def screenshot(html_path: Path, png_path: Path, tmp_path: Path, size: str = "1280,1500") -> None:
    binary = _chromium()
    subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                    # the screenshot after every compositor stage has drawn (once, in a full run of the suite, a
                    # shot showed the page without its charts' bars)
                    "--run-all-compositor-stages-before-draw", "--virtual-time-budget=2000",
                    f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={size}",
                    f"--screenshot={png_path}", html_path.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium); "
                                                 "the HTML report cannot be rendered")
def test_report_renders_in_headless_chromium(tmp_path, job_output):
    out = job_output(tmp_path / "out")
    html_path = write_report(str(out), tmp_path / "report.html", {"created_at": 1.7e9, "state": "completed"})
    png = tmp_path / "report.png"
    screenshot(html_path, png, tmp_path, size="1000,900")
    width, height, rows = png_pixels(png.read_bytes())
    assert (width, height) == (1000, 900)
    bpp = len(rows[0]) // width
    colours = Counter(row[x:x + 3] for row in rows[::3] for x in range(0, len(row), bpp * 3))
    # not blank: many colours, and the charts' blue bars (#3b6ea8) are on the page
    assert len(colours) > 20, colours.most_common(5)
    assert colours[bytes.fromhex("3b6ea8")] > 50
    assert colours.most_common(1)[0][1] < 0.9 * sum(colours.values())


def test_the_page_shows_an_output_urls_password_masked():
    # `ziya-batch report sftp://user:PASSWORD@host/runs/x/`: the page, made to be mailed and archived, names where it
    # was computed from, without the password the command line held
    from ziya_batch.report import JobStats

    page = render_html(JobStats(job_id="j", name="n", state="completed", source="manifest",
                                output_url="sftp://reader:PageSecret@files.example/runs/x/"))
    assert "PageSecret" not in page and "sftp://reader:***@files.example/runs/x/" in page
