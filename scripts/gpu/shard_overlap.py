"""What feeding a replica shard by shard costs, and what overlapping shards wins back, without Redis or Ray: W1 on
the 13B-shaped random engine of `ziya-batch bench` (one GPU), all requests at once, shard by shard (the worker
before 2026-11-29: each shard drains the batch), and shards overlapped through ShardStream as the worker now
feeds them (the next shard once every line in flight is admitted, at most 2 in flight). Output tok/s for each.
One H200, 2026-11-29, commit 5d3ad7e, shards of 512: all at once 4,556; one by one 4,398; overlapped 4,552.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/shard_overlap.py [SHARD_SIZE ...]   (default 512 128)"""
from __future__ import annotations

import sys
import time

import torch

from ziya_batch.records import PromptLine
from ziya_batch.work.generation import ShardStream, generate_lines
from ziya_batch.spec import SamplingSpec
from ziya_batch.tools import bench as B

dev = torch.device("cuda")
a = B._args(40)
t = time.perf_counter()
eng, _ = B._build_engine(a, dev, seed=0)
print(f"engine built in {time.perf_counter() - t:.0f}s; {eng.num_blocks} blocks", flush=True)
work = B.workload_w1(1024, a.vocab_size, seed=0)
prompts = [(PromptLine(f"p{i}", "w1", i + 1, "", SamplingSpec(max_new_tokens=o, top_p=0.85, ignore_eos=True)), p)
           for i, (p, o) in enumerate(work)]
total = sum(o for _, o in work)


def shards(size):
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def bare():
    generate_lines(eng, prompts)


def one_by_one(size):
    for sh in shards(size):
        generate_lines(eng, sh)


def overlapped(size, max_in_flight=2):
    todo, stream, in_flight = shards(size), ShardStream(eng), 0
    while todo or in_flight:
        if todo and (not in_flight or (in_flight < max_in_flight and stream.admitted())):
            stream.add(str(len(todo)), todo.pop(0))
            in_flight += 1
            continue
        in_flight -= len(stream.step())


def timed(name, fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"{name:28s} {total / wall:8,.0f} tok/s  ({wall:.1f} s)", flush=True)


generate_lines(eng, prompts[:64])     # warm-up: graphs, kernels
sizes = [int(s) for s in sys.argv[1:]] or [512, 128]
timed("all 1024 at once", bare)
for size in sizes:
    timed(f"shards of {size}, one by one", lambda: one_by_one(size))
    timed(f"shards of {size}, overlapped", lambda: overlapped(size))
