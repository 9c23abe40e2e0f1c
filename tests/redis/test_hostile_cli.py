"""What the `ziya-batch` command does with bad input or a missing service: exactly one line on stderr and the
documented exit code (2 bad input, 3 a service that cannot be reached), never a traceback. Real processes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import child_env


def _cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "ziya_batch.cli", *args], capture_output=True, text=True, timeout=120,
                       cwd=cwd, env=child_env())
    return p.returncode, p.stdout, p.stderr


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ziya-batch: error: "), err
    return lines[0]


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    return tmp_path


def _spec(work: Path, out: str, **extra) -> Path:
    path = work / f"spec-{abs(hash((out, str(extra))))}.json"
    path.write_text(json.dumps({"name": "cli", "model": {"path": str(work / "model")}, "input": ["in.jsonl"],
                                "output": {"path": out}, **extra}))
    return path


def test_bad_outputs_are_one_line_exit_2(work, redis_server):
    (work / "afile").write_text("x")
    (work / "corrupt-owner").mkdir()
    (work / "corrupt-owner" / "_owner.json").write_text('["not", "an", "owner"]')
    (work / "corrupt-manifest").mkdir()
    (work / "corrupt-manifest" / "manifest.json").write_bytes(b"\xff\xfe{")
    cases = {"afile": "is a file", "afile/sub": "is a file", "/sys/ziya-batch-test/out": "cannot be written",
             "corrupt-owner": "_owner.json is corrupt", "corrupt-manifest": "manifest.json is corrupt"}
    for out, expect in cases.items():
        code, stdout, err = _cli("submit", str(_spec(work, out)), "--redis-url", redis_server.url, cwd=work)
        assert code == 2 and stdout == "" and expect in _one_line(err), (out, code, err)


def test_insane_numbers_and_non_utf8_specs_are_one_line_exit_2(work, redis_server):
    (work / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, _, err = _cli("submit", str(work / "latin1.yaml"), "--redis-url", redis_server.url, cwd=work)
    assert code == 2 and "not UTF-8" in _one_line(err)
    for sampling, field in (({"top_k": 10**20}, "top_k"), ({"seed": -5}, "seed"),
                            ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens")):
        code, _, err = _cli("submit", str(_spec(work, "o", sampling=sampling)), "--redis-url", redis_server.url,
                            cwd=work)
        assert code == 2 and field in _one_line(err), err
    code, _, err = _cli("submit", str(_spec(work, "o", reliability={"lease_s": 10**9})), "--redis-url",
                        redis_server.url, cwd=work)
    assert code == 2 and "lease_s" in _one_line(err)


@pytest.mark.parametrize("url,code,expect", [
    ("redis://127.0.0.1:1/0", 3, "cannot reach Redis"),            # a port nothing listens on
    ("redis://127.0.0.1:99999/0", 2, "bad Redis URL"),             # no such port
    ("redis://127.0.0.1:abc/0", 2, "bad Redis URL"),
    ("http://127.0.0.1:6379/0", 2, "bad Redis URL"),                # wrong scheme
    ("redis://[::1", 2, "bad Redis URL"),                           # malformed
])
def test_redis_urls_that_cannot_work_are_one_line(work, url, code, expect):
    for args in (("submit", str(_spec(work, "o"))), ("status",), ("cancel", "nojob")):
        got, stdout, err = _cli(*args, "--redis-url", url, cwd=work)
        assert got == code and stdout == "" and expect in _one_line(err), (args, got, err)


def test_an_unwritable_report_file_is_one_line_exit_2(work):
    out = work / "done"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "job_id": "j", "spec": None, "summary": {},
                                                   "format": "jsonl", "num_shards": 0, "records": {}, "parts": {}}))
    code, _, err = _cli("report", str(out), "-o", "/sys/ziya-batch-report.html", "--redis-url",
                        "redis://127.0.0.1:1/0", cwd=work)
    assert code == 2 and "ziya-batch-report.html" in _one_line(err)
    (work / "adir.html").mkdir()
    code, _, err = _cli("report", str(out), "-o", str(work / "adir.html"), "--redis-url", "redis://127.0.0.1:1/0",
                        cwd=work)
    assert code == 2 and "adir.html" in _one_line(err)
