"""The bench's options are defined once (tools/bench.py's parser, defaults from BenchOptions and the engine's
EngineConfig); `ziya-batch bench` hands its arguments to that parser unchanged."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_also_adds_engine_variants_in_order():
    got = parse_options(["--also", "quantization=fp8,kv-cache-dtype=fp8", "--also", "max_num_seqs=512"])
    assert got.also == ("quantization=fp8,kv-cache-dtype=fp8", "max_num_seqs=512")
    assert bench.parse_variant("quantization=fp8, kv-cache-dtype=fp8 ,max-num-seqs=384,mixed-graphs=off") == dict(
        quantization="fp8", kv_cache_dtype="fp8", max_num_seqs=384, mixed_step_graphs=False)
    assert bench.parse_variant("quantization=none") == dict(quantization=None)
    assert bench.parse_variant("quantization=fp8,fp8-fast-accum=on") == dict(quantization="fp8", fp8_fast_accum=True)
    assert bench.parse_variant("mixed_graphs=on") == dict(mixed_step_graphs=True)
    assert bench.parse_variant("max-num-batched-tokens=384") == dict(max_num_batched_tokens=384)
    assert bench.parse_variant("adaptive-step-size=on") == dict(adaptive_step_size=True)


@pytest.mark.parametrize("value,message", [
    ("", "is not KEY=VALUE"), ("quantization", "is not KEY=VALUE"), ("dtype=float32", "is not KEY=VALUE"),
    ("quantization=int4", "quantization must be none or fp8"), ("kv-cache-dtype=fp4", "kv-cache-dtype must be"),
    ("max-num-seqs=0", "max-num-seqs must be a whole number in 1..4096"), ("max-num-seqs=-3", "1..4096"),
    ("max-num-seqs=4097", "1..4096"), ("max-num-seqs=1e3", "1..4096"), ("max-num-seqs=" + "9" * 400, "1..4096"),
    ("max-num-batched-tokens=15", "max-num-batched-tokens must be a whole number in 16..1000000"),
    ("max-num-batched-tokens=1000001", "16..1000000"), ("max-num-batched-tokens=3e2", "16..1000000"),
    ("mixed-graphs=both", "mixed-graphs must be on or off"), ("fp8-fast-accum=yes", "fp8-fast-accum must be on or off"),
    ("max-num-seqs=8,max_num_seqs=16", "max-num-seqs is given twice"),
    ("overlap-mixed=on", "is not KEY=VALUE with KEY one of"),
    ("mixed-graphs=on,mixed_graphs=off", "mixed-graphs is given twice")])
def test_a_bad_variant_is_one_line_and_exit_2(capsys, value, message):
    with pytest.raises(SystemExit) as exc:
        parse_options(["--also", value], prog="ziya-batch bench")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert exc.value.code == 2 and last.startswith("ziya-batch bench: error: argument --also: ")
    assert message in last and err.count("error:") == 1 and len(last) < 300


@pytest.mark.parametrize("opts", [BenchOptions(also=("max-num-seqs=512",), workload="W2"),
                                  BenchOptions(also=("max-num-seqs=512",), tensor_parallel=2),
                                  BenchOptions(also=("max-num-seqs=512",), prefix_caching="both")])
def test_variants_are_refused_where_the_run_has_no_w1_engine_on_one_gpu(monkeypatch, opts):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    with pytest.raises(bench.ModelError, match="--also adds engine rows to workload W1 on one GPU"):
        bench.run_bench(opts)


@pytest.mark.parametrize("opts,match", [
    (BenchOptions(also=("fp8-fast-accum=on",)), "fp8-fast-accum=on needs FP8 weights"),
    (BenchOptions(quantization="fp8", also=("quantization=none,fp8-fast-accum=on",)), "needs FP8 weights"),
    (BenchOptions(also=("max-num-seqs=512",), only=("hf-continuous",)), "keep engine or roofline in --only")])
def test_a_variant_the_run_could_not_honour_is_refused(monkeypatch, opts, match):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    with pytest.raises(bench.ModelError, match=match):
        bench.run_bench(opts)


def test_a_variant_given_in_code_is_checked_before_any_gpu_work(monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    with pytest.raises(bench.ModelError, match="bench --also 'weights=fp8': .*is not KEY=VALUE"):
        bench.run_bench(BenchOptions(also=("weights=fp8",)))


def test_the_roofline_beside_a_variant_names_its_configuration():
    from ziya_batch.tools.bench_core import config_note_parts
    parts = config_note_parts(EngineConfig(model_path="", kv_cache_dtype="fp8", quantization="fp8", max_num_seqs=512))
    assert config_note_parts(EngineConfig(model_path="")) == []
    assert config_note_parts(EngineConfig(model_path="", max_num_batched_tokens=384)) == ["step budget 384 tokens"]
    assert config_note_parts(EngineConfig(model_path="", adaptive_step_size=False)) == ["fixed step size"]
    row = dict(output_tokens=10, config=", ".join(parts))          # as bench_engine makes it
    got = bench._roofline_row(4, row, dict(floor_tok_s=123.0), 3e12, 1)
    assert got["output_tok_s"] == 123.0
    assert got["note"].endswith("(weights + KV bytes per step); KV cache fp8, weights fp8, 512 seats")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("=,_- 0123456789abcdefpqrstuvwxyzkin\x00\u00e9")), max_size=80))
def test_any_variant_text_parses_or_is_one_clear_error(text):
    try:
        got = bench.parse_variant(text)
    except ValueError as e:
        assert "\n" not in str(e) and len(str(e)) < 300
    else:
        assert set(got) <= {"quantization", "kv_cache_dtype", "max_num_seqs", "max_num_batched_tokens",
                            "mixed_step_graphs", "fp8_fast_accum", "adaptive_step_size"} and got


def test_variants_run_after_the_first_row_each_with_its_roofline(monkeypatch, capsys):
    calls = []

    def fake_engine(a, work, device, bw, seed, world_size=1, schedule=None, kv_cache_dtype="auto", **config):
        calls.append(dict(kv_cache_dtype=kv_cache_dtype, **config))
        parts = ([f"KV cache {kv_cache_dtype}"] if kv_cache_dtype != "auto" else []) + \
            ([f"{config['max_num_seqs']} seats"] if config["max_num_seqs"] != 256 else [])
        row = dict(method="engine", requests=len(work), output_tokens=5, wall_s=1.0, output_tok_s=100.0 * len(calls),
                   prefill_tok_s=None, decode_tok_s=None, peak_gib=None,
                   note="; ".join(["1 KV blocks of 16"] + parts), config=", ".join(parts))
        prof = dict(floor_tok_s=1000.0 * len(calls), decode_step_ms=1.0, floor_step_ms=1.0, host_ms=0.1,
                    decode_batch=2.0, decode_gpu_ms=1.0, mixed_steps=1, mixed_step_ms=2.0, mixed_prefill=3,
                    mixed_decode=1, mixed_host_ms=0.2, mixed_host_median_ms=0.2, mixed_host_max_ms=0.2,
                    mixed_gpu_ms=2.0)
        return row, prof

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda d=None: "card")
    monkeypatch.setattr(bench, "measure_copy_bandwidth_bytes_s", lambda d: 3e12)
    monkeypatch.setattr(bench, "bench_engine", fake_engine)
    rows = bench.run_bench(BenchOptions(layers=2, requests=4, only=("engine", "roofline"),
                                        also=("kv-cache-dtype=fp8,max-num-seqs=512", "mixed-graphs=off")))
    assert [r["method"] for r in rows] == ["engine", "roofline"] * 3
    assert [r["output_tok_s"] for r in rows] == [100.0, 1000.0, 200.0, 2000.0, 300.0, 3000.0]
    assert calls[1] == dict(kv_cache_dtype="fp8", quantization=None, mixed_step_graphs=True, max_num_seqs=512)
    assert calls[2] == dict(kv_cache_dtype="auto", quantization=None, mixed_step_graphs=False, max_num_seqs=256)
    assert rows[3]["note"].endswith("; KV cache fp8, 512 seats")
    assert "[bench] --also kv-cache-dtype=fp8,max-num-seqs=512:" in capsys.readouterr().out


def test_a_variant_that_fails_leaves_a_failed_row_and_the_rest_of_the_run(monkeypatch, capsys):
    calls = []

    def fake_engine(a, work, device, bw, seed, schedule="x", kv_cache_dtype="auto", **config):
        calls.append(config)
        if config.get("adaptive_step_size"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        row = dict(method="engine", requests=len(work), output_tokens=5, wall_s=1.0, output_tok_s=100.0 * len(calls),
                   prefill_tok_s=None, decode_tok_s=None, peak_gib=None, note="ok", config="")
        prof = dict(floor_tok_s=1000.0, decode_step_ms=1.0, floor_step_ms=1.0, host_ms=0.1, decode_batch=2.0,
                    decode_gpu_ms=1.0, mixed_steps=1, mixed_step_ms=2.0, mixed_prefill=3, mixed_decode=1,
                    mixed_host_ms=0.2, mixed_host_median_ms=0.2, mixed_host_max_ms=0.2, mixed_gpu_ms=2.0)
        return row, prof

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda d=None: "card")
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "measure_copy_bandwidth_bytes_s", lambda d: 3e12)
    monkeypatch.setattr(bench, "bench_engine", fake_engine)
    rows = bench.run_bench(BenchOptions(layers=2, requests=4, only=("engine", "roofline"),
                                        also=("adaptive-step-size=on", "max-num-seqs=128")))
    assert len(calls) == 3
    assert [(r["method"], r["output_tok_s"]) for r in rows] == [("engine", 100.0), ("roofline", 1000.0),
                                                               ("engine", None), ("engine", 300.0),
                                                               ("roofline", 1000.0)]
    assert rows[2]["note"] == ("--also adaptive-step-size=on failed: RuntimeError: CUDA error: an illegal memory "
                               "access was encountered")
    assert "output tok/s; --also adaptive-step-size=on failed: RuntimeError" in capsys.readouterr().out
