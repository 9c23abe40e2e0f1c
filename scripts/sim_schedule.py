"""The engine's scheduler alone (no model, no GPU) on workload W1: how many steps, how large the decode batches
and how many preemptions a KV cache of a given size gives, for trying admission and scheduling changes before
spending GPU time. Every request runs to its W1 output length, or stops there with a larger max_new_tokens
(--max-new), as EOS would end it. Tokens are filled as soon as a step is planned (no asynchronous pipeline).

`est_s` is a rough time for the steps on LLaMA-13B in float16: per step the larger of reading the weights (26 GB)
at --bandwidth-tbs and the step's rows at 600 TFLOP/s (26 GFLOP a row), plus its KV bytes (800 KiB a token of
context) at 85% of that bandwidth, plus 1 ms. It orders choices; the GPU decides.

Usage: python scripts/sim_schedule.py --blocks 3853 [--horizon 256] [--max-new 512] [--policy longest-first]
       [--requests 512] [--bandwidth-tbs 2.88]
(3,853 blocks of 16: an H100's float16 cache for LLaMA-13B, copy bandwidth 2.88 TB/s; 8,577: an H200's, 4.14)"""
from __future__ import annotations

import argparse
import time

from ziya_batch.engine.scheduler import POLICIES, Scheduler, Sequence, SeqStatus
from ziya_batch.engine.types import SamplingParams
from ziya_batch.tools.bench import workload_w1

WEIGHT_BYTES, FLOP_PER_ROW, KV_BYTES_PER_TOKEN = 26.0e9, 26.0e9, 819_200      # LLaMA-13B, float16


def simulate(blocks: int, horizon: int = 256, max_new: int = 0, policy: str = "fcfs", max_num_seqs: int = 256,
             budget: int = 2048, requests: int = 1024, seed: int = 0, bandwidth: float = 4.14e12) -> dict:
    s = Scheduler(blocks, 16, max_num_seqs, budget, horizon, policy)
    stop_at = {}
    for i, (p, o) in enumerate(workload_w1(requests, 39424, seed)):
        q = Sequence(s.new_seq_id(), str(i), 0, list(p), len(p), SamplingParams(max_new_tokens=max_new or o))
        stop_at[q.seq_id] = o
        s.add(q)
    steps = decode_steps = decode_rows = prefill_tokens = 0
    est_s = 0.0
    while s.has_unfinished():
        out = s.schedule()
        est_s += (max(WEIGHT_BYTES / bandwidth, out.num_tokens * FLOP_PER_ROW / 600e12) + 1e-3
                  + sum(c.start + c.num_tokens for c in out.chunks) * KV_BYTES_PER_TOKEN / (0.85 * bandwidth))
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
    a = p.parse_args()
    t0 = time.perf_counter()
    r = simulate(a.blocks, a.horizon, a.max_new, a.policy, a.max_num_seqs, requests=a.requests,
                 bandwidth=a.bandwidth_tbs * 1e12)
    print({**r, "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
