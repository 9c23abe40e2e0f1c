"""Numeric options out of range, unknown options and missing arguments are one line and exit 2 (a port of
99999 was an OverflowError traceback from deep in the HTTP server); nothing is started before the check."""
from __future__ import annotations

import pytest

from ziya_batch import cli


@pytest.fixture(autouse=True)
def _nothing_runs(monkeypatch):
    # a value that passes the check would start a server, Ray or a job: the test must not get that far
    def started(*a, **kw):
        raise AssertionError("the command ran with an out-of-range value")

    for module, name in (("ziya_batch.api.serve", "serve_main"), ("ziya_batch.runtime.cluster", "serve_node"),
                         ("ziya_batch.runtime.local", "run_job"), ("ziya_batch.runtime.status_view", "show_status")):
        monkeypatch.setattr(f"{module}.{name}", started)


@pytest.mark.parametrize("argv,option", [
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--port", "0"], "--port"),
    (["serve", "--port", "http"], "--port"),
    (["serve", "--tensor-parallel", "65"], "--tensor-parallel"),
    (["worker", "--tensor-parallel", "99999999999999999999"], "--tensor-parallel"),
    (["worker", "--num-gpus", "99999999999999999999"], "--num-gpus"),
    (["worker", "--num-gpus", "-1"], "--num-gpus"),
    (["run", "job.yaml", "--workers", "99999999999999999999"], "--workers"),
    (["run", "job.yaml", "--workers", "0"], "--workers"),
    (["status", "--interval", "-1"], "--interval"),
    (["status", "--interval", "nan"], "--interval"),
    (["status", "--interval", "0.05"], "outside 0.1..3600"),
    (["status", "--interval", "NaN"], "not a number"),
    (["status", "--interval", "1e309"], "--interval"),
    (["status", "--no-such-option"], "--no-such-option"),
    (["cancel"], "job_id"),
])
def test_a_bad_option_is_one_line_exit_2(argv, option, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ziya-batch: error: ") and option in lines[0], err
    assert f"{argv[0]} --help`" in lines[0]                # and where to read what is allowed


def test_help_and_no_arguments_still_show_the_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "--help"])
    assert done.value.code == 0 and "--port" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main([])
    out = capsys.readouterr()
    assert done.value.code == 2 and "serve" in out.out and "error" not in out.err


def test_the_bounds_hold_where_they_are_inside(monkeypatch):
    got = {}
    monkeypatch.setattr("ziya_batch.api.serve.serve_main", lambda **kw: got.update(kw))
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "--port", "65535", "--tensor-parallel", "64"])
    assert done.value.code == 0 and got["port"] == 65535 and got["tensor_parallel"] == 64
