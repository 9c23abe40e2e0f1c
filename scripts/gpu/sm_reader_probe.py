"""How much of the card's bandwidth can a memory-bound kernel pull from a few SMs, and does it then run beside a
GEMM that leaves it those SMs? A persistent Triton kernel sums a large float16 buffer (--gib, about a step's decode
attention reads of a few layers) with a grid of N programs, one an SM: its loads either plain (`ld`, tiles of
rows x 2,048) or through a tensor descriptor (`tma`, Hopper's bulk copies, pipelined by --stages). First each
alone at several N against the whole-card copy bandwidth, then beside float16 GEMMs of a step with prefill's size
(rows x 5120 x 27648, cuBLASLt told to leave N SMs free: torch._C._set_sm_carveout_experimental) on a
high-priority stream. `hidden` is the share of the reader's own time hidden: (gemm + reader - both) / reader.

This asks whether decode attention on a few SMs could run under a step's prefill GEMMs (the in-kernel overlap the
float16 target needs): if a few SMs pull most of the bandwidth, a persistent attention kernel limited to them, on
a second stream, could; if not, no two-stream schedule can.

Usage (GPU machine, repo root): PYTHONPATH=. python3 scripts/gpu/sm_reader_probe.py [--gib 2] [--sms 8,16,24,32,48,66,132]
[--kinds ld,tma] [--rows 608]"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from carveout_probe import captured, side_by_side     # this folder is the script's first path entry
from ziya_batch.engine.piecewise import gpu_seconds as timed
from ziya_batch.tools.bench import measure_copy_bandwidth_bytes_s

COLS = 2048


@triton.jit
def _read_ld(x_ptr, out_ptr, n_tiles, BM: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr):
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    rows = tl.arange(0, BM)[:, None]
    cols = tl.arange(0, BC)[None, :]
    acc = tl.zeros([BM, BC], dtype=tl.float32)
    for t in tl.range(pid, n_tiles, nprog, num_stages=STAGES):
        acc += tl.load(x_ptr + (t * BM + rows).to(tl.int64) * BC + cols).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def _read_tma(x_ptr, out_ptr, n_tiles, BM: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr):
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    desc = tl.make_tensor_descriptor(x_ptr, shape=[n_tiles * BM, BC], strides=[BC, 1], block_shape=[BM, BC])
    acc = tl.zeros([BM, BC], dtype=tl.float32)
    for t in tl.range(pid, n_tiles, nprog, num_stages=STAGES):
        acc += desc.load([t * BM, 0]).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--sms", default="8,16,24,32,48,66,132")
    p.add_argument("--kinds", default="ld,tma")
    p.add_argument("--rows", type=int, default=608)
    p.add_argument("--gemms", type=int, default=8)
    p.add_argument("--stages", type=int, default=4)
    a = p.parse_args()
    dev = torch.device("cuda")
    nsm = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = measure_copy_bandwidth_bytes_s(dev)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    n = int(a.gib * 2**30) // 2 // COLS * COLS
    buf = torch.randn(n, dtype=torch.float16, device=dev)
    out = torch.zeros(nsm, dtype=torch.float32, device=dev)
    x = torch.randn(a.rows, 5120, dtype=torch.float16, device=dev)
    w = torch.randn(27648, 5120, dtype=torch.float16, device=dev) / 64
    y = torch.empty(a.rows, 27648, dtype=torch.float16, device=dev)
    main_s, side = torch.cuda.Stream(dev), torch.cuda.Stream(dev, priority=torch.cuda.Stream.priority_range()[1])
    print(json.dumps({"gpu": torch.cuda.get_device_name(dev), "sms": nsm, "copy_tb_s": round(bw / 1e12, 3),
                      "read_gib": round(2 * n / 2**30, 3), "triton": triton.__version__}), flush=True)

    def reader(kind: str, grid: int, bm: int, warps: int):
        kern = _read_tma if kind == "tma" else _read_ld
        tiles = n // (bm * COLS)

        def run() -> None:
            kern[(grid,)](buf, out, tiles, BM=bm, BC=COLS, STAGES=a.stages, num_warps=warps)
        return run, tiles * bm * COLS * 2

    def gemms() -> None:
        for _ in range(a.gemms):
            torch.mm(x, w.t(), out=y)

    grids = [int(v) for v in a.sms.split(",") if 0 < int(v) <= nsm]
    best: dict[tuple[str, int], tuple[float, int, int, int]] = {}      # (seconds, bm, warps, bytes read)
    for kind in a.kinds.split(","):
        for grid in grids:
            for bm, warps in ((8, 4), (16, 8), (32, 8)):
                try:
                    run, nbytes = reader(kind, grid, bm, warps)
                    t = timed(run)
                except Exception as e:  # noqa: BLE001 - a tile the kernel cannot take is one line, not the end
                    print(json.dumps({"kind": kind, "grid": grid, "bm": bm, "error": f"{type(e).__name__}: {e}"[:200]}))
                    continue
                if (kind, grid) not in best or t < best[(kind, grid)][0]:
                    best[(kind, grid)] = (t, bm, warps, nbytes)
            if (kind, grid) in best:
                t, bm, warps, nbytes = best[(kind, grid)]
                print(json.dumps({"kind": kind, "grid": grid, "bm": bm, "warps": warps, "ms": round(1e3 * t, 3),
                                  "tb_s": round(nbytes / t / 1e12, 3), "of_copy": round(nbytes / t / bw, 3)}),
                      flush=True)
    for kind in a.kinds.split(","):
        for grid in grids:
            if (kind, grid) not in best or grid >= nsm:
                continue
            t_r, bm, warps, _ = best[(kind, grid)]
            run, _ = reader(kind, grid, bm, warps)
            g = captured(gemms, dev, "cublaslt", grid)
            t_g = timed(g.replay)
            t_b = timed(lambda: side_by_side(g.replay, run, main_s, side))
            print(json.dumps({"kind": kind, "carveout": grid, "gemm_ms": round(1e3 * t_g, 3),
                              "reader_ms": round(1e3 * t_r, 3), "both_ms": round(1e3 * t_b, 3),
                              "serial_ms": round(1e3 * (t_g + t_r), 3),
                              "hidden": round((t_g + t_r - t_b) / t_r, 3),
                              "gemm_tflops": round(2 * a.rows * 5120 * 27648 * a.gemms / t_g / 1e12, 1)}),
                  flush=True)
    g0 = captured(gemms, dev, "cublaslt", 0)
    print(json.dumps({"kind": "none", "carveout": 0, "gemm_ms": round(1e3 * timed(g0.replay), 3)}), flush=True)


if __name__ == "__main__":
    main()
