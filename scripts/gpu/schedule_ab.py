"""Admission orders side by side on one engine: the bench's engine (LLaMA-13B shape, random float16 weights, its
config and sampling) is built once, then W1 (or its first N requests) runs under each order in turn, alternated,
so both see the same card, clocks and graphs. Prints one JSON line a run and writes $OUT/schedule_ab.json.

Usage (GPU machine, repo root): PYTHONPATH=. python3 scripts/gpu/schedule_ab.py [--plan 1024:fcfs,1024:tail-longest-first,...]
[--budget-s 300] (runs not started once the budget is spent) [--max-num-seqs 384] [--kv-cache-dtype fp8]"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ziya_batch.engine.types import Request
from ziya_batch.tools.bench import _args, _build_engine, _sampling, workload_w1

DEFAULT_PLAN = ("1024:fcfs,1024:tail-longest-first,512:tail-longest-first,512:fcfs,512:fcfs,512:tail-longest-first,"
                "1024:tail-longest-first,1024:fcfs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default=DEFAULT_PLAN, help="REQUESTS:SCHEDULE,... in order")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--card-gib", type=float, default=0.0,
                   help="give the engine the KV cache of a card this size (card_like.py), e.g. 79.1 for an H100")
    p.add_argument("--max-num-seqs", type=int, default=0, help="the engine's seats (default: the bench's)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    a = p.parse_args()
    plan = [(int(n), pol) for n, pol in (x.split(":") for x in a.plan.split(","))]
    args = _args(a.layers)
    weight = None
    if a.card_gib:
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from card_like import ballast
        weight = ballast(a.card_gib)
    if a.max_num_seqs:
        import dataclasses

        from ziya_batch.tools import bench_core      # the home _build_engine reads BENCH_ENGINE from
        bench_core.BENCH_ENGINE = dataclasses.replace(bench_core.BENCH_ENGINE, max_num_seqs=a.max_num_seqs)
    eng, init_s = _build_engine(args, torch.device("cuda"), 0, kv_cache_dtype=a.kv_cache_dtype)
    eng.generate([Request("warm", list(range(3, 40)), _sampling(8))])
    work = workload_w1(max(n for n, _ in plan), args.vocab_size, 0)
    rows, t_start = [], time.time()
    for k, (n, pol) in enumerate(plan):
        if time.time() - t_start > a.budget_s:
            break
        s = eng.scheduler
        s.policy, s._tail_sorted = pol, False
        pre = s.num_preemptions
        for i, (prompt, out_len) in enumerate(work[:n]):
            eng.add_request(Request(f"{k}-{i}", prompt, _sampling(out_len)))
        torch.cuda.synchronize()
        t0, tokens, steps, decode_only = time.perf_counter(), 0, 0, 0
        while eng.has_unfinished():
            for o in eng.step():
                tokens += sum(len(c.token_ids) for c in o.completions)
            if eng.last_step is not None:
                steps += 1
                decode_only += int(eng.last_step.decode_only)
        wall = time.perf_counter() - t0
        rows.append(dict(requests=n, schedule=pol, seats=eng.config.max_num_seqs, kv=a.kv_cache_dtype,
                         kv_blocks=eng.num_blocks, output_tok_s=round(tokens / wall), wall_s=round(wall, 2),
                         output_tokens=tokens, steps=steps, decode_only_steps=decode_only,
                         preemptions=s.num_preemptions - pre))
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(card=torch.cuda.get_device_name(0), card_gib=a.card_gib or None, kv_blocks=eng.num_blocks,
                max_num_seqs=eng.config.max_num_seqs, kv_cache_dtype=a.kv_cache_dtype,
                init_s=init_s, commit=os.environ.get("ZIYA_BATCH_COMMIT", "unknown"))
    with open(os.path.join(os.environ.get("OUT", "."), "schedule_ab.json"), "w") as fh:
        json.dump({"meta": meta, "runs": rows}, fh, indent=1)
    del weight                  # the ballast, if any, held its memory for as long as the engine ran


if __name__ == "__main__":
    main()
