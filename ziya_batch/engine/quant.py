"""FP8 weights (W8A8): the linear layers' weights in float8 e4m3 with one float32 scale per output channel,
activations quantised per token on the fly, products through torch._scaled_mm's row-wise scaling (sm_89+).

A decode step of the 13B shape is bound by reading the weights; float8 halves those bytes. Embeddings, norms
and lm_head stay in the model dtype (lm_head's error would go straight into the logprobs).

Checkpoint layout (written by `ziya-batch quantize`, read by model.from_state_dict), that of llm-compressor's
FP8_DYNAMIC scheme ("compressed-tensors", read by vLLM and transformers):
    layers.N.self_attn.q_proj.weight        float8_e4m3fn [out, in]
    layers.N.self_attn.q_proj.weight_scale  float32 [out, 1]        w ~= weight.float() * weight_scale
and config.json's quantization_config (QUANTIZATION_CONFIG below). The reader also takes a per-tensor scale
([] or [1], vLLM's "fp8" method) and ignores static input_scale tensors: activations always get a dynamic
per-token scale here."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ziya_batch.errors import ModelError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds without Triton
    triton = None

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                    # largest finite e4m3fn value
# scales are never below this: an all-zero row quantises to zeros instead of dividing by zero
_MIN_SCALE = 1e-12
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZATIONS = ("fp8",)
_PROJECTION = re.compile(r"^(model\.)?layers\.\d+\.(self_attn|mlp)\.(" + "|".join(QUANTIZED) + r")\.weight$")

QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head"], "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                    "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True, "group_size": None, "block_structure": None, "actorder": None,
                              "observer": None},
        "output_activations": None}},
}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (float8 [M, K], float32 scale [M, 1]) with x ~= q * scale, each row scaled so its largest
    magnitude maps to 448. Device ops only (no host sync): safe inside a CUDA graph."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_(min=_MIN_SCALE)   # [M, 1]
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


if triton is not None:
    @triton.jit
    def _quantize_rows_kernel(X, Q, S, stride_x, stride_q, K: tl.constexpr, BLOCK: tl.constexpr):
        # one row: its amax (first pass), then x / scale rounded to float8 (second pass); quantize_rows' math
        row = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        amax = tl.max(acc, axis=0)
        scale = tl.maximum(amax / 448.0, 1e-12)
        tl.store(S + row, scale)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
            tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=cols < K)


def quantize_rows_fused(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows in one Triton kernel (CUDA): in eager torch it is 8 kernels, for each of a layer's four
    products, which at decode batch sizes costs about as much as the float8 weights save."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(M,)](x, q, scale, x.stride(0), q.stride(0), K=K, BLOCK=1024, num_warps=4)
    return q, scale


def check_fused_quantize(device: torch.device, dtype: torch.dtype) -> bool:
    """True when quantize_rows_fused agrees with quantize_rows on random rows (scales to float32 rounding,
    float8 values but for rare one-step rounding differences of Triton's division); False on the CPU, without
    Triton, or if they disagree (Fp8Linear then quantises in torch). Synchronises: call at load, never while
    a CUDA graph is being captured."""
    if triton is None or device.type != "cuda":
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(37, 5120 + 16, device=device, dtype=dtype, generator=g) * torch.logspace(
            -3, 3, 37, device=device).to(dtype)[:, None]
        x[5] = 0
        want_q, want_s = quantize_rows(x)
        got_q, got_s = quantize_rows_fused(x)
        diff = (got_q.float() - want_q.float()).abs()
        ok = (torch.allclose(got_s, want_s, rtol=1e-6, atol=0) and
              bool((diff <= want_q.float().abs() * 2.0 ** -3 + 2.0 ** -9).all()) and
              float((diff > 0).float().mean()) < 1e-3)
    except Exception as err:  # noqa: BLE001 - a Triton that cannot build this kernel: torch does the work
        log.warning("the fused float8 activation quantisation does not run here (%s); using torch", err)
        return False
    if not ok:
        log.warning("the fused float8 activation quantisation disagrees with torch's; using torch")
    return ok


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear weight [out, in] -> (float8 [out, in], float32 scale [out, 1]): one scale per output channel."""
    if w.dim() != 2:
        raise ValueError(f"a linear weight is 2-dimensional, got shape {list(w.shape)}")
    return quantize_rows(w)


def dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8 [out, in] and a per-channel [out, 1] (or per-tensor) scale -> the weight in dtype."""
    return (w8.float() * scale.float().reshape(-1, 1) if scale.numel() > 1 else w8.float() * scale.float()).to(dtype)


def per_channel(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint's weight_scale ([out, 1], [out] or a per-tensor [] / [1]) as float32 [rows, 1]."""
    s = scale.float().reshape(-1, 1)
    if s.shape[0] == 1:
        return s.expand(rows, 1).contiguous()
    if s.shape[0] != rows:
        raise ValueError(f"a weight_scale of {s.shape[0]} rows for a weight of {rows}")
    return s


def fp8_linear_reference(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What Fp8Linear computes, in float32 on any device: per-token quantised x times the dequantised weight."""
    x8, sx = quantize_rows(x)
    return ((x8.float() * sx) @ dequantize(w8, scale).t()).to(x.dtype)


class Fp8Linear(nn.Module):
    """y = x @ (weight * scale).T: weight float8 e4m3 [out, in], scale float32 [out, 1]. Takes the place of a
    projection's float16 Parameter in model.Layer (model._linear calls it)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, fused: bool = False,
                 mm_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.register_buffer("weight", weight)     # [N, K] float8_e4m3fn
        self.register_buffer("scale", scale)       # [N, 1] float32
        self.fused = fused                         # activations through quantize_rows_fused (check_fused_quantize)
        self.mm_dtype = mm_dtype                   # _scaled_mm's output dtype if not x's (require_fp8)

    @classmethod
    def empty(cls, rows: int, cols: int, device=None, fused: bool = False,
              mm_dtype: Optional[torch.dtype] = None) -> "Fp8Linear":
        return cls(torch.empty(rows, cols, dtype=FP8, device=device),
                   torch.empty(rows, 1, dtype=torch.float32, device=device), fused, mm_dtype)

    def like(self, weight: torch.Tensor, scale: torch.Tensor) -> "Fp8Linear":
        """Another weight (a tensor-parallel shard) with this one's kernel choices."""
        return Fp8Linear(weight, scale, self.fused, self.mm_dtype)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, K] float16/bfloat16 -> [T, N] in x's dtype
        if x.device.type != "cuda":
            return fp8_linear_reference(x, self.weight, self.scale)
        x = x.contiguous()       # _scaled_mm wants a row-major first operand; the kernel reads rows of stride 1
        x8, sx = quantize_rows_fused(x) if self.fused else quantize_rows(x)
        # weight.t() is [K, N] column-major, as _scaled_mm wants its second operand; [N, 1] -> [1, N] is a view
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=sx, scale_b=self.scale.view(1, -1),
                             out_dtype=self.mm_dtype or x.dtype)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def require_fp8(device: torch.device, dtype: torch.dtype = torch.float16) -> Optional[torch.dtype]:
    """Refuses, in one line, a device without FP8 matrix multiplies (the CPU, GPUs before compute capability 8.9,
    a torch whose _scaled_mm cannot scale rows there). Returns the output dtype to ask _scaled_mm for: None
    (dtype itself), or bfloat16 where row-wise scaling gives only that (older torch; Fp8Linear then casts)."""
    how = "run it on an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper), or remove model.quantization"
    if device.type != "cuda":
        raise ModelError(f"model.quantization fp8 needs FP8 matrix multiplies, which the {device.type} lacks: {how}")
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < (8, 9):
        raise ModelError(f"model.quantization fp8 needs FP8 matrix multiplies; {name} (compute capability "
                         f"{major}.{minor}) lacks them: {how}")
    a8, sa = quantize_rows(torch.ones(16, 32, device=device))
    b8, sb = quantize_weight(torch.ones(32, 32, device=device))
    errors = []
    for out in (dtype, torch.bfloat16):
        try:
            torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb.view(1, -1), out_dtype=out)
            return None if out == dtype else out
        except (RuntimeError, ValueError) as err:
            errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
    raise ModelError(f"model.quantization fp8: torch {torch.__version__} cannot multiply float8 with row-wise scales "
                     f"on {name} ({errors[-1]}): upgrade torch (2.5 or newer), or remove model.quantization")


def check_quantization(quantization: Optional[str]) -> None:
    if quantization not in (None, *QUANTIZATIONS):
        raise ModelError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)} or none")


def use_fp8_linears(layer: nn.Module, fused: bool = False, mm_dtype: Optional[torch.dtype] = None,
                    names: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")) -> None:
    """Replaces each named 2-d Parameter of `layer` by an empty Fp8Linear of its shape on its device (the meta
    device before loading: the float16 weights are never allocated)."""
    for name in names:
        p = getattr(layer, name)
        set_projection(layer, name, Fp8Linear.empty(*p.shape, device=p.device, fused=fused, mm_dtype=mm_dtype))


def quantize_model(model: nn.Module) -> nn.Module:
    """Quantises a built model's linear weights in place (each layer's qkv/o/gate_up/down), on their device
    and without a hardware check: for models built in memory (tests; the CPU runs the float32 emulation)."""
    dev, dt = model.embed.device, model.embed.dtype
    fused, mm_dtype = check_fused_quantize(dev, dt), require_fp8(dev, dt) if dev.type == "cuda" else None
    with torch.no_grad():
        for layer in model.layers:
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                w = getattr(layer, name)
                if not isinstance(w, Fp8Linear):
                    set_projection(layer, name, Fp8Linear(*quantize_weight(w), fused, mm_dtype))
    return model


def set_projection(layer: nn.Module, name: str, value: nn.Module) -> None:
    """Puts an Fp8Linear where a Parameter (or another Fp8Linear) is: nn.Module refuses to rebind a parameter's
    name to a module."""
    if name in layer._parameters:
        del layer._parameters[name]
    setattr(layer, name, value)


def is_quantized_weight(name: str) -> bool:
    """Whether a checkpoint tensor is one of the linear weights FP8 quantises."""
    return bool(_PROJECTION.match(name))


def checkpoint_quantization(config: dict) -> Optional[str]:
    """'fp8' when a config.json says its linear weights are float8 (compressed-tensors or vLLM's fp8)."""
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if method == "fp8":
        return "fp8"
    if method == "compressed-tensors":
        for group in (q.get("config_groups") or {}).values():
            w = group.get("weights") or {}
            if w.get("type") == "float" and w.get("num_bits") == 8:
                return "fp8"
    return None if not method else str(method)


# ---- the FP8 checkpoint writer (`ziya-batch quantize`) ---------------------------------------------------------
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.index\.json|\.pt|\.pth|\.msgpack|\.h5)$")
DEFAULT_MAX_SHARD_SIZE = "2GB"
INDEX_FILE = "model.safetensors.index.json"


def write_fp8_checkpoint(src: str | Path, target: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                         device: str = "cpu", on_shard=None) -> Path:
    """Writes an FP8 copy of the Hugging Face LLaMA checkpoint `src` to `target` (a new or empty directory):
    every linear weight as float8 + weight_scale, everything else as it was; the tokenizer and other side
    files copied; config.json with QUANTIZATION_CONFIG. Tensors are read, quantised (on `device`) and written
    one at a time, so host memory holds at most one output shard (max_shard_size) and one input tensor. The
    index is written last: a target with one is complete. `on_shard(n)` after the n-th shard."""
    from safetensors.torch import save_file

    from ziya_batch.engine.merge_delta import parse_size_bytes
    from ziya_batch.engine.model import checkpoint_files, iter_checkpoint

    src, target = Path(src), Path(target)
    if not (src / "config.json").is_file():
        raise ModelError(f"{src}: no config.json; give a Hugging Face checkpoint directory")
    config = json.loads((src / "config.json").read_text())
    if checkpoint_quantization(config):
        raise ModelError(f"{src} is already quantised ({checkpoint_quantization(config)}); give the float16 checkpoint")
    try:
        checkpoint_files(str(src))
    except FileNotFoundError as err:
        raise ModelError(str(err)) from None
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ModelError(f"target {target} is not an empty directory; give a new or empty one")
    limit = parse_size_bytes(max_shard_size)
    target.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    written: list[tuple[str, list[str]]] = []       # (temporary file, tensor names)
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            tmp = target / f".shard-{len(written) + 1:05d}.tmp"
            save_file(shard, str(tmp), metadata={"format": "pt"})
            written.append((tmp.name, list(shard)))
            if on_shard is not None:
                on_shard(len(written))
        shard, size = {}, 0

    with torch.no_grad():
        for name, t in iter_checkpoint(str(src)):
            if is_quantized_weight(name):
                w8, scale = quantize_weight(t.to(dev))
                out = {name: w8.cpu(), name + "_scale": scale.cpu()}
            else:
                out = {name: t.contiguous()}
            n = sum(x.numel() * x.element_size() for x in out.values())
            if shard and size + n > limit:
                flush()
            shard.update(out)
            size += n
            total += n
    flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(target / tmp, target / final)
        weight_map.update({n: final for n in names})
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "config.json" and not _WEIGHT_FILE.search(f.name) and not f.name.startswith("."):
            shutil.copyfile(f, target / f.name)
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZATION_CONFIG},
                                                   indent=2, sort_keys=True) + "\n")
    (target / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True) + "\n")
    return target


def main(model: str, target: str, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE, device: str = "auto") -> Path:
    """`ziya-batch quantize --model DIR --target DIR`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = write_fp8_checkpoint(model, target, max_shard_size, device,
                               on_shard=lambda n: print(f"wrote shard {n}", flush=True))
    print(f"FP8 checkpoint written to {out}; load it with model.quantization: fp8")
    return out
