"""FP8 projections of LLaMA-13B's 40 layers through torch._scaled_mm with row-wise scales, as quant.Fp8Linear
runs them, with and without use_fast_accum (Hopper's tensor cores then accumulate without the periodic
promotion to float32), into float16 (cuBLASLt) and into bfloat16 (where torch may take another kernel):
milliseconds for all 40 layers per row count, against the one-byte weight floor and
the card's FP8 peak, and the relative error of each against a float32 product of the same float8 operands.
Numbers only; nothing is changed.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/fp8_gemm_accum.py [--rows 128,224,256,512,768,2048] [--tunable]"""
from __future__ import annotations

import argparse

import torch

from ziya_batch.engine import quant
from ziya_batch.tools.bandwidth import measure_copy_bandwidth_bytes_s

SHAPES = {"qkv": (15360, 5120), "o": (5120, 5120), "gate_up": (27648, 5120), "down": (5120, 13824)}
LAYERS = 40


def projection_weights(dev: torch.device, g: torch.Generator, layers: int = LAYERS
                       ) -> tuple[list[dict], int, float]:
    """`layers` layers' projections as float8 weights with per-output-channel scales (quant.quantize_weight of
    random float32 ones), their byte count and the copy bandwidth; prints the one-byte weight floor."""
    bw = measure_copy_bandwidth_bytes_s(dev) if dev.type == "cuda" else float("nan")
    w = [{k: quant.quantize_weight(torch.randn(n, kk, device=dev, generator=g) * 0.02)
          for k, (n, kk) in SHAPES.items()} for _ in range(layers)]
    wbytes = sum(n * kk for n, kk in SHAPES.values()) * layers
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; float8 weight bytes {wbytes / 1e9:.1f} GB; "
          f"floor {1e3 * wbytes / bw:.2f} ms", flush=True)
    return w, wbytes, bw


def activations(m: int, dev: torch.device, g: torch.Generator) -> dict:
    """Per projection, m rows of random float16 activations quantised per row: {name: (x8, scales)}."""
    return {k: quant.quantize_rows(torch.randn(m, kk, device=dev, generator=g).half()) for k, (n, kk) in
            SHAPES.items()}


def scaled_mm(x8: torch.Tensor, sx: torch.Tensor, w8: torch.Tensor, ws: torch.Tensor,
              out_dtype: torch.dtype = torch.float16, fast: bool = False, out: torch.Tensor | None = None):
    """quant.Fp8Linear's product: x8 [M, K] with row scales sx [M, 1], weight w8 [N, K] with scales ws [N, 1]."""
    extra = {} if out is None else {"out": out}
    return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=ws.view(1, -1), out_dtype=out_dtype,
                            use_fast_accum=fast, **extra)


def max_rel_error(layer: dict, xs: dict, product) -> float:
    """The largest relative error of product(name, x8, sx, w8, ws) over one layer's projections, against a
    float32 product of the same float8 operands."""
    errs = []
    for k, (w8, ws) in layer.items():
        x8, sx = xs[k]
        ref = (x8.float() * sx) @ (w8.float() * ws).t()
        errs.append(float((product(k, x8, sx, w8, ws).float() - ref).norm() / ref.norm()))
    return max(errs)


def timed(run) -> float:
    """Milliseconds of run(), the median of five after one warm-up."""
    run(); torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); run(); e.record(); e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="128,224,256,512,768,2048")
    p.add_argument("--tunable", action="store_true",
                   help="PyTorch's TunableOp on (torch.cuda.tunable: each shape's GEMM chosen by timing the "
                        "library's candidates at its first call); whether it covers _scaled_mm depends on the build")
    o = p.parse_args()
    if o.tunable:
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_max_tuning_iterations(20)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w, wbytes, bw = projection_weights(dev, g)
    for m in (int(r) for r in o.rows.split(",")):
        xs = activations(m, dev, g)
        res = {}
        for out_dtype, fast in ((torch.float16, False), (torch.float16, True), (torch.bfloat16, False),
                                (torch.bfloat16, True)):
            def run():
                for layer in w:
                    for k, (w8, ws) in layer.items():
                        scaled_mm(*xs[k], w8, ws, out_dtype, fast)
            ms = timed(run)
            err = max_rel_error(w[0], xs, lambda k, x8, sx, w8, ws: scaled_mm(x8, sx, w8, ws, out_dtype, fast))
            flops = 2 * m * sum(n * kk for n, kk in SHAPES.values()) * LAYERS
            res[(out_dtype, fast)] = ms
            print(f"rows {m:5d} {str(out_dtype)[6:]:8s} fast_accum={fast!s:5s}: {ms:7.2f} ms "
                  f"({1e3 * wbytes / bw / ms:4.0%} of the byte floor, "
                  f"{flops / ms / 1e9:6.0f} TFLOP/s); rel. error vs float32 {err:.2e}", flush=True)
        base = res[(torch.float16, False)]
        print(f"rows {m:5d}: against float16 out: " + ", ".join(
            f"{str(d)[6:]}{' fast' if f else ''} {base / t:.3f}x" for (d, f), t in res.items()), flush=True)


if __name__ == "__main__":
    main()
