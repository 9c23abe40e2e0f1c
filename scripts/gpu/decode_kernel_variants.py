"""Variants of the paged decode-attention kernel, timed against the engine's on W1-like batches.

Variant "tail": the engine's kernel with its full BLOCK_N tiles unmasked and the context's remainder in
smaller TAIL_N tiles (over W1's mixed lengths the last, partly masked 128-token tile of each sequence costs
~10%: the engine's kernel reaches 88% of the KV-byte floor over 512-token contexts, 78% over mixed ones).
(A variant with several query heads a program, whose K/V rows are adjacent in the cache, measured slower than the
engine's kernel in every configuration on 2026-11-29: 71% at best against 78%.)
Checks every variant against the torch reference first, then times each configuration over 40 layers' worth of
launches on: 224 sequences with W1-like mixed contexts (32..1024, mean ~460), 160 such, and 128 x 512 uniform.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/decode_kernel_variants.py"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from ziya_batch.engine.attention import decode_attention_torch, decode_attention_triton


@triton.jit
def _decode_tail_kernel(Q, K, V, O, BT, CTX, scale, stride_qb, stride_qh, stride_ks, stride_kh, stride_btb,
                        stride_ob, stride_oh, GROUP: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                        TAIL_N: tl.constexpr, D: tl.constexpr, NUM_STAGES: tl.constexpr):
    # the engine's kernel, but its full BLOCK_N tiles run unmasked and the remainder (ctx % BLOCK_N tokens) in
    # tiles of TAIL_N: a context of 460 tokens no longer pays for a half-empty 128-token tile
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    ctx = tl.load(CTX + b)
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc = tl.zeros([D], tl.float32)
    full = ctx // BLOCK_N * BLOCK_N
    for start in tl.range(0, full, BLOCK_N, num_stages=NUM_STAGES):
        t = start + tl.arange(0, BLOCK_N)
        page = tl.load(BT + b * stride_btb + t // BS).to(tl.int64)
        offs = (page * BS + t % BS)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        k = tl.load(K + offs)
        v = tl.load(V + offs)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    for start in tl.range(full, ctx, TAIL_N):
        t = start + tl.arange(0, TAIL_N)
        mask = t < ctx
        page = tl.load(BT + b * stride_btb + t // BS, mask=mask, other=0).to(tl.int64)
        offs = (page * BS + t % BS)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        k = tl.load(K + offs, mask=mask[:, None], other=0.0)
        v = tl.load(V + offs, mask=mask[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-20)
    tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty))


def decode_tail(q, k_flat, v_flat, bt, lens, bs, out, bn, warps, stages, tail):
    B, Hq, D = q.shape
    Hkv = k_flat.shape[1]
    _decode_tail_kernel[(B, Hq)](
        q, k_flat, v_flat, out, bt, lens, 1.0 / math.sqrt(D), q.stride(0), q.stride(1), k_flat.stride(0),
        k_flat.stride(1), bt.stride(0), out.stride(0), out.stride(1), GROUP=Hq // Hkv, BS=bs, BLOCK_N=bn,
        TAIL_N=tail, D=D, NUM_STAGES=stages, num_warps=warps)


def batch(num_blocks, bs, n, lens_list, dev, max_blocks=64):
    lens = torch.tensor(lens_list, dtype=torch.int32, device=dev)
    bt = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
    perm = torch.randperm(num_blocks, device=dev).to(torch.int32)
    at = 0
    for i, L in enumerate(lens_list):
        nb = -(-L // bs)
        bt[i, :nb] = perm[at:at + nb]
        at += nb
    return bt, lens


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    Hq = Hkv = 40
    D, bs = 128, 16
    num_blocks = 8577
    k = torch.randn(num_blocks * bs, Hkv, D, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    g = torch.Generator().manual_seed(1)
    # W1-like contexts: prompt 32..512 plus a uniform share of the output 32..512 generated so far
    mixed = [int(torch.randint(32, 513, (1,), generator=g)) + int(torch.randint(0, 513, (1,), generator=g) *
             torch.rand(1, generator=g)) for _ in range(224)]
    cases = {"224 mixed": mixed, "160 mixed": mixed[:160], "128 x 512": [512] * 128}
    kv_tok = 2 * Hkv * D * 2
    variants = [(f"engine bn{c[0]} w{c[1]} s{c[2]}", c) for c in ((128, 4, 2), (64, 4, 1), (128, 4, 1))]
    grid = [(bn, w, st, tail) for bn, w, st in ((128, 4, 2), (128, 4, 1), (64, 4, 1), (64, 4, 2), (256, 8, 2))
            for tail in (16, 32, 64) if tail < bn]
    for bn, w, st, tail in grid:
        variants.append((f"tail bn{bn} w{w} s{st} tail{tail}", (bn, w, st, tail)))
    # correctness on a small mixed batch
    bt, lens = batch(num_blocks, bs, 24, mixed[:24], dev)
    q = torch.randn(24, Hq, D, device=dev, dtype=torch.float16)
    ref = decode_attention_torch(q, k, v, bt, lens, bs).float()
    bad = []
    for name, cfg in variants:
        if name.startswith("engine"):
            continue
        out = torch.empty_like(q)
        try:
            decode_tail(q, k, v, bt, lens, bs, out, *cfg)
        except Exception as err:  # noqa: BLE001 - resources
            bad.append(name)
            print(f"{name}: {type(err).__name__}")
            continue
        err = (out.float() - ref).abs().max().item()
        if err > 2e-2:
            bad.append(name)
            print(f"{name}: WRONG, max error {err}")
    variants = [x for x in variants if x[0] not in bad]
    print(f"{len(variants)} variants correct; timing (ms over 40 layers; KV-byte floor at 4.2 TB/s)")
    for case, lens_list in cases.items():
        n = len(lens_list)
        bt, lens = batch(num_blocks, bs, n, lens_list, dev)
        q = torch.randn(n, Hq, D, device=dev, dtype=torch.float16)
        out = torch.empty_like(q)
        floor = 40 * sum(lens_list) * kv_tok / 4.2e12 * 1e3
        res = []
        for name, cfg in variants:
            if name.startswith("engine"):
                fn = lambda cfg=cfg: decode_attention_triton(q, k, v, bt, lens, bs, out, cfg)  # noqa: E731
            else:
                fn = lambda cfg=cfg: decode_tail(q, k, v, bt, lens, bs, out, *cfg)  # noqa: E731
            res.append((do_bench(fn, warmup=10, rep=50, return_mode="median") * 40, name))
        res.sort()
        eng = next(t for t, nm in res if nm == "engine bn128 w4 s2")
        print(f"{case}: floor {floor:.2f} ms; engine kernel at its usual config {eng:.2f} ms")
        for t, nm in res[:10]:
            print(f"   {t:7.2f} ms  {100 * floor / t:4.0f}%  {nm}")


if __name__ == "__main__":
    main()
