"""Tensor parallelism as a transformation of a built model (gpt-fast style), plus the engine side.

Each rank holds its share of every layer: q/k/v heads and gate/up columns (column-parallel), the matching
input columns of o_proj and down_proj (row-parallel), with an all-reduce after o_proj and after down_proj.
Embedding, norms and lm_head stay whole, so every rank ends a step with identical logits. A checkpoint is
loaded sharded (`LlamaModel.from_state_dict(..., tp=(rank, world_size))`: a rank's device never holds the
whole model, as on cards too small for it), then `attach_tp` joins the ranks; `apply_tp` does both to a
model built whole (random benchmark weights, tests).

One rank (0) owns the scheduler and the sampler. Each step it broadcasts the step's plan (which tokens of
which sequences, their block tables, copy-on-write copies) and every rank runs the same forward on its
shard of the paged cache, so the cache, the CUDA graphs and sampling code are the single-GPU ones."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from ziya_batch.engine.kv_cache import copy_blocks
from ziya_batch.engine.model import LlamaModel, check_tp_split, tp_slice
from ziya_batch.engine.quant import Fp8Linear, cat_rows, set_projection
from ziya_batch.engine.scheduler import ScheduledChunk, SchedulerOutput, Sequence
from ziya_batch.engine.types import SamplingParams


def apply_tp(model: LlamaModel, rank: int, world_size: int, group=None) -> LlamaModel:
    """Keeps this rank's share of a whole model's projections (see model.TP_SPLIT_DIM) and joins the ranks.
    A checkpoint is better loaded sharded (LlamaModel.from_state_dict(tp=...), then attach_tp): this
    transformation needs the whole model on the device first."""
    a = model.args
    if world_size == 1:
        return model
    check_tp_split(a, world_size)
    D = a.head_dim
    qkv_rows = [a.num_heads * D, a.num_kv_heads * D, a.num_kv_heads * D]

    def rows(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        # column-parallel: this rank's rows of each fused piece (q/k/v heads, gate/up columns)
        return cat_rows([tp_slice(x, 0, rank, world_size) for x in t.split(sizes)])

    def cols(t: torch.Tensor) -> torch.Tensor:
        # row-parallel: this rank's input columns (a view: it keeps the whole weight only until copied)
        return tp_slice(t, 1, rank, world_size)

    with torch.no_grad():
        for layer in model.layers:
            cut = {"qkv_proj": lambda t: rows(t, qkv_rows),
                   "gate_up_proj": lambda t: rows(t, [a.intermediate_size] * 2), "o_proj": cols, "down_proj": cols}
            shard = {}
            for name, fn in cut.items():
                w = getattr(layer, name)
                if isinstance(w, Fp8Linear):
                    # a float8 weight's per-output-channel scales go with its rows: split with the rows of a
                    # column-parallel weight, kept whole for a row-parallel one (every output row stays)
                    shard[name] = w.like(fn(w.weight).contiguous(), w.scale if fn is cols else fn(w.scale).contiguous())
                else:
                    shard[name] = fn(w)
            layer.shrink_to_shard(world_size)
            for name, t in shard.items():
                if isinstance(t, Fp8Linear):
                    set_projection(layer, name, t)
                else:
                    getattr(layer, name).copy_(t)
    if model.embed.device.type == "cuda":
        torch.cuda.empty_cache()
    return attach_tp(model, rank, world_size, group)


def attach_tp(model: LlamaModel, rank: int, world_size: int, group=None) -> LlamaModel:
    """Joins a model that already holds rank `rank`'s shard (from_state_dict(tp=...) or apply_tp) to the
    other ranks: an all-reduce after o_proj and after down_proj, and one cache size for all ranks."""
    a = model.args
    if world_size == 1:
        return model
    for layer in model.layers:
        if layer.local_heads != a.num_heads // world_size:
            raise ValueError(f"the model holds {layer.local_heads} of {a.num_heads} heads a layer, not the share of "
                             f"one rank of {world_size}")
        layer.all_reduce = lambda t, g=group: dist.all_reduce(t, group=g)

    def agree_num_blocks(n: int) -> int:
        # every rank must build the same cache: take the smallest any rank can hold
        x = torch.tensor([n], dtype=torch.int64, device=model.embed.device)
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=group)
        return int(x.item())
    model.agree_num_blocks = agree_num_blocks

    def agree_seconds(seconds: list[float]) -> list[float]:
        # the runner prunes its graph sizes by these times: every rank must keep the same sizes, so all take the
        # slowest rank's time at each size
        x = torch.tensor(seconds, dtype=torch.float64, device=model.embed.device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        return x.tolist()
    model.agree_seconds = agree_seconds
    return model


def _plan(out: SchedulerOutput) -> dict:
    """The step as plain data: only what the runner reads."""
    return {"copies": out.block_copies,
            "chunks": [(c.seq.seq_id, c.start, c.num_tokens, c.samples, c.seq.token_ids[c.start:c.start + c.num_tokens],
                        list(c.seq.block_ids), len(c.children)) for c in out.chunks]}


def _unplan(plan: dict) -> SchedulerOutput:
    chunks = []
    params = SamplingParams()
    for seq_id, start, n, samples, tokens, blocks, n_children in plan["chunks"]:
        seq = Sequence(seq_id, "", 0, [0] * start + tokens, 0, params, block_ids=blocks)
        children = [Sequence(-1, "", 0, [], 0, params) for _ in range(n_children)]
        chunks.append(ScheduledChunk(seq, start, n, samples, children))
    return SchedulerOutput(chunks, [tuple(c) for c in plan["copies"]], [])


class PlanBroadcaster:
    """Installed on rank 0's engine as plan_hook: sends each step's plan to the other ranks."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, out: Optional[SchedulerOutput]) -> None:
        dist.broadcast_object_list([None if out is None else _plan(out)], src=0, group=self.group)

    def load(self, what: str) -> None:
        """Tells the followers to drop their engine and build the one `what` describes (for the replica's
        on_load, e.g. a job spec as JSON); rank 0 then builds its own, at the same time."""
        dist.broadcast_object_list([{"load": what}], src=0, group=self.group)

    def stop(self) -> None:
        """Tells the followers to return."""
        self(None)


def enable_tp_driver(engine, group=None) -> PlanBroadcaster:
    """Rank 0: make `engine` broadcast its plans; call .stop() on the result when done."""
    engine.plan_hook = PlanBroadcaster(group)
    return engine.plan_hook


def serve_follower(engine, group=None, on_load: Optional[Callable[[str], object]] = None) -> int:
    """Ranks > 0: run each step rank 0 broadcasts until it says stop. Returns the number of steps run. When rank
    0 switches models (PlanBroadcaster.load), `on_load(what)` must drop this rank's engine and return the new
    one; `engine` may be None until the first load."""
    steps = 0
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        msg = box[0]
        if msg is None:
            return steps
        if "load" in msg:
            if on_load is None:
                raise RuntimeError("rank 0 switched models, and this rank was given no way to load one")
            engine = None             # this frame's reference goes first: the memory is needed for the next model
            engine = on_load(msg["load"])
            continue
        if engine is None:
            raise RuntimeError("rank 0 sent a step before any model was loaded")
        out = _unplan(msg)
        with torch.inference_mode():
            copy_blocks(engine.kv_caches, out.block_copies)
            engine.runner.execute(out)
        steps += 1
