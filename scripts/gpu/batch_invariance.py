"""How often float16 greedy decoding of LLaMA-13B's shape with random weights changes when only the batch
changes (same engine code, same weights, one GPU). Random weights give near-uniform logits, so the top two
tokens are often closer than float16's rounding; a different batch composition (other GEMM tiles, other
graph buckets) then flips the argmax. This is the floor for any comparison of two float16 runs on such a
checkpoint, tensor parallel 2 against 1 included.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/batch_invariance.py [--prompts 64] [--tokens 32]"""
from __future__ import annotations

import argparse
import random

import torch

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.model import PRESETS, LlamaModel, ModelArgs
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams


def run(model, prompts, tokens: int, max_num_seqs: int, budget: int) -> list[tuple[list[int], list[float]]]:
    cfg = EngineConfig(model_path="", dtype="float16", max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                       max_model_len=1024, num_kv_blocks=len(prompts) * 40)
    eng = LLMEngine.from_model(model, None, cfg)
    p = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    outs = eng.generate([Request(str(i), ids, p) for i, ids in enumerate(prompts)])
    res = [(o.completions[0].token_ids, o.completions[0].logprobs) for o in outs]
    del eng
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=40)
    args = ap.parse_args()
    a = ModelArgs(**{**PRESETS["13B"], "num_layers": args.layers})
    model = LlamaModel.random(a, torch.device("cuda"), torch.float16, seed=0)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, a.vocab_size) for _ in range(rng.randint(32, 512))] for _ in range(args.prompts)]
    big = run(model, prompts, args.tokens, 64, 2048)
    small = run(model, prompts, args.tokens, 5, 256)
    again = run(model, prompts, args.tokens, 64, 2048)
    same = sum(x[0] == y[0] for x, y in zip(big, small))
    repeat = sum(x[0] == y[0] for x, y in zip(big, again))
    print(f"batch 64 vs batch 5: first {args.tokens} greedy tokens equal for {same}/{len(prompts)} prompts "
          f"({100 * same / len(prompts):.0f}%); batch 64 run twice: {repeat}/{len(prompts)}")
    gaps = []
    for (ta, la), (tb, lb) in zip(big, small):
        k = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        if k is not None:
            # at the first difference both runs agree on the prefix; each picked its own argmax: how far apart
            # were the two picks' log-probabilities (each in its own run)?
            gaps.append((k, la[k], lb[k]))
    for k, x, y in gaps[:16]:
        print(f"  diverges at token {k}: logprob of the pick {x:.4f} (batch 64) vs {y:.4f} (batch 5)")


if __name__ == "__main__":
    main()
