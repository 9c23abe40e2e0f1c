"""The FP8 quality gate on a trained checkpoint of LLaMA-13B's shape (issue 23, part 2).

1. Trains (or reuses) the checkpoint of `bench_stack.py --trained-steps`: the 13B shape trained on prompts in
   Ziya's format, each followed by a Markov chain from the prompt text's last token, so that after a prompt its
   next-token distributions are peaked like a real model's (random weights make most greedy choices near-ties).
   Training the 40-layer shape with AdamW after each backward needs ~96 GiB (bfloat16): on an H200 it trains so;
   on an H100 AdamW steps each parameter inside the backward pass instead (~74 GiB: weights and moments, never
   all gradients; the same update, without clipping to a global norm; bench_stack.adamw_in_backward; measured
   peak 73.2 GiB, 739 steps in 450 s).
2. Builds `--prompts` prompts the way the workers do (Ziya's format around 8..64 tokens of the shipped corpus).
3. Runs greedy generation of `--tokens` tokens (EOS ignored) with the engine on float16 weights, on FP8 weights
   (quantised at load), on FP8 weights with the float8 KV cache, and on those with the FP8 GEMMs' fast
   accumulation (EngineConfig.fp8_fast_accum), one engine at a time, CUDA graphs on.
   Each variant's output is kept beside the checkpoint (generated-PxT.json) as soon as it is in, so a call its
   time limit stops leaves the checkpoint and those to the next call on the machine, which does only the rest.
4. Per variant against float16: prompts whose tokens are all equal, and the mean absolute difference of the chosen
   tokens' raw logprobs over the tokens before a prompt's first divergence. The gate: >= 90% equal, mean < 0.05.

Usage (GPU machine, repo root): python scripts/gpu/fp8_quality.py --work /tmp/stack --out $OUT
Writes $OUT/fp8_quality.json."""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _bench_stack():
    spec = importlib.util.spec_from_file_location("bench_stack", HERE / "bench_stack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_prompts(model_dir: Path, n: int, seed: int = 1) -> list[list[int]]:
    from transformers import AutoTokenizer

    from ziya_batch.prompts import build_prompt
    from ziya_batch.tools.demo_model import corpus_text

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok(corpus_text(), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(8, 64)
        off = rng.randrange(0, len(text) - k)
        out.append(tok(build_prompt(tok.decode(text[off:off + k]).strip() or "hello"))["input_ids"])
    return out


def generate(model_dir: Path, prompts: list[list[int]], tokens: int, quantization, kv_cache_dtype: str,
             fast_accum: bool = False) -> dict:
    from transformers import AutoConfig

    from ziya_batch.engine.engine import LLMEngine
    from ziya_batch.engine.model import LlamaModel, ModelArgs, iter_checkpoint
    from ziya_batch.engine.types import EngineConfig, Request, SamplingParams

    t0 = time.time()
    args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(str(model_dir)))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = LlamaModel.from_state_dict(args, iter_checkpoint(str(model_dir)), dev, dtype, quantization=quantization)
    eng = LLMEngine.from_model(model, None, EngineConfig(model_path=str(model_dir), dtype=str(dtype)[6:],
                                                         device=dev.type, kv_cache_dtype=kv_cache_dtype,
                                                         gpu_memory_fraction=0.9, fp8_fast_accum=fast_accum))
    load_s = time.time() - t0
    params = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0, ignore_eos=True,
                            logprobs_mode="raw")
    t0 = time.time()
    outs = eng.generate([Request(str(i), p, params) for i, p in enumerate(prompts)])
    gen_s = time.time() - t0
    res = {o.request_id: [[int(t) for t in o.completions[0].token_ids], [float(x) for x in o.completions[0].logprobs]]
           for o in outs}
    del eng, model, outs
    gc.collect()
    torch.cuda.empty_cache()
    print(f"[quality] {quantization or 'float16'} weights{' (fast accumulation)' if fast_accum else ''}, KV "
          f"{kv_cache_dtype}: loaded in {load_s:.0f} s, "
          f"generated in {gen_s:.1f} s", flush=True)
    return res


def compare(ref: dict, got: dict) -> dict:
    same, diffs, first_div = 0, [], []
    for rid, (ids, lps) in ref.items():
        g_ids, g_lps = got[rid]
        same += ids == g_ids
        for j, (a, b, la, lb) in enumerate(zip(ids, g_ids, lps, g_lps)):
            if a != b:
                first_div.append(j)
                break
            diffs.append(abs(la - lb))
    return dict(prompts=len(ref), equal=same, fraction=same / max(1, len(ref)),
                mean_abs_dlogprob=statistics.mean(diffs) if diffs else None,
                median_first_divergence=statistics.median(first_div) if first_div else None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/stack")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--shape", default="13B", help="13B, or small for a check of this script without a GPU")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--embed-lr-mult", type=float, default=10.0)
    p.add_argument("--train-max-s", type=float, default=370,
                   help="training stops after this long, its learning rate annealed by then (bench_stack.lr_scale)")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    sys.path.insert(0, str(HERE.parent.parent))
    stack = _bench_stack()
    model_dir = Path(a.work) / f"model-trained{a.steps}"
    trained = stack.train_checkpoint(model_dir, a.layers, a.shape, a.steps, lr=a.lr, embed_lr_mult=a.embed_lr_mult,
                                     max_s=a.train_max_s)
    prompts = make_prompts(model_dir, a.prompts)
    # each variant's tokens and logprobs kept beside the checkpoint as soon as they are in: a call stopped by its
    # time limit leaves them to the next, which generates only what is missing
    done_file = model_dir / f"generated-{a.prompts}x{a.tokens}.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}

    def generated(name: str, *variant) -> dict:
        if name not in done:
            done[name] = generate(model_dir, prompts, a.tokens, *variant)
            done_file.write_text(json.dumps(done))
        else:
            print(f"[quality] {name}: generated by an earlier call ({done_file})", flush=True)
        return done[name]

    ref = generated("float16", None, "auto")
    result = dict(card=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", commit=os.environ.get("ZIYA_BATCH_COMMIT", "unknown"),
                  trained=trained, prompts=a.prompts, tokens=a.tokens, variants={})
    variants = (("fp8 weights", "fp8", "auto", False), ("fp8 weights + fp8 KV cache", "fp8", "fp8", False),
                ("fp8 weights + fp8 KV cache, fast accumulation", "fp8", "fp8", True))
    if not torch.cuda.is_available():      # a check of the script: FP8 weights need an FP8 GPU
        variants = (("float16 again", None, "auto", False),)
    for name, q, kv, fast in variants:
        result["variants"][name] = r = compare(ref, generated(name, q, kv, fast))
        r["gate"] = bool(r["fraction"] >= 0.9 and r["mean_abs_dlogprob"] is not None and r["mean_abs_dlogprob"] < 0.05)
        print(f"[quality] {name}: {r}", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "fp8_quality.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
