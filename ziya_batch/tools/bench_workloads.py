"""The bench's workloads beside W1 (docs/BENCHMARKS.md): W2 (a shared 1,024-token prefix) and W2g (GRPO-like,
n = 8) with prefix caching on, off or both; W3 (W1 constrained to a JSON schema, against W1 at the same output
lengths); and W1 once per logprobs variant. Each runs the engine alone on one GPU (bench_core.bench_engine)."""
from __future__ import annotations

import dataclasses
import datetime as dt
import random
import time

import torch

from ziya_batch import settings
from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.model import LlamaModel, ModelArgs
from ziya_batch.engine.types import LOGPROBS_MODES, Request, SamplingParams
from ziya_batch.errors import ModelError
from ziya_batch.tools.bench_core import (BENCH_ENGINE, BenchOptions, _args, _git_commit, _print_row, _print_table,
                                         _sampling, bench_engine, measure_copy_bandwidth_bytes_s, workload_w1)

WORKLOADS = ("W1", "W2", "W2g", "W3")
PREFIX_CACHING = ("on", "off", "both")


def workload_w2(num_requests: int, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """A templated job: one 1,024-token prefix (system prompt and few-shot examples) shared by every request,
    then a unique 32..128-token suffix; outputs 32..256 tokens."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab_size) for _ in range(1024)]
    return [(prefix + [rng.randrange(3, vocab_size) for _ in range(rng.randint(32, 128))], rng.randint(32, 256))
            for _ in range(num_requests)]


def workload_w2g(num_requests: int, vocab_size: int, seed: int) -> list[tuple[list[int], int, int]]:
    """GRPO-style: num_requests / 8 prompts of 256..512 tokens, 8 samples each; outputs 32..256 tokens."""
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab_size) for _ in range(rng.randint(256, 512))], rng.randint(32, 256), 8)
            for _ in range(max(1, num_requests // 8))]


def run_prefix_bench(opts: BenchOptions) -> list[dict]:
    """The engine alone, on one GPU, with prefix caching on, off or both (one row each, in one process, on the
    same workload); no transformers baselines. W2's prompts reach 1,152 tokens and its outputs 256: the
    engine's context is LLaMA's 2,048 (W1's runs use 1,024)."""
    if opts.workload not in WORKLOADS or opts.prefix_caching not in PREFIX_CACHING:
        raise ModelError(f"bench --workload must be one of {', '.join(WORKLOADS)} and --prefix-caching one of "
                         f"{', '.join(PREFIX_CACHING)}")
    if opts.tensor_parallel != 1 or opts.markdown:
        raise ModelError("bench --workload W2/W2g and --prefix-caching off/both run on one GPU and print their "
                         "table: leave out --tensor-parallel and --markdown")
    device = torch.device("cuda")
    a = _args(opts.layers)
    make = {"W1": workload_w1, "W2": workload_w2, "W2g": workload_w2g}[opts.workload]
    work = make(opts.requests, a.vocab_size, opts.seed)
    bw = measure_copy_bandwidth_bytes_s(device)
    caching = {"on": (True,), "off": (False,), "both": (True, False)}[opts.prefix_caching]
    rows, prof = [], None
    for on in caching:
        row, p = bench_engine(a, work, device, bw, opts.seed, schedule=opts.schedule,
                              kv_cache_dtype=opts.kv_cache_dtype, prefix_caching=on, quantization=opts.quantization,
                              max_model_len=2048 if opts.workload != "W1" else BENCH_ENGINE.max_model_len)
        row["method"] = f"engine, prefix caching {'on' if on else 'off'}"
        rows.append(row)
        prof = prof or p
        _print_row(row)
    if len(rows) == 2:
        print(f"[bench] {opts.workload}: prefix caching on / off = "
              f"{rows[0]['output_tok_s'] / rows[1]['output_tok_s']:.2f}x output tok/s", flush=True)
    meta = dict(card=torch.cuda.get_device_name(device), date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
                commit=settings.commit() or _git_commit(), layers=opts.layers,
                requests=len(work), bandwidth_tb_s=bw / 1e12, tensor_parallel=1, workload=opts.workload)
    _print_table(rows, meta, prof)
    return rows


def parse_logprobs_variant(v: str) -> dict:
    """'temperature+top5' -> {logprobs_mode: 'temperature', top_logprobs: 5}."""
    mode, _, top = v.partition("+top")
    if mode not in LOGPROBS_MODES or (top and not (top.isdigit() and int(top) <= 20)):
        raise ModelError(f"bench --logprobs: {v!r} is not MODE or MODE+topK (MODE one of {', '.join(LOGPROBS_MODES)}; "
                         "K 0..20), e.g. temperature,processed,temperature+top5")
    return {"logprobs_mode": mode, "top_logprobs": int(top or 0)}


def bench_logprobs(a: ModelArgs, work, device, bw: float, opts: BenchOptions) -> list[dict]:
    """The engine on W1 once per logprobs variant, output tok/s side by side with the cost against the first."""
    variants = [(v, parse_logprobs_variant(v)) for v in opts.logprobs]
    rows = []
    for name, params in variants:
        row, _ = bench_engine(a, work, device, bw, opts.seed, schedule=opts.schedule,
                              kv_cache_dtype=opts.kv_cache_dtype, logprobs=params,
                              quantization=opts.quantization, max_num_seqs=opts.max_num_seqs)
        row = {**row, "method": f"engine [{name}]", "note": f"logprobs {name}; " + row["note"]}
        rows.append(row)
        _print_row(row)
    base = rows[0]["output_tok_s"]
    print(f"[bench] logprobs variants on W1 (cost against {rows[0]['method']}):", flush=True)
    for r in rows:
        cost = 100 * (1 - r["output_tok_s"] / base)
        print(f"[bench]   {r['method']:<32} {r['output_tok_s']:>9,.0f} tok/s  {cost:+6.2f}%", flush=True)
    return rows


def w3_schema(max_chars: int) -> dict:
    """W3's record: a free-text string of bounded length, an enum, a bounded integer and a boolean."""
    return {"type": "object", "additionalProperties": False, "required": ["summary", "category", "score", "verified"],
            "properties": {"summary": {"type": "string", "maxLength": max_chars},
                           "category": {"enum": ["travel", "food", "history", "science", "other"]},
                           "score": {"type": "integer", "minimum": 0, "maximum": 100},
                           "verified": {"type": "boolean"}}}


def bench_w3(a: ModelArgs, work, device, seed: int) -> list[dict]:
    """W3: W1's prompts, each constrained to w3_schema with maxLength = its W1 output length (in characters,
    rounded up to 32: 16 distinct grammars). EOS is not ignored (the grammar ends each record), so W1 runs
    after it with each request's max_new_tokens = the length its record took (EOS ignored): both runs decode
    the same tokens, and output tok/s compare the constraint's cost alone. Both again with synchronous steps
    give the cost of waiting for each step's tokens before the next step's masks. The tokenizer is the demo
    model's (4,096 pieces; masks forbid the other ids of the 39,424-row vocabulary)."""
    import json
    import tempfile

    import jsonschema
    from transformers import AutoTokenizer

    from ziya_batch.tools.demo_model import write_demo_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(write_demo_tokenizer(tmp)))
    model = LlamaModel.random(a, device, torch.float16, seed)
    # prefix caching off: the W1 runs reuse W3's prompts, and cached prompts would flatter them
    eng = LLMEngine.from_model(model, tok, dataclasses.replace(BENCH_ENGINE, prefix_caching=False))
    schemas = {n: json.dumps(w3_schema(n)) for n in range(32, 513, 32)}

    def constrained(o: int, i: int = -1) -> SamplingParams:
        # the model card's sampling (SamplingParams' defaults); seeded: async and sync runs draw the same
        return SamplingParams(max_new_tokens=o + 64, json_schema=schemas[-(-o // 32) * 32],
                              seed=seed * 100_003 + i + 1)

    eng.generate([Request("warm", list(range(3, 40)), constrained(32)), Request("w", list(range(3, 40)), _sampling(8))])
    rows, lengths = [], None
    for sync in (False, True):
        eng.config = dataclasses.replace(eng.config, async_scheduling=not sync)
        for kind in ("W3", "W1"):
            if kind == "W3":
                reqs = [Request(str(i), p, constrained(o, i)) for i, (p, o) in enumerate(work)]
            else:
                reqs = [Request(str(i), p, _sampling(max(1, lengths[str(i)]))) for i, (p, _) in enumerate(work)]
            g = eng._grammars
            g.mask_s = g.fill_s = 0.0
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = eng.generate(reqs)
            wall = time.perf_counter() - t0
            tokens = sum(len(c.token_ids) for o in outs for c in o.completions)
            note = f"{'synchronous' if sync else 'async'} steps"
            if kind == "W3":
                lengths = lengths or {o.request_id: len(o.completions[0].token_ids) for o in outs}
                ok = 0
                for o in outs:
                    c = o.completions[0]
                    try:
                        jsonschema.validate(json.loads(c.text), json.loads(reqs[int(o.request_id)].params.json_schema))
                        ok += c.finish_reason == "stop"
                    except (ValueError, jsonschema.ValidationError):
                        pass
                note += (f"; {ok}/{len(outs)} records valid; masks {g.mask_s:.2f} s of host time "
                         f"({g.fill_s:.2f} s filling them)")
            else:
                note += "; the W3 run's output lengths, EOS ignored"
            rows.append(dict(method=kind, requests=len(reqs), output_tokens=tokens, wall_s=wall,
                             output_tok_s=tokens / wall, note=note))
            _print_row(rows[-1])
    for sync in (0, 2):
        print(f"[bench] W3 / W1 ({rows[sync]['note'].split(';')[0]}): "
              f"{rows[sync]['output_tok_s'] / rows[sync + 1]['output_tok_s']:.1%}", flush=True)
    return rows
