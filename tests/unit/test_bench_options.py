"""The bench's options are defined once (tools/bench.py's parser, defaults from BenchOptions and the engine's
EngineConfig); `ziya-batch bench` hands its arguments to that parser unchanged."""
from __future__ import annotations

import pytest

from ziya_batch import cli
from ziya_batch.engine.types import EngineConfig
from ziya_batch.tools import bench
from ziya_batch.tools.bench import BenchOptions, parse_options


def test_defaults_are_the_options_and_the_engines():
    assert parse_options([]) == BenchOptions()
    assert (BenchOptions.schedule, BenchOptions.kv_cache_dtype) == (EngineConfig.schedule, EngineConfig.kv_cache_dtype)
    assert BenchOptions.layers == 40                     # LLaMA-13B's depth (README, `ziya-batch bench`)


def test_only_takes_commas_and_repeats():
    assert parse_options(["--only", "engine", "--only", "hf-generate,roofline"]).only == \
        ("engine", "hf-generate", "roofline")


def test_a_bad_value_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_options(["--layers", "0"], prog="ziya-batch bench")
    assert exc.value.code == 2
    assert "ziya-batch bench: error: argument --layers: must be at least 1, not 0" in capsys.readouterr().err


def test_the_command_forwards_its_arguments(monkeypatch):
    got = []
    monkeypatch.setattr(bench, "run_bench", got.append)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--layers", "2", "--only", "engine", "--schedule", "fcfs", "--kv-cache-dtype", "fp8"])
    assert exc.value.code == 0
    assert got == [BenchOptions(layers=2, only=("engine",), schedule="fcfs", kv_cache_dtype="fp8")]


def test_the_command_help_is_the_parsers(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ziya-batch bench") and "--kv-cache-dtype" in out and "--tensor-parallel" in out


def test_workload_w3_is_a_parser_choice(monkeypatch):
    got = []
    monkeypatch.setattr(bench, "run_bench", got.append)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--workload", "W3", "--requests", "8"])
    assert exc.value.code == 0
    assert got == [BenchOptions(requests=8, workload="W3")]


def test_workload_w3_refuses_options_it_would_ignore(monkeypatch):
    # W3 is its own comparison on one float16 engine: options it would ignore are refused before any GPU work
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    with pytest.raises(bench.ModelError, match="--workload W3"):
        bench.run_bench(BenchOptions(workload="W3", prefix_caching="both"))


def test_seats_and_mixed_step_graphs_are_options():
    assert parse_options(["--max-num-seqs", "384", "--mixed-graphs", "both"]) == \
        BenchOptions(max_num_seqs=384, mixed_graphs="both")
    assert BenchOptions.max_num_seqs == EngineConfig.max_num_seqs and BenchOptions.mixed_graphs == "on"


@pytest.mark.parametrize("opts,match", [
    (BenchOptions(workload="W2", max_num_seqs=384), "--max-num-seqs applies to workload W1"),
    (BenchOptions(mixed_graphs="both", tensor_parallel=2), "--mixed-graphs both runs on one GPU"),
    (BenchOptions(mixed_graphs="sometimes"), "--mixed-graphs must be one of"),
])
def test_options_a_run_would_ignore_or_cannot_take_are_refused_first(monkeypatch, opts, match):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    with pytest.raises(bench.ModelError, match=match):
        bench.run_bench(opts)


@pytest.mark.parametrize("value,message", [("0", "must be at least 1, not 0"),
                                           ("4097", "must be at most 4096 (engine.max_num_seqs), not 4097"),
                                           ("1" + "0" * 30, "must be at most 4096")])
def test_seats_are_bounded_as_a_job_spec_bounds_them(capsys, value, message):
    with pytest.raises(SystemExit) as exc:
        parse_options(["--max-num-seqs", value], prog="ziya-batch bench")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]                                   # after argparse's usage lines
    assert exc.value.code == 2 and last.startswith("ziya-batch bench: error: argument --max-num-seqs: ")
    assert message in last and err.count("error:") == 1
