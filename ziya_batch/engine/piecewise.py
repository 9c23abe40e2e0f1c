"""CUDA graphs for steps with prefill chunks ("mixed" steps), captured in pieces around the attention.

A decode-only step is one graph (runner.py): its launch shapes depend only on the batch size. A step with prefill
chunks also depends on how its tokens split into chunks, which only the attention kernels see; everything else in
a layer (the projections, norms, RoPE, SiLU, the K/V writes) depends only on the step's token count. So for each
bucket of token counts the model is captured in num_layers + 1 pieces:

    piece 0      embedding, layer 0's input norm, qkv projection, RoPE and K/V write (one kernel)
    piece i      layer i-1's o_proj, residual, norm, MLP, residual, layer i's input norm, qkv, RoPE, K/V write
    piece L      layer L-1's o_proj ... MLP, residual, the final norm

and a step replays them with each layer's attention launched eagerly in between (two Triton launches a layer),
reading the pieces' static qkv buffer and writing their static attention buffer. A step of T tokens runs in the
first bucket of at least T tokens; the padding rows compute on whatever earlier steps left in their buffers (valid
ids and positions; every row of these pieces is independent of the others), write their K/V to the cache's
scratch slot, and are never read. Without graphs (capture=False: the CPU, tests) the same pieces run eagerly, padding and all.

What this removes (one H100, 2026-12-06, docs/BENCHMARKS.md): launching a step with prefill eagerly took the host
24 ms (float16) to 46 ms (FP8 weights and cache) for ~600-800 launches through PyTorch's and Triton's Python
launchers, which the GPU waited for after the short decode steps of FP8; replayed, 10-11 ms, and FP8's W1 ran
6.4% faster. Float16's steps with prefill are GPU-bound either way (their GEMMs over ~800 rows), so there the
pieces change nothing measurable."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ziya_batch.engine.attention import AttentionMetadata
from ziya_batch.engine.model import LlamaModel, linear, norm_for

# token-count buckets: every 64 tokens up to 2,048 (padding costs at most 63 rows of compute-bound GEMMs), then
# every 256 up to the largest step (max_num_batched_tokens), at most 8,192 tokens
BUCKET_STEP, WIDE_FROM, WIDE_STEP, MAX_TOKENS = 64, 2048, 256, 8192


def mixed_buckets(max_tokens: int) -> list[int]:
    """The token counts pieces are captured for, for steps of at most max_tokens tokens."""
    top = min(max_tokens, MAX_TOKENS)
    out = list(range(BUCKET_STEP, min(top, WIDE_FROM) + 1, BUCKET_STEP))
    out += list(range(WIDE_FROM + WIDE_STEP, top, WIDE_STEP)) if top > WIDE_FROM else []
    if not out or out[-1] < top:
        out.append(-(-top // BUCKET_STEP) * BUCKET_STEP)
    return out


# a bucket is dropped when a larger one's projections run at least this much faster (padding up to it is cheaper)
PRUNE_MARGIN = 0.03


def prune_buckets(sizes: list[int], seconds: list[float], margin: float = PRUNE_MARGIN) -> list[int]:
    """The sizes (ascending) worth padding a step to: a size whose measured time (seconds[i]) is above a larger
    kept size's by more than `margin` is dropped, since its steps then run faster padded to that one. cuBLAS's
    heuristics pick much slower kernels at some row counts: on an H100 (2026-12-06) LLaMA-13B's four float16
    projections at 832 rows took 47-48 ms over 40 layers against 31-32 at 800 and 808 and 39 at 1,024. The
    largest size is always kept (it bounds what fits)."""
    if len(sizes) != len(seconds):
        raise ValueError(f"{len(sizes)} sizes but {len(seconds)} times")
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    kept, best = [], float("inf")
    for i in reversed(order):
        if not kept or seconds[i] * (1.0 - margin) <= best:
            kept.append(sizes[i])
            best = min(best, seconds[i])
    return sorted(kept)


def gpu_seconds(fn: Callable[[], None], reps: int = 10) -> float:
    """The median GPU time of fn() over reps calls, after one call outside the timing (compilation, cuBLAS's
    heuristic and workspace)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[reps // 2]


def projection_seconds(model: LlamaModel, sizes: list[int], reps: int = 5, passes: int = 2) -> list[float]:
    """For each row count, the median GPU time of one layer's four projections (the layer's own weights and
    kernels: float16 or FP8, this rank's shard) over random rows; the least of `passes` sweeps over the sizes,
    since what else the GPU is doing only ever makes a time longer (on an H100, 2026-12-06, one sweep inside a
    starting engine timed 152 rows at 4x and the next ten sizes decreasingly slow, and pruned them all)."""
    layer, dev = model.layers[0], model.embed.device
    projs = [layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj]
    top = max(sizes)
    xs = [torch.randn(top, p.shape[1], device=dev, dtype=model.embed.dtype) for p in projs]

    def run(n: int) -> None:
        for p, x in zip(projs, xs):
            linear(x[:n], p)
    out = [float("inf")] * len(sizes)
    for _ in range(passes):
        for i, n in enumerate(sizes):
            out[i] = min(out[i], gpu_seconds(lambda n=n: run(n), reps))
    del xs
    torch.cuda.empty_cache()          # the rows and products (~0.7 GB at 8,192 rows): graph pools allocate their own
    return out


class MixedStepGraphs:
    """The pieces of a mixed step for every bucket, with the static buffers they read and write."""

    def __init__(self, model: LlamaModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], buckets: list[int],
                 scratch_slot: int, device: torch.device, capture: bool, pool=None):
        self.model, self.kv_caches, self.buckets = model, kv_caches, sorted(buckets)
        self.scratch_slot, self.device = scratch_slot, device
        a, layer0 = model.args, model.layers[0]
        n, dt = self.buckets[-1], model.embed.dtype
        qkv_cols = (layer0.local_heads + 2 * layer0.local_kv_heads) * a.head_dim
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.pos = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), scratch_slot, dtype=torch.int64, device=device)
        self.h = torch.zeros(n, a.hidden_size, dtype=dt, device=device)           # the residual stream
        self.qkv = torch.zeros(n, qkv_cols, dtype=dt, device=device)              # a layer's q|k|v (RoPE applied)
        self.attn = torch.zeros(n, layer0.local_heads * a.head_dim, dtype=dt, device=device)   # its attention
        self.x = torch.zeros(n, a.hidden_size, dtype=dt, device=device)           # the final norm's output
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture:
            self._capture(pool)

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.buckets[-1]

    # ---- the pieces -----------------------------------------------------------------------------------------
    def _pieces(self, b: int) -> list[Callable[[], None]]:
        m = self.model
        a, layers = m.args, m.layers
        cos_t, sin_t = m.rope_tables(a.max_position_embeddings)
        h, qkv, attn, pos, slots = self.h[:b], self.qkv[:b], self.attn[:b], self.pos[:b], self.slots[:b]

        def qkv_of(i: int, x: torch.Tensor) -> None:
            layers[i].qkv_rope(x, pos, cos_t, sin_t, *self.kv_caches[i], slots, out=qkv)

        def first() -> None:
            torch.index_select(m.embed, 0, self.ids[:b], out=h)
            qkv_of(0, norm_for(layers[0].qkv_proj, h, None, layers[0].input_norm, a.rms_norm_eps))

        def between(i: int) -> Callable[[], None]:
            return lambda: qkv_of(i, layers[i - 1].mlp_block(h, attn, layers[i].input_norm,
                                                             next_proj=layers[i].qkv_proj))

        def last() -> None:
            layers[-1].mlp_block(h, attn, m.norm, out=self.x[:b])

        return [first, *(between(i) for i in range(1, len(layers))), last]

    def _capture(self, pool) -> None:
        # one memory pool for every piece (and the runner's decode graphs): a piece's intermediates die with it
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for b in self.buckets:                      # warm-up outside capture (Triton, cuBLAS heuristics)
                for piece in self._pieces(b):
                    piece()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()                        # the warm-ups' cached blocks: the pool allocates its own
        with torch.cuda.stream(s):
            for b in reversed(self.buckets):            # largest first: smaller ones reuse its memory in the pool
                pieces = self._pieces(b)
                graphs = []
                for piece in pieces:
                    g = torch.cuda.CUDAGraph()
                    # capture_begin/end, not torch.cuda.graph: that one collects garbage and empties the cache
                    # around every capture, ~40 captures a bucket
                    g.capture_begin(pool=pool)
                    try:
                        piece()
                    finally:
                        g.capture_end()
                    graphs.append(g)
                self.graphs[b] = graphs
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)

    # ---- a step ---------------------------------------------------------------------------------------------
    def run(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata,
            logits_rows: torch.Tensor) -> torch.Tensor:
        """One mixed step of T = len(ids) tokens (fits(T)): float32 logits [R, V] of logits_rows, as
        LlamaModel.forward returns them."""
        T = ids.shape[0]
        b = next(x for x in self.buckets if x >= T)
        self.ids[:T].copy_(ids)
        self.pos[:T].copy_(pos)
        self.slots[:T].copy_(meta.slot_mapping)
        if b > T:     # padding rows write their K/V to the scratch slot (their ids and positions: earlier steps')
            self.slots[T:b].fill_(self.scratch_slot)
        graphs: Optional[list] = self.graphs.get(b)
        pieces = graphs if graphs is not None else self._pieces(b)
        layers, qkv, attn = self.model.layers, self.qkv[:T], self.attn[:T]
        for i, piece in enumerate(pieces):
            piece.replay() if graphs is not None else piece()
            if i < len(layers):
                kc, vc = self.kv_caches[i]
                layers[i].attend(qkv, kc, vc, meta, out=attn, kv_written=True)
        return F.linear(self.x[logits_rows], self.model.lm_head).float()
