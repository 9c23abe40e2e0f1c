"""FP8 weights (W8A8): the linear layers' weights in float8 e4m3 with one float32 scale per output channel,
activations quantised per token on the fly, products through torch._scaled_mm's row-wise scaling (sm_89+).

A decode step of the 13B shape is bound by reading the weights; float8 halves those bytes. Embeddings, norms
and lm_head stay in the model dtype (lm_head's error would go straight into the logprobs).

Checkpoint layout (written by fp8_checkpoint.py, `ziya-batch quantize`; read by model.from_state_dict), that
of llm-compressor's FP8_DYNAMIC scheme ("compressed-tensors", read by vLLM and transformers):
    layers.N.self_attn.q_proj.weight        float8_e4m3fn [out, in]
    layers.N.self_attn.q_proj.weight_scale  float32 [out, 1]        w ~= weight.float() * weight_scale
The reader also takes a per-tensor scale ([] or [1], vLLM's "fp8" method) and ignores static input_scale
tensors: activations always get a dynamic per-token scale here."""
from __future__ import annotations

import logging
import re
from typing import Optional

import torch
import torch.nn as nn

from ziya_batch.engine import fused as fused_kernels
from ziya_batch.engine.fused import QuantizedRows
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


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (float8 [M, K], float32 scale [M, 1]) with x ~= q * scale, each row scaled so its largest
    magnitude maps to 448. Device ops only (no host sync): safe inside a CUDA graph."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_(min=_MIN_SCALE)   # [M, 1]
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


if triton is not None:
    from ziya_batch.engine.fused import fp8_abs_max, fp8_row_scale, fp8_values

    @triton.jit
    def _quantize_rows_kernel(X, Q, S, stride_x, stride_q, K: tl.constexpr, BLOCK: tl.constexpr):
        # one row: its amax (first pass), then x / scale rounded to float8 (second pass); quantize_rows' math
        row = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
            acc = fp8_abs_max(acc, x)
        scale = fp8_row_scale(tl.max(acc, axis=0))
        tl.store(S + row, scale)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
            tl.store(Q + row * stride_q + cols, fp8_values(x, scale).to(Q.dtype.element_ty),
                     mask=cols < K)


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


def check_fused_norm_quantize(device: torch.device, dtype: torch.dtype, hidden: int = 5120) -> bool:
    """True when fused.add_rms_norm(quantize=True) gives exactly the residual, float8 bytes and scales of
    add_rms_norm followed by quantize_rows_fused (then a norm hands an Fp8Linear its rows quantised, one kernel
    instead of two, for qkv_proj and gate_up_proj), on rows of the model's hidden size; False off the GPU,
    without Triton or if anything differs. Synchronises: call at load."""
    def same() -> bool:
        g = torch.Generator(device=device).manual_seed(1)
        T, N = 37, hidden
        h = torch.randn(T, N, device=device, dtype=dtype, generator=g) * torch.logspace(
            -2, 2, T, device=device).to(dtype)[:, None]
        x = torch.randn(T, N, device=device, dtype=dtype, generator=g)
        w = torch.rand(N, device=device, dtype=dtype, generator=g) + 0.5
        h1, h2 = h.clone(), h.clone()
        want_q, want_s = quantize_rows_fused(fused_kernels.add_rms_norm(h1, x, w, 1e-6))
        got = fused_kernels.add_rms_norm(h2, x, w, 1e-6, quantize=True)
        return torch.equal(h1, h2) and _same_rows(got, want_q, want_s, dtype)
    return _fusion_agrees("the norm", device, same)


def check_fused_silu_quantize(device: torch.device, dtype: torch.dtype, intermediate: int = 13824) -> bool:
    """True when fused.silu_mul(quantize=True) gives exactly the float8 bytes and scales of silu_mul followed by
    quantize_rows_fused (then down_proj gets its rows quantised from the kernel that makes them) on rows of the
    model's intermediate size; False off the GPU, without Triton or if anything differs. Synchronises: call at
    load."""
    def same() -> bool:
        g = torch.Generator(device=device).manual_seed(2)
        T, N = 37, intermediate
        gu = torch.randn(T, 2 * N, device=device, dtype=dtype, generator=g) * torch.logspace(
            -2, 2, T, device=device).to(dtype)[:, None]
        gu[3] = 0
        want_q, want_s = quantize_rows_fused(fused_kernels.silu_mul(gu))
        return _same_rows(fused_kernels.silu_mul(gu, quantize=True), want_q, want_s, dtype)
    return _fusion_agrees("SiLU·up", device, same)


def _same_rows(got: QuantizedRows, want_q: torch.Tensor, want_s: torch.Tensor, dtype: torch.dtype) -> bool:
    return (torch.equal(got.q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(got.scale, want_s)
            and got.dtype == dtype)


def _fusion_agrees(what: str, device: torch.device, same) -> bool:
    """same() on the GPU: False off it, without Triton, if it raises (a Triton that cannot build the kernel) or
    returns False; each logged once, with the two kernels doing the work instead."""
    if triton is None or device.type != "cuda":
        return False
    try:
        ok = bool(same())
    except Exception as err:  # noqa: BLE001 - a Triton that cannot build it: the two kernels do the work
        log.warning("%s cannot quantise its rows for FP8 projections here (%s); quantising apart", what, err)
        return False
    if not ok:
        log.warning("%s's quantised rows differ from the two kernels' here; quantising apart", what)
    return ok


def check_fused_rows(device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int) -> dict[str, bool]:
    """Per projection, whether the kernel before it may hand it its rows quantised (Fp8Linear.takes_rows):
    qkv_proj and gate_up_proj where the norms agree byte for byte with quantising apart
    (check_fused_norm_quantize), down_proj where SiLU·up does (check_fused_silu_quantize; intermediate: the
    columns of its rows, a tensor-parallel rank's share where the loader shards). Each check stands alone, so
    one failing leaves the other fusion on. o_proj is never handed rows (the attention's output is float)."""
    norms = check_fused_norm_quantize(device, dtype, hidden)
    return dict(qkv_proj=norms, o_proj=False, gate_up_proj=norms,
                down_proj=check_fused_silu_quantize(device, dtype, intermediate))


def cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0; float8 through its bytes (not every torch build concatenates float8 on every
    device, while a byte view of the same size always works)."""
    if tensors[0].dtype == FP8:
        return torch.cat([t.view(torch.uint8) for t in tensors]).view(FP8)
    return torch.cat(tensors)


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
    projection's float16 Parameter in model.Layer (model.linear calls it)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, fused: bool = False,
                 mm_dtype: Optional[torch.dtype] = None, takes_rows: bool = False):
        super().__init__()
        self.register_buffer("weight", weight)     # [N, K] float8_e4m3fn
        self.register_buffer("scale", scale)       # [N, 1] float32
        self.fused = fused                         # activations through quantize_rows_fused (check_fused_quantize)
        self.mm_dtype = mm_dtype                   # _scaled_mm's output dtype if not x's (require_fp8)
        # the norm before it may hand it rows it quantised itself (fused.QuantizedRows; check_fused_norm_quantize)
        self.takes_rows = takes_rows
        self.fast_accum = False                    # _scaled_mm's use_fast_accum (set_fast_accum)

    @classmethod
    def empty(cls, rows: int, cols: int, device=None, fused: bool = False,
              mm_dtype: Optional[torch.dtype] = None, takes_rows: bool = False) -> "Fp8Linear":
        return cls(torch.empty(rows, cols, dtype=FP8, device=device),
                   torch.empty(rows, 1, dtype=torch.float32, device=device), fused, mm_dtype, takes_rows)

    def like(self, weight: torch.Tensor, scale: torch.Tensor) -> "Fp8Linear":
        """Another weight (a tensor-parallel shard) with this one's kernel choices."""
        other = Fp8Linear(weight, scale, self.fused, self.mm_dtype, self.takes_rows)
        other.fast_accum = self.fast_accum
        return other

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def forward(self, x, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [T, K] float16/bfloat16, or those rows already quantised (fused.QuantizedRows) -> [T, N] in x's
        # dtype (written into out when given: a static buffer of a captured graph, contiguous [T, N])
        if isinstance(x, QuantizedRows):
            x8, sx, dtype = x
        elif x.device.type != "cuda":
            y = fp8_linear_reference(x, self.weight, self.scale)
            return y if out is None else out.copy_(y)
        else:
            x, dtype = x.contiguous(), x.dtype     # _scaled_mm wants a row-major first operand
            x8, sx = quantize_rows_fused(x) if self.fused else quantize_rows(x)
        # weight.t() is [K, N] column-major, as _scaled_mm wants its second operand; [N, 1] -> [1, N] is a view
        args = dict(scale_a=sx, scale_b=self.scale.view(1, -1), out_dtype=self.mm_dtype or dtype,
                    use_fast_accum=self.fast_accum)
        if out is not None and self.mm_dtype is None:
            return torch._scaled_mm(x8, self.weight.t(), **args, out=out)
        y = torch._scaled_mm(x8, self.weight.t(), **args)
        y = y if y.dtype == dtype else y.to(dtype)
        return y if out is None else out.copy_(y)


def set_fast_accum(model: nn.Module, on: bool) -> int:
    """Sets use_fast_accum on every Fp8Linear of model (EngineConfig.fp8_fast_accum); returns how many there are.
    The CPU's float32 emulation has no such mode: it ignores the flag."""
    n = 0
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.fast_accum, n = bool(on), n + 1
    return n


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
                    takes_rows: Optional[dict[str, bool]] = None,
                    names: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")) -> None:
    """Replaces each named 2-d Parameter of `layer` by an empty Fp8Linear of its shape on its device (the meta
    device before loading: the float16 weights are never allocated); takes_rows: check_fused_rows' answer."""
    for name in names:
        p = getattr(layer, name)
        set_projection(layer, name, Fp8Linear.empty(*p.shape, device=p.device, fused=fused, mm_dtype=mm_dtype,
                                                    takes_rows=bool((takes_rows or {}).get(name))))


def quantize_model(model: nn.Module) -> nn.Module:
    """Quantises a built model's linear weights in place (each layer's qkv/o/gate_up/down), on their device
    and without a hardware check: for models built in memory (tests; the CPU runs the float32 emulation)."""
    dev, dt = model.embed.device, model.embed.dtype
    fused, mm_dtype = check_fused_quantize(dev, dt), require_fp8(dev, dt) if dev.type == "cuda" else None
    takes_rows = check_fused_rows(dev, dt, model.args.hidden_size, model.layers[0].down_proj.shape[1]) if fused \
        else {}
    with torch.no_grad():
        for layer in model.layers:
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                w = getattr(layer, name)
                if not isinstance(w, Fp8Linear):
                    set_projection(layer, name, Fp8Linear(*quantize_weight(w), fused, mm_dtype,
                                                          bool(takes_rows.get(name))))
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
