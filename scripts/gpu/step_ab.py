"""The runner's and scheduler's step choices, alternated on one engine per configuration: the bench's engine
(LLaMA-13B shape, random weights, its config and sampling, prefix caching off so a rerun of W1 computes every
prompt again) is built once per configuration, then W1 (or its first N requests) runs with each setting in turn,
so all see the same card, clocks and graphs. Configurations: f16 (float16 weights and KV cache), f16kv8 (float16
weights, float8 KV cache), fp8 (FP8 weights, float8 KV cache), fp8fast (those with engine.fp8_fast_accum).
Knobs (one a run; the others at their defaults):
  order=on|off     ModelRunner.decode_longest_first: decode rows longest context first
  cut=on|off|M/T   Scheduler.step_buckets: steps with prefill cut back to the bucket below where the next is much
                   dearer; M/T (e.g. 0.1/64) is on with scheduler.TRIM_MARGIN and TRIM_MAX_TOKENS set to those
  attn=fma|half|dot  decode attention from that kernel's fastest configuration, as the start-up tuner times them
                   ("half" timed the same way though not the tuner's candidate), the decode graphs captured
                   again; it stays so for the configuration's later runs
  schedule=POLICY  the admission order (EngineConfig.schedule: fcfs, longest-first, tail-longest-first)
  budget=N         the step's token budget (Scheduler.max_num_batched_tokens: decode rows plus prefill chunks;
                   EngineConfig.max_num_batched_tokens), N in 16..the engine's own (its graphs go no larger),
                   every step with prefill filling it (adaptive step sizes off: a fixed budget's A/B)
  adaptive=on|off  Scheduler.adaptive_step_size: each step with prefill sized by scheduler.step_size from the
                   runner's bucket times, up to the budget (EngineConfig.adaptive_step_size)
  overhead=US      adaptive step sizes with step_size's overhead of a step with prefill set to US microseconds a
                   layer (scheduler.MIXED_STEP_OVERHEAD_S: 100), US in 0..10000: smaller values choose smaller steps
  side=on|off      attention.PREFILL_ON_SIDE_STREAM: a step's prefill attention on a side stream beside its decode
                   attention, instead of after it
A run is CONFIG:KNOB=VALUE[@N], N the number of W1's requests (default --requests). Prints one JSON line a run
and writes $OUT/step_ab.json.

Usage (GPU machine, repo root): PYTHONPATH=. python3 scripts/gpu/step_ab.py
[--plan fp8fast:cut=off,fp8fast:cut=on,fp8fast:cut=on,fp8fast:cut=off] [--budget-s 480] [--card-gib 79.1]
[--max-num-seqs 384]"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import sys
import time
from typing import NamedTuple, Optional

import torch

from ziya_batch.engine import attention, scheduler
from ziya_batch.engine.types import SCHEDULE_POLICIES, Request
from ziya_batch.tools.bench import _args, _build_engine, _sampling, workload_w1

CONFIGS = {"f16": {}, "f16kv8": dict(kv_cache_dtype="fp8"), "fp8": dict(quantization="fp8", kv_cache_dtype="fp8"),
           "fp8fast": dict(quantization="fp8", kv_cache_dtype="fp8", fp8_fast_accum=True)}
DEFAULT_PLAN = "fp8fast:cut=off,fp8fast:cut=on,fp8fast:cut=on,fp8fast:cut=off,f16:cut=on,f16:cut=off"
ATTN_KERNELS = ("fma", "half", "dot")
KNOBS = ("order", "cut", "attn", "schedule", "budget", "adaptive", "overhead", "side")
MAX_REQUESTS = 100_000


class Run(NamedTuple):
    config: str                 # a key of CONFIGS
    knob: str                   # one of KNOBS
    value: object               # order, cut, adaptive: bool; attn: a kernel; schedule: a policy; budget: tokens;
                                # overhead: microseconds a layer; side: bool
    limits: Optional[tuple[float, int]] = None     # cut=M/T: (TRIM_MARGIN, TRIM_MAX_TOKENS)
    requests: Optional[int] = None                 # W1's first N requests (None: --requests)


class PlanError(ValueError):
    """A --plan item that names no run; its message is one line."""


def parse_plan(text: str) -> list[Run]:
    """The runs of a --plan (CONFIG:KNOB=VALUE[@N],...), in order; PlanError names the first item that is not one."""
    usage = (f"is not CONFIG:KNOB=VALUE[@N] (CONFIG: {', '.join(CONFIGS)}; order=on|off, cut=on|off|MARGIN/TOKENS, "
             f"attn={'|'.join(ATTN_KERNELS)}, schedule={'|'.join(SCHEDULE_POLICIES)}, budget=TOKENS, adaptive=on|off, overhead=US, side=on|off; "
             f"N: 1..{MAX_REQUESTS})")
    runs = []
    for item in text.split(","):
        shown = repr(item[:80])
        m = re.fullmatch(r"([a-z0-9]+):([a-z]+)=([a-z0-9./-]+)(?:@([0-9]{1,6}))?", item, re.ASCII)
        if m is None:
            raise PlanError(f"{shown} {usage}")
        name, knob, value, count = m.groups()
        requests = int(count) if count else None
        if requests is not None and not 1 <= requests <= MAX_REQUESTS or name not in CONFIGS or knob not in KNOBS:
            raise PlanError(f"{shown} {usage}")
        limits = None
        if knob in ("order", "cut", "adaptive", "side") and value in ("on", "off"):
            value = value == "on"
        elif knob == "cut" and (cut := re.fullmatch(r"([0-9]*\.?[0-9]+)/([0-9]{1,7})", value)):
            limits, value = (float(cut[1]), int(cut[2])), True
            if not (0 <= limits[0] < 1 and 0 <= limits[1] <= 1 << 20):
                raise PlanError(f"{shown}: cut's MARGIN is a fraction in [0, 1) and TOKENS a count")
        elif knob == "attn" and value in ATTN_KERNELS:
            if value == "half" and CONFIGS[name].get("kv_cache_dtype") != "fp8":
                raise PlanError(f"{shown}: kernel half runs over a float8 cache only")
        elif knob == "budget" and re.fullmatch(r"[0-9]{2,6}", value) and int(value) >= 16:
            value = int(value)
        elif knob == "overhead" and re.fullmatch(r"[0-9]{1,5}(\.[0-9]{1,3})?", value) and float(value) <= 10_000:
            value = float(value)
        elif not (knob == "schedule" and value in SCHEDULE_POLICIES):
            raise PlanError(f"{shown} {usage}")
        runs.append(Run(name, knob, value, limits, requests))
    return runs


def attn_key(eng) -> tuple:
    """The tuner's key of the engine's decode attention: (query heads, KV heads, head dim, query and cache dtypes)."""
    r = eng.runner
    return attention.kernel_key(r.model.layers[0].local_heads, r.model.embed.dtype, r.flat_cache()[0])


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
    p.add_argument("--plan", default=DEFAULT_PLAN, help="CONFIG:KNOB=VALUE[@N],... in order (see the module's doc)")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--requests", type=int, default=1024, help="W1's requests a run takes unless it names N")
    p.add_argument("--budget-s", type=float, default=480.0, help="runs not started once this is spent")
    p.add_argument("--card-gib", type=float, default=0.0,
                   help="give the engines the KV cache of a card this size (card_like.py), e.g. 79.1 for an H100")
    p.add_argument("--max-num-seqs", type=int, default=0, help="the engines' seats (default: the bench's)")
    a = p.parse_args()
    try:
        plan = parse_plan(a.plan)
    except PlanError as e:
        raise SystemExit(f"--plan: {e}") from None
    weight = None
    if a.card_gib:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from card_like import ballast
        weight = ballast(a.card_gib)
    if a.max_num_seqs:
        from ziya_batch.tools import bench_core      # the home _build_engine reads BENCH_ENGINE from
        bench_core.BENCH_ENGINE = dataclasses.replace(bench_core.BENCH_ENGINE, max_num_seqs=a.max_num_seqs)
    args = _args(a.layers)
    work = workload_w1(max(r.requests or a.requests for r in plan), args.vocab_size, 0)
    rows, t_start, eng, built = [], time.time(), None, None
    defaults = (scheduler.TRIM_MARGIN, scheduler.TRIM_MAX_TOKENS)
    side_default = attention.PREFILL_ON_SIDE_STREAM
    for k, run in enumerate(plan):
        if time.time() - t_start > a.budget_s:
            break
        name, knob, value = run.config, run.knob, run.value
        if built != name:
            eng = None
            gc.collect(); torch.cuda.empty_cache()
            cfg = dict(CONFIGS[name])
            kv = cfg.pop("kv_cache_dtype", "auto")
            eng, init_s = _build_engine(args, torch.device("cuda"), 0, kv_cache_dtype=kv, prefix_caching=False,
                                        **cfg)
            eng.generate([Request("warm", list(range(3, 40)), _sampling(8))])
            built, buckets, policy = name, eng.scheduler.step_buckets, eng.config.schedule
            budget = eng.scheduler.max_num_batched_tokens
            tuned = sorted(eng.runner.decode_tuning or [], key=lambda r: r[1])
            print(json.dumps({"config": name, "step_buckets_us": [(n, round(1e6 * t)) for n, t in buckets or []],
                              "decode_attention_us": [(c, round(1e6 * t, 1)) for c, t in tuned[:6]]}), flush=True)
        if knob == "attn":
            use_attention_kernel(eng, value)
            value = attention._decode_config.get(attn_key(eng))
        s = eng.scheduler
        eng.runner.decode_longest_first = value if knob == "order" else True
        s.step_buckets = (buckets if value else None) if knob == "cut" else buckets
        scheduler.TRIM_MARGIN, scheduler.TRIM_MAX_TOKENS = run.limits or defaults
        s.policy, s._tail_sorted = (value if knob == "schedule" else policy), False
        if knob == "budget" and value > budget:
            raise SystemExit(f"budget={value}: above the engine's own {budget} (its graphs are captured up to it)")
        s.max_num_batched_tokens = value if knob == "budget" else budget
        # budget=N measures a fixed budget; overhead=US adaptive sizes; other knobs the engine's own step sizing
        s.adaptive_step_size = (value if knob == "adaptive" else knob == "overhead"
                                or knob != "budget" and eng.config.adaptive_step_size)
        s.step_overhead_s = value * 1e-6 if knob == "overhead" else scheduler.MIXED_STEP_OVERHEAD_S
        attention.PREFILL_ON_SIDE_STREAM = value if knob == "side" else side_default
        cuts, preempted, n = s.num_cut_steps, s.num_preemptions, run.requests or a.requests
        for i, (prompt, out_len) in enumerate(work[:n]):
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
        rows.append(dict(config=name, knob=knob, value=value, requests=n, schedule=s.policy,
                         budget=s.max_num_batched_tokens, adaptive=s.adaptive_step_size,
                         overhead_us=round(1e6 * s.step_overhead_s, 3), side=attention.PREFILL_ON_SIDE_STREAM,
                         trim=[scheduler.TRIM_MARGIN, scheduler.TRIM_MAX_TOKENS],
                         output_tok_s=round(tokens / wall), wall_s=round(wall, 2),
                         output_tokens=tokens, steps=steps, decode_only_steps=decode_only,
                         decode_step_ms=round(1e3 * dec_s / max(decode_only, 1), 2),
                         mixed_step_ms=round(1e3 * mix_s / max(steps - decode_only, 1), 2),
                         cut_steps=s.num_cut_steps - cuts, preemptions=s.num_preemptions - preempted,
                         seats=eng.config.max_num_seqs, kv_blocks=eng.num_blocks, init_s=round(init_s, 1)))
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(card=torch.cuda.get_device_name(0), card_gib=a.card_gib or None,
                commit=os.environ.get("ZIYA_BATCH_COMMIT", "unknown"))
    with open(os.path.join(os.environ.get("OUT", "."), "step_ab.json"), "w") as fh:
        json.dump({"meta": meta, "runs": rows}, fh, indent=1)
    del weight                  # the ballast, if any, held its memory for as long as the engines ran


if __name__ == "__main__":
    main()
