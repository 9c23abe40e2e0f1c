"""Tiny random LLaMA models for the engine's tests (CPU and GPU) and transformers references."""
from __future__ import annotations

import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@functools.lru_cache(maxsize=None)
def tiny_llama(num_kv_heads: int = 4, seed: int = 0, vocab_size: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=num_kv_heads,
                      intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=512, rope_theta=10000.0,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).float().eval()
    # larger weights than the default init, so the logits are peaked and greedy choices are not near-ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


def markov_chain(vocab_size: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random first-order chain over ids 3..vocab_size-1: each token has a likely (0.9) and an unlikely
    (0.1) successor. Returns (likely, unlikely), each [vocab_size]."""
    g = torch.Generator().manual_seed(seed)
    likely = torch.randint(3, vocab_size, (vocab_size,), generator=g)
    unlikely = torch.randint(3, vocab_size, (vocab_size,), generator=g)
    return likely, unlikely


def chain_sequences(n: int, length: int, chain: tuple[torch.Tensor, torch.Tensor], seed: int) -> torch.Tensor:
    likely, unlikely = chain
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, length, dtype=torch.int64)
    x[:, 0] = torch.randint(3, len(likely), (n,), generator=g)
    for t in range(1, length):
        coin = torch.rand(n, generator=g) < 0.9
        x[:, t] = torch.where(coin, likely[x[:, t - 1]], unlikely[x[:, t - 1]])
    return x


def trained_tiny_llama(device: str, steps: int = 300, seed: int = 0) -> LlamaForCausalLM:
    """A tiny LLaMA trained (float32, a few seconds) on sequences of markov_chain(): its next-token
    distributions are peaked like a real language model's, so greedy choices are rarely near-ties and
    float16 parity can be asked token for token."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=256, vocab_size=300, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).float().to(device).train()
    chain = markov_chain(300, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        x = chain_sequences(64, 128, chain, seed=seed * 100_000 + step).to(device)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def hf_greedy(model: LlamaForCausalLM, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' own greedy tokens (EOS masked by min_new_tokens) and its processed logits at each step
    (the raw logits with EOS masked), whose log_softmax the engine's logprobs must equal."""
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.scores)[:, 0].float().cpu()


def load_sharded(model_dir: str, rank: int, world_size: int, device: torch.device, dtype: torch.dtype):
    """A transformers checkpoint folder loaded as tensor-parallel rank `rank` loads it in LLMEngine: only its
    shard of each projection reaches the device, then the ranks are joined."""
    from transformers import AutoConfig

    from ziya_batch.engine.model import LlamaModel, ModelArgs, iter_checkpoint
    from ziya_batch.engine.tp import attach_tp

    args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(model_dir))
    model = LlamaModel.from_state_dict(args, iter_checkpoint(model_dir, tp=(rank, world_size), args=args), device,
                                       dtype, tp=(rank, world_size))
    return attach_tp(model, rank, world_size)


def tp_generate_worker(rank: int, world_size: int, init_file: str, num_kv_heads: int, prompts: list,
                       max_new_tokens: int, n: int, num_kv_blocks: int, result_file: str, model_dir: str = "",
                       pieces: tuple[int, ...] = (), slow_piece: int = 0) -> None:
    """One process of a CPU tensor-parallel run (gloo): rank 0 schedules and writes the greedy tokens of every
    completion as JSON to result_file; the other ranks follow. The model is tiny_llama(num_kv_heads), built
    whole and sharded by apply_tp, or, with model_dir (that model saved there), loaded sharded. With pieces
    (token-count buckets), every rank runs the steps that fit them through the mixed-step pieces, eagerly. With
    slow_piece, rank 1 alone times its projections as slow at that bucket: the ranks must still keep the same
    buckets (each writes those it kept to result_file + ".rank<N>.buckets")."""
    import json

    import torch.distributed as dist

    from ziya_batch.engine.engine import LLMEngine
    from ziya_batch.engine.model import from_hf_model
    from ziya_batch.engine.tp import apply_tp, enable_tp_driver, serve_follower
    from ziya_batch.engine.types import EngineConfig, Request, SamplingParams

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        if model_dir:
            model = load_sharded(model_dir, rank, world_size, torch.device("cpu"), torch.float32)
        else:
            model = apply_tp(from_hf_model(tiny_llama(num_kv_heads), torch.device("cpu"), torch.float32), rank,
                             world_size)
        eng = LLMEngine.from_model(model, None, EngineConfig(model_path="", device="cpu", block_size=4,
                                                             max_num_batched_tokens=64, num_kv_blocks=num_kv_blocks,
                                                             admission_horizon_tokens=0))
        if pieces:
            from ziya_batch.engine import runner as runner_mod
            from ziya_batch.engine.piecewise import MixedStepGraphs
            buckets = list(pieces)
            if slow_piece:
                runner_mod.projection_seconds = lambda model, sizes: [
                    float(b) * (100.0 if rank == 1 and b == slow_piece else 1.0) for b in sizes]
                buckets = eng.runner._prune("mixed", buckets)
                with open(f"{result_file}.rank{rank}.buckets", "w") as fh:
                    json.dump(buckets, fh)
            eng.runner.mixed = MixedStepGraphs(eng.model, eng.kv_caches, buckets, eng.runner.scratch_slot,
                                               eng.device, capture=False)
        if rank == 0:
            driver = enable_tp_driver(eng)
            params = SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, temperature=0.0,
                                    n=n)
            outs = eng.generate([Request(str(i), p, params) for i, p in enumerate(prompts)])
            driver.stop()
            with open(result_file, "w") as fh:
                json.dump({"tokens": [[c.token_ids for c in o.completions] for o in outs],
                           "preemptions": eng.scheduler.num_preemptions}, fh)
        else:
            serve_follower(eng)
    finally:
        dist.destroy_process_group()


def tp_generate_worker_cuda(rank: int, world_size: int, init_file: str, model_dir: str, prompts: list,
                            max_new_tokens: int, result_file: str) -> None:
    """One process of a GPU tensor-parallel run (NCCL, GPU `rank`, float16, CUDA graphs): the transformers
    checkpoint at model_dir, sharded; rank 0 writes the greedy tokens of every prompt as JSON to result_file."""
    import json
    import os
    import sys

    import torch.distributed as dist

    from ziya_batch.engine.engine import LLMEngine
    from ziya_batch.engine.tp import enable_tp_driver, serve_follower
    from ziya_batch.engine.types import EngineConfig, Request, SamplingParams

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            device_id=device)
    model = load_sharded(model_dir, rank, world_size, device, torch.float16)
    eng = LLMEngine.from_model(model, None, EngineConfig(model_path="", dtype="float16", device=f"cuda:{rank}",
                                                         num_kv_blocks=512, max_num_batched_tokens=256))
    if rank == 0:
        driver = enable_tp_driver(eng)
        params = SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, temperature=0.0)
        outs = eng.generate([Request(str(i), p, params) for i, p in enumerate(prompts)])
        driver.stop()
        with open(result_file, "w") as fh:
            json.dump([o.completions[0].token_ids for o in outs], fh)
    else:
        serve_follower(eng)
    sys.stdout.flush()
    os._exit(0)     # no destroy_process_group: it can wait forever while captured graphs hold the communicator


def tp_switch_worker(rank: int, world_size: int, init_file: str, specs_json: list, prompts: list,
                     max_new_tokens: int, result_file: str, on_gpu: bool = False) -> None:
    """One process of a tensor-parallel replica that switches models (CPU and gloo, or with on_gpu GPU `rank`,
    NCCL and CUDA graphs): rank 0 serves the job specs in order through a TPModelCache (each switch tells the
    other ranks first) and writes the greedy tokens per spec as JSON to result_file; the other ranks follow,
    loading what rank 0 tells them to."""
    import datetime
    import json
    import os
    import sys
    import traceback

    import torch.distributed as dist

    from ziya_batch.engine.engine import LLMEngine
    from ziya_batch.engine.tp import PlanBroadcaster, serve_follower
    from ziya_batch.engine.types import Request, SamplingParams
    from ziya_batch.work.models import TPModelCache, engine_config
    from ziya_batch.spec import JobSpec

    torch.set_num_threads(1)
    device = f"cuda:{rank}" if on_gpu else "cpu"
    # a rank that misses a collective fails the test in a minute instead of hanging it for gloo's 30
    timeout = datetime.timedelta(seconds=60)
    if on_gpu:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timeout, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timeout)
    try:
        if rank == 0:
            driver = PlanBroadcaster()
            cache = TPModelCache(device, world_size, driver)
            params = SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, temperature=0.0)
            got = []
            for raw in specs_json:
                eng = cache.engine(JobSpec.model_validate_json(raw))
                got.append([o.completions[0].token_ids
                            for o in eng.generate([Request(str(i), p, params) for i, p in enumerate(prompts)])])
                # as a worker does: the cache holds the only reference, so a switch frees the GPU memory (with
                # this one left, the next model found no room for its KV cache)
                eng = None
            driver.stop()
            with open(result_file, "w") as fh:
                json.dump(got, fh)
        else:
            def load(raw: str):
                from ziya_batch.work.models import release_memory

                release_memory(device)        # what serve_follower dropped, as the replica's actor does
                return LLMEngine(engine_config(JobSpec.model_validate_json(raw), device),
                                 tensor_parallel=(rank, world_size))
            serve_follower(None, on_load=load)
    except BaseException:
        if on_gpu:
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
        raise
    finally:
        if on_gpu:
            sys.stdout.flush()
            os._exit(0)     # no destroy_process_group: it can wait while captured graphs hold the communicator
        dist.destroy_process_group()
