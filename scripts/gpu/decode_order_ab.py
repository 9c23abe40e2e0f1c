"""Decode rows longest context first (ModelRunner.decode_longest_first, the default) against the scheduler's
order, on one engine each: the bench's engine (LLaMA-13B shape, random weights, its config and sampling, prefix
caching off so a rerun of W1 computes every prompt again) is built once per configuration, then W1 runs under
each order in turn, alternated, so both see the same card, clocks and graphs. Prints one JSON line a run and
writes $OUT/decode_order_ab.json.

Usage (GPU machine, repo root): PYTHONPATH=. python3 scripts/gpu/decode_order_ab.py
[--plan fp8fast:off,fp8fast:on,fp8fast:on,fp8fast:off,f16:on,f16:off] [--budget-s 480]"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from ziya_batch.engine.types import Request
from ziya_batch.tools.bench import _args, _build_engine, _sampling, workload_w1

CONFIGS = {"f16": {}, "fp8": dict(quantization="fp8", kv_cache_dtype="fp8"),
           "fp8fast": dict(quantization="fp8", kv_cache_dtype="fp8", fp8_fast_accum=True)}
DEFAULT_PLAN = "fp8fast:off,fp8fast:on,fp8fast:on,fp8fast:off,f16:on,f16:off"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default=DEFAULT_PLAN, help="CONFIG:on|off,... in order (CONFIG: f16, fp8, fp8fast)")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--budget-s", type=float, default=480.0, help="runs not started once this is spent")
    a = p.parse_args()
    plan = [(c, o == "on") for c, o in (x.split(":") for x in a.plan.split(","))]
    args = _args(a.layers)
    work = workload_w1(a.requests, args.vocab_size, 0)
    rows, t_start, eng, built = [], time.time(), None, None
    for k, (name, longest) in enumerate(plan):
        if time.time() - t_start > a.budget_s:
            break
        if built != name:
            eng = None
            gc.collect(); torch.cuda.empty_cache()
            cfg = dict(CONFIGS[name])
            kv = cfg.pop("kv_cache_dtype", "auto")
            eng, init_s = _build_engine(args, torch.device("cuda"), 0, kv_cache_dtype=kv, prefix_caching=False,
                                        **cfg)
            eng.generate([Request("warm", list(range(3, 40)), _sampling(8))])
            built = name
        eng.runner.decode_longest_first = longest
        for i, (prompt, out_len) in enumerate(work):
            eng.add_request(Request(f"{k}-{i}", prompt, _sampling(out_len)))
        torch.cuda.synchronize()
        t0, tokens, steps, decode_only, dec_s, mix_s = time.perf_counter(), 0, 0, 0, 0.0, 0.0
        while eng.has_unfinished():
            for o in eng.step():
                tokens += sum(len(c.token_ids) for c in o.completions)
            if (st := eng.last_step) is not None:
                steps += 1
                decode_only += int(st.decode_only)
                if st.decode_only:
                    dec_s += st.wall_s
                else:
                    mix_s += st.wall_s
        wall = time.perf_counter() - t0
        rows.append(dict(config=name, longest_first=longest, output_tok_s=round(tokens / wall), wall_s=round(wall, 2),
                         output_tokens=tokens, steps=steps, decode_only_steps=decode_only,
                         decode_step_ms=round(1e3 * dec_s / max(decode_only, 1), 2),
                         mixed_step_ms=round(1e3 * mix_s / max(steps - decode_only, 1), 2),
                         kv_blocks=eng.num_blocks, init_s=round(init_s, 1)))
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(card=torch.cuda.get_device_name(0), commit=os.environ.get("ZIYA_BATCH_COMMIT", "unknown"))
    with open(os.path.join(os.environ.get("OUT", "."), "decode_order_ab.json"), "w") as fh:
        json.dump({"meta": meta, "runs": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
