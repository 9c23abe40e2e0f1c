"""Variants of the paged decode-attention kernel, timed against the engine's on W1-like batches.

Variant "mh": one program per (sequence, group of HPP query heads) instead of per (sequence, head): a token's K/V
rows of those heads are adjacent in the cache ([slot, kv_head, head_dim]), so each load reads HPP * 256 bytes
contiguously instead of 256. Optional evict_first loads (K/V are read once a step: keep them out of L2).
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
def _decode_mh_kernel(Q, K, V, O, BT, CTX, scale, stride_qb, stride_qh, stride_ks, stride_kh, stride_btb,
                      stride_ob, stride_oh, GROUP: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                      D: tl.constexpr, HPP: tl.constexpr, NUM_STAGES: tl.constexpr, EVICT: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1) * HPP + tl.arange(0, HPP)                                       # [HPP]
    kvh = h // GROUP
    ctx = tl.load(CTX + b)
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :]).to(tl.float32) * scale   # [HPP, D]
    m_i = tl.full([HPP], float("-inf"), tl.float32)
    l_i = tl.zeros([HPP], tl.float32)
    acc = tl.zeros([HPP, D], tl.float32)
    hd = (kvh * stride_kh)[:, None] + d[None, :]                                          # [HPP, D]
    for start in tl.range(0, ctx, BLOCK_N, num_stages=NUM_STAGES):
        t = start + tl.arange(0, BLOCK_N)
        mask = t < ctx
        page = tl.load(BT + b * stride_btb + t // BS, mask=mask, other=0).to(tl.int64)
        slot = page * BS + t % BS
        offs = (slot * stride_ks)[:, None, None] + hd[None, :, :]                          # [N, HPP, D]
        m3 = mask[:, None, None]
        if EVICT:
            k = tl.load(K + offs, mask=m3, other=0.0, eviction_policy="evict_first")
            v = tl.load(V + offs, mask=m3, other=0.0, eviction_policy="evict_first")
        else:
            k = tl.load(K + offs, mask=m3, other=0.0)
            v = tl.load(V + offs, mask=m3, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :, :], axis=2)                             # [N, HPP]
        s = tl.where(mask[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))                                       # [HPP]
        p = tl.exp(s - m_new[None, :])                                                   # [N, HPP]
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32), axis=0)    # [HPP, D]
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-20)[:, None]
    tl.store(O + b * stride_ob + h[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty))


def decode_mh(q, k_flat, v_flat, bt, lens, bs, out, bn, warps, stages, hpp, evict):
    B, Hq, D = q.shape
    Hkv = k_flat.shape[1]
    _decode_mh_kernel[(B, Hq // hpp)](
        q, k_flat, v_flat, out, bt, lens, 1.0 / math.sqrt(D), q.stride(0), q.stride(1), k_flat.stride(0),
        k_flat.stride(1), bt.stride(0), out.stride(0), out.stride(1), GROUP=Hq // Hkv, BS=bs, BLOCK_N=bn, D=D,
        HPP=hpp, NUM_STAGES=stages, EVICT=evict, num_warps=warps)


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
    grid = [(bn, w, st, hpp, ev) for bn in (16, 32, 64) for hpp in (2, 4) for w in (4, 8) for st in (1, 2)
            for ev in (False, True)] + [(bn, 8, st, 8, False) for bn in (16, 32) for st in (1, 2)]
    for bn, w, st, hpp, ev in grid:
        variants.append((f"mh bn{bn} hpp{hpp} w{w} s{st}{' ev' if ev else ''}", (bn, w, st, hpp, ev)))
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
            decode_mh(q, k, v, bt, lens, bs, out, *cfg)
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
                fn = lambda cfg=cfg: decode_mh(q, k, v, bt, lens, bs, out, *cfg)  # noqa: E731
            res.append((do_bench(fn, warmup=10, rep=50, return_mode="median") * 40, name))
        res.sort()
        eng = next(t for t, nm in res if nm == "engine bn128 w4 s2")
        print(f"{case}: floor {floor:.2f} ms; engine kernel at its usual config {eng:.2f} ms")
        for t, nm in res[:10]:
            print(f"   {t:7.2f} ms  {100 * floor / t:4.0f}%  {nm}")


if __name__ == "__main__":
    main()
