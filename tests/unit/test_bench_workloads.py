"""The prefix-caching bench's bookkeeping on the CPU: the engine runs and the device queries are replaced, the
rows, the on/off ratio and the table's header are real."""
from __future__ import annotations

import pytest

from ziya_batch.tools import bench_workloads as W
from ziya_batch.tools.bench import BenchOptions


@pytest.fixture
def fake_gpu(monkeypatch):
    calls, tables = [], []

    def engine(a, work, device, bw, seed, **config):
        calls.append(config)
        tok_s = 300.0 if config["prefix_caching"] else 100.0
        return dict(method="engine", requests=len(work), output_tokens=9, wall_s=1.0, output_tok_s=tok_s,
                    prefill_tok_s=None, decode_tok_s=None, peak_gib=None, note="n"), {"decode_steps": 1}

    monkeypatch.setattr(W, "bench_engine", engine)
    monkeypatch.setattr(W, "measure_copy_bandwidth_bytes_s", lambda device: 2e12)
    monkeypatch.setattr(W.torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(W, "_print_table", lambda rows, meta, prof: tables.append((rows, meta, prof)))
    monkeypatch.setenv("ZIYA_BATCH_COMMIT", "abc1234")
    return calls, tables


def test_prefix_bench_runs_both_settings_and_prints_its_table(fake_gpu, capsys):
    calls, tables = fake_gpu
    rows = W.run_prefix_bench(BenchOptions(layers=2, requests=16, workload="W2g", prefix_caching="both"))
    assert [c["prefix_caching"] for c in calls] == [True, False]
    assert all(c["max_model_len"] == 2048 for c in calls)          # W2's prompts reach 1,152 tokens
    assert [r["method"] for r in rows] == ["engine, prefix caching on", "engine, prefix caching off"]
    assert "W2g: prefix caching on / off = 3.00x output tok/s" in capsys.readouterr().out
    [(shown, meta, prof)] = tables
    assert shown == rows and prof == {"decode_steps": 1}
    assert (meta["card"], meta["commit"], meta["workload"], meta["requests"]) == ("Fake GPU", "abc1234", "W2g", 2)
    assert meta["bandwidth_tb_s"] == 2.0


def test_prefix_bench_refuses_what_it_would_ignore():
    with pytest.raises(W.ModelError, match="--tensor-parallel and --markdown"):
        W.run_prefix_bench(BenchOptions(workload="W2", tensor_parallel=2))
