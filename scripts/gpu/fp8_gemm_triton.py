"""Could a Triton FP8 GEMM beat cuBLASLt's at the engine's row counts? LLaMA-13B's four projections with float8
weights and row-wise scales (quant.Fp8Linear's layout: weight [N, K] K-contiguous, per-output-channel scales,
activations quantised per row), through torch._scaled_mm (with and without use_fast_accum) and through a
Triton kernel autotuned per shape and row count (tensor-core FP8 dots, scales in the epilogue, float16 out):
milliseconds for 40 layers, the share of the one-byte weight floor and TFLOP/s, and each one's relative error
against a float32 product of the same float8 operands. Numbers only; the engine is not changed.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/fp8_gemm_triton.py [--rows 128,224,256,512,768]"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

# this directory's script
from fp8_gemm_accum import LAYERS, SHAPES, activations, max_rel_error, projection_weights, scaled_mm, timed

CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
           for bm, bn, bk, w, s in [(64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 128, 256, 4, 3),
                                     (64, 256, 128, 8, 3), (128, 64, 128, 4, 4), (128, 128, 128, 8, 4),
                                     (128, 128, 256, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                     (64, 64, 256, 4, 5), (128, 64, 256, 4, 4), (64, 128, 128, 4, 6)]]


@triton.autotune(configs=CONFIGS, key=["M", "N", "K"])
@triton.jit
def _fp8_rowwise_gemm(A, B, C, SA, SB, M, N, K, stride_am, stride_bn, stride_cm, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # C[M, N] = (A[M, K] @ B[N, K]^T) * SA[M] * SB[N]; programs of GROUP_M row tiles share a column of B's tiles,
    # so a weight tile is read from DRAM once and from L2 by the other row tiles
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = pid // in_group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None] * stride_am + rk[None, :]
    b_ptrs = B + rn[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=rm[:, None] < M, other=0.0)
        b = tl.load(b_ptrs, mask=rn[None, :] < N, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sa = tl.load(SA + rm, mask=rm < M, other=0.0)
    sb = tl.load(SB + rn, mask=rn < N, other=0.0)
    c = acc * sa[:, None] * sb[None, :]
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], c.to(C.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_mm(x8: torch.Tensor, xs: torch.Tensor, w8: torch.Tensor, ws: torch.Tensor, out: torch.Tensor) -> None:
    M, K = x8.shape
    N = w8.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _fp8_rowwise_gemm[grid](x8, w8, out, xs, ws, M, N, K, x8.stride(0), w8.stride(0), out.stride(0))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="128,224,256,512,768")
    o = p.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w, wbytes, bw = projection_weights(dev, g)
    for m in (int(r) for r in o.rows.split(",")):
        xs = activations(m, dev, g)
        outs = {k: torch.empty(m, n, device=dev, dtype=torch.float16) for k, (n, _) in SHAPES.items()}
        flops = 2 * m * sum(n * kk for n, kk in SHAPES.values()) * LAYERS

        def scaled(fast):
            def run():
                for layer in w:
                    for k, (w8, ws) in layer.items():
                        scaled_mm(*xs[k], w8, ws, fast=fast, out=outs[k])
            return run

        def tri_one(k, x8, sx, w8, ws):
            triton_mm(x8, sx.view(-1), w8, ws.view(-1), outs[k])
            return outs[k]

        def tri():
            for layer in w:
                for k, (w8, ws) in layer.items():
                    tri_one(k, *xs[k], w8, ws)

        errs = {"_scaled_mm": max_rel_error(w[0], xs, lambda k, *a: scaled_mm(*a)),
                "_scaled_mm fast": max_rel_error(w[0], xs, lambda k, *a: scaled_mm(*a, fast=True)),
                "triton": max_rel_error(w[0], xs, tri_one)}
        res = {"_scaled_mm": timed(scaled(False)), "_scaled_mm fast": timed(scaled(True)), "triton": timed(tri)}
        for name, ms in res.items():
            print(f"rows {m:5d} {name:16s}: {ms:7.2f} ms ({1e3 * wbytes / bw / ms:4.0%} of the byte floor, "
                  f"{flops / ms / 1e9:6.0f} TFLOP/s); rel. error vs float32 {errs[name]:.2e}", flush=True)
        print(f"rows {m:5d}: triton's configs " + "; ".join(
            f"{key}: {cfg}" for key, cfg in _fp8_rowwise_gemm.cache.items() if key[0] == m), flush=True)


if __name__ == "__main__":
    main()
