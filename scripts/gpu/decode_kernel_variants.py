"""Every configuration of the engine's paged decode-attention kernel, timed on W1-like batches against the
KV-byte floor (what the start-up tuner chooses from, on the batches a run really has).

History (one H200, 2026-11-29): masking every tile had cost ~10% (88% of the floor over 512-token contexts);
full tiles unmasked plus the remainder in smaller masked tiles gave 98% there, and 78% -> 82% over W1's mixed
lengths, where each sequence's partly filled last tile still costs nearly a full one. A variant with several
query heads a program (their K/V rows are adjacent in the cache) was slower in every configuration (71% at best).
Then TAIL_N 0 (one pipelined loop; the positions past the context re-read its last token, only their scores
masked): over the 224 mixed contexts here (mean 391) 80% -> 96% with (64, 2, 2, 0); ncu had shown the masked-tail
kernel at 3 programs an SM (157 registers, 68 KB of shared memory) and 72% of DRAM bandwidth. A cache laid out
[block, head, offset, dim] (each head's block contiguous) instead of [block, offset, head, dim] gained ~1% at best.

On H100s (2026-12-06): the tensor-core kernel ("dot": the query heads of a KV head as the rows of a 16-row tile,
so the CUDA cores only convert K/V and run the softmax) is the fastest over a float16 cache (~1% ahead of the
CUDA-core one) and 4-6% behind it over a float8 cache: the float8 cache's shortfall (86-90% of the floor,
sequences first) is not the CUDA cores' arithmetic. Heads first (the order field: programs side by side read
every head of one sequence, whole token rows of the cache) gains 2-3% in both, on one machine: float16 23.33 ms
(the floor is at the copy bandwidth: reads alone run above it), float8 13.12 ms (92%). 32-token blocks read as
fast as 16-token ones. Two or four heads a program were slower everywhere (97% / 69% at best) and were removed.
A tensor-core kernel reading the float8 cache as int32 words (converted in registers, four values at a time:
~30% fewer instructions a byte, scripts/triton_sass.py) ran at 80-86% of the floor against the CUDA-core
kernel's 88% (0c13320) and was removed.

Checks every configuration against the torch reference first, then times each over 40 layers' worth of
launches on: 224 sequences with W1-like mixed contexts (32..1024, mean ~460), 160 such, each also longest context
first (as the runner orders decode rows), 128 x 512 uniform, and the 224 over 32-token blocks,
for each cache dtype asked (--kv float16,fp8), against the KV-byte floor at this GPU's measured copy bandwidth.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/decode_kernel_variants.py [--kv float16,fp8] [--config 64,2,3,fma,heads]
[--cases "224 mixed"] [--kernels fma,half]

On one H100 (2026-12-06, e080694): "half" (float16 tile math, float8 caches) 12.80 ms (95%) over 224 mixed contexts
against 13.07 (93%) for the best "fma", yet W1 ran 0.4% slower with it (BENCHMARKS.md): the longest-first cases are
there to see whether the row order is where the two part."""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from ziya_batch.engine.attention import (DECODE_CONFIG_FIELDS, block_tables_of, decode_attention_torch,
                                         decode_attention_triton, decode_variants)
from ziya_batch.tools.bandwidth import measure_copy_bandwidth_bytes_s

DTYPES = {"float16": torch.float16, "fp8": torch.float8_e4m3fn}


def batch(num_blocks, bs, lens_list, dev, max_blocks=64):
    lens = torch.tensor(lens_list, dtype=torch.int32, device=dev)
    return block_tables_of([-(-L // bs) for L in lens_list], num_blocks, max_blocks).to(dev), lens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", default="float16,fp8", help="cache dtypes, comma-separated: float16, fp8")
    ap.add_argument("--config", help="one configuration alone, e.g. 64,2,3,fma,heads (for a profiler: "
                                     "ncu --kernel-name regex:_paged_decode ... on this script)")
    ap.add_argument("--cases", help="only these cases, comma-separated (e.g. '224 mixed')")
    ap.add_argument("--kernels", help="only these kernels, comma-separated (fma, dot, half)")
    args = ap.parse_args()
    fixed = None
    if args.config:
        bn, w, st, kind, order = args.config.split(",")
        fixed = [(int(bn), int(w), int(st), kind, order)]
    dev = torch.device("cuda")
    bw = measure_copy_bandwidth_bytes_s(dev)
    torch.manual_seed(0)
    Hq = Hkv = 40
    D, bs = 128, 16
    num_blocks = 8577
    g = torch.Generator().manual_seed(1)
    # W1-like contexts: prompt 32..512 plus a uniform share of the output 32..512 generated so far
    mixed = [int(torch.randint(32, 513, (1,), generator=g)) + int(torch.randint(0, 513, (1,), generator=g) *
             torch.rand(1, generator=g)) for _ in range(224)]
    # (contexts, block size): the engine's 16-token blocks, and 32 (engine.block_size) over the same contexts
    # and the same contexts longest first, the order the runner gives a step's decode rows (decode_longest_first)
    cases = {"224 mixed": (mixed, bs), "224 mixed longest first": (sorted(mixed, reverse=True), bs),
             "160 mixed": (mixed[:160], bs), "160 mixed longest first": (sorted(mixed[:160], reverse=True), bs),
             "128 x 512": ([512] * 128, bs), "224 mixed in 32-token blocks": (mixed, 32)}
    if args.cases:
        cases = {c: cases[c] for c in args.cases.split(",")}
    for name in args.kv.split(","):
        dt = DTYPES[name]
        configs = fixed or [c for c in decode_variants(dt) if not args.kernels or c[3] in args.kernels.split(",")]
        k = torch.randn(num_blocks * bs, Hkv, D, device=dev).to(dt)
        v = torch.randn(num_blocks * bs, Hkv, D, device=dev).to(dt)
        kv_tok = 2 * Hkv * D * k.element_size()
        bt, lens = batch(num_blocks, bs, mixed[:24], dev)
        q = torch.randn(24, Hq, D, device=dev, dtype=torch.float16)
        ref = decode_attention_torch(q.float(), k, v, bt, lens, bs).float()
        for cfg in configs:
            out = torch.empty_like(q)
            decode_attention_triton(q, k, v, bt, lens, bs, out, cfg)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 3e-3, (cfg, err)
        print(f"{name} cache: {len(configs)} configurations agree with the reference; ms over 40 layers "
              f"(KV floor at the measured {bw / 1e12:.2f} TB/s)", flush=True)
        for case, (lens_list, case_bs) in cases.items():
            n = len(lens_list)
            bt, lens = batch(num_blocks * bs // case_bs, case_bs, lens_list, dev)
            q = torch.randn(n, Hq, D, device=dev, dtype=torch.float16)
            out = torch.empty_like(q)
            floor = 40 * sum(lens_list) * kv_tok / bw * 1e3
            res = sorted((do_bench(lambda cfg=cfg: decode_attention_triton(q, k, v, bt, lens, case_bs, out, cfg),
                                   warmup=10, rep=50, return_mode="median") * 40, cfg) for cfg in configs)
            print(f"{name} cache, {case}: floor {floor:.2f} ms", flush=True)
            for t, cfg in res:
                print(f"   {t:7.2f} ms  {100 * floor / t:4.0f}%  {DECODE_CONFIG_FIELDS} = {cfg}", flush=True)
        del k, v


if __name__ == "__main__":
    main()
