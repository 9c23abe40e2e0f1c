"""The engine's scheduler alone (no model, no GPU) on workload W1: how many steps, how large the decode batches
and how many preemptions a KV cache of a given size gives, for trying admission and scheduling changes before
spending GPU time. Every request runs to its W1 output length, or stops there with a larger max_new_tokens
(--max-new), as EOS would end it. Tokens are filled as soon as a step is planned (no asynchronous pipeline).

`est_s` is a rough time for the steps on LLaMA-13B in float16: per step the larger of reading the weights (26 GB)
at --bandwidth-tbs and the step's rows at 600 TFLOP/s (26 GFLOP a row), plus its KV bytes (800 KiB a token of
context) at 85% of that bandwidth, plus 1 ms. It orders choices; the GPU decides.

With --weights float16|fp8 the steps with prefill take instead the projection times an H100 measured for one
layer at each token-count bucket (scripts/gpu/bucket_times.py, 2026-12-06, x40 layers), padded to the next bucket
prune_buckets keeps, as the runner's graphs do (fp8: FP8 weights and KV, fast accumulation: half the weight and
KV bytes); --cut gives the scheduler those times, so it cuts steps back to a bucket (Scheduler.step_buckets).

Usage: python scripts/sim_schedule.py --blocks 3853 [--horizon 256] [--max-new 512] [--policy longest-first]
       [--requests 512] [--bandwidth-tbs 2.88] [--weights float16 [--cut [--adaptive]]] [--budget 384]
       [--mixed-overhead-ms 2]
(3,853 blocks of 16: an H100's float16 cache for LLaMA-13B, copy bandwidth 2.88 TB/s; 8,577: an H200's, 4.14)"""
from __future__ import annotations

import argparse
import bisect
import time
from typing import Optional

from ziya_batch.engine.piecewise import prune_buckets
from ziya_batch.engine.scheduler import POLICIES, Scheduler, Sequence, SeqStatus
from ziya_batch.engine.types import SamplingParams
from ziya_batch.tools.bench import workload_w1

WEIGHT_BYTES, FLOP_PER_ROW, KV_BYTES_PER_TOKEN = 26.0e9, 26.0e9, 819_200      # LLaMA-13B, float16

# one H100 (2026-12-06, bd96818's tree): LLaMA-13B's four projections of one layer x40, ms, at each mixed-step
# bucket of 64 tokens from 64 to 2,048 (scripts/gpu/bucket_times.py --fast-accum)
H100_BUCKET_MS = {
    "float16": [10.42, 10.82, 11.14, 11.61, 13.94, 14.48, 17.96, 18.41, 20.84, 25.05, 26.62, 26.91, 44.75, 32.94,
                34.25, 35.21, 40.34, 40.69, 45.62, 45.08, 48.72, 49.42, 51.33, 51.74, 63.34, 62.80, 66.42, 67.96,
                70.88, 70.78, 76.25, 78.00],
    "fp8": [12.56, 11.17, 12.00, 11.82, 13.82, 12.94, 16.07, 14.57, 16.26, 16.13, 18.83, 17.68, 22.34, 21.93, 23.59,
            22.61, 26.45, 25.61, 29.14, 27.63, 31.35, 30.61, 33.56, 32.37, 36.22, 36.13, 40.58, 39.45, 41.53, 41.37,
            44.43, 43.26]}


def kept_buckets(weights: str) -> list[tuple[int, float]]:
    """(tokens, seconds for all 40 layers) of the buckets the runner would keep, from H100_BUCKET_MS."""
    sizes, secs = [64 * (i + 1) for i in range(32)], [ms / 1e3 for ms in H100_BUCKET_MS[weights]]
    keep = set(prune_buckets(sizes, secs))
    return [(n, t) for n, t in zip(sizes, secs) if n in keep]


def simulate(blocks: int, horizon: int = 256, max_new: int = 0, policy: str = "fcfs", max_num_seqs: int = 256,
             budget: int = 2048, requests: int = 1024, seed: int = 0, bandwidth: float = 4.14e12,
             weights: Optional[str] = None, cut: bool = False, mixed_overhead_s: float = 0.0,
             adaptive: bool = False) -> dict:
    s = Scheduler(blocks, 16, max_num_seqs, budget, horizon, policy)
    s.adaptive_step_size = adaptive
    buckets = kept_buckets(weights) if weights else None
    if cut:
        # the scheduler compares one layer's times, as the runner measures them: the 20 us floor is a layer's
        s.step_buckets = [(n, t / 40) for n, t in buckets]
    shrink = 2.0 if weights == "fp8" else 1.0          # FP8 weights and KV: half the bytes
    stop_at = {}
    for i, (p, o) in enumerate(workload_w1(requests, 39424, seed)):
        q = Sequence(s.new_seq_id(), str(i), 0, list(p), len(p), SamplingParams(max_new_tokens=max_new or o))
        stop_at[q.seq_id] = o
        s.add(q)
    steps = decode_steps = decode_rows = prefill_tokens = 0
    est_s = 0.0
    while s.has_unfinished():
        out = s.schedule()
        kv_s = sum(c.start + c.num_tokens for c in out.chunks) * KV_BYTES_PER_TOKEN / shrink / (0.85 * bandwidth)
        proj_s = max(WEIGHT_BYTES / shrink / bandwidth, out.num_tokens * FLOP_PER_ROW / 600e12 / shrink)
        if buckets and not out.is_decode_only and out.num_tokens <= buckets[-1][0]:
            # the weight read, plus what the bucket's measured time adds to the flat time of the smallest ones
            # (launch gaps of the eager timing included there, not in a replayed graph)
            proj_s = WEIGHT_BYTES / shrink / bandwidth + \
                buckets[bisect.bisect_left(buckets, (out.num_tokens,))][1] - buckets[0][1]
        est_s += proj_s + 1e-3 + kv_s + (0.0 if out.is_decode_only else mixed_overhead_s)
        rows = [c.seq for c in out.chunks if c.samples]
        s.advance(out, rows)
        for q in rows:
            if q.status is SeqStatus.RUNNING:
                s.fill(q, 5, 0.0)
                if q.num_output_tokens >= stop_at[q.seq_id]:
                    s.finish(q, SeqStatus.FINISHED_STOPPED)
        steps += 1
        if out.is_decode_only:
            decode_steps += 1
            decode_rows += len(out.chunks)
        else:
            prefill_tokens += sum(c.num_tokens for c in out.chunks if c.num_tokens > 1)
    return dict(steps=steps, decode_only_steps=decode_steps, mixed_steps=steps - decode_steps,
                cut_steps=s.num_cut_steps,
                mean_decode_batch=round(decode_rows / max(1, decode_steps), 1), preemptions=s.num_preemptions,
                prefill_tokens=prefill_tokens, est_s=round(est_s, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--horizon", type=int, default=256)
    p.add_argument("--max-new", type=int, default=0, help="every request's max_new_tokens (0: its W1 length)")
    p.add_argument("--policy", choices=POLICIES, default="fcfs")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--requests", type=int, default=1024, help="W1's first this many requests")
    p.add_argument("--bandwidth-tbs", type=float, default=4.14, help="copy bandwidth for est_s (TB/s)")
    p.add_argument("--weights", choices=sorted(H100_BUCKET_MS),
                   help="steps with prefill at an H100's measured bucket times for these weights (and KV)")
    p.add_argument("--cut", action="store_true", help="cut steps back to a bucket (needs --weights)")
    p.add_argument("--budget", type=int, default=2048, help="the step's token budget (engine.max_num_batched_tokens)")
    p.add_argument("--adaptive", action="store_true",
                   help="size steps with prefill by scheduler.step_size (EngineConfig.adaptive_step_size; needs --cut)")
    p.add_argument("--mixed-overhead-ms", type=float, default=0.0,
                   help="added to each step with prefill (what an H100 spent in them beyond this model: ~2 ms)")
    a = p.parse_args()
    if a.cut and not a.weights:
        p.error("--cut needs --weights")
    if a.adaptive and not a.cut:
        p.error("--adaptive needs --cut (the bucket times it sizes steps by)")
    t0 = time.perf_counter()
    if a.budget < a.max_num_seqs:
        p.error("--budget below --max-num-seqs would leave running sequences out of decode steps")
    r = simulate(a.blocks, a.horizon, a.max_new, a.policy, a.max_num_seqs, budget=a.budget, requests=a.requests,
                 bandwidth=a.bandwidth_tbs * 1e12, weights=a.weights, cut=a.cut,
                 mixed_overhead_s=a.mixed_overhead_ms / 1e3, adaptive=a.adaptive)
    print({**r, "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
