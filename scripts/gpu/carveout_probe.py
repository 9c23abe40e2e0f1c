"""Does cuBLAS's SM count target let a memory-bound kernel run beside a compute-bound GEMM? One float16 GEMM of a
step with prefill's size (rows x 5120 x 27648: LLaMA-13B's gate_up over ~600 tokens) on one stream, a
memory-bound copy (--copy-gib, the size of a step's decode attention reads) on a high-priority stream: each alone,
then both at once, at several carveouts (SMs the GEMM leaves free), under the default BLAS library and cuBLASLt.
`overlap` is the share of the shorter one hidden: (alone + alone - both) / min(alone, alone).

Usage (GPU machine, repo root): PYTHONPATH=. python3 scripts/gpu/carveout_probe.py [--rows 608] [--copy-gib 1.0]
[--carveouts 0,16,32,48,64]"""
from __future__ import annotations

import argparse
import json

import torch

from ziya_batch.engine.piecewise import gpu_seconds as timed


def captured(fn, dev: torch.device, lib: str = "default", carveout: int = 0) -> torch.cuda.CUDAGraph:
    """fn's kernels as one CUDA graph, its GEMMs launched under BLAS library `lib` told to leave `carveout` SMs
    free (0: none). The carveout is read when a GEMM is launched: a graph keeps the launch it captured."""
    torch.backends.cuda.preferred_blas_library(lib)
    torch._C._set_sm_carveout_experimental(carveout or None)
    try:
        g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g, stream=s):
            fn()
        return g
    finally:
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library("default")


def side_by_side(main_fn, side_fn, main_s: torch.cuda.Stream, side_s: torch.cuda.Stream) -> None:
    """side_fn on `side_s` and main_fn on `main_s` at once, both ordered after and before the current stream."""
    cur = torch.cuda.current_stream()
    main_s.wait_stream(cur)
    side_s.wait_stream(cur)
    with torch.cuda.stream(side_s):
        side_fn()
    with torch.cuda.stream(main_s):
        main_fn()
    cur.wait_stream(main_s)
    cur.wait_stream(side_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=608)
    p.add_argument("--copy-gib", type=float, default=1.0)
    p.add_argument("--carveouts", default="0,16,32,48,64")
    p.add_argument("--gemms", type=int, default=8, help="GEMMs in a row (one layer's time scale x this)")
    a = p.parse_args()
    dev = torch.device("cuda")
    x = torch.randn(a.rows, 5120, dtype=torch.float16, device=dev)
    w = torch.randn(27648, 5120, dtype=torch.float16, device=dev) / 64
    y = torch.empty(a.rows, 27648, dtype=torch.float16, device=dev)
    n = int(a.copy_gib * 2**30) // 2
    src, dst = torch.empty(n, dtype=torch.float16, device=dev), torch.empty(n, dtype=torch.float16, device=dev)
    main_s, side = torch.cuda.Stream(dev), torch.cuda.Stream(dev, priority=torch.cuda.Stream.priority_range()[1])
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(json.dumps({"gpu": torch.cuda.get_device_name(dev), "sms": sms, "rows": a.rows, "copy_gib": a.copy_gib}))

    def gemms() -> None:
        for _ in range(a.gemms):
            torch.mm(x, w.t(), out=y)

    def copy() -> None:
        dst.copy_(src)

    t_copy = timed(copy)
    for lib in ("default", "cublaslt"):
        for c in (int(v) for v in a.carveouts.split(",")):
            if c >= sms:
                continue
            g = captured(gemms, dev, lib, c)
            t_g = timed(g.replay)
            t_b = timed(lambda: side_by_side(g.replay, copy, main_s, side))
            hidden = (t_g + t_copy - t_b) / min(t_g, t_copy)
            print(json.dumps({"lib": lib, "carveout": c, "gemm_ms": round(1e3 * t_g, 3),
                              "copy_ms": round(1e3 * t_copy, 3), "both_ms": round(1e3 * t_b, 3),
                              "serial_ms": round(1e3 * (t_g + t_copy), 3), "overlap": round(hidden, 3),
                              "gemm_tflops": round(2 * a.rows * 5120 * 27648 * a.gemms / t_g / 1e12, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
