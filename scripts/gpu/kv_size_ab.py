"""How much float16's W1 gains from a larger KV cache on this card: the bench's engine (LLaMA-13B shape, random
weights, W1) built once per run with a given engine.gpu_memory_fraction and reserve (the memory the engine keeps
out of the KV cache for activations, logits and CUDA graphs: 3 GiB in engine.py), one W1 run each, in the order
given. Prints one JSON line a run (tok/s, KV blocks, steps, peak allocated, memory the card still had free at the
end) and writes $OUT/kv_size_ab.json. Numbers only; nothing is changed.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/kv_size_ab.py [--plan 0.95/3,0.99/1,0.95/1,0.95/3] [--requests 1024]"""
from __future__ import annotations

import argparse
import gc
import json
import os

import torch

from ziya_batch.engine import engine as engine_mod
from ziya_batch.tools.bandwidth import measure_copy_bandwidth_bytes_s
from ziya_batch.tools.bench import _args, bench_engine, workload_w1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--plan", default="0.95/3,0.99/1,0.95/1,0.95/3",
                   help="FRACTION/RESERVE_GIB runs, comma-separated")
    p.add_argument("--requests", type=int, default=1024)
    o = p.parse_args()
    dev = torch.device("cuda")
    bw = measure_copy_bandwidth_bytes_s(dev)
    a = _args(40)
    out = []
    for item in o.plan.split(","):
        frac, reserve = (float(x) for x in item.split("/"))
        engine_mod._GPU_RESERVE_BYTES = int(reserve * 2**30)
        try:
            row, prof = bench_engine(a, workload_w1(o.requests, a.vocab_size, 0), dev, bw, 0,
                                     gpu_memory_fraction=frac)
            free, total = torch.cuda.mem_get_info(dev)
            rec = dict(fraction=frac, reserve_gib=reserve, tok_s=round(row["output_tok_s"], 1),
                       blocks=int(row["note"].split(" KV blocks")[0]), peak_gib=round(row["peak_gib"], 2),
                       decode_steps=prof["decode_steps"], decode_step_ms=round(prof["decode_step_ms"], 2),
                       decode_batch=round(prof["decode_batch"], 1), mixed_steps=prof["mixed_steps"],
                       mixed_step_ms=round(prof["mixed_step_ms"], 2), free_after_gib=round(free / 2**30, 2),
                       total_gib=round(total / 2**30, 2))
        except Exception as e:  # noqa: BLE001 (out of memory at a large fraction is a result too)
            rec = dict(fraction=frac, reserve_gib=reserve, error=f"{type(e).__name__}: {str(e)[:300]}")
        print(json.dumps(rec), flush=True)
        out.append(rec)
        gc.collect()
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kv_size_ab.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
