"""The runner's and scheduler's step choices on and off, alternated on one engine per configuration: the bench's
engine (LLaMA-13B shape, random weights, its config and sampling, prefix caching off so a rerun of W1 computes
every prompt again) is built once per configuration, then W1 runs with each setting in turn, so both see the same
card, clocks and graphs. Knobs: `order` (ModelRunner.decode_longest_first: decode rows longest context first)
and `cut` (Scheduler.step_buckets: steps with prefill cut back to the bucket below where the next is much
dearer; `cut=MARGIN/TOKENS`, e.g. cut=0.1/64, is on with scheduler.TRIM_MARGIN and TRIM_MAX_TOKENS set to
those); and `attn=fma|half|dot` (decode attention from that kernel's fastest configuration, as the start-up tuner
times them, "half" timed the same way though not the tuner's candidate; the decode graphs captured again). Prints
one JSON line a run and writes $OUT/step_ab.json.

Usage (GPU machine, repo root): PYTHONPATH=. python3 scripts/gpu/step_ab.py
[--plan fp8fast:cut=off,fp8fast:cut=on,fp8fast:cut=on,fp8fast:cut=off] [--budget-s 480]"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from ziya_batch.engine import attention, scheduler
from ziya_batch.engine.types import Request
from ziya_batch.tools.bench import _args, _build_engine, _sampling, workload_w1

CONFIGS = {"f16": {}, "fp8": dict(quantization="fp8", kv_cache_dtype="fp8"),
           "fp8fast": dict(quantization="fp8", kv_cache_dtype="fp8", fp8_fast_accum=True)}
DEFAULT_PLAN = "fp8fast:cut=off,fp8fast:cut=on,fp8fast:cut=on,fp8fast:cut=off,f16:cut=on,f16:cut=off"


ATTN_KERNELS = ("fma", "half", "dot")


def attn_key(eng) -> tuple:
    """The tuner's key of the engine's decode attention: (query heads, KV heads, head dim, query and cache dtypes)."""
    k = eng.kv_caches[0][0]
    layer = eng.runner.model.layers[0]
    return (layer.local_heads, k.shape[2], k.shape[3], eng.runner.model.embed.dtype, k.dtype)


def use_attention_kernel(eng, kind: str) -> None:
    """Decode attention from the fastest configuration of this kernel in the engine's start-up tuning, and the
    decode graphs captured again with it (steps with prefill run attention between their graph pieces, so they
    take the new configuration as they are; they also keep the first pool, so the new graphs' pool is memory on
    top of it, out of the engine's reserve)."""
    r = eng.runner
    runs = sorted((t, cfg) for cfg, t in r.decode_tuning if cfg[3] == kind)
    if not runs:            # not among the tuner's candidates ("half"): timed here as the tuner times its own
        configs = [c for c in attention.decode_variants(eng.kv_caches[0][0].dtype) if c[3] == kind]
        timed = r.tune_decode(configs) if configs else []
        r.decode_tuning = r.decode_tuning + timed
        runs = sorted((t, cfg) for cfg, t in timed)
    if not runs:
        raise SystemExit(f"attn={kind}: no configuration of that kernel runs over this cache")
    attention._decode_config[attn_key(eng)] = runs[0][1]
    eng.runner.graphs = {}
    gc.collect()
    torch.cuda.empty_cache()
    eng.runner._capture_graphs()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default=DEFAULT_PLAN,
                   help="CONFIG:KNOB=on|off,... in order (CONFIG: f16, fp8, fp8fast; KNOB: order, cut; "
                        "or CONFIG:attn=fma|half|dot)")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--budget-s", type=float, default=480.0, help="runs not started once this is spent")
    a = p.parse_args()
    plan = []
    for item in a.plan.split(","):
        name = knob = value = None
        try:
            name, setting = item.split(":")
            knob, value = setting.split("=")
            limits = None
            if knob == "cut" and "/" in value:
                margin, tokens = value.split("/")
                limits, value = (float(margin), int(tokens)), "on"
        except ValueError:
            name = None
        if knob == "attn" and value in ATTN_KERNELS and name in CONFIGS:
            if value == "half" and CONFIGS[name].get("kv_cache_dtype") != "fp8":
                raise SystemExit(f"--plan: {item!r}: kernel half runs over a float8 cache only")
            plan.append((name, knob, value, None))
            continue
        if name not in CONFIGS or knob not in ("order", "cut") or value not in ("on", "off"):
            raise SystemExit(f"--plan: {item!r} is not CONFIG:order|cut=on|off (or cut=MARGIN/TOKENS, or "
                             f"attn={'|'.join(ATTN_KERNELS)})")
        plan.append((name, knob, value == "on", limits))
    args = _args(a.layers)
    work = workload_w1(a.requests, args.vocab_size, 0)
    rows, t_start, eng, built = [], time.time(), None, None
    defaults = (scheduler.TRIM_MARGIN, scheduler.TRIM_MAX_TOKENS)
    for k, (name, knob, on, limits) in enumerate(plan):
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
            built, buckets = name, eng.scheduler.step_buckets
            tuned = sorted(eng.runner.decode_tuning or [], key=lambda r: r[1])
            print(json.dumps({"config": name, "step_buckets_us": [(n, round(1e6 * t)) for n, t in buckets or []],
                              "decode_attention_us": [(c, round(1e6 * t, 1)) for c, t in tuned[:6]]}), flush=True)
        if knob == "attn":
            use_attention_kernel(eng, on)
            on = attention._decode_config.get(attn_key(eng))
        eng.runner.decode_longest_first = on if knob == "order" else True
        eng.scheduler.step_buckets = (buckets if on else None) if knob == "cut" else buckets
        scheduler.TRIM_MARGIN, scheduler.TRIM_MAX_TOKENS = limits or defaults
        cuts = eng.scheduler.num_cut_steps
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
        rows.append(dict(config=name, knob=knob, on=on, trim=[scheduler.TRIM_MARGIN, scheduler.TRIM_MAX_TOKENS],
                         output_tok_s=round(tokens / wall), wall_s=round(wall, 2),
                         output_tokens=tokens, steps=steps, decode_only_steps=decode_only,
                         decode_step_ms=round(1e3 * dec_s / max(decode_only, 1), 2),
                         mixed_step_ms=round(1e3 * mix_s / max(steps - decode_only, 1), 2),
                         cut_steps=eng.scheduler.num_cut_steps - cuts, kv_blocks=eng.num_blocks,
                         init_s=round(init_s, 1)))
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(card=torch.cuda.get_device_name(0), commit=os.environ.get("ZIYA_BATCH_COMMIT", "unknown"))
    with open(os.path.join(os.environ.get("OUT", "."), "step_ab.json"), "w") as fh:
        json.dump({"meta": meta, "runs": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
