"""One layer's four projections at every size the runner captures graphs for (decode batch sizes and mixed-step
token buckets), LLaMA-13B's shape, float16 and FP8 weights, as the runner measures them at start-up
(piecewise.projection_seconds), and the sizes prune_buckets drops: where cuBLAS's choice at a size is slower than
at a larger one, steps of that size run faster padded to the larger.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/bucket_times.py [--quantization none,fp8] [--fast-accum]"""
from __future__ import annotations

import argparse

import torch

from ziya_batch.engine.model import LlamaModel
from ziya_batch.engine.piecewise import mixed_buckets, projection_seconds, prune_buckets
from ziya_batch.engine.quant import set_fast_accum
from ziya_batch.engine.runner import graph_batch_sizes
from ziya_batch.tools.bench_core import _args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="none,fp8")
    ap.add_argument("--fast-accum", action="store_true", help="FP8: _scaled_mm's fast accumulation")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--layers", type=int, default=40, help="times are one layer's, multiplied by this")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name())
    for q in args.quantization.split(","):
        model = LlamaModel.random(_args(1), dev, torch.float16, 0, None if q == "none" else q)
        if q == "fp8" and args.fast_accum:
            set_fast_accum(model, True)
        for what, sizes in (("decode", graph_batch_sizes(args.max_seqs)),
                            ("mixed", mixed_buckets(args.max_tokens))):
            secs = projection_seconds(model, sizes)
            kept = prune_buckets(sizes, secs)
            print(f"{q} {what}: ms x{args.layers} layers (* dropped)")
            print("  " + ", ".join(f"{n}{'' if n in kept else '*'} {1e3 * t * args.layers:.2f}"
                                   for n, t in zip(sizes, secs)))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
