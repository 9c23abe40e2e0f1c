"""Batched sampling on the device: repetition penalty, min_new_tokens, structured-output masks (grammar.py),
temperature (0 = greedy), top_k, top_p, and the logprob of each chosen token (with the top_logprobs asked for)
under the row's logprobs_mode: temperature (log-softmax of the logits / T, T = 1 for greedy rows), raw
(log-softmax of the logits) or processed (the distribution sampled from, grammar mask included; the penalised
log-softmax for greedy rows). See sample_full.

Randomness: Gumbel-max with noise from a counter-based hash of (sample key, output position, vocab id) rather
than a torch.Generator. A sample's tokens then depend only on its seed and its own history, never on which
other sequences shared the step, on preemption, or on batch order, and the noise is a pure function of
tensors (graph-capturable). The sample key is the request's seed + the sample index, so completion i of a
request with seed s draws exactly what completion 0 of the same prompt with seed s + i would.

Two implementations of the same draw: sample_torch sorts each row for its top_k/top_p cut-off (CPU, and GPUs
without Triton); on CUDA, sample_triton finds the cut-offs by bisection, with no sort, in one program per row
(1.7 -> 0.3 ms for a 128-row step of a 39,424-token vocabulary on an H200). Both score the same noise, so
they pick the same tokens except where float rounding of the cumulative mass moves the nucleus' edge."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ziya_batch.engine.scheduler import PENDING_TOKEN

try:  # the GPU image has Triton; the CPU CI build may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_M32 = 0xFFFFFFFF


def mix32_int(x: int) -> int:
    """A 32-bit integer finaliser (lowbias32); the same function as mix32 on tensors."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    # x: int64 values in [0, 2^32); a product may wrap int64 but its low 32 bits stay exact
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 uniform in the open interval (0, 1). The top 23 bits plus a half are exact in
    float32; 24 bits plus a half would round the largest value up to 1.0, whose Gumbel noise is +inf: that
    token would win whatever its probability (a masked one included, as NaN)."""
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def row_key(sample_key: int, position: int) -> int:
    """The noise key of one sampled token: sample key (64-bit seed + index) and output position."""
    k = mix32_int(sample_key & _M32) ^ mix32_int(((sample_key >> 32) & _M32) + 0x9E3779B9)
    return mix32_int(k ^ mix32_int(position * 0x85EBCA6B + 0x27D4EB2F))


@dataclass
class SamplingTensors:
    temperature: torch.Tensor            # [R] float32; 0 = greedy
    top_p: torch.Tensor                  # [R] float32; 1 = off
    top_k: torch.Tensor                  # [R] int64; 0 = off
    keys: torch.Tensor                   # [R] int64 noise keys (row_key)
    penalty: Optional[torch.Tensor]      # [R] float32, or None when every row has 1.0
    seen: Optional[torch.Tensor]         # [R, V] bool: tokens in prompt + output, for the penalty
    banned: Optional[tuple[torch.Tensor, torch.Tensor]]  # (rows, token ids) masked before min_new_tokens
    any_top_k: bool
    any_top_p: bool
    all_greedy: bool
    # logprob modes (SamplingParams.logprobs_mode): rows not in "processed" take their logprobs from the logits
    # before any processor, divided by lp_divisor (T, or 1 for raw and greedy rows); None: every row processed
    lp_divisor: Optional[torch.Tensor] = None      # [R] float32
    processed: Optional[torch.Tensor] = None       # [R] bool: the row's logprobs are the sampled distribution's
    num_top: int = 0                               # most top_logprobs any row asks for; 0 = none
    top_processed: bool = False                    # some row asks for top_logprobs of the processed distribution
    allowed: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # grammars: (rows [Rc], bitmask [Rc, V/32] int32)


@dataclass
class Sampled:
    tokens: torch.Tensor                           # [R] int64
    logprobs: torch.Tensor                         # [R] float32, under each row's logprobs_mode
    top_ids: Optional[torch.Tensor] = None         # [R, num_top] int64, most likely first
    top_logprobs: Optional[torch.Tensor] = None    # [R, num_top] float32; -inf past the tokens the mode allows


def build_sampling_tensors(rows: list, vocab_size: int, device: torch.device, ban_ids: list[list[int]],
                           prev_tokens: Optional[torch.Tensor] = None, pending: Optional[dict[int, int]] = None,
                           allowed: Optional[tuple[list[int], torch.Tensor]] = None) -> SamplingTensors:
    """rows: Sequences (one per logits row); ban_ids[i]: ids masked for row i (EOS/stop before min_new_tokens);
    allowed: (row indices, host bitmask) of the rows under a grammar (grammar.Grammars.masks), or None.
    A row whose last token is still pending (PENDING_TOKEN, async scheduling) has it in
    prev_tokens[pending[seq_id]] on the device: the repetition penalty reads it there."""
    temps = [r.params.temperature for r in rows]
    top_p = [r.params.top_p if r.params.temperature > 0 else 1.0 for r in rows]
    top_k = [r.params.top_k if r.params.temperature > 0 else 0 for r in rows]
    keys = [row_key(r.sample_key, r.num_output_tokens) for r in rows]
    # logprob modes (SamplingParams.logprobs_mode): the divisor of the logits a row's logprob is read from (T in
    # temperature mode, 1 for raw and greedy rows) and whether it is the processed distribution's instead
    modes = [r.params.logprobs_mode for r in rows]
    div = [r.params.temperature if m == "temperature" and r.params.temperature > 0 else 1.0
           for m, r in zip(modes, rows)]
    processed = [1.0 if m == "processed" else 0.0 for m in modes]
    # rows padded to a multiple of 4: each table starts 16-byte aligned (the Triton sampler specialises on it);
    # one host-to-device copy for every per-row float
    pad = [0] * (-len(rows) % 4)
    floats = torch.tensor([temps + pad, top_p + pad, div + pad, processed + pad],
                          dtype=torch.float32).to(device, non_blocking=True)
    ints = torch.tensor([top_k + pad, keys + pad], dtype=torch.int64).to(device, non_blocking=True)
    R = len(rows)
    penalty = seen = banned = None
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        penalty = torch.tensor([r.params.repetition_penalty for r in rows], dtype=torch.float32).to(device)
        ri, ti, late = [], [], []
        for i, r in enumerate(rows):
            if r.params.repetition_penalty != 1.0:
                for t in r.token_ids:
                    if t == PENDING_TOKEN:
                        late.append((i, pending[r.seq_id]))
                    else:
                        ri.append(i)
                        ti.append(t)
        seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(ri, device=device), torch.tensor(ti, device=device)] = True
        if late:
            rows_t, src = torch.tensor(late, device=device).T
            seen[rows_t, prev_tokens[src]] = True
    if any(ban_ids):
        br = [i for i, ids in enumerate(ban_ids) for _ in ids]
        bt = [t for ids in ban_ids for t in ids]
        banned = (torch.tensor(br, device=device), torch.tensor(bt, device=device))
    if allowed is not None:
        allowed = (torch.tensor(allowed[0], dtype=torch.int64).to(device, non_blocking=True),
                   allowed[1].to(device, non_blocking=True))
    num_top = max(r.params.top_logprobs for r in rows)
    all_processed = all(processed)
    return SamplingTensors(floats[0, :R], floats[1, :R], ints[0, :R], ints[1, :R], penalty, seen, banned,
                           any_top_k=any(k > 0 for k in top_k), any_top_p=any(p < 1.0 for p in top_p),
                           all_greedy=all(t == 0 for t in temps),
                           lp_divisor=None if all_processed else floats[2, :R],
                           processed=None if all_processed else floats[3, :R] > 0,
                           num_top=num_top, top_processed=num_top > 0 and any(
                               p and r.params.top_logprobs for p, r in zip(processed, rows)),
                           allowed=allowed)


def sample(logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [R, V] float32 -> (tokens [R] int64, logprobs [R] float32)."""
    out = sample_full(logits, t)
    return out.tokens, out.logprobs


def sample_full(logits: torch.Tensor, t: SamplingTensors) -> Sampled:
    """The draw, each row's logprob under its logprobs_mode, and the top_logprobs asked for, all from this one
    set of logits (no second forward): temperature and raw modes read the logits before the processors."""
    raw = logits
    logits = _process(logits, t)
    top = None
    if triton is not None and logits.is_cuda and not t.all_greedy and not t.top_processed:
        tok, lp = sample_triton(logits, t)
    else:
        tok, lp, *rest = sample_torch(logits, t, num_top=t.num_top if t.top_processed else 0)
        top = rest[0] if rest else None
    if t.lp_divisor is None:
        return Sampled(tok, lp, *(top or (None, None)))
    x = raw / t.lp_divisor[:, None]                                                 # [R, V]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)                                  # [R, 1]
    lp = torch.where(t.processed, lp, x.gather(1, tok[:, None])[:, 0] - lse[:, 0])
    if not t.num_top:
        return Sampled(tok, lp)
    top_lp, top_ids = torch.topk(x, t.num_top, dim=-1)                              # [R, k]
    top_lp = top_lp - lse
    if top is not None:
        top_ids = torch.where(t.processed[:, None], top[0], top_ids)
        top_lp = torch.where(t.processed[:, None], top[1], top_lp)
    return Sampled(tok, lp, top_ids, top_lp)


def _process(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """The logits processors that come before temperature: repetition penalty, bans before min_new_tokens."""
    if t.penalty is not None:
        # CTRL-style, as transformers: positive logits are divided, negative multiplied
        p = t.penalty[:, None]
        logits = torch.where(t.seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if t.banned is not None:
        logits = logits.index_put((t.banned[0], t.banned[1]), torch.tensor(float("-inf"), device=logits.device))
    if t.allowed is not None:
        # after the penalty, before temperature/top_k/top_p: the nucleus is taken among the allowed tokens, and
        # processed-mode logprobs are those of the distribution actually sampled from (temperature and raw modes
        # read the logits before every processor, this mask included)
        from ziya_batch.engine.grammar import apply_masks
        logits = apply_masks(logits, *t.allowed)
    return logits


def sample_torch(logits: torch.Tensor, t: SamplingTensors, num_top: int = 0):
    """The reference path (CPU, GPUs without Triton, and processed-mode top_logprobs): sorts each row for
    top_k/top_p. Returns (tokens, logprobs), plus (top ids, top logprobs) of the processed distribution when
    num_top > 0."""
    greedy_tok = logits.argmax(dim=-1)
    greedy_lp = logits.gather(1, greedy_tok[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    if t.all_greedy:
        if num_top:
            top_lp, top_ids = torch.topk(torch.log_softmax(logits, dim=-1), num_top, dim=-1)
            return greedy_tok, greedy_lp, (top_ids, top_lp)
        return greedy_tok, greedy_lp
    greedy = t.temperature == 0
    x = logits / torch.where(greedy, 1.0, t.temperature)[:, None]                   # [R, V]
    if t.any_top_k or t.any_top_p:
        x, ids = x.sort(dim=-1, descending=True)                                    # [R, V], by rank
        rank = torch.arange(x.shape[1], device=x.device)[None, :]
        x = x.masked_fill((t.top_k[:, None] > 0) & (rank >= t.top_k[:, None]), float("-inf"))
        if t.any_top_p:
            probs = torch.softmax(x, dim=-1)
            before = probs.cumsum(dim=-1) - probs                                   # mass ranked above each token
            x = x.masked_fill((before >= t.top_p[:, None]) & (rank > 0), float("-inf"))
        if x.device.type == "cpu":
            # the nucleus is usually small: drawing noise only for surviving ranks is the same draw, cheaper
            keep = int(torch.isfinite(x).sum(dim=-1).max())
            x, ids = x[:, :keep], ids[:, :keep]
    else:
        ids = torch.arange(x.shape[1], device=x.device, dtype=torch.int64).expand_as(x)
    logp = x - torch.logsumexp(x, dim=-1, keepdim=True)                             # [R, K]
    # noise is a function of (row key, vocab id), whatever order or subset of ids is scored
    h = mix32(t.keys[:, None] ^ mix32(ids))                                          # [R, K] in [0, 2^32)
    u = uniform_from_hash(h)
    j = (logp - torch.log(-torch.log(u))).argmax(dim=-1, keepdim=True)              # Gumbel-max
    tok = torch.where(greedy, greedy_tok, ids.gather(1, j)[:, 0])
    lp = torch.where(greedy, greedy_lp, logp.gather(1, j)[:, 0])
    if not num_top:
        return tok, lp
    # greedy rows' logp is the processed log-softmax too (temperature 1, no cut); the CPU may have kept fewer
    # columns than num_top (the nucleus): pad with -inf, which the engine drops
    k = min(num_top, logp.shape[1])
    top_lp, j = torch.topk(logp, k, dim=-1)
    top_ids = ids.gather(1, j)
    if k < num_top:
        top_lp = torch.nn.functional.pad(top_lp, (0, num_top - k), value=float("-inf"))
        top_ids = torch.nn.functional.pad(top_ids, (0, num_top - k), value=0)
    return tok, lp, (top_ids, top_lp)


def sample_triton(logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """One Triton program per row, no sort: the top_k and top_p cut-offs are found by bisection over the
    row's values (as order-preserving integer keys, so 32 halvings reach the exact value), then a Gumbel-max
    over the kept tokens with the same counter-hash noise as sample_torch. Cut-offs are values, so tokens
    tied with the last kept one are all kept: for top_k as transformers' TopKLogitsWarper does; for top_p,
    where sample_torch and transformers break such exact ties by sort order, the nucleus may grow by the tied
    tokens. Otherwise it keeps what sample_torch keeps, up to float rounding of the cumulative mass at the
    nucleus' edge."""
    # temperature applied here, as sample_torch does (Triton's float32 division is not correctly rounded)
    logits = (logits / torch.where(t.temperature == 0, 1.0, t.temperature)[:, None]).contiguous()
    R, V = logits.shape
    tok = torch.empty(R, dtype=torch.int64, device=logits.device)
    lp = torch.empty(R, dtype=torch.float32, device=logits.device)
    _sample_kernel[(R,)](logits, V, t.temperature, t.top_p, t.top_k, t.keys, tok, lp, BLOCK=2048, num_warps=8)
    return tok, lp


if triton is not None:
    @triton.jit
    def _mix32_tl(x):
        # x: int64 in [0, 2^32); the same finaliser as mix32 (products wrap, their low 32 bits are exact)
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _order_key(x):
        # float32 -> int64 with the same order (negative floats' bits reversed): bisection over exact values;
        # + 0.0 turns -0.0 into +0.0, so the two zeros get one key (a tie stays a tie)
        b = (x + 0.0).to(tl.int32, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)

    @triton.jit
    def _sample_kernel(logits_ptr, V, temp_ptr, top_p_ptr, top_k_ptr, keys_ptr, tok_ptr, lp_ptr,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * V
        temp = tl.load(temp_ptr + row)       # only tells greedy rows (0): the logits come already divided by it
        greedy = temp == 0.0
        top_p = tl.load(top_p_ptr + row)
        top_k = tl.load(top_k_ptr + row)
        offs = tl.arange(0, BLOCK)
        # the row's max, then the softmax normaliser relative to it
        mvec = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            mvec = tl.maximum(mvec, tl.load(base + idx, mask=idx < V, other=float("-inf")))
        m = tl.max(mvec, 0)
        top = _order_key(m)
        # top_k: the largest key with at least top_k values at or above it (HF keeps ties with the k-th)
        kth = top * 0 - 2147483648
        if (temp > 0.0) & (top_k > 0) & (top_k < V):
            lo = kth
            hi = top + 1
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                cnt = tl.zeros([BLOCK], tl.int32)
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    x = tl.load(base + idx, mask=idx < V, other=float("-inf"))
                    cnt += ((_order_key(x) >= mid) & (idx < V)).to(tl.int32)
                ok = tl.sum(cnt, 0) >= top_k
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            kth = lo
        # top_p: the largest key whose values at or above it (within top_k) hold top_p of the kept mass
        cut = kth
        if (temp > 0.0) & (top_p < 1.0):
            zvec = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                x = tl.load(base + idx, mask=idx < V, other=float("-inf"))
                zvec += tl.where(_order_key(x) >= kth, tl.exp(x - m), 0.0)
            target = top_p * tl.sum(zvec, 0)
            lo = kth
            hi = top + 1
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                svec = tl.zeros([BLOCK], tl.float32)
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    x = tl.load(base + idx, mask=idx < V, other=float("-inf"))
                    svec += tl.where(_order_key(x) >= mid, tl.exp(x - m), 0.0)
                ok = tl.sum(svec, 0) >= target
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            cut = lo
        # Gumbel-max over the kept tokens (greedy rows: plain argmax), and the kept mass for the logprob
        rkey = tl.load(keys_ptr + row)
        zs = tl.zeros([BLOCK], tl.float32)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        bidx = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < V, other=float("-inf"))
            keep = (_order_key(x) >= cut) & (idx < V)
            zs += tl.where(keep, tl.exp(x - m), 0.0)
            h = _mix32_tl(rkey ^ _mix32_tl(idx.to(tl.int64)))
            u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)      # as sample_torch: never 1.0
            g = tl.where(greedy, x, x - tl.log(-tl.log(u)))
            g = tl.where(keep, g, float("-inf"))
            upd = g > best
            best = tl.where(upd, g, best)
            bidx = tl.where(upd, idx, bidx)
        gmax = tl.max(best, 0)
        j = tl.min(tl.where(best == gmax, bidx, V), 0)
        xj = tl.load(base + j)
        tl.store(tok_ptr + row, j.to(tl.int64))
        tl.store(lp_ptr + row, xj - m - tl.log(tl.sum(zs, 0)))
