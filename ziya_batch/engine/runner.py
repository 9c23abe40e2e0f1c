"""Turns a SchedulerOutput into the model's input tensors and runs the step: decode-only steps replay a CUDA
graph captured for the next batch-size bucket; steps with prefill chunks replay graphs captured in pieces
around the attention for the next token-count bucket (piecewise.py), or run eagerly. All host data goes to the
device in one copy per step (graph steps: one per static buffer)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ziya_batch.engine.attention import (AttentionMetadata, PrefillBatch, prefill_q_blocks, tune_decode_kernel,
                                         tune_prefill_kernel)
from ziya_batch.engine.model import LlamaModel
from ziya_batch.engine.piecewise import MixedStepGraphs, mixed_buckets, projection_seconds, prune_buckets
from ziya_batch.engine.scheduler import PENDING_TOKEN, ScheduledChunk, SchedulerOutput, Sequence

# Decode batch sizes a CUDA graph is captured for; a batch runs in the first at or above it, padded. Every 8 rows
# from 128: there the projections are no longer a plain read of the weights, and cuBLAS's time grows with the
# rows in steps (at 216 -> 217 rows by 9%, scripts/gpu/gemm_blas.py), so padding a batch by up to 31 rows cost
# up to ~1.5 ms a step; below 128 their time is nearly flat in the rows. Above 256 (max_num_seqs beyond its
# default) every 32 rows up to 512; only sizes up to max_num_seqs are captured.
GRAPH_BATCH_SIZES = ((1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112) + tuple(range(128, 257, 8))
                     + tuple(range(288, 513, 32)))


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes graphs are captured for (before prune_buckets): GRAPH_BATCH_SIZES up to
    max_num_seqs, and max_num_seqs itself where it lies between two of them."""
    sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_num_seqs]
    if max_num_seqs not in sizes and max_num_seqs < GRAPH_BATCH_SIZES[-1]:
        sizes.append(max_num_seqs)
    return sizes


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 max_num_seqs: int, max_model_len: int, device: torch.device, use_graphs: bool, use_triton: bool,
                 mixed_graphs: bool = False, max_num_batched_tokens: int = 0):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.device, self.use_triton = device, use_triton
        # decode rows longest context first: the attention kernel's programs start in row order, so the longest
        # rows no longer start last and leave the GPU to a few programs at the end of the launch (row order
        # changes nothing else: sampling is keyed by request and position, sampling.py)
        self.decode_longest_first = True
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch_slot = (kv_caches[0][0].shape[0] - 1) * block_size   # the extra block (kv_cache.py)
        self.graph_sizes = graph_batch_sizes(max_num_seqs) if use_graphs else []
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        # steps with prefill (and decode steps no decode graph takes): pieces captured per token-count bucket,
        # on the fused layer (the pieces are its kernels)
        self.mixed: Optional[MixedStepGraphs] = None
        self.decode_tuning: list = []
        self.prefill_tuning: list = []
        # the decode tuner's synthetic batch: as many rows as run (up to 256), contexts as long (up to 1,024)
        self.tune_batch, self.tune_context = min(max_num_seqs, 256), min(max_model_len, 1024)
        if use_triton:
            from ziya_batch.engine.fused import check_fused
            a = model.args
            model.use_fused = check_fused(device, model.embed.dtype, a.hidden_size, model.layers[0].local_heads,
                                          a.head_dim, model.layers[0].gate_up_proj.shape[0] // 2, a.rope_theta)
            self.decode_tuning = self.tune_decode()
            k_flat, v_flat = self.flat_cache()
            self.prefill_tuning = tune_prefill_kernel(k_flat, v_flat, model.layers[0].local_heads, block_size,
                                                      q_dtype=model.embed.dtype)
        # the sizes graphs are captured for, without those at which the projections run slower than at a larger
        # size (prune_buckets): {"decode" | "mixed": [(size, seconds of one layer's projections)]}
        self.bucket_seconds: dict[str, list[tuple[int, float]]] = {}
        if self.graph_sizes:
            self.graph_sizes = self._prune("decode", self.graph_sizes)
            self._capture_graphs()
        if use_graphs and mixed_graphs and model.use_fused and max_num_batched_tokens > 0:
            buckets = self._prune("mixed", mixed_buckets(max_num_batched_tokens))
            self.mixed = MixedStepGraphs(model, kv_caches, buckets, self.scratch_slot, device, capture=True,
                                         pool=self.graph_pool)

    def flat_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's K and V caches as [slots, KV heads, head dim] (what the kernels index by slot)."""
        k, v = self.kv_caches[0]
        return k.view(-1, k.shape[2], k.shape[3]), v.view(-1, v.shape[2], v.shape[3])

    def tune_decode(self, configs: Optional[list] = None) -> list[tuple[tuple, float]]:
        """Times decode attention's configurations (configs: the tuner's own candidates when None) on a batch like
        a running one over this runner's cache, makes the fastest the one decode uses, and returns [(config,
        seconds)]. Run before graph capture: captured graphs keep the configuration they were captured with."""
        k_flat, v_flat = self.flat_cache()
        return tune_decode_kernel(k_flat, v_flat, self.model.layers[0].local_heads, self.block_size,
                                  batch=self.tune_batch, max_context=self.tune_context, q_dtype=self.model.embed.dtype,
                                  configs=configs)

    def _prune(self, what: str, sizes: list[int]) -> list[int]:
        seconds = projection_seconds(self.model, sizes)
        if agree := getattr(self.model, "agree_seconds", None):
            seconds = agree(seconds)        # tensor parallel: every rank must capture (and pad to) the same sizes
        self.bucket_seconds[what] = list(zip(sizes, seconds))
        return prune_buckets(sizes, seconds)

    def step_buckets(self) -> Optional[list[tuple[int, float]]]:
        """The token-count buckets steps with prefill replay graphs for, with their projections' measured time
        (the scheduler cuts a step back to a bucket where the next one is much dearer); None without them."""
        if self.mixed is None:
            return None
        kept = set(self.mixed.buckets)
        return [(n, t) for n, t in self.bucket_seconds.get("mixed", []) if n in kept] or None

    def dropped_buckets(self) -> dict[str, list[int]]:
        """The sizes prune_buckets left out, by kind of graph."""
        kept = {"decode": set(self.graph_sizes), "mixed": set(self.mixed.buckets if self.mixed else [])}
        return {what: [n for n, _ in rows if n not in kept[what]] for what, rows in self.bucket_seconds.items()}

    # ---- inputs ---------------------------------------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        blocks = np.asarray(seq.block_ids, dtype=np.int64)
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, out: SchedulerOutput, prev_tokens: Optional[torch.Tensor] = None,
                pending: Optional[dict[int, int]] = None) -> tuple[Optional[torch.Tensor], list[Sequence]]:
        """Runs the step; returns logits [R, V] float32 and the Sequence each row samples for. A chunk whose last
        token is still PENDING_TOKEN takes it on the device from prev_tokens[pending[seq_id]] (the step before,
        launched but not read back)."""
        if self.decode_longest_first:        # one-token chunks first, longest context first; then the rest
            chunks = sorted(out.chunks, key=lambda c: -c.start if c.num_tokens == 1 else 1)
        else:                                # one-token chunks first (stable)
            chunks = sorted(out.chunks, key=lambda c: c.num_tokens != 1)
        decodes = [c for c in chunks if c.num_tokens == 1]
        rows: list[Sequence] = []
        row_idx: list[int] = []
        t = 0
        for c in chunks:
            if c.samples:
                for s in (c.seq, *c.children):
                    rows.append(s)
                    row_idx.append(t + c.num_tokens - 1)
            t += c.num_tokens
        if not rows and not chunks:
            return None, []
        # src[i]: the row of prev_tokens holding chunk i's last token, -1 where the host has it
        src = [pending[c.seq.seq_id] if c.seq.token_ids[c.start + c.num_tokens - 1] == PENDING_TOKEN else -1
               for c in chunks]
        fix = prev_tokens if any(i >= 0 for i in src) else None
        nd = len(decodes)
        if nd == len(chunks) and self.graphs:
            bucket = self._decode_bucket(nd)
            if bucket is not None and all(len(c.children) == 0 for c in chunks):
                logits = self._replay(decodes, bucket, src, fix)
                return logits[self._index(row_idx)] if len(row_idx) != nd else logits[:nd], rows
        return self._run_step(chunks, nd, row_idx, src, fix), rows

    def _decode_bucket(self, rows: int) -> Optional[int]:
        """The smallest decode graph size that takes `rows` rows; None where none does."""
        return next((b for b in self.graph_sizes if b >= rows), None)

    def _index(self, rows: list[int]) -> torch.Tensor:
        """rows as an index on the device, copied without waiting for the stream (a pageable copy would block the
        host until the step has run, and async scheduling with it)."""
        host = torch.tensor(rows, dtype=torch.int64)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _run_step(self, chunks: list[ScheduledChunk], nd: int, row_idx: list[int], src: list[int],
                  prev_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        bs = self.block_size
        # decode rows as plain ints (one token each: numpy per row costs more than it saves), then prefill chunks
        one = [(c.seq.token_ids[c.start], c.start, c.seq.block_ids[c.start // bs] * bs + c.start % bs, i)
               for c, i in zip(chunks[:nd], src)]
        ids, pos, slots, fix = ([np.asarray(col, dtype=np.int64)] for col in (zip(*one) if one else ((),) * 4))
        for c, i in zip(chunks[nd:], src[nd:]):
            ids.append(np.asarray(c.seq.token_ids[c.start:c.start + c.num_tokens], dtype=np.int64))
            pos.append(np.arange(c.start, c.start + c.num_tokens))
            slots.append(self._slots(c.seq, c.start, c.start + c.num_tokens))
            fix.append(np.full(c.num_tokens, -1, dtype=np.int64))
            fix[-1][-1] = i
        bt = np.zeros((len(chunks), self.max_blocks), dtype=np.int64)    # decode rows, then prefill rows
        for i, c in enumerate(chunks):
            bt[i, :len(c.seq.block_ids)] = c.seq.block_ids
        ctx = np.array([c.start + 1 for c in chunks[:nd]], dtype=np.int64)
        pchunks, tok = [], nd
        for c in chunks[nd:]:
            pchunks.append((tok, c.num_tokens, c.start))
            tok += c.num_tokens
        info = np.asarray(pchunks, dtype=np.int64).reshape(-1, 3).T
        qbs = np.asarray(prefill_q_blocks([n for _, n, _ in pchunks]), dtype=np.int64).reshape(-1, 2).T
        ids_a, pos_a, slots_a = np.concatenate(ids), np.concatenate(pos), np.concatenate(slots)
        # Every table starts 16-byte aligned: Triton specialises kernels on pointer alignment, so tables at
        # step-dependent offsets would compile new variants of the attention and RoPE kernels mid-run.
        wide, narrow = _packed([ids_a, pos_a, slots_a, np.asarray(row_idx, dtype=np.int64), np.concatenate(fix)],
                               [ctx, bt[:nd].reshape(-1), bt[nd:].reshape(-1), info.reshape(-1), qbs.reshape(-1)],
                               self.device)
        ids_t, pos_t, slots_t, rows_t, fix_t = wide
        if prev_tokens is not None:
            ids_t = _take_pending(ids_t, fix_t, prev_tokens)
        ctx_t, bt_dec, bt_pre, info_t, qbs_t = narrow
        prefill = None
        if pchunks:
            prefill = PrefillBatch(pchunks, bt_pre.view(-1, self.max_blocks), info_t.view(3, -1),
                                   qbs_t.view(2, -1))
        meta = AttentionMetadata(slots_t, nd, bt_dec.view(-1, self.max_blocks), ctx_t, self.block_size, prefill,
                                 self.use_triton)
        if self.mixed is not None and self.mixed.fits(ids_t.shape[0]):
            return self.mixed.run(ids_t, pos_t, meta, rows_t)
        return self.model(ids_t, pos_t, self.kv_caches, meta, rows_t)

    # ---- CUDA graphs ----------------------------------------------------------------------------------------
    def _capture_graphs(self) -> None:
        n = max(self.graph_sizes)
        dev = self.device
        self.g_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.g_pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self.g_slots = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.g_bt = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.g_ctx = torch.zeros(n, dtype=torch.int32, device=dev)
        self.g_rows = torch.arange(n, device=dev)
        # one logits buffer for every graph: each graph's own output would stay allocated (~160 KB a row of
        # LLaMA's vocabulary in float32, ~0.6 GB over all sizes); a step's logits are sampled before the next
        # step's graph runs on the same stream
        self.g_logits: Optional[torch.Tensor] = None
        pool = self.graph_pool = torch.cuda.graph_pool_handle()
        # captured on a stream of the runner's own (not torch.cuda.graph's shared default): the stream whose cuBLAS
        # workspace the graphs replay with, which nothing else may use while they run
        self.decode_capture_stream = torch.cuda.Stream(dev)
        for b in sorted(self.graph_sizes, reverse=True):     # largest first: smaller ones reuse its pool
            meta = AttentionMetadata(self.g_slots[:b], b, self.g_bt[:b], self.g_ctx[:b], self.block_size, None,
                                     self.use_triton)
            args = (self.g_ids[:b], self.g_pos[:b], self.kv_caches, meta, self.g_rows[:b])
            s = self.decode_capture_stream                # its cuBLAS workspace made here, not inside the capture
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):                       # warm-up: Triton compilation, rope tables, cuBLAS handles
                    warm = self.model(*args)
            torch.cuda.current_stream().wait_stream(s)
            if self.g_logits is None:
                self.g_logits = torch.empty((n, *warm.shape[1:]), dtype=warm.dtype, device=dev)
            del warm
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=self.decode_capture_stream):
                self.g_logits[:b].copy_(self.model(*args))
            self.graphs[b] = g
        torch.cuda.synchronize()

    def _replay(self, decodes: list[ScheduledChunk], bucket: int, src: list[int],
                prev_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        """Replays the decode graph of `bucket` rows: the inputs go to its static buffers and the graph runs, on
        the current stream."""
        host = np.zeros((5, bucket), dtype=np.int64)
        host[2, :] = self.scratch_slot
        host[4, :] = -1                  # padding rows take no token from the step before
        host[4, :len(src)] = src
        bt = np.zeros((bucket, self.max_blocks), dtype=np.int32)
        bs = self.block_size
        for i, c in enumerate(decodes):
            seq, p = c.seq, c.start
            host[0, i] = seq.token_ids[p]
            host[1, i] = p
            host[2, i] = seq.block_ids[p // bs] * bs + p % bs
            host[3, i] = p + 1
            bt[i, :len(seq.block_ids)] = seq.block_ids
        dev = torch.from_numpy(host).to(self.device, non_blocking=True)
        self.g_ids[:bucket].copy_(dev[0] if prev_tokens is None else _take_pending(dev[0], dev[4], prev_tokens))
        self.g_pos[:bucket].copy_(dev[1])
        self.g_slots[:bucket].copy_(dev[2])
        self.g_ctx[:bucket].copy_(dev[3])
        self.g_bt[:bucket].copy_(torch.from_numpy(bt).to(self.device, non_blocking=True))
        self.graphs[bucket].replay()
        return self.g_logits[:bucket]


def _take_pending(ids: torch.Tensor, src: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
    """ids with ids[i] = prev_tokens[src[i]] wherever src[i] >= 0 (tokens sampled by a step not read back)."""
    return torch.where(src >= 0, prev_tokens[src.clamp(min=0)], ids)


def _packed(wide: list[np.ndarray], narrow: list[np.ndarray], device: torch.device
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One host-to-device copy of int64 arrays: `wide` ones stay int64, `narrow` ones become int32 (one
    conversion for all). Each array starts at a 16-byte boundary. Returns the device views of each."""
    def layout(arrays: list[np.ndarray], align: int) -> tuple[list[int], int]:
        starts, n = [], 0
        for a in arrays:
            starts.append(n)
            n += -(-a.size // align) * align
        return starts, n
    ws, wn = layout(wide, 2)          # int64: 2 elements = 16 bytes
    ns, nn = layout(narrow, 4)        # int32: 4 elements = 16 bytes
    host = np.zeros(wn + nn, dtype=np.int64)
    for a, st in zip(wide, ws):
        host[st:st + a.size] = a
    for a, st in zip(narrow, ns):
        host[wn + st:wn + st + a.size] = a
    dev = torch.from_numpy(host).to(device, non_blocking=True)
    small = dev[wn:].to(torch.int32)
    return ([dev[st:st + a.size] for a, st in zip(wide, ws)],
            [small[st:st + a.size] for a, st in zip(narrow, ns)])
