"""Our own LLaMA forward over a flat batch of tokens (every sequence's new tokens laid end to end), taking
the weights of a Hugging Face LLaMA checkpoint. q/k/v and gate/up are fused into one matrix each so a
decode step reads every weight once in as few kernels as possible. The attention itself (paged KV cache)
lives in attention.py; this module only knows shapes."""
from __future__ import annotations

import glob
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ziya_batch.engine import fused, quant
from ziya_batch.engine.attention import AttentionMetadata, paged_attention
from ziya_batch.engine.fused import apply_rope, rms_norm
from ziya_batch.engine.merge_delta import index_files

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        scaling = getattr(config, "rope_scaling", None)
        if rope_type != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type"))
                                      not in (None, "default")):
            raise NotImplementedError(f"rope scaling {rope_type or scaling} is not supported by the engine")
        theta = getattr(config, "rope_theta", None) or rope.get("rope_theta", 10000.0)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   num_layers=config.num_hidden_layers, num_heads=heads,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate_size=config.intermediate_size, rms_norm_eps=config.rms_norm_eps,
                   rope_theta=float(theta), max_position_embeddings=config.max_position_embeddings,
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


# Named presets, gpt-fast style: the benchmark builds "13B" with random weights.
PRESETS = {
    "13B": dict(vocab_size=39424, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                intermediate_size=13824, max_position_embeddings=2048),
    "tiny": dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                 intermediate_size=128, max_position_embeddings=512),
}


# Tensor parallelism (tp.py) splits each layer's projections: column-parallel ones (q/k/v heads, gate/up
# columns) along their output rows, row-parallel ones (o_proj, down_proj) along their input columns, so each
# rank holds 1/K of every attention and MLP weight. Norms, the embedding and lm_head stay whole.
TP_SPLIT_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


def tp_slice(t: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/world_size of t along dim (a view)."""
    size = t.shape[dim] // world_size
    return t.narrow(dim, rank * size, size)


def _full_size(a: ModelArgs, kind: str) -> int:
    """A projection's whole extent along the dimension tensor parallelism splits (TP_SPLIT_DIM)."""
    heads, kv_heads = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    return {"q_proj": heads, "o_proj": heads, "k_proj": kv_heads, "v_proj": kv_heads}.get(kind, a.intermediate_size)


def check_tp_split(a: ModelArgs, world_size: int) -> None:
    for what, n in (("attention heads", a.num_heads), ("key/value heads", a.num_kv_heads),
                    ("intermediate size", a.intermediate_size)):
        if n % world_size:
            raise ValueError(f"{what} ({n}) do not split over tensor_parallel={world_size}")


def linear(x: torch.Tensor, w, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    # w: a float Parameter [N, K], or a quant.Fp8Linear in its place (model.quantization fp8); out: [T, N] to
    # write the product into (a captured graph's static buffer), else a new tensor
    if isinstance(w, nn.Module):
        return w(x, out=out)
    return F.linear(x, w) if out is None else torch.mm(x, w.t(), out=out)


def takes_rows(proj) -> bool:
    """Whether `proj` is an FP8 projection whose input kernel may hand it rows it quantised itself."""
    return isinstance(proj, quant.Fp8Linear) and proj.takes_rows


def norm_for(proj, h: torch.Tensor, x: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
             out: Optional[torch.Tensor] = None):
    """fused.add_rms_norm for the projection `proj` that reads its output: for an FP8 projection that takes them,
    the rows come quantised from the same kernel (fused.QuantizedRows); otherwise in the model dtype (into out)."""
    if takes_rows(proj):
        if out is not None:
            raise ValueError("norm_for: rows quantised for an FP8 projection are not written into a buffer")
        return fused.add_rms_norm(h, x, weight, eps, quantize=True)
    return fused.add_rms_norm(h, x, weight, eps, out=out)


class Layer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.input_norm = nn.Parameter(torch.ones(a.hidden_size))
        self.qkv_proj = nn.Parameter(torch.empty(q + 2 * kv, a.hidden_size))   # [q|k|v, H]
        self.o_proj = nn.Parameter(torch.empty(a.hidden_size, q))
        self.post_norm = nn.Parameter(torch.ones(a.hidden_size))
        self.gate_up_proj = nn.Parameter(torch.empty(2 * a.intermediate_size, a.hidden_size))  # [gate|up, H]
        self.down_proj = nn.Parameter(torch.empty(a.hidden_size, a.intermediate_size))
        # Tensor parallelism (tp.py) shrinks the local head counts and sets an all-reduce hook.
        self.local_heads, self.local_kv_heads = a.num_heads, a.num_kv_heads
        self.all_reduce = None

    def shrink_to_shard(self, world_size: int) -> None:
        """Replaces the four projections by empty ones of one tensor-parallel rank's shape, on their device (on
        the meta device before loading: a rank never allocates the whole layer)."""
        a = self.a
        heads, kv_heads = a.num_heads // world_size, a.num_kv_heads // world_size
        inter = a.intermediate_size // world_size
        dev, dt = self.input_norm.device, self.input_norm.dtype   # (a projection may be an Fp8Linear)

        def empty(*shape):
            return nn.Parameter(torch.empty(*shape, device=dev, dtype=dt), requires_grad=False)
        self.qkv_proj = empty((heads + 2 * kv_heads) * a.head_dim, a.hidden_size)
        self.o_proj = empty(a.hidden_size, heads * a.head_dim)
        self.gate_up_proj = empty(2 * inter, a.hidden_size)
        self.down_proj = empty(a.hidden_size, inter)
        self.local_heads, self.local_kv_heads = heads, kv_heads

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # h: [T, H]
        a, T = self.a, h.shape[0]
        x = rms_norm(h, self.input_norm, a.rms_norm_eps)
        qkv = linear(x, self.qkv_proj)                                   # [T, (hq + 2 hkv) * D]
        nq, nkv = self.local_heads * a.head_dim, self.local_kv_heads * a.head_dim
        q = qkv[:, :nq].view(T, self.local_heads, a.head_dim)
        k = qkv[:, nq:nq + nkv].view(T, self.local_kv_heads, a.head_dim)
        v = qkv[:, nq + nkv:].view(T, self.local_kv_heads, a.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = paged_attention(q, k, v.contiguous(), k_cache, v_cache, meta)  # [T, hq, D]
        o = linear(o.reshape(T, nq), self.o_proj)
        if self.all_reduce is not None:
            self.all_reduce(o)
        h = h + o
        x = rms_norm(h, self.post_norm, a.rms_norm_eps)
        gate, up = linear(x, self.gate_up_proj).chunk(2, dim=-1)       # [T, I] each
        m = linear(F.silu(gate) * up, self.down_proj)
        if self.all_reduce is not None:
            self.all_reduce(m)
        return h + m

    def forward_fused(self, h: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, cos_t: torch.Tensor,
                      sin_t: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      next_norm: torch.Tensor, next_proj=None) -> torch.Tensor:
        """The same layer through fused Triton kernels (GPU): h: [T, H] residual, updated in place; x: this
        layer's normalised input. Returns the next layer's normalised input (next_norm applied; quantised for
        next_proj where norm_for says so). Its three pieces are what a captured mixed step replays around the
        attention (piecewise.py)."""
        qkv = self.qkv_rope(x, positions, cos_t, sin_t, k_cache, v_cache, meta.slot_mapping)
        return self.mlp_block(h, self.attend(qkv, k_cache, v_cache, meta, kv_written=True), next_norm,
                              next_proj=next_proj)

    def qkv_rope(self, x: torch.Tensor, positions: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [T, H] normalised input -> qkv [T, (hq + 2 hkv) * D] with RoPE applied to q and k (into out); the
        step's k and v are written to the layer's caches at `slots` in the same kernel."""
        qkv = linear(x, self.qkv_proj, out)
        D = self.a.head_dim
        fused.rope_write_kv_(qkv, positions, cos_t, sin_t, self.local_heads, self.local_kv_heads, D, slots,
                             k_cache.view(-1, self.local_kv_heads, D), v_cache.view(-1, self.local_kv_heads, D))
        return qkv

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of q [T, hq, D], k and v [T, hkv, D] in a qkv row block."""
        T, D = qkv.shape[0], self.a.head_dim
        nq, nkv = self.local_heads * D, self.local_kv_heads * D
        return (qkv[:, :nq].view(T, self.local_heads, D), qkv[:, nq:nq + nkv].view(T, self.local_kv_heads, D),
                qkv[:, nq + nkv:].view(T, self.local_kv_heads, D))

    def attend(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               out: Optional[torch.Tensor] = None, kv_written: bool = False) -> torch.Tensor:
        """Paged attention of the step's queries -> [T, hq * D] (into out); writes the step's K/V to the cache
        first unless kv_written (a captured piece wrote them)."""
        q, k, v = self.split_qkv(qkv)
        T = qkv.shape[0]
        o = paged_attention(q, k, v, k_cache, v_cache, meta, out=None if out is None else out.view(q.shape),
                            kv_written=kv_written)
        return o.view(T, -1)

    def mlp_block(self, h: torch.Tensor, attn: torch.Tensor, next_norm: torch.Tensor,
                  out: Optional[torch.Tensor] = None, next_proj=None):
        """o_proj of the attention output, the residual, the MLP and the residual again (h updated in place);
        returns the next layer's normalised input (next_norm applied; into out, or quantised for next_proj, the
        projection that reads it, where norm_for says so)."""
        o = linear(attn, self.o_proj)
        if self.all_reduce is not None:
            self.all_reduce(o)
        x = norm_for(self.gate_up_proj, h, o, self.post_norm, self.a.rms_norm_eps)
        m = linear(fused.silu_mul(linear(x, self.gate_up_proj), quantize=takes_rows(self.down_proj)),
                    self.down_proj)
        if self.all_reduce is not None:
            self.all_reduce(m)
        return norm_for(next_proj, h, m, next_norm, self.a.rms_norm_eps, out=out)


class LlamaModel(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed = nn.Parameter(torch.empty(a.vocab_size, a.hidden_size))
        self.layers = nn.ModuleList(Layer(a) for _ in range(a.num_layers))
        self.norm = nn.Parameter(torch.ones(a.hidden_size))
        self.lm_head = nn.Parameter(torch.empty(a.vocab_size, a.hidden_size))
        self._rope_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.use_fused = False          # set by the runner on CUDA once fused.check_fused agrees with torch

    def rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..n-1, computed in float32 like transformers, stored in the model dtype."""
        if self._rope_cache is None or self._rope_cache[0].shape[0] < n:
            a, dev = self.args, self.embed.device
            inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.int64, device=dev)
                                               .float() / a.head_dim))
            freqs = torch.outer(torch.arange(n, device=dev, dtype=torch.float32), inv_freq)  # [n, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_cache = (emb.cos().to(self.embed.dtype), emb.sin().to(self.embed.dtype))
        return self._rope_cache

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata, logits_rows: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; logits_rows: [R] indices into T whose next-token logits are wanted.
        Returns float32 logits [R, V]."""
        cos_t, sin_t = self.rope_tables(self.args.max_position_embeddings)
        if self.use_fused:
            return self._forward_fused(input_ids, positions, kv_caches, meta, logits_rows, cos_t, sin_t)
        cos, sin = cos_t[positions].unsqueeze(1), sin_t[positions].unsqueeze(1)   # [T, 1, D]
        h = F.embedding(input_ids, self.embed)                                     # [T, H]
        for layer, (kc, vc) in zip(self.layers, kv_caches):
            h = layer(h, cos, sin, kc, vc, meta)
        h = rms_norm(h[logits_rows], self.norm, self.args.rms_norm_eps)             # [R, H]
        return F.linear(h, self.lm_head).float()                                    # [R, V]

    def _forward_fused(self, input_ids, positions, kv_caches, meta, logits_rows, cos_t, sin_t) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed)                                     # [T, H]
        layers = self.layers
        x = norm_for(layers[0].qkv_proj, h, None, layers[0].input_norm, self.args.rms_norm_eps)
        norms = [layer.input_norm for layer in layers[1:]] + [self.norm]
        projs = [layer.qkv_proj for layer in layers[1:]] + [None]       # the last feeds lm_head (float16)
        for layer, (kc, vc), nxt, proj in zip(layers, kv_caches, norms, projs):
            x = layer.forward_fused(h, x, positions, cos_t, sin_t, kc, vc, meta, nxt, proj)
        return F.linear(x[logits_rows], self.lm_head).float()                      # [R, V]

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    def random(cls, a: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0,
               quantization: Optional[str] = None) -> "LlamaModel":
        """Random weights made directly on the device (benchmarks): no host copy of a 26 GB model. With
        quantization "fp8", each linear weight is drawn in dtype and quantised alone."""
        m = cls._empty(a, device, dtype, 1, quantization)
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
            for lin in m.modules():
                if isinstance(lin, quant.Fp8Linear):
                    w8, scale = quant.quantize_weight(torch.empty(lin.shape, device=device, dtype=dtype)
                                                      .normal_(0.0, 0.02, generator=g))
                    lin.weight.copy_(w8); lin.scale.copy_(scale)
        return m.eval().requires_grad_(False)

    @classmethod
    def _empty(cls, a: ModelArgs, device: torch.device, dtype: torch.dtype, world_size: int,
               quantization: Optional[str]) -> "LlamaModel":
        """Uninitialised weights of one tensor-parallel rank's shape, made on the meta device first so nothing is
        allocated twice; with quantization "fp8" the projections are Fp8Linear (float16 never allocated)."""
        quant.check_quantization(quantization)
        with torch.device("meta"):
            m = cls(a)
            if world_size > 1:
                for layer in m.layers:
                    layer.shrink_to_shard(world_size)
        m = m.to(dtype=dtype)                 # meta -> dtype first: no float32 copy
        if quantization == "fp8":             # after .to(dtype), which would widen float8 buffers
            mm_dtype = quant.require_fp8(device, dtype)
            fused = quant.check_fused_quantize(device, dtype)
            takes_rows = quant.check_fused_rows(device, dtype, a.hidden_size,
                                                a.intermediate_size // world_size) if fused else {}
            for layer in m.layers:
                quant.use_fp8_linears(layer, fused, mm_dtype, takes_rows)
        return m.to_empty(device=device)

    @classmethod
    def from_state_dict(cls, a: ModelArgs, tensors: Iterator[tuple[str, torch.Tensor]], device: torch.device,
                        dtype: torch.dtype, tp: tuple[int, int] = (0, 1),
                        quantization: Optional[str] = None) -> "LlamaModel":
        """Builds the model from (name, tensor) pairs named as in HF LLaMA checkpoints, fusing q/k/v and gate/up
        as the pieces arrive, so at most one layer's unfused pieces are held besides the model. With
        tp = (rank, world_size), only that tensor-parallel rank's share of each projection is kept: every
        tensor is sliced where it was read (host memory) before it goes to the device, so the device never
        holds more than the shard (tp.attach_tp then joins the ranks).
        quantization "fp8" (quant.py) quantises each linear weight as it arrives, or takes it and its
        weight_scale as they are from an FP8 checkpoint; without it, an FP8 checkpoint's weights are widened
        to dtype (twice the memory, for devices without FP8). A rank quantising a float16 checkpoint sees only
        its columns of o_proj/down_proj, so their row scales are its own: each rank's partial product is exact
        to its scales and the all-reduce sums the same product, but the rounding differs from one GPU's (an FP8
        checkpoint gives every rank the whole rows' scales)."""
        rank, world_size = tp
        if world_size > 1:
            check_tp_split(a, world_size)
        m = cls._empty(a, device, dtype, world_size, quantization)
        pending: dict[tuple[int, str, str], torch.Tensor] = {}     # (layer, q_proj..., weight|scale)
        seen: set[str] = set()
        widened = False
        with torch.no_grad():
            for name, t in tensors:
                if name.startswith("model."):
                    name = name[len("model."):]
                dim = _tp_dim(name) if world_size > 1 and t.numel() > 1 else None   # per-tensor scales stay
                if dim is not None:
                    # whole (sliced here) or already this rank's slice (iter_checkpoint(tp=...))
                    full = _full_size(a, name.split(".")[-2])
                    if t.shape[dim] == full:
                        t = tp_slice(t, dim, rank, world_size)
                    elif t.shape[dim] != full // world_size:
                        raise ValueError(f"{name}: {t.shape[dim]} along dimension {dim} is neither the whole "
                                         f"{full} nor one rank's {full // world_size}")
                _check_loaded(a, name, t, world_size)
                # float8 weights, their scales and weights to quantise keep their dtype until _fuse_ready
                keep = t.dtype == quant.FP8 or name.endswith("_scale") or (quantization and
                                                                           quant.is_quantized_weight(name))
                t = t.to(device=device) if keep else t.to(device=device, dtype=dtype)
                if t.dtype == quant.FP8 and not quantization and not widened:
                    widened = True
                    log.warning("the checkpoint's linear weights are float8 but model.quantization is not fp8: "
                                "they are widened to %s (twice the memory)", dtype)
                if name == "embed_tokens.weight":
                    m.embed.copy_(t); seen.add("embed")
                elif name == "norm.weight":
                    m.norm.copy_(t); seen.add("norm")
                elif name == "lm_head.weight":
                    m.lm_head.copy_(t); seen.add("lm_head")
                elif name.startswith("layers."):
                    _, idx, rest = name.split(".", 2)
                    i, layer = int(idx), m.layers[int(idx)]
                    simple = {"input_layernorm.weight": layer.input_norm, "post_attention_layernorm.weight":
                              layer.post_norm}
                    kind = rest.split(".")[1] if rest.count(".") == 2 else ""
                    if rest in simple:
                        simple[rest].copy_(t); seen.add(f"{i}.{rest}")
                    elif kind in quant.QUANTIZED and rest.endswith((".weight", ".weight_scale")):
                        part = "scale" if rest.endswith("_scale") else "weight"
                        if (i, kind, part) in pending:
                            raise ValueError(f"{name} appears twice in the checkpoint")
                        if quantization and part == "weight" and t.dtype != quant.FP8:
                            if (i, kind, "scale") in pending:
                                raise ValueError(f"{name} is not float8 but the checkpoint gives it a weight_scale")
                            t, pending[(i, kind, "scale")] = quant.quantize_weight(t)
                        pending[(i, kind, part)] = t
                        _fuse_ready(layer, i, pending, seen, dtype)
                    elif kind in quant.QUANTIZED and rest.endswith(".input_scale"):
                        continue          # a static activation scale: activations are scaled per token here
                    elif "rotary_emb" in rest:
                        continue
                    else:
                        raise ValueError(f"unexpected weight {name}: not a LLaMA checkpoint the engine can load")
        if "lm_head" not in seen and a.tie_word_embeddings:
            m.lm_head = m.embed
            seen.add("lm_head")
        expected = 3 + a.num_layers * 6
        if len(seen) != expected or pending:
            # what arrived without its partner: a float8 weight without its weight_scale (or the reverse), q
            # without k and v, gate without up
            left = sorted(f"layers.{i}.{p}.{'weight_scale' if part == 'scale' else 'weight'}"
                          for i, p, part in pending)
            raise ValueError(f"checkpoint is missing weights: loaded {len(seen)} of {expected} parameter groups"
                             + (f"; waiting for the rest of {', '.join(left[:3])}" if left else ""))
        return m.eval().requires_grad_(False)


# each of the layer's weights and the checkpoint pieces it is made of (q/k/v and gate/up fused, in this order)
_PIECES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
           "o_proj": ("o_proj",), "down_proj": ("down_proj",)}


def _fuse_ready(layer: Layer, i: int, pending: dict, seen: set, dtype: torch.dtype) -> None:
    """Sets each of layer i's weights whose pieces have all arrived: float (a Parameter), or float8 with
    per-channel scales (an Fp8Linear, which then takes float8 weights with their scales, widening none); a
    float8 piece waits for its weight_scale."""
    def ready(p):
        w = pending.get((i, p, "weight"))
        return w is not None and (w.dtype != quant.FP8 or (i, p, "scale") in pending)
    for name, parts in _PIECES.items():
        if not all(ready(p) for p in parts):
            continue
        pieces = [(pending.pop((i, p, "weight")), pending.pop((i, p, "scale"), None)) for p in parts]
        for p, (w, s) in zip(parts, pieces):
            if s is None:
                continue
            if w.dtype != quant.FP8:        # a scale the checkpoint gives a float weight would scale it twice
                raise ValueError(f"layers.{i}.{p}.weight is {str(w.dtype).replace('torch.', '')} but the checkpoint "
                                 "gives it a weight_scale: only float8 weights have one")
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise ValueError(f"layers.{i}.{p}.weight_scale holds a scale that is not a positive finite number "
                                 "(NaN, inf, 0 or negative): a damaged checkpoint, or one quantised from weights "
                                 "that were")
        target = getattr(layer, name)
        if isinstance(target, quant.Fp8Linear):
            target.weight.copy_(quant.cat_rows([w for w, _ in pieces]))
            target.scale.copy_(torch.cat([quant.per_channel(s, w.shape[0]) for w, s in pieces]))
        else:
            target.copy_(torch.cat([w if s is None else quant.dequantize(w, s, dtype) for w, s in pieces]))
        seen.add(f"{i}.{name}")


def _expected_shape(a: ModelArgs, name: str, world_size: int) -> Optional[tuple[int, ...]]:
    """The shape a checkpoint tensor (this tensor-parallel rank's share of it) must have; None for names the
    loader judges otherwise (scales, unknown names)."""
    heads, kv = a.num_heads * a.head_dim // world_size, a.num_kv_heads * a.head_dim // world_size
    inter, hidden = a.intermediate_size // world_size, a.hidden_size
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return (a.vocab_size, hidden)
    if name == "norm.weight" or name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
        return (hidden,)
    if not name.startswith("layers.") or not name.endswith(".weight"):
        return None
    return {"q_proj": (heads, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, heads),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}.get(name.split(".")[-2])


def _check_loaded(a: ModelArgs, name: str, t: torch.Tensor, world_size: int) -> None:
    """A checkpoint tensor of the shape and kind its parameter has, before anything is copied (copy_ broadcasts
    and .to converts, so a tensor of one row or of integers would load as garbage): floating point, float8 only
    as e4m3 linear weights, scales floating point."""
    if name.startswith("layers.") and name.split(".")[1].isdigit() and int(name.split(".")[1]) >= a.num_layers:
        raise ValueError(f"{name}: the config has {a.num_layers} layers")
    if not t.is_floating_point():
        raise ValueError(f"{name} is {str(t.dtype).replace('torch.', '')}: weights are floating point")
    # (the floating-point dtypes of one byte are the float8 ones)
    if t.element_size() == 1 and (t.dtype != quant.FP8 or not quant.is_quantized_weight(name)):
        raise ValueError(f"{name} is {str(t.dtype).replace('torch.', '')}: float8 weights are e4m3 "
                         "(float8_e4m3fn) linear weights with a weight_scale")
    want = _expected_shape(a, name, world_size)
    if want is not None and tuple(t.shape) != want:
        raise ValueError(f"{name} has shape {list(t.shape)}, the config says {list(want)}")


def _tp_dim(name: str) -> Optional[int]:
    """The dimension tensor parallelism splits a checkpoint tensor along, or None if every rank keeps it whole."""
    if not name.startswith(("layers.", "model.layers.")):
        return None
    if name.endswith(".weight"):
        return TP_SPLIT_DIM.get(name.split(".")[-2])
    # an FP8 weight's per-channel scale [out, 1] goes with its output rows: split where the rows are
    return 0 if name.endswith(".weight_scale") and TP_SPLIT_DIM.get(name.split(".")[-2]) == 0 else None


def checkpoint_files(path: str) -> tuple[bool, list[str]]:
    """(safetensors?, weight files) of a HF checkpoint folder: the safetensors its index names (all present), or
    without an index its *.safetensors, else its pytorch_model*.bin (as its index lists them, if it has one).
    FileNotFoundError if it has neither, or a file its index names is missing."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):       # the files the index names, all of them, and no other (a stray copy)
        files = [os.path.join(path, f) for f in index_files(Path(index), index)]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{path}: the index names {os.path.basename(missing[0])}, which is missing; "
                                    "the download is incomplete")
        return True, files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return True, files
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    index = os.path.join(path, "pytorch_model.bin.index.json")
    if os.path.exists(index):
        files = sorted({os.path.join(path, f) for f in index_files(Path(index), index)})
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    return False, files


def num_parameters(a: ModelArgs) -> int:
    """The parameters a checkpoint of this config holds (the engine's layout: norms, projections, embedding and,
    unless tied, lm_head)."""
    heads, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    layer = a.hidden_size * (2 * heads + 2 * kv) + 3 * a.hidden_size * a.intermediate_size + 2 * a.hidden_size
    return a.num_layers * layer + a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2) + a.hidden_size


def check_weights_fit(a: ModelArgs, path: str) -> None:
    """ValueError, before anything is allocated, where config.json describes more weights than the checkpoint's
    files could hold at one byte a parameter (the smallest, float8): a config that does not belong to these
    weights (num_hidden_layers 100000 filled the host's memory before any tensor was compared)."""
    _, files = checkpoint_files(path)
    on_disk = sum(os.path.getsize(f) for f in files)
    need = num_parameters(a)
    if need > on_disk:
        raise ValueError(f"{path}: config.json describes {need:,} parameters, more than its weight files hold "
                         f"({on_disk:,} bytes): the config does not belong to these weights")


def iter_checkpoint(path: str, tp: tuple[int, int] = (0, 1),
                    args: Optional[ModelArgs] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from a HF checkpoint folder: safetensors first; .bin only with weights_only=True.
    With tp = (rank, world_size), the projections tensor parallelism splits come as that rank's slice, read
    alone from safetensors (a rank reads 1/world_size of those bytes); with `args`, a projection is first checked
    to have the config's whole size there (a slice of a larger one would otherwise pass as a whole one)."""
    rank, world_size = tp
    safetensors, files = checkpoint_files(path)
    if safetensors:
        from safetensors import safe_open
        for f in files:
            with safe_open(f, framework="pt", device="cpu") as st:
                for name in st.keys():
                    dim = _tp_dim(name) if world_size > 1 else None
                    sl = st.get_slice(name)
                    if dim is None or math.prod(sl.get_shape()) <= 1:      # (a per-tensor scale stays whole)
                        yield name, st.get_tensor(name)
                        continue
                    whole = sl.get_shape()[dim]
                    _check_whole(args, name, whole, dim)
                    size = whole // world_size
                    part = slice(rank * size, (rank + 1) * size)
                    yield name, sl[part] if dim == 0 else sl[:, part]
        return
    for f in files:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        for name, t in sd.items():
            dim = _tp_dim(name) if world_size > 1 and t.numel() > 1 else None
            if dim is not None:
                _check_whole(args, name, t.shape[dim], dim)
            # a slice of the memory-mapped tensor: only its pages are read
            yield name, (t if dim is None else tp_slice(t, dim, rank, world_size))
        del sd


def _check_whole(args: Optional[ModelArgs], name: str, whole: int, dim: int) -> None:
    """A projection the ranks split has the config's whole size along `dim` (with no args: nothing to check)."""
    if args is not None and name.endswith(".weight") and whole != _full_size(args, name.split(".")[-2]):
        raise ValueError(f"{name} has {whole} along dimension {dim}, the config says "
                         f"{_full_size(args, name.split('.')[-2])}")


def from_hf_model(hf_model, device: torch.device, dtype: torch.dtype,
                  quantization: Optional[str] = None) -> LlamaModel:
    a = ModelArgs.from_hf_config(hf_model.config)
    return LlamaModel.from_state_dict(a, iter(hf_model.state_dict().items()), device, dtype,
                                      quantization=quantization)
