"""tensor_parallel 2 over two GPUs (NCCL, float16, CUDA graphs) against tensor_parallel 1, on a model whose
next-token distributions are peaked (briefly trained, see testing.trained_tiny_llama). Skipped without two
CUDA GPUs."""
from __future__ import annotations

import json
import random

import pytest
import torch

from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.testing import chain_sequences, markov_chain, tp_generate_worker_cuda, trained_tiny_llama
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def test_tensor_parallel_2_matches_1_in_float16(tmp_path):
    import torch.multiprocessing as mp

    model_dir = tmp_path / "model"
    trained_tiny_llama("cuda:0").save_pretrained(str(model_dir))
    rng = random.Random(5)
    seqs = chain_sequences(40, 200, markov_chain(300, 0), seed=991)
    ps = [seqs[i, :rng.randint(4, 200)].tolist() for i in range(40)]
    result = tmp_path / "tp2.json"
    mp.spawn(tp_generate_worker_cuda, args=(2, str(tmp_path / "init"), str(model_dir), ps, 32, str(result)),
             nprocs=2, join=True)
    two = json.loads(result.read_text())
    from transformers import LlamaForCausalLM
    eng = LLMEngine.from_model(LlamaForCausalLM.from_pretrained(str(model_dir)).to("cuda:0"), None,
                               EngineConfig(model_path="", dtype="float16", device="cuda:0", block_size=16,
                                            num_kv_blocks=512, max_num_batched_tokens=256))
    params = SamplingParams(max_new_tokens=32, min_new_tokens=32, temperature=0.0)
    one = [o.completions[0].token_ids for o in eng.generate([Request(str(i), p, params) for i, p in enumerate(ps)])]
    same = sum(a == b for a, b in zip(one, two))
    assert same >= 0.95 * len(ps), f"{same} of {len(ps)} prompts equal for 32 tokens"
