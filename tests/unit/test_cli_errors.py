"""main's mapping of library exceptions a user causes to one line and an exit code; a bug keeps its traceback."""
from __future__ import annotations

import pytest
import redis
import redis.exceptions as rex

from ziya_batch.cli import main, user_error


def test_library_errors_a_user_causes_map_to_one_line():
    for err, code in ((rex.ConnectionError("Error 111 connecting"), 3), (rex.TimeoutError("timed out"), 3),
                      (rex.AuthenticationError("invalid password"), 3), (rex.ReadOnlyError("READONLY"), 3),
                      (PermissionError(13, "Permission denied", "/x/report.html"), 2)):
        message, got = user_error(err)
        assert got == code and "\n" not in message, (err, message)
    for url in ("http://h", "redis://h:99999", "redis://[::1"):
        with pytest.raises(ValueError) as info:
            redis.Redis.from_url(url)
        message, code = user_error(info.value)
        assert code == 2 and message.startswith("bad Redis URL")


def test_a_bug_is_not_dressed_up_as_a_user_error():
    assert user_error(ValueError("a bug of ours")) is None
    assert user_error(KeyError("x")) is None
    assert user_error(OSError("no filename")) is None


def test_main_prints_one_line_and_exits_with_the_code(monkeypatch, capsys):
    from ziya_batch import cli

    def boom(*a, **kw):
        raise rex.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit) as exit_:
        main(["status"])
    assert exit_.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ziya-batch: error: cannot reach Redis")
    monkeypatch.setattr(cli, "app", lambda *a, **kw: [][1])
    with pytest.raises(SystemExit) as exit_:        # a bug: its traceback, as Python prints one (masked), exit 1
        main(["status"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("Traceback") and "IndexError: list index out of range" in err


@pytest.mark.parametrize("args", [["status", "a\udcff"], ["cancel", "\udce9t\udce9"], ["report", "x", "-o", "r\udcff"],
                                  ["demo-model", "/tmp/m\udcff\nx"], ["submit", "\udc80.yaml"]])
def test_an_argument_that_is_not_utf8_is_one_line_before_anything_runs(monkeypatch, capsys, args):
    """Undecodable bytes on the command line (Python keeps them as lone surrogates) fit no Redis key, spec or URL:
    one line naming the argument, exit 2, before a command runs (demo-model had made its directory first)."""
    from ziya_batch import cli

    monkeypatch.setattr(cli, "app", lambda *a, **kw: pytest.fail("the command ran"))
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ziya-batch: error: argument '") and "is not UTF-8 text" in line and "\\x" in line
