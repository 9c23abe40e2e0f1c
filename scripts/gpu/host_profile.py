"""Where the host's time goes when it launches an eager step with prefill: runs W1 on the engine (LLaMA-13B's
shape) until a step with at least 256 prefill tokens after --warm-steps, then re-runs that step's plan: its
launch time (host, until runner.execute returns) against its GPU time, and a cProfile of the launches sorted by
own time. Numbers only.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/host_profile.py [--warm-steps 300] [--kv-cache-dtype fp8]"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import sys
import time

import torch

sys.path.insert(0, "scripts/gpu")
from profile_steps import frozen  # noqa: E402

from ziya_batch.engine.scheduler import SchedulerOutput  # noqa: E402
from ziya_batch.engine.types import Request  # noqa: E402
from ziya_batch.tools.bench import _args, _build_engine, _sampling, workload_w1  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm-steps", type=int, default=300)
    ap.add_argument("--kv-cache-dtype", default="auto")
    args = ap.parse_args()
    dev = torch.device("cuda")
    a = _args(40)
    eng, _ = _build_engine(a, dev, 0, kv_cache_dtype=args.kv_cache_dtype)
    eng.config = dataclasses.replace(eng.config, async_scheduling=False)
    eng.generate([Request("warm", list(range(3, 40)), _sampling(8))])
    for i, (p, o) in enumerate(workload_w1(1024, a.vocab_size, 0)):
        eng.add_request(Request(str(i), p, _sampling(o)))
    plans: list[SchedulerOutput] = []
    execute = eng.runner.execute
    eng.runner.execute = lambda out, *x: (plans.append(frozen(out)), execute(out, *x))[1]
    steps = 0
    while eng.has_unfinished():
        plans.clear()
        eng.step()
        steps += 1
        st = eng.last_step
        if steps >= args.warm_steps and st is not None and not st.decode_only and st.num_prefill_tokens >= 256:
            break
    plan = plans[0]
    eng.runner.execute = execute
    nchunks = sum(c.num_tokens > 1 for c in plan.chunks)
    print(f"step {steps}: {st.num_decode_tokens} decode rows, {st.num_prefill_tokens} prefill tokens in "
          f"{nchunks} chunks")
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        execute(plan)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"  launch (host) {1e3 * (t1 - t0):.2f} ms; until the GPU is done {1e3 * (t2 - t0):.2f} ms")
    prof = cProfile.Profile()
    for _ in range(3):
        torch.cuda.synchronize()
        prof.enable()
        execute(plan)
        prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    print(s.getvalue())
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
    print(s.getvalue())


if __name__ == "__main__":
    main()
