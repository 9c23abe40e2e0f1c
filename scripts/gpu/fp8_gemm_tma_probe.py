"""Can a Triton FP8 GEMM on Hopper's tensor memory accelerator read LLaMA-13B's float8 projection weights closer
to the memory bandwidth than cuBLASLt's `torch._scaled_mm` at the row counts of W1's FP8 steps? quant.Fp8Linear's
layout: weight [N, K] float8 e4m3, K-contiguous, per-output-channel scales; activations quantised per row; float16
out. For the four projections of 40 layers (each layer's own weights, 13 GB, so nothing stays in L2), per row
count: `_scaled_mm` with fast accumulation (the engine's `engine.fp8_fast_accum`) and the best configuration of
three Triton kernels (tiles loaded through TMA descriptors into a software pipeline of FP8 wgmma dots, the row and
column scales in the epilogue), each method timed as one CUDA graph of its 40 launches:

  nt     y[M, N] = x[M, K] @ w[N, K]^T in [BM, BN] tiles; programs side by side share one weight tile (L2)
  swap   y^T = w @ x^T: the weight rows are the wgmma's M, the step's rows its N (up to 256 in one tile), so the
         weights are read once whatever the row count
  splitk swap with K split over S programs, their scaled partial sums added atomically into a float32 buffer
         (zeroed first) and cast to float16 after (both counted): more programs for o and down, whose 5,120 output
         rows make only 40-80 weight tiles

Every configuration is checked first against a float32 product of the same float8 operands (relative error under
1e-2; `_scaled_mm`'s fast accumulation is ~3e-3). Numbers only; nothing in the engine uses these kernels.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/fp8_gemm_tma_probe.py [--rows 128,224,256] [--shapes qkv,o]
[--budget-s 300]"""
from __future__ import annotations

import argparse
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# this directory's float16 probe: the same shapes, layer count, shared-memory limit and graph timing
from gemm_tma_probe import LAYERS, SHAPES, SMEM_BYTES, graph_ms

from ziya_batch.engine import quant

ROWS = (128, 224, 256, 384, 640)


@triton.jit
def _scales(SA, SB, offs_m, offs_n, M, N):
    sa = tl.load(SA + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(SB + offs_n, mask=offs_n < N, other=0.0)
    return sa, sb


@triton.jit
def _fp8_nt(x_desc, w_desc, y_desc, SA, SB, M, N, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, STAGES: tl.constexpr):
    off_m = tl.program_id(0) * BM
    off_n = tl.program_id(1) * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
        k = kt * BK
        a = x_desc.load([off_m, k])                        # [BM, BK] float8
        b = w_desc.load([off_n, k])                        # [BN, BK] float8
        acc = tl.dot(a, b.T, acc)
    sa, sb = _scales(SA, SB, off_m + tl.arange(0, BM), off_n + tl.arange(0, BN), M, N)
    y_desc.store([off_m, off_n], (acc * sa[:, None] * sb[None, :]).to(tl.float16))


@triton.jit
def _fp8_swap(x_desc, w_desc, y_desc, SA, SB, M, N, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, STAGES: tl.constexpr):
    off_m = tl.program_id(0) * BM
    off_n = tl.program_id(1) * BN
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for kt in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
        k = kt * BK
        w = w_desc.load([off_n, k])                        # [BN, BK]
        x = x_desc.load([off_m, k])                        # [BM, BK]
        acc = tl.dot(w, x.T, acc)                          # [BN, BM]
    sa, sb = _scales(SA, SB, off_m + tl.arange(0, BM), off_n + tl.arange(0, BN), M, N)
    y_desc.store([off_m, off_n], tl.trans(acc * sb[:, None] * sa[None, :]).to(tl.float16))


@triton.jit
def _fp8_swap_splitk(x_desc, w_desc, Y32, SA, SB, M, N, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, STAGES: tl.constexpr, PER: tl.constexpr):
    # PER: K's tiles a program takes (of cdiv(K, BK), split over grid dim 2)
    off_m = tl.program_id(0) * BM
    off_n = tl.program_id(1) * BN
    first = tl.program_id(2) * PER
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for i in tl.range(0, PER, num_stages=STAGES):      # tiles past K (when SPLIT does not divide them) load as 0
        k = (first + i) * BK
        w = w_desc.load([off_n, k])
        x = x_desc.load([off_m, k])
        acc = tl.dot(w, x.T, acc)
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    sa, sb = _scales(SA, SB, offs_m, offs_n, M, N)
    ptrs = Y32 + offs_m[None, :] * N + offs_n[:, None]     # acc is [BN, BM]: y[m, n] at m * N + n
    tl.atomic_add(ptrs, acc * sb[:, None] * sa[None, :], mask=(offs_m[None, :] < M) & (offs_n[:, None] < N),
                  sem="relaxed")


def smem(cfg) -> int:
    kind, bm, bn, bk, stages, _warps, _split = cfg
    return stages * (bm + bn) * bk + (bm * bn * 2 if kind != "splitk" else 0)


def configs(m: int, n: int) -> list[tuple]:
    """(kind, BM, BN, BK, stages, warps, split) candidates for m rows and n output columns."""
    out = [("nt", bm, bn, bk, st, 4 if bm == 64 else 8, 1) for bm, bn, bk, st in
           ((64, 128, 128, 4), (64, 128, 256, 3), (64, 256, 128, 4), (128, 128, 128, 4), (128, 128, 256, 3),
            (128, 256, 128, 3), (128, 256, 128, 4), (64, 64, 256, 4))]
    bmx = max(16, triton.next_power_of_2(m))
    if bmx <= 256:
        out += [("swap", bmx, bn, bk, st, 4 if bn == 64 else 8, 1) for bn in (64, 128)
                for bk, st in ((128, 4), (128, 5), (256, 3))]
        if n <= 5120:
            out += [("splitk", bmx, bn, 128, 4, 4 if bn == 64 else 8, s) for bn in (64, 128) for s in (2, 4)]
    return [c for c in out if smem(c) <= SMEM_BYTES]


class Launcher:
    """One configuration's launches for x8 [M, K] against any of the layers' weights of one shape."""

    def __init__(self, cfg, x8: torch.Tensor, sx: torch.Tensor, n: int, y: torch.Tensor):
        self.cfg, self.x8, self.sx, self.y = cfg, x8, sx.reshape(-1).contiguous(), y
        kind, bm, bn, bk, st, warps, split = cfg
        self.xd = TensorDescriptor.from_tensor(x8, [bm, bk])
        self.yd = TensorDescriptor.from_tensor(y, [bm, bn]) if kind != "splitk" else None
        self.y32 = torch.empty(y.shape, device=y.device, dtype=torch.float32) if kind == "splitk" else None
        self.grid = (triton.cdiv(x8.shape[0], bm), triton.cdiv(n, bn), split)

    def __call__(self, w8: torch.Tensor, ws: torch.Tensor) -> None:
        kind, bm, bn, bk, st, warps, split = self.cfg
        m, k = self.x8.shape
        n = w8.shape[0]
        wd = TensorDescriptor.from_tensor(w8, [bn, bk])
        sb = ws.reshape(-1)
        if kind == "nt":
            _fp8_nt[self.grid[:2]](self.xd, wd, self.yd, self.sx, sb, m, n, k, BM=bm, BN=bn, BK=bk, STAGES=st,
                                   num_warps=warps)
        elif kind == "swap":
            _fp8_swap[self.grid[:2]](self.xd, wd, self.yd, self.sx, sb, m, n, k, BM=bm, BN=bn, BK=bk, STAGES=st,
                                     num_warps=warps)
        else:
            self.y32.zero_()
            _fp8_swap_splitk[self.grid](self.xd, wd, self.y32, self.sx, sb, m, n, k, BM=bm, BN=bn, BK=bk,
                                        STAGES=st, PER=triton.cdiv(triton.cdiv(k, bk), split), num_warps=warps)
            self.y.copy_(self.y32)


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
    g = torch.Generator(device=dev).manual_seed(0)
    w = {nm: [quant.quantize_weight(torch.randn(SHAPES[nm], device=dev, generator=g) * 0.02)
              for _ in range(LAYERS)] for nm in names}
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}; triton {triton.__version__}",
          flush=True)
    t_end = time.monotonic() + o.budget_s
    totals: dict[int, dict[str, float]] = {}
    for m in rows:
        for name in names:
            n, k = SHAPES[name]
            floor_ms = 1e3 * LAYERS * n * k / bw
            x8, sx = quant.quantize_rows(torch.randn(m, k, device=dev, generator=g).half())
            y = torch.empty(m, n, device=dev, dtype=torch.float16)
            w8, ws = w[name][0]
            ref = (x8.float() * sx) @ (w8.float() * ws).t()

            def cublas():
                for w8l, wsl in w[name]:
                    torch._scaled_mm(x8, w8l.t(), scale_a=sx, scale_b=wsl.view(1, -1), out_dtype=torch.float16,
                                     use_fast_accum=True)
            cub = graph_ms(cublas)
            res = []
            for cfg in configs(m, n):
                if time.monotonic() > t_end:
                    break
                try:
                    run = Launcher(cfg, x8, sx, n, y)
                    run(w8, ws)
                    torch.cuda.synchronize()
                    err = float((y.float() - ref).norm() / ref.norm())
                    if not err < 1e-2:
                        print(f"  {name} {m} {cfg}: wrong (relative error {err:.2e})", flush=True)
                        continue
                    ms = graph_ms(lambda: [run(w8l, wsl) for w8l, wsl in w[name]])
                    res.append((ms, cfg))
                except Exception as e:  # noqa: BLE001 (a configuration this GPU or Triton cannot build)
                    print(f"  {name} {m} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            res.sort()
            best = {kind: next(((ms, c) for ms, c in res if c[0] == kind), (float("nan"), None))
                    for kind in ("nt", "swap", "splitk")}
            tot = totals.setdefault(m, {"cublas": 0.0, "triton": 0.0, "floor": 0.0})
            tot["cublas"] += cub
            tot["triton"] += min(cub, res[0][0]) if res else cub
            tot["floor"] += floor_ms
            print(f"{m:4d} {name:8s} floor {floor_ms:6.2f}  _scaled_mm {cub:6.2f} ({100 * floor_ms / cub:3.0f}%)  "
                  + "  ".join(f"{kd} {ms:6.2f} {c}" for kd, (ms, c) in best.items()), flush=True)
        if m in totals:
            t = totals[m]
            print(f"{m:4d} ALL      floor {t['floor']:6.2f}  _scaled_mm {t['cublas']:6.2f} "
                  f"({100 * t['floor'] / t['cublas']:3.0f}%)  best of each {t['triton']:6.2f} "
                  f"({100 * t['floor'] / t['triton']:3.0f}%, {100 * (t['cublas'] / t['triton'] - 1):+.1f}%)",
                  flush=True)


if __name__ == "__main__":
    main()
