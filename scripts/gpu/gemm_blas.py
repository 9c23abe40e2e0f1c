"""The four GEMMs of LLaMA-13B's 40 layers at decode and mixed-step row counts, under cuBLAS and cuBLASLt
(torch.backends.cuda.preferred_blas_library), each layer's own weights (25 GB in all, so nothing stays in L2).
Prints, per row count, milliseconds for all 40 layers and the share of the weight-byte floor at the measured
copy bandwidth. Numbers only; nothing is changed.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/gemm_blas.py [--rows 128:1024:8] [--libs cublas,cublaslt,tunable]"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ziya_batch.tools.bandwidth import measure_copy_bandwidth_bytes_s

SHAPES = {"qkv": (15360, 5120), "o": (5120, 5120), "gate_up": (27648, 5120), "down": (5120, 13824)}
ROWS = (16, 32, 64, 96, 128, 160, 192, 224, 256, 384, 512, 768, 1024)
LAYERS = 40


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="", help="start:stop:step (stop included), or a comma-separated list")
    p.add_argument("--libs", default="cublas,cublaslt")
    o = p.parse_args()
    if ":" in o.rows:
        a, b, c = (int(x) for x in o.rows.split(":"))
        rows = tuple(range(a, b + 1, c))
    else:
        rows = tuple(int(x) for x in o.rows.split(",")) if o.rows else ROWS
    dev = torch.device("cuda")
    bw = measure_copy_bandwidth_bytes_s(dev)
    w = [{k: torch.randn(n, kk, device=dev, dtype=torch.float16) * 0.02 for k, (n, kk) in SHAPES.items()}
         for _ in range(LAYERS)]
    wbytes = sum(n * kk * 2 for n, kk in SHAPES.values()) * LAYERS
    floor_ms = 1e3 * wbytes / bw
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; weight bytes {wbytes / 1e9:.1f} GB; floor {floor_ms:.2f} ms")
    libs = tuple(o.libs.split(","))
    print("rows  " + "  ".join(f"{lib:>20s}" for lib in libs) + "   per GEMM (ms, 40 layers, each lib)")
    for m in rows:
        xs = {k: torch.randn(m, kk, device=dev, dtype=torch.float16) for k, (_, kk) in SHAPES.items()}
        res, per = [], []
        for lib in libs:
            # "tunable": PyTorch's TunableOp times every GEMM implementation it has for each shape and keeps the
            # fastest (the first calls below tune)
            torch.cuda.tunable.enable(lib == "tunable")
            torch.cuda.tunable.tuning_enable(lib == "tunable")
            if lib != "tunable":
                torch.backends.cuda.preferred_blas_library(lib)
            one = {}
            for name in SHAPES:
                for _ in range(3):
                    for layer in w:
                        F.linear(xs[name], layer[name])
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(5):
                    s.record()
                    for layer in w:
                        F.linear(xs[name], layer[name])
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e))
                one[name] = min(times)
            tot = sum(one.values())
            flops = 2 * m * sum(n * kk for n, kk in SHAPES.values()) * LAYERS
            res.append(f"{tot:7.2f} ms {100 * floor_ms / tot:3.0f}% {flops / tot / 1e9:4.0f}TF")
            per.append("/".join(f"{one[k]:.2f}" for k in SHAPES))
        print(f"{m:4d}  " + "  ".join(res) + "   " + "  ".join(per))
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
