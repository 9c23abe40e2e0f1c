"""Attention over the paged KV cache.

A step's tokens are laid out decode-first: the first `num_decode` tokens each are one query at the end of
its own sequence (decode, or a one-token prefill chunk) and go through the paged decode path, which reads
only that sequence's blocks through its block table. The remaining tokens are prefill chunks; each chunk's
queries attend causally to its sequence's cached context plus the chunk itself, also read through the block
table (the chunk's own K/V are written to the cache first). On CUDA both paths are one Triton kernel launch a
layer each, whatever the number of sequences; elsewhere they are plain torch (a loop over prefill chunks).

Cache layout per layer: k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]; a token's slot is
block_id * block_size + offset, so the cache viewed as [num_slots, kv_heads, head_dim] is indexed by slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ziya_batch.engine.kv_cache import as_storage

try:  # the GPU image has Triton; the CPU CI build may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


# query rows per program of the Triton prefill kernel; the runner splits chunks into blocks of this size
PREFILL_BLOCK_M = 64

# A step with both decode rows and prefill chunks launches the prefill kernel on a side stream before the decode
# kernel, so its few programs (query blocks x heads) run on SMs the memory-bound decode kernel does not need,
# instead of after it. Off until measured on a GPU (scripts/gpu/step_ab.py side=on|off).
PREFILL_ON_SIDE_STREAM = False
_side_streams: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


@dataclass
class PrefillBatch:
    """The step's prefill chunks. chunks (host ints, for the torch path): (token_start, num_tokens,
    context_start) each, token_start being the chunk's first row in the step's flat batch and context_start
    the position of its first token (positions before it are cached). Device tensors (Triton path):
    info [3, P] int32 = the same three numbers; block_tables [P, max_blocks] int32; q_blocks [2, NQB] int32 =
    (chunk index, first query offset in the chunk) for every PREFILL_BLOCK_M queries of every chunk."""
    chunks: list[tuple[int, int, int]]
    block_tables: torch.Tensor
    info: torch.Tensor
    q_blocks: torch.Tensor


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor            # [T] int64: where each new token's K/V is written
    num_decode: int                       # the first num_decode tokens use the paged decode path
    block_tables: torch.Tensor            # [num_decode, max_blocks] int32
    context_lens: torch.Tensor            # [num_decode] int32: tokens each decode query attends to (incl. itself)
    block_size: int
    prefill: Optional[PrefillBatch] = None
    use_triton: bool = False


def prefill_q_blocks(lens: list[int]) -> list[tuple[int, int]]:
    """(chunk index, query offset) of every PREFILL_BLOCK_M-row block of chunks with these lengths."""
    return [(i, off) for i, n in enumerate(lens) for off in range(0, n, PREFILL_BLOCK_M)]


def prefill_batch(chunks: list[tuple[int, int, int]], block_tables: torch.Tensor) -> PrefillBatch:
    """A PrefillBatch on block_tables' device from host (token_start, num_tokens, context_start) chunks (the
    runner packs the same tables into its one host-to-device copy instead)."""
    dev = block_tables.device
    info = torch.tensor(chunks, device=dev, dtype=torch.int32).reshape(-1, 3).T.contiguous()
    q_blocks = torch.tensor(prefill_q_blocks([n for _, n, _ in chunks]), device=dev,
                            dtype=torch.int32).reshape(-1, 2).T.contiguous()
    return PrefillBatch(chunks, block_tables, info, q_blocks)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, out: Optional[torch.Tensor] = None,
                    kv_written: bool = False) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (this step's new tokens). Writes k/v to the cache (unless kv_written: the
    caller did), returns [T, Hq, D] (out, when given: a contiguous [T, Hq, D])."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    k_flat = k_cache.view(-1, Hkv, D)        # [num_slots, Hkv, D]
    v_flat = v_cache.view(-1, Hkv, D)
    if not kv_written:
        write_kv(k_flat, v_flat, meta.slot_mapping, k, v)
    out = torch.empty_like(q) if out is None else out
    nd = meta.num_decode
    prefill = meta.prefill is not None and bool(meta.prefill.chunks)
    side = None
    if nd and prefill and meta.use_triton and PREFILL_ON_SIDE_STREAM and q.is_cuda:
        # the prefill kernel first, on the side stream; both write disjoint rows of out, and the main stream waits
        # for the side one before anything reads out
        main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            prefill_attention_triton(q, k_flat, v_flat, meta.prefill, meta.block_size, out)
    if nd:
        if meta.use_triton:
            decode_attention_triton(q[:nd], k_flat, v_flat, meta.block_tables, meta.context_lens, meta.block_size,
                                    out[:nd])
        else:
            out[:nd] = decode_attention_torch(q[:nd], k_flat, v_flat, meta.block_tables, meta.context_lens,
                                              meta.block_size)
    if side is not None:
        main.wait_stream(side)
    elif prefill:
        if meta.use_triton:
            prefill_attention_triton(q, k_flat, v_flat, meta.prefill, meta.block_size, out)
        else:
            prefill_attention_torch(q, k_flat, v_flat, meta.prefill, meta.block_size, out)
    return out


def write_kv(k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Stores this step's K/V at their slots, converted to the cache's dtype (float8: through its bytes)."""
    for flat, x in ((k_flat, k), (v_flat, v)):
        if flat.dtype == torch.float8_e4m3fn:
            # clamp to e4m3's range first: some torch versions cast out-of-range values to NaN, not to +-448
            x = x.clamp(-448.0, 448.0).to(flat.dtype)
        as_storage(flat).index_copy_(0, slots, as_storage(x))


def prefill_attention_torch(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, pre: PrefillBatch,
                            block_size: int, out: torch.Tensor) -> None:
    """Reference path: one SDPA call per chunk over its gathered context. q, out: [T, Hq, D]."""
    Hq, Hkv = q.shape[1], k_flat.shape[1]
    for i, (tok, n, ctx0) in enumerate(pre.chunks):
        ctx = ctx0 + n
        pos = torch.arange(ctx, device=q.device)
        slots = pre.block_tables[i].long()[pos // block_size] * block_size + pos % block_size
        qs = q[tok:tok + n].transpose(0, 1).unsqueeze(0)                                 # [1, Hq, n, D]
        ks = k_flat[slots].to(q.dtype).transpose(0, 1).unsqueeze(0)                      # [1, Hkv, ctx, D]
        vs = v_flat[slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
        if Hkv != Hq:
            ks = ks.repeat_interleave(Hq // Hkv, dim=1)
            vs = vs.repeat_interleave(Hq // Hkv, dim=1)
        if ctx0 == 0:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:
            mask = pos[None, :] <= torch.arange(ctx0, ctx, device=q.device)[:, None]     # [n, ctx]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        out[tok:tok + n] = o[0].transpose(0, 1)


def decode_attention_torch(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Reference path: gather each sequence's K/V through its block table, mask past its length.
    q: [B, Hq, D] -> [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv = k_flat.shape[1]
    max_len = int(context_lens.max().item())
    pos = torch.arange(max_len, device=q.device)                                          # [L]
    page_idx = (pos // block_size).clamp(max=block_tables.shape[1] - 1).expand(B, -1)
    slots = block_tables.long().gather(1, page_idx) * block_size + pos % block_size      # [B, L]
    keys, vals = k_flat[slots].float(), v_flat[slots].float()                             # [B, L, Hkv, D]
    if Hkv != Hq:
        keys = keys.repeat_interleave(Hq // Hkv, dim=2)
        vals = vals.repeat_interleave(Hq // Hkv, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), keys.float()) / math.sqrt(D)        # [B, Hq, L]
    valid = pos[None, :] < context_lens[:, None].long()                                   # [B, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhl,blhd->bhd", probs, vals.float()).to(q.dtype)


if triton is not None:
    @triton.jit
    def _decode_program(HEADS_FIRST: tl.constexpr):
        # (sequence, head) of a decode program; the head is a query head or a KV head, as the kernel's grid has
        # them. Programs side by side read, sequences first, one head of many sequences (rows of D elements a
        # cache token apart); heads first, every head of one sequence (together, whole token rows of the cache)
        if HEADS_FIRST:
            b = tl.program_id(1)
            h = tl.program_id(0)
        else:
            b = tl.program_id(0)
            h = tl.program_id(1)
        return b, h

    @triton.jit
    def _paged_decode_kernel(Q, K, V, O, BT, CTX, scale, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                             stride_btb, stride_ob, stride_oh, GROUP: tl.constexpr, BS: tl.constexpr,
                             BLOCK_N: tl.constexpr, D: tl.constexpr, NUM_STAGES: tl.constexpr,
                             HEADS_FIRST: tl.constexpr, HALF: tl.constexpr = False):
        # one program per (sequence, query head); online softmax over BLOCK_N tokens at a time on the CUDA cores.
        # HALF (kernel "half", float8 caches): K/V converted to float16 only, not on to float32, and the tile's
        # products and their sums over D (scores) and over the tile's tokens (its share of the output) taken in
        # float16, two values an instruction; the running max, the softmax's sum and the output stay float32, as
        # in flash attention, where P goes to the P.V product in 16 bits and its sum stays 32.
        # A token's K/V row is at page * stride_kb + offset * stride_ks + head * stride_kh. One pipelined loop over
        # every tile: the positions past the context read the context's last token again (the same cache lines:
        # no extra DRAM bytes, no predicated loads) and only their scores are masked, so a context's partly
        # filled last tile is loaded inside the pipeline. (Masking every tile cost ~10% of the bandwidth; full
        # tiles unmasked and the remainder in smaller masked tiles after the loop, 2-15% slower than this on
        # W1-like batches on an H100.)
        b, h = _decode_program(HEADS_FIRST)
        kvh = h // GROUP
        ctx = tl.load(CTX + b)
        d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale        # [D]
        if HALF:
            q = q.to(tl.float16)
        m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
        acc = tl.zeros([D], tl.float32)
        for start in tl.range(0, ctx, BLOCK_N, num_stages=NUM_STAGES):
            t = start + tl.arange(0, BLOCK_N)
            tc = tl.minimum(t, ctx - 1)
            page = tl.load(BT + b * stride_btb + tc // BS).to(tl.int64)
            offs = (page * stride_kb + (tc % BS) * stride_ks)[:, None] + kvh * stride_kh + d[None, :]
            # issue both loads before any arithmetic, so V's latency hides behind K's
            k = tl.load(K + offs)
            v = tl.load(V + offs)
            m_i, l_i, acc = _online_softmax_step(q, k, v, t < ctx, m_i, l_i, acc, HALF)
        out = acc / tl.maximum(l_i, 1e-20)
        tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty))

    @triton.jit
    def _online_softmax_step(q, k, v, mask, m_i, l_i, acc, HALF: tl.constexpr = False):
        # one tile of keys/values [N, D] for the query q [D]; positions where mask [N] is false get no weight
        if HALF:
            s = tl.sum(k.to(tl.float16) * q[None, :], axis=1).to(tl.float32)
        else:
            s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        if HALF:
            pv = tl.sum(p.to(tl.float16)[:, None] * v.to(tl.float16), axis=0).to(tl.float32)
        else:
            pv = tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        acc = acc * alpha + pv
        l_i = l_i * alpha + tl.sum(p, axis=0)
        return m_new, l_i, acc


if triton is not None:
    @triton.jit
    def _paged_decode_dot_kernel(Q, K, V, O, BT, CTX, scale, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                                 stride_btb, stride_ob, stride_oh, GROUP: tl.constexpr, M: tl.constexpr,
                                 BS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                                 NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr, HEADS_FIRST: tl.constexpr):
        # one program per (sequence, KV head): the GROUP query heads that share the head's K/V are the rows of an
        # [M, D] query tile (M >= 16, the tensor cores' least; rows past GROUP are zeros and never stored), so
        # scores and the weighted sum of V are tensor-core dots and the CUDA cores only convert K/V (float8 to
        # the model's dtype) and run the online softmax. With one query head a KV head (MHA) 15 of 16 rows are
        # padding: the tensor cores idle most of the time, the point is what the CUDA cores no longer do (one
        # multiply-add per K and V element and the reductions over D). Positions past the context re-read its
        # last token (same cache lines) and only their scores are masked, as in _paged_decode_kernel.
        # (Reading a float8 cache as int32 words, four values converted in registers by the paired hardware
        # conversion before the dots, compiles to ~30% fewer instructions a byte than loading float8 here, which
        # Triton moves into the dot's layout through shared memory a byte at a time; on an H100 it was slower
        # than both kernels on every batch, 80-86% of the floor against 88% for _paged_decode_kernel, and was
        # removed: the float8 cache's shortfall is not instruction issue.)
        b, kvh = _decode_program(HEADS_FIRST)
        ctx = tl.load(CTX + b)
        d = tl.arange(0, D)
        r = tl.arange(0, M)
        rows = r < GROUP
        h = kvh * GROUP + r
        q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=rows[:, None], other=0.0)
        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, D], tl.float32)
        for start in tl.range(0, ctx, BLOCK_N, num_stages=NUM_STAGES):
            t = start + tl.arange(0, BLOCK_N)
            tc = tl.minimum(t, ctx - 1)
            page = tl.load(BT + b * stride_btb + tc // BS).to(tl.int64)
            offs = (page * stride_kb + (tc % BS) * stride_ks)[:, None] + kvh * stride_kh + d[None, :]
            k = tl.load(K + offs).to(q.dtype)                                              # [BLOCK_N, D]
            v = tl.load(V + offs).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale                  # [M, BLOCK_N]
            s = tl.where((t < ctx)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.maximum(l_i, 1e-20)[:, None]
        tl.store(O + b * stride_ob + h[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=rows[:, None])


if triton is not None:
    # stride_info and stride_qb are the step's chunk and query-block counts: not specialised on, or every new
    # value that is 1 or a multiple of 16 would compile another variant mid-run
    @triton.jit(do_not_specialize=["stride_info", "stride_qb"])
    def _paged_prefill_kernel(Q, K, V, O, BT, INFO, QB, scale, stride_qt, stride_qh, stride_ks, stride_kh,
                              stride_btb, stride_ot, stride_oh, stride_info, stride_qb, GROUP: tl.constexpr,
                              BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                              NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr):
        # one program per (BLOCK_M queries of one chunk, query head): flash attention (online softmax,
        # tensor-core dots) over the chunk's sequence read through its block table, causal by position
        qb = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        c = tl.load(QB + qb)
        off = tl.load(QB + stride_qb + qb)
        tok0 = tl.load(INFO + c)
        n = tl.load(INFO + stride_info + c)
        ctx0 = tl.load(INFO + 2 * stride_info + c)
        m = off + tl.arange(0, BLOCK_M)
        qmask = m < n
        qpos = ctx0 + m                                                                    # [BLOCK_M]
        d = tl.arange(0, D)
        q = tl.load(Q + (tok0 + m)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=qmask[:, None],
                    other=0.0)                                                             # [BLOCK_M, D]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        end = ctx0 + tl.minimum(off + BLOCK_M, n)          # keys this block needs: positions < end
        for start in tl.range(0, end, BLOCK_N, num_stages=NUM_STAGES):
            t = start + tl.arange(0, BLOCK_N)
            kmask = t < end
            page = tl.load(BT + c * stride_btb + t // BS, mask=kmask, other=0).to(tl.int64)
            offs = (page * BS + t % BS)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            k = tl.load(K + offs, mask=kmask[:, None], other=0.0)                          # [BLOCK_N, D]
            v = tl.load(V + offs, mask=kmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale      # [BLOCK_M, BLOCK_N]
            s = tl.where((t[None, :] <= qpos[:, None]) & kmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.maximum(l_i, 1e-20)[:, None]
        tl.store(O + (tok0 + m)[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=qmask[:, None])


# (BLOCK_N, num_warps, num_stages) of the prefill kernel; tune_prefill_kernel picks one on the real GPU
PREFILL_CONFIGS = [(bn, w, st) for bn in (32, 64) for w in (4, 8) for st in (2, 3)]
_prefill_config: dict[tuple, tuple[int, int, int]] = {}


def kernel_key(q_heads: int, q_dtype: torch.dtype, k_flat: torch.Tensor) -> tuple:
    """What a tuned kernel configuration is kept under (the tuners' and the kernels' key): query heads, KV heads,
    head dim, query dtype, cache dtype; k_flat: a cache as [slots, KV heads, head dim]."""
    return (q_heads, k_flat.shape[1], k_flat.shape[2], q_dtype, k_flat.dtype)


def prefill_attention_triton(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, pre: PrefillBatch,
                             block_size: int, out: torch.Tensor, config: tuple[int, int, int] | None = None) -> None:
    """One launch for every prefill chunk of the step. q, out: [T, Hq, D]."""
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k_flat.shape[1]
    bn, warps, stages = config or _prefill_config.get(kernel_key(Hq, q.dtype, k_flat), (64, 4, 2))
    nqb = pre.q_blocks.shape[1]
    _paged_prefill_kernel[(nqb, Hq)](
        q, k_flat, v_flat, out, pre.block_tables, pre.info, pre.q_blocks, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1), pre.block_tables.stride(0),
        out.stride(0), out.stride(1), pre.info.stride(0), pre.q_blocks.stride(0), GROUP=Hq // Hkv, BS=block_size,
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=bn, D=D, NUM_STAGES=stages,
        # float32 models: full-precision dots (Triton's default for float32 is TF32)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps)


# A decode configuration: (BLOCK_N, num_warps, num_stages, kernel, order). kernel "fma": _paged_decode_kernel, one
# query head a program on the CUDA cores; "dot": _paged_decode_dot_kernel, the query heads of a KV head as the
# rows of a tensor-core tile. order "seqs": programs side by side are one head of many sequences; "heads": the
# heads of one sequence, together whole token rows of the cache. tune_decode_kernel picks one per head shape and
# cache dtype on the real GPU. On one H100 (2026-12-06, scripts/gpu/decode_kernel_variants.py, 224 W1-like
# contexts, 40 layers; KV-byte floors at the copy bandwidth, float16 24.1 ms, float8 12.05): sequences first,
# float16 23.87 ms with "dot" (128, 4, 2), 24.12 with "fma" (32, 1, 3); float8 13.38 ms (90%) with "fma"
# (32, 1, 3), "dot" 84% at best. Heads first: float16 23.33 ms ("dot" (128, 4, 2); reads alone run above the
# copy bandwidth), float8 13.12 ms (92%, "fma" (64, 2, 3)). Two or four adjacent heads a program (a
# [BLOCK_N, heads, D] tile, fixed costs paid once for several heads) were slower everywhere on another H100:
# 97% at best in float16, 69% in float8; a tensor-core kernel reading a float8 cache as int32 words (fewer
# instructions a byte) 80-86% against "fma"'s 88% on a third.
DECODE_CONFIG_FIELDS = "(BLOCK_N, warps, stages, kernel, order)"
DECODE_CONFIGS = [(bn, w, st, kind, order) for order in ("seqs", "heads") for bn, w, st, kind in (
    (128, 4, 2, "fma"), (64, 4, 2, "fma"), (64, 2, 2, "fma"), (64, 2, 3, "fma"), (32, 2, 3, "fma"), (32, 2, 2, "fma"),
    (32, 1, 2, "fma"), (32, 1, 3, "fma"), (16, 1, 3, "fma"),
    (32, 2, 3, "dot"), (64, 2, 3, "dot"), (64, 4, 2, "dot"), (64, 4, 3, "dot"), (128, 4, 2, "dot"),
    (128, 4, 3, "dot"), (128, 8, 3, "dot"))]
# kernel "half": _paged_decode_kernel with q, its products and tile sums in float16 (HALF), for float8 caches only,
# timed by the scripts but not a candidate of the tuner: its scores lose precision as they grow (under Triton's
# interpreter, relative error 2e-4 for "fma" at any score, for "half" 8e-4 at mean scores near 0, 6e-3 near 45,
# 1.2e-2 near 100, past the tuner's 1e-2 agreement check, which random K/V never shows). Its loop over
# a float8 cache compiles to 0.104 warp-instructions a byte for the (32, 1, 2) tile against "fma"'s 0.136 (a third
# of those conversions on to float32; scripts/triton_sass.py --kernel half). On one H100 (2026-12-06,
# decode_kernel_variants.py) it ran 2.1-2.6% faster than "fma" on unordered W1-like batches (12.80 ms, 95% of the
# floor, against 13.07 over 224 contexts), and the tuner, given it, chose it; but W1 ran 0.4% slower with it than
# with the tuner's best "fma" on one engine (scripts/gpu/step_ab.py attn=half|fma: 8,077 / 8,073 against 8,126 /
# 8,084 tok/s), where decode rows run longest context first.
HALF_DECODE_CONFIGS = [(bn, w, st, "half", "heads") for bn, w, st in (
    (16, 1, 3), (32, 1, 2), (32, 1, 3), (32, 2, 3), (64, 2, 2), (64, 2, 3), (128, 4, 2))]
DEFAULT_DECODE_CONFIG = (64, 2, 3, "fma", "heads")
_decode_config: dict[tuple, tuple[int, int, int, str, str]] = {}


def decode_variants(cache_dtype: torch.dtype) -> list[tuple[int, int, int, str, str]]:
    """Every decode configuration that computes attention over a cache of this dtype: the tuner's candidates
    (DECODE_CONFIGS) and, over a float8 cache, the "half" ones."""
    return DECODE_CONFIGS + (HALF_DECODE_CONFIGS if cache_dtype == torch.float8_e4m3fn else [])


def decode_attention_triton(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, block_tables: torch.Tensor,
                            context_lens: torch.Tensor, block_size: int, out: torch.Tensor,
                            config: tuple[int, int, int, str, str] | None = None) -> None:
    """q, out: [B, Hq, D]; rows with context_len 0 (CUDA-graph padding) produce zeros."""
    B, Hq, D = q.shape
    Hkv = k_flat.shape[1]
    bn, warps, stages, kind, order = config or _decode_config.get(kernel_key(Hq, q.dtype, k_flat),
                                                                  DEFAULT_DECODE_CONFIG)
    heads_first = order == "heads"
    args = (q, k_flat, v_flat, out, block_tables, context_lens, 1.0 / math.sqrt(D), q.stride(0), q.stride(1),
            block_size * k_flat.stride(0), k_flat.stride(0), k_flat.stride(1), block_tables.stride(0),
            out.stride(0), out.stride(1))
    group = Hq // Hkv
    if kind == "dot":
        _paged_decode_dot_kernel[(Hkv, B) if heads_first else (B, Hkv)](
            *args, GROUP=group, M=max(16, triton.next_power_of_2(group)), BS=block_size, BLOCK_N=bn, D=D,
            NUM_STAGES=stages, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HEADS_FIRST=heads_first,
            num_warps=warps)
    else:
        _paged_decode_kernel[(Hq, B) if heads_first else (B, Hq)](
            *args, GROUP=group, BS=block_size, BLOCK_N=bn, D=D, NUM_STAGES=stages, HEADS_FIRST=heads_first,
            HALF=kind == "half", num_warps=warps)


def synthetic_decode_batch(num_blocks: int, block_size: int, batch: int, max_context: int,
                           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(context_lens [n] int32, block_tables [n, ceil(max_context / block_size)] int32) of a decode batch as a
    running one looks: contexts uniform in min(32, max_context)..max_context, every sequence on blocks of its own
    out of num_blocks, and n <= batch sequences, as many as those blocks hold (at least one; the caller makes
    sure one fits)."""
    lens = torch.randint(min(32, max_context), max_context + 1, (batch,), generator=generator, dtype=torch.int32)
    need = (lens + block_size - 1) // block_size
    n = max(int((need.cumsum(0) <= num_blocks).sum()), 1)
    return lens[:n], block_tables_of(need[:n].tolist(), num_blocks, -(-max_context // block_size), generator)


def block_tables_of(need: list[int], num_blocks: int, width: int,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[len(need), width] int32 block tables: row i's first need[i] entries blocks of its own, laid out from one
    random permutation of num_blocks (sum(need) <= num_blocks), the rest 0."""
    perm = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    bt = torch.zeros(len(need), width, dtype=torch.int32)
    at = 0
    for i, nb in enumerate(need):
        bt[i, :nb] = perm[at:at + nb]
        at += nb
    return bt


def tune_decode_kernel(k_flat: torch.Tensor, v_flat: torch.Tensor, num_heads: int, block_size: int,
                       batch: int = 128, max_context: int = 1024, q_dtype: torch.dtype | None = None,
                       configs: list[tuple[int, int, int, str, str]] | None = None) -> list[tuple[tuple, float]]:
    """Times every config on a synthetic decode batch over the real cache tensors (read only) and keeps the
    fastest for this head shape. The batch is what a running one looks like: contexts of mixed lengths up to
    max_context, every sequence on blocks of its own (blocks shared between sequences would be read from L2 and
    favour launch orders that reuse them), and no more sequences than the cache holds (up to `batch`). Returns
    [(config, seconds)] for the log. Run before graph capture. configs: the candidates (DECODE_CONFIGS)."""
    Hkv, D = k_flat.shape[1], k_flat.shape[2]
    num_blocks = k_flat.shape[0] // block_size - 1
    per_seq = -(-max_context // block_size)
    if num_blocks < per_seq:
        return []
    dev = k_flat.device
    g = torch.Generator().manual_seed(0)
    lens, bt = synthetic_decode_batch(num_blocks, block_size, batch, max_context, g)
    lens, bt, batch = lens.to(dev), bt.to(dev), lens.shape[0]
    q = torch.randn(batch, num_heads, D, generator=g).to(dev, q_dtype or k_flat.dtype)
    out = torch.empty_like(q)
    # a configuration is a candidate only if it computes what the reference does, here, on random K/V of the
    # cache's dtype (a kernel family this Triton or GPU miscompiles is never picked for being fast)
    n = min(batch, 4)
    ck = torch.randn(n * per_seq * block_size, Hkv, D, generator=g).to(dev, k_flat.dtype)
    cv = torch.randn(n * per_seq * block_size, Hkv, D, generator=g).to(dev, v_flat.dtype)
    cbt = torch.randperm(n * per_seq, generator=g).view(n, per_seq).to(dev, torch.int32)
    ref = decode_attention_torch(q[:n].float(), ck, cv, cbt, lens[:n], block_size)
    small = torch.empty_like(q[:n])

    def agrees(cfg) -> bool:
        decode_attention_triton(q[:n], ck, cv, cbt, lens[:n], block_size, small, cfg)
        return bool(((small.float() - ref).norm() <= 1e-2 * ref.norm()).item())

    return _keep_fastest(DECODE_CONFIGS if configs is None else configs,
                         lambda cfg: decode_attention_triton(q, k_flat, v_flat, bt, lens, block_size, out, cfg),
                         _decode_config, kernel_key(num_heads, q.dtype, k_flat), agrees)


def tune_prefill_kernel(k_flat: torch.Tensor, v_flat: torch.Tensor, num_heads: int, block_size: int,
                        chunk: int = 512, num_chunks: int = 4, q_dtype: torch.dtype | None = None
                        ) -> list[tuple[tuple[int, int, int], float]]:
    """Times every prefill config on chunks of `chunk` new tokens after as many cached ones, over the real
    cache tensors (read only), and keeps the fastest for this head shape. Returns [(config, seconds)]."""
    D = k_flat.shape[2]
    per_seq = -(-2 * chunk // block_size)
    num_blocks = k_flat.shape[0] // block_size - 1
    if num_blocks < per_seq * num_chunks:
        return []
    dev = k_flat.device
    T = chunk * num_chunks
    q = torch.randn(T, num_heads, D, device=dev, dtype=q_dtype or k_flat.dtype)
    out = torch.empty_like(q)
    bt = torch.randperm(num_blocks, device=dev)[:per_seq * num_chunks].view(num_chunks, per_seq).to(torch.int32)
    pre = prefill_batch([(i * chunk, chunk, chunk) for i in range(num_chunks)], bt)
    return _keep_fastest(PREFILL_CONFIGS, lambda cfg: prefill_attention_triton(q, k_flat, v_flat, pre, block_size,
                                                                              out, cfg),
                         _prefill_config, kernel_key(num_heads, q.dtype, k_flat))


def _keep_fastest(configs: list, run, chosen: dict, key: tuple, agrees=None) -> list[tuple[tuple, float]]:
    """Times run(config) for every config (median of do_bench), records the fastest as chosen[key] and
    returns [(config, seconds)]; a config the compiler rejects (resources), or for which agrees(config) is
    false, is skipped."""
    from triton.testing import do_bench
    results = []
    for cfg in configs:
        try:
            if agrees is not None and not agrees(cfg):
                continue
            t = do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median") / 1e3
        except Exception:  # noqa: BLE001 - see the docstring
            continue
        results.append((cfg, t))
    if results:
        chosen[key] = min(results, key=lambda r: r[1])[0]
    return results
