"""The decode-attention kernels compiled for an H100 (sm_90a) on any machine, GPU or not, and what their main loop
is made of: Triton builds the cubin with its bundled ptxas, cuobjdump disassembles it, and this counts the
instructions between the loop's two branches by opcode. Integer arguments that are multiples of 16 at run time
(pointers, strides) are specialised as Triton's launcher does, or the loads would not be vectorised as they are
on the GPU. Needs `triton` (pip install triton; no GPU).

Read on 2026-12-06 (Triton 3.6 of PyPI): the CUDA-core kernel's loop over a float8 cache, (32, 1, 2), is ~1,110
instructions a warp for 8 KB of K and V, against ~1,190 for 16 KB over a float16 cache: twice the issue slots a
byte (at 3.2 TB/s about half of an H100's), a third of them conversions (F2FP.F16.E4M3.UNPACK_B and HADD2.F32);
the tensor-core kernel over a float8 cache reads its tile back from shared memory a byte at a time (LDS.U8)
before converting it, where over a float16 cache it uses ldmatrix (LDSM). A tensor-core kernel reading the float8
cache as int32 words, converted in registers before the dots, compiled to ~0.09 warp-instructions a byte against
"fma"'s 0.14, yet ran slower than both on an H100 (80-86% of the floor against 88%): the float8 kernel is not
bound by instruction issue, and that kernel was removed.

"half" (products and tile sums in float16, a variant for float8 caches, 2026-12-06; not the tuner's candidate):
the same (32, 1, 2) loop over a float8 cache compiles to ~850 instructions (0.104 a byte), conversions on to
float32 gone.

Usage: PYTHONPATH=. python scripts/triton_sass.py [--kv fp8e4nv|fp16] [--kernel fma|dot|half] [--config 32,1,2]"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ziya_batch.engine import attention as A

ARGS = ["Q", "K", "V", "O", "BT", "CTX", "scale", "stride_qb", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
        "stride_btb", "stride_ob", "stride_oh"]


def compile_decode(kv: str, kernel: str, bn: int, warps: int, stages: int, heads_first: bool = True):
    sig = dict(zip(ARGS, ["*fp16", f"*{kv}", f"*{kv}", "*fp16", "*i32", "*i32", "fp32"] + ["i32"] * 8))
    consts = dict(GROUP=1, BS=16, BLOCK_N=bn, D=128, NUM_STAGES=stages, HEADS_FIRST=heads_first)
    fn = A._paged_decode_kernel
    if kernel in ("fma", "half"):
        consts.update(HALF=kernel == "half")
    else:
        consts.update(M=16, PRECISION="tf32")
        fn = A._paged_decode_dot_kernel
    sig.update({k: "constexpr" for k in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(ARGS) if n != "scale"}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def loop_mix(cubin: bytes) -> tuple[collections.Counter, int, int]:
    """Opcode counts of the instructions between the first two branches (the main loop), the loop's length and
    the kernel's."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = [m.group(2) for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)]
    branches = [i for i, op in enumerate(ops) if op.startswith("BRA")]
    lo, hi = (branches[0], branches[1]) if len(branches) > 1 else (0, len(ops))
    return collections.Counter(ops[lo:hi]), hi - lo, len(ops)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kv", default="fp8e4nv,fp16")
    p.add_argument("--kernel", default="fma,dot")
    p.add_argument("--config", default="32,1,2;64,2,3", help="BLOCK_N,warps,stages; several separated by ;")
    o = p.parse_args()
    for kv in o.kv.split(","):
        for kernel in o.kernel.split(","):
            for cfg in o.config.split(";"):
                bn, warps, stages = (int(x) for x in cfg.split(","))
                k = compile_decode(kv, kernel, bn, warps, stages)
                mix, n, total = loop_mix(k.asm["cubin"])
                tile = bn * 128 * 2 * (1 if kv.startswith("fp8") else 2)        # K and V bytes an iteration
                print(f"{kernel} {kv} (BLOCK_N {bn}, {warps} warps, {stages} stages): loop {n} of {total} "
                      f"instructions, {n * warps / tile:.3f} warp-instructions a byte; dynamic shared memory "
                      f"{k.metadata.shared} B; " + ", ".join(f"{c} {op}" for op, c in mix.most_common(10)))


if __name__ == "__main__":
    main()
