"""Can a Triton GEMM on Hopper's tensor memory accelerator (TMA descriptor loads, software-pipelined wgmma) read
LLaMA-13B's float16 projection weights closer to the memory bandwidth than cuBLAS at a decode step's row counts,
or run a step with prefill's row counts faster? For the four projections of 40 layers (each layer's own weights,
25 GB, so nothing stays in L2), per row count: cuBLAS (F.linear) and the best Triton configuration of two
kernels, each timed as one CUDA graph of its 40 launches (so host launch costs are not counted for either):

  nt    y[M, N] = x[M, K] @ w[N, K]^T in [BM, BN] tiles, the grid's rows of tiles sharing one weight tile side by
        side (the weight tile's second read comes from L2)
  swap  y^T = w @ x^T: the weight rows are the wgmma's M, the step's rows its N (up to 256 in one tile), so the
        weights are read once whatever the row count

Every configuration is checked against F.linear first (relative error under 1e-2). Numbers only; nothing in the
engine uses these kernels.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/gemm_tma_probe.py [--rows 96,128,160] [--shapes qkv,o]
[--budget-s 300]"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

SHAPES = {"qkv": (15360, 5120), "o": (5120, 5120), "gate_up": (27648, 5120), "down": (5120, 13824)}
ROWS = (64, 96, 128, 160, 192, 256, 320, 384, 512)
LAYERS = 40
SMEM_BYTES = 227 * 1024


@triton.jit
def _gemm_nt(x_desc, w_desc, y_desc, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             STAGES: tl.constexpr):
    off_m = tl.program_id(0) * BM
    off_n = tl.program_id(1) * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
        k = kt * BK
        a = x_desc.load([off_m, k])                        # [BM, BK]
        b = w_desc.load([off_n, k])                        # [BN, BK]
        acc = tl.dot(a, b.T, acc)
    y_desc.store([off_m, off_n], acc.to(tl.float16))


@triton.jit
def _gemm_swap(x_desc, w_desc, y_desc, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               STAGES: tl.constexpr):
    off_m = tl.program_id(0) * BM
    off_n = tl.program_id(1) * BN
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for kt in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
        k = kt * BK
        w = w_desc.load([off_n, k])                        # [BN, BK]
        x = x_desc.load([off_m, k])                        # [BM, BK]
        acc = tl.dot(w, x.T, acc)                          # [BN, BM]
    y_desc.store([off_m, off_n], tl.trans(acc).to(tl.float16))


def smem(cfg) -> int:
    kind, bm, bn, bk, stages, _ = cfg
    return stages * (bm + bn) * bk * 2 + bm * bn * 2


def configs(m: int) -> list[tuple]:
    out = []
    for bm, bn, bk, st in itertools.product((64, 128), (128, 256), (64, 128), (3, 4, 5)):
        out.append(("nt", bm, bn, bk, st, 4 if bm == 64 else 8))
    bmx = max(16, triton.next_power_of_2(m))
    if bmx <= 256:
        for bn, bk, st in itertools.product((64, 128), (64, 128), (3, 4, 5)):
            out.append(("swap", bmx, bn, bk, st, 4 if bn == 64 else 8))
    return [c for c in out if smem(c) <= SMEM_BYTES]


def launch(cfg, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    kind, bm, bn, bk, st, warps = cfg
    m, k = x.shape
    n = w.shape[0]
    xd = TensorDescriptor.from_tensor(x, [bm, bk])
    wd = TensorDescriptor.from_tensor(w, [bn, bk])
    yd = TensorDescriptor.from_tensor(y, [bm, bn])
    fn = _gemm_nt if kind == "nt" else _gemm_swap
    fn[(triton.cdiv(m, bm), triton.cdiv(n, bn))](xd, wd, yd, k, BM=bm, BN=bn, BK=bk, STAGES=st, num_warps=warps)


def graph_ms(run_all, reps: int = 5) -> float:
    """Milliseconds of one replay of a graph of run_all's launches (the least of reps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_all()                                          # compile / warm outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run_all()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b))
    del g
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--budget-s", type=float, default=300.0)
    o = p.parse_args()
    rows = [int(r) for r in o.rows.split(",")]
    names = o.shapes.split(",")
    dev = torch.device("cuda")
    from ziya_batch.tools.bandwidth import measure_copy_bandwidth_bytes_s
    bw = measure_copy_bandwidth_bytes_s(dev)
    w = {n: [torch.randn(SHAPES[n], device=dev, dtype=torch.float16) * 0.02 for _ in range(LAYERS)] for n in names}
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}; triton {triton.__version__}",
          flush=True)
    t_end = time.monotonic() + o.budget_s
    totals: dict[int, dict[str, float]] = {}
    for m in rows:
        for name in names:
            n, k = SHAPES[name]
            floor_ms = 1e3 * LAYERS * n * k * 2 / bw
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            y = torch.empty(m, n, device=dev, dtype=torch.float16)
            ref = F.linear(x, w[name][0])
            cub = graph_ms(lambda: [F.linear(x, wl, out=None) for wl in w[name]])
            res = []
            for cfg in configs(m):
                if time.monotonic() > t_end:
                    break
                try:
                    launch(cfg, x, w[name][0], y)
                    torch.cuda.synchronize()
                    err = float((y.float() - ref.float()).norm() / ref.float().norm())
                    if not err < 1e-2:
                        print(f"  {name} {m} {cfg}: wrong (relative error {err:.2e})", flush=True)
                        continue
                    ms = graph_ms(lambda: [launch(cfg, x, wl, y) for wl in w[name]])
                    res.append((ms, cfg))
                except Exception as e:  # noqa: BLE001 (a configuration this GPU or Triton cannot build)
                    print(f"  {name} {m} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            res.sort()
            best_nt = next(((ms, c) for ms, c in res if c[0] == "nt"), (float("nan"), None))
            best_sw = next(((ms, c) for ms, c in res if c[0] == "swap"), (float("nan"), None))
            tot = totals.setdefault(m, {"cublas": 0.0, "triton": 0.0, "floor": 0.0})
            tot["cublas"] += cub
            tot["triton"] += min(cub, res[0][0]) if res else cub
            tot["floor"] += floor_ms
            print(f"{m:4d} {name:8s} floor {floor_ms:6.2f}  cuBLAS {cub:6.2f} ({100 * floor_ms / cub:3.0f}%)  "
                  f"nt {best_nt[0]:6.2f} {best_nt[1]}  swap {best_sw[0]:6.2f} {best_sw[1]}", flush=True)
        if m in totals:
            t = totals[m]
            print(f"{m:4d} ALL      floor {t['floor']:6.2f}  cuBLAS {t['cublas']:6.2f} "
                  f"({100 * t['floor'] / t['cublas']:3.0f}%)  best of each {t['triton']:6.2f} "
                  f"({100 * t['floor'] / t['triton']:3.0f}%, {100 * (t['cublas'] / t['triton'] - 1):+.1f}%)",
                  flush=True)


if __name__ == "__main__":
    main()
