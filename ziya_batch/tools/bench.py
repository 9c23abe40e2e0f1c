"""The throughput benchmark (README, `ziya-batch bench`; docs/BENCHMARKS.md): LLaMA-13B's shape with random float16 weights made on
the GPU, workload W1 (prompt and output lengths uniform in 32..512, EOS ignored), and in one run:
our engine, the model card's method (transformers `generate` on static left-padded batches), transformers'
own continuous batching, and the decode roofline (weights + KV bytes of every decode step the engine ran,
over the measured device copy bandwidth).

The two transformers baselines are slow, so each runs on the first requests of the workload for a bounded
time and reports tokens/s over what it finished; the table's note says how much that was."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import inspect
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ziya_batch import settings
from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.kv_cache import KV_CACHE_DTYPES, kv_bytes_per_token
from ziya_batch.engine.model import PRESETS, LlamaModel, ModelArgs
from ziya_batch.engine.scheduler import POLICIES
from ziya_batch.engine.types import LOGPROBS_MODES, PAD_ID, EngineConfig, Request, SamplingParams
from ziya_batch.errors import ModelError

METHODS = ("engine", "hf-generate", "hf-continuous", "roofline")
SECTION = "## Engine (workload W1)"
# the part of SECTION that --markdown rewrites; the section's other subsections are hand-written notes
GENERATED = "### Last `ziya-batch bench --markdown` run"
HF_GENERATE_BUDGET_S = 60.0      # wall-clock cap per transformers baseline
HF_CONTINUOUS_BUDGET_S = 75.0
HF_CONTINUOUS_REQUESTS = 256


@dataclass
class BenchOptions:
    """What one run measures; `parser()` builds the command line (of `ziya-batch bench` too) from these."""
    layers: int = PRESETS["13B"]["num_layers"]
    requests: int = 1024
    tensor_parallel: int = 1
    markdown: Optional[str] = None
    only: tuple[str, ...] = ()
    seed: int = 0
    schedule: str = EngineConfig.schedule
    kv_cache_dtype: str = EngineConfig.kv_cache_dtype
    workload: str = "W1"             # W1 | W2 | W2g (workload_w2, workload_w2g) | W3 (bench_w3: W1 under a JSON schema)
    prefix_caching: str = "on"       # on | off | both (one engine row each)
    quantization: Optional[str] = EngineConfig.quantization    # "fp8": float8 linear weights (engine/quant.py)
    # extra engine runs of W1, one per variant: a logprobs mode, optionally with top logprobs ("processed",
    # "temperature", "temperature+top5"), to measure what experience.logprobs_mode / top_logprobs cost
    logprobs: tuple[str, ...] = ()


# the engine the bench runs: the engine's defaults (float16 on the GPU) but W1's prompt + output within 1,024
# positions, and a larger share of the GPU (nothing else runs on it)
BENCH_ENGINE = EngineConfig(model_path="", max_model_len=1024, gpu_memory_fraction=0.95)


def parse_logprobs_variant(v: str) -> dict:
    """'temperature+top5' -> {logprobs_mode: 'temperature', top_logprobs: 5}."""
    mode, _, top = v.partition("+top")
    if mode not in LOGPROBS_MODES or (top and not (top.isdigit() and int(top) <= 20)):
        raise ModelError(f"bench --logprobs: {v!r} is not MODE or MODE+topK (MODE one of {', '.join(LOGPROBS_MODES)}; "
                         "K 0..20), e.g. temperature,processed,temperature+top5")
    return {"logprobs_mode": mode, "top_logprobs": int(top or 0)}


def workload_w1(num_requests: int, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request: both lengths uniform in 32..512, ids random (no EOS, id 2)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        plen, olen = rng.randint(32, 512), rng.randint(32, 512)
        out.append(([rng.randrange(3, vocab_size) for _ in range(plen)], olen))
    return out


def measure_copy_bandwidth_bytes_s(device: torch.device) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written over the median time."""
    a = torch.empty(1 << 29, dtype=torch.float16, device=device).normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); b.copy_(a); e.record(); e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * (1 << 30) / sorted(times[2:])[len(times[2:]) // 2]


def _args(layers: int) -> ModelArgs:
    return ModelArgs(**{**PRESETS["13B"], "num_layers": layers})


def _weight_bytes(a: ModelArgs, quantization: Optional[str] = None) -> int:
    per_layer = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim * a.hidden_size + a.hidden_size * a.num_heads * \
        a.head_dim + 3 * a.hidden_size * a.intermediate_size
    # fp8: 1 byte a linear weight plus a float32 scale per output row; embedding and lm_head stay float16
    rows = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + 2 * a.hidden_size + 2 * a.intermediate_size
    linear = a.num_layers * (per_layer + 4 * rows) if quantization == "fp8" else 2 * a.num_layers * per_layer
    return linear + 2 * 2 * a.vocab_size * a.hidden_size


def _sampling(out_len: int, n: int = 1, **logprobs) -> SamplingParams:
    # the model card's sampling (SamplingParams' defaults), EOS ignored so every request runs to its own length
    return SamplingParams(max_new_tokens=out_len, ignore_eos=True, n=n, **logprobs)


CARD = SamplingParams()       # the model card's temperature and top_p, for the transformers baselines


def _build_engine(a: ModelArgs, device, seed: int, rank: int = 0, world_size: int = 1,
                  schedule: str = BenchOptions.schedule,
                  kv_cache_dtype: str = BenchOptions.kv_cache_dtype, **config) -> tuple[LLMEngine, float]:
    """The random-weight engine; with world_size > 1, this rank's tensor-parallel shard (every rank makes the
    same weights from the seed, then keeps its share)."""
    from ziya_batch.engine.tp import apply_tp
    model = apply_tp(LlamaModel.random(a, device, torch.float16, seed, config.get("quantization")), rank,
                     world_size)
    t_init = time.perf_counter()
    eng = LLMEngine.from_model(model, None, dataclasses.replace(BENCH_ENGINE, schedule=schedule,
                                                                kv_cache_dtype=kv_cache_dtype, **config))
    return eng, time.perf_counter() - t_init


def bench_engine(a: ModelArgs, work, device, bw: float, seed: int, world_size: int = 1,
                 schedule: str = BenchOptions.schedule, kv_cache_dtype: str = BenchOptions.kv_cache_dtype,
                 logprobs: Optional[dict] = None, **config) -> tuple[dict, dict]:
    """Rank 0's side of the run (the only side when world_size is 1): with tensor parallelism the other
    ranks follow each step (_tp_bench_rank). work: (prompt ids, output length[, samples]) per request; config:
    EngineConfig fields to override."""
    eng, init_s = _build_engine(a, device, seed, 0, world_size, schedule, kv_cache_dtype, **config)
    model, cfg = eng.model, eng.config
    driver = None
    if world_size > 1:
        from ziya_batch.engine.tp import enable_tp_driver
        driver = enable_tp_driver(eng)
    eng.generate([Request("warm", list(range(3, 40)), _sampling(8))])
    eng.time_gpu = True
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    reqs = [Request(str(i), w[0], _sampling(*w[1:], **(logprobs or {}))) for i, w in enumerate(work)]
    for r in reqs:
        eng.add_request(r)
    # per GPU: each rank reads 1/K of the weights and of the KV cache a step (the all-reduces are not counted)
    kv_tok = kv_bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, eng.kv_caches[0][0].dtype) / world_size
    w_bytes = _weight_bytes(a, cfg.quantization) / world_size
    pre_s = pre_tok = dec_s = dec_tok = floor_s = host_dec = mix_dec = 0.0
    n_dec_steps = n_mix_steps = 0
    mix_hosts: list[float] = []
    gpu_dec = gpu_mix = 0.0
    out_tokens = 0
    t0 = time.perf_counter()
    while eng.has_unfinished():
        for o in eng.step():
            out_tokens += sum(len(c.token_ids) for c in o.completions)
        st = eng.last_step
        if st is None:                 # the call only launched a step (asynchronous scheduling)
            continue
        if st.decode_only:
            dec_s += st.wall_s; dec_tok += st.num_decode_tokens; n_dec_steps += 1; host_dec += st.host_s
            floor_s += (w_bytes + st.context_tokens * kv_tok) / bw
            gpu_dec += st.gpu_s or 0.0
        else:
            pre_s += st.wall_s; pre_tok += st.num_prefill_tokens; n_mix_steps += 1
            mix_dec += st.num_decode_tokens; mix_hosts.append(st.host_s)
            gpu_mix += st.gpu_s or 0.0
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    row = dict(method="engine", requests=len(reqs), output_tokens=out_tokens, wall_s=wall,
               output_tok_s=out_tokens / wall, prefill_tok_s=pre_tok / max(pre_s, 1e-9),
               decode_tok_s=dec_tok / max(dec_s, 1e-9), peak_gib=peak / 2**30,
               note=f"{eng.num_blocks} KV blocks of {cfg.block_size}; {eng.scheduler.num_preemptions} preemptions; "
                    f"{n_dec_steps} decode-only steps ({dec_s:.1f} s), mixed steps {pre_s:.1f} s; init {init_s:.0f} s; "
                    f"fused kernels {'on' if model.use_fused else 'off'}; schedule {schedule}"
                    + (f"; KV cache {kv_cache_dtype}" if kv_cache_dtype != EngineConfig.kv_cache_dtype else "")
                    + (f"; weights {cfg.quantization}" if cfg.quantization else "")
                    + (f"; tensor parallel {world_size} (NCCL)" if world_size > 1 else "")
                    + f"; prefix caching {_hit_note(eng)}")
    prof = dict(decode_steps=n_dec_steps, decode_step_ms=1e3 * dec_s / max(n_dec_steps, 1),
                floor_step_ms=1e3 * floor_s / max(n_dec_steps, 1), host_ms=1e3 * host_dec / max(n_dec_steps, 1),
                decode_batch=dec_tok / max(n_dec_steps, 1), floor_tok_s=dec_tok / max(floor_s, 1e-9),
                mixed_steps=n_mix_steps, mixed_step_ms=1e3 * pre_s / max(n_mix_steps, 1),
                mixed_prefill=pre_tok / max(n_mix_steps, 1), mixed_decode=mix_dec / max(n_mix_steps, 1),
                mixed_host_ms=1e3 * sum(mix_hosts) / max(n_mix_steps, 1),
                mixed_host_median_ms=1e3 * sorted(mix_hosts)[len(mix_hosts) // 2] if mix_hosts else 0.0,
                mixed_host_max_ms=1e3 * max(mix_hosts, default=0.0),
                decode_gpu_ms=1e3 * gpu_dec / max(n_dec_steps, 1), mixed_gpu_ms=1e3 * gpu_mix / max(n_mix_steps, 1))
    prof["tuning"] = eng.runner.decode_tuning
    if driver is not None:
        driver.stop()     # the step profile replays rank 0's graphs alone: single GPU only
    else:
        prof["breakdown"] = profile_decode_step(eng, a, bw, batch=128, context=512)
    del eng, model
    gc.collect(); torch.cuda.empty_cache()
    return row, prof


def w3_schema(max_chars: int) -> dict:
    """W3's record: a free-text string of bounded length, an enum, a bounded integer and a boolean."""
    return {"type": "object", "additionalProperties": False, "required": ["summary", "category", "score", "verified"],
            "properties": {"summary": {"type": "string", "maxLength": max_chars},
                           "category": {"enum": ["travel", "food", "history", "science", "other"]},
                           "score": {"type": "integer", "minimum": 0, "maximum": 100},
                           "verified": {"type": "boolean"}}}


def bench_w3(a: ModelArgs, work, device, seed: int) -> list[dict]:
    """W3: W1's prompts, each constrained to w3_schema with maxLength = its W1 output length (in characters,
    rounded up to 32: 16 distinct grammars). EOS is not ignored (the grammar ends each record), so W1 runs
    after it with each request's max_new_tokens = the length its record took (EOS ignored): both runs decode
    the same tokens, and output tok/s compare the constraint's cost alone. Both again with synchronous steps
    give the cost of waiting for each step's tokens before the next step's masks. The tokenizer is the demo
    model's (4,096 pieces; masks forbid the other ids of the 39,424-row vocabulary)."""
    import json
    import tempfile

    import jsonschema
    from transformers import AutoTokenizer

    from ziya_batch.tools.demo_model import write_demo_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(write_demo_tokenizer(tmp)))
    model = LlamaModel.random(a, device, torch.float16, seed)
    # prefix caching off: the W1 runs reuse W3's prompts, and cached prompts would flatter them
    eng = LLMEngine.from_model(model, tok, dataclasses.replace(BENCH_ENGINE, prefix_caching=False))
    schemas = {n: json.dumps(w3_schema(n)) for n in range(32, 513, 32)}

    def constrained(o: int, i: int = -1) -> SamplingParams:
        # the model card's sampling (SamplingParams' defaults); seeded: async and sync runs draw the same
        return SamplingParams(max_new_tokens=o + 64, json_schema=schemas[-(-o // 32) * 32],
                              seed=seed * 100_003 + i + 1)

    eng.generate([Request("warm", list(range(3, 40)), constrained(32)), Request("w", list(range(3, 40)), _sampling(8))])
    rows, lengths = [], None
    for sync in (False, True):
        eng.config = dataclasses.replace(eng.config, async_scheduling=not sync)
        for kind in ("W3", "W1"):
            if kind == "W3":
                reqs = [Request(str(i), p, constrained(o, i)) for i, (p, o) in enumerate(work)]
            else:
                reqs = [Request(str(i), p, _sampling(max(1, lengths[str(i)]))) for i, (p, _) in enumerate(work)]
            g = eng._grammars
            g.mask_s = g.fill_s = 0.0
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = eng.generate(reqs)
            wall = time.perf_counter() - t0
            tokens = sum(len(c.token_ids) for o in outs for c in o.completions)
            note = f"{'synchronous' if sync else 'async'} steps"
            if kind == "W3":
                lengths = lengths or {o.request_id: len(o.completions[0].token_ids) for o in outs}
                ok = 0
                for o in outs:
                    c = o.completions[0]
                    try:
                        jsonschema.validate(json.loads(c.text), json.loads(reqs[int(o.request_id)].params.json_schema))
                        ok += c.finish_reason == "stop"
                    except (ValueError, jsonschema.ValidationError):
                        pass
                note += (f"; {ok}/{len(outs)} records valid; masks {g.mask_s:.2f} s of host time "
                         f"({g.fill_s:.2f} s filling them)")
            else:
                note += "; the W3 run's output lengths, EOS ignored"
            rows.append(dict(method=kind, requests=len(reqs), output_tokens=tokens, wall_s=wall,
                             output_tok_s=tokens / wall, note=note))
            _print_row(rows[-1])
    for sync in (0, 2):
        print(f"[bench] W3 / W1 ({rows[sync]['note'].split(';')[0]}): "
              f"{rows[sync]['output_tok_s'] / rows[sync + 1]['output_tok_s']:.1%}", flush=True)
    return rows


def _tp_bench_rank(rank: int, world_size: int, init_file: str, layers: int, requests: int, seed: int,
                   result_file: str, schedule: str = BenchOptions.schedule,
                   kv_cache_dtype: str = BenchOptions.kv_cache_dtype,
                   quantization: Optional[str] = BenchOptions.quantization) -> None:
    """One process of `bench --tensor-parallel K`: one GPU each, NCCL; rank 0 runs the workload and writes
    its row and profile as JSON, the others follow its steps."""
    import json

    import torch.distributed as dist

    from ziya_batch.engine.tp import serve_follower
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            device_id=device)
    try:
        a = _args(layers)
        bw = measure_copy_bandwidth_bytes_s(device)
        if rank == 0:
            row, prof = bench_engine(a, workload_w1(requests, a.vocab_size, seed), device, bw, seed, world_size,
                                     schedule, kv_cache_dtype, quantization=quantization)
            with open(result_file, "w") as fh:
                json.dump({"row": row, "prof": prof, "bw": bw}, fh)
        else:
            eng, _ = _build_engine(a, device, seed, rank, world_size, schedule, kv_cache_dtype,
                                   quantization=quantization)
            serve_follower(eng)
    except BaseException:
        # no destroy_process_group (see below): report and leave, so mp.spawn sees the failure and stops the
        # other ranks instead of waiting on a peer stuck in a collective
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # done: leave without destroy_process_group, which can wait forever on a follower whose communicator is
    # still referenced by captured CUDA graphs; the process exit frees everything
    sys.stdout.flush()
    os._exit(0)


def bench_engine_tp(opts: "BenchOptions") -> tuple[dict, dict, float]:
    """Runs the engine over opts.tensor_parallel GPUs in as many processes; returns rank 0's (row, prof, bw)."""
    import json
    import tempfile

    import torch.multiprocessing as mp
    k = opts.tensor_parallel
    if torch.cuda.device_count() < k:
        raise ModelError(f"bench --tensor-parallel {k} needs {k} GPUs; this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rank0.json")
        mp.spawn(_tp_bench_rank, args=(k, os.path.join(tmp, "init"), opts.layers, opts.requests, opts.seed, result,
                                       opts.schedule, opts.kv_cache_dtype, opts.quantization), nprocs=k, join=True)
        with open(result) as fh:
            got = json.load(fh)
    return got["row"], got["prof"], got["bw"]


def _time_s(fn, reps: int = 10) -> float:
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return sorted(times)[reps // 2]


def profile_decode_step(eng: LLMEngine, a: ModelArgs, bw: float, batch: int, context: int) -> dict:
    """Where one decode step's time goes: the graph replayed at `batch` sequences of `context` tokens, the same
    with 1-token contexts (weights only), the attention kernel alone, and sampling; each against bytes / bw."""
    from ziya_batch.engine.attention import decode_attention_triton
    from ziya_batch.engine.sampling import SamplingTensors, sample
    r = eng.runner
    b = next(x for x in r.graph_sizes if x >= batch)
    dev = eng.device
    per_seq = -(-context // r.block_size)
    r.g_ids[:b].random_(3, a.vocab_size)
    r.g_pos[:b].fill_(context - 1)
    r.g_slots[:b].fill_(r.scratch_slot)
    r.g_bt[:b, :per_seq].copy_(torch.randint(0, eng.num_blocks, (b, per_seq), device=dev, dtype=torch.int32))
    r.g_ctx[:b].fill_(context)
    full = _time_s(r.graphs[b].replay)
    r.g_ctx[:b].fill_(1)
    weights_only = _time_s(r.graphs[b].replay)
    k, v = eng.kv_caches[0]
    kf, vf = k.view(-1, k.shape[2], k.shape[3]), v.view(-1, v.shape[2], v.shape[3])
    q = torch.randn(b, a.num_heads, a.head_dim, device=dev, dtype=eng.model.embed.dtype)
    out = torch.empty_like(q)
    lens = torch.full((b,), context, device=dev, dtype=torch.int32)
    attn = _time_s(lambda: decode_attention_triton(q, kf, vf, r.g_bt[:b], lens, r.block_size, out)) * a.num_layers
    logits = torch.randn(b, a.vocab_size, device=dev)
    st = SamplingTensors(torch.ones(b, device=dev), torch.full((b,), CARD.top_p, device=dev),
                         torch.zeros(b, dtype=torch.int64, device=dev), torch.arange(b, device=dev), None, None,
                         None, any_top_k=False, any_top_p=True, all_greedy=False)
    samp = _time_s(lambda: sample(logits, st))
    kv_bytes = b * context * kv_bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, k.dtype)
    r.g_ctx[:b].fill_(context)
    return dict(batch=b, context=context, step_ms=1e3 * full, weights_only_ms=1e3 * weights_only,
                attention_ms=1e3 * attn, sampling_ms=1e3 * samp,
                weights_floor_ms=1e3 * _weight_bytes(a, eng.config.quantization) / bw,
                kv_floor_ms=1e3 * kv_bytes / bw, kernels=_kernel_profile(eng, b))


def _kernel_profile(eng: LLMEngine, b: int, top: int = 10) -> list[tuple[str, float, int]]:
    """The same step run eagerly under the torch profiler: (kernel, device ms per step, launches per step) for
    the kernels with the most device time. A graph replay runs the same kernels without the launch gaps."""
    from ziya_batch.engine.attention import AttentionMetadata
    r = eng.runner
    meta = AttentionMetadata(r.g_slots[:b], b, r.g_bt[:b], r.g_ctx[:b], r.block_size, None, r.use_triton)
    return profile_kernels(lambda: eng.model(r.g_ids[:b], r.g_pos[:b], eng.kv_caches, meta, r.g_rows[:b]), top=top)


def profile_kernels(run, reps: int = 3, top: int = 10) -> list[tuple[str, float, int]]:
    """run() (after one warm-up call) `reps` times under the torch profiler: ("all kernels", ms, launches) and
    then (kernel, device ms per call, launches per call) for the `top` kernels with the most device time."""
    from torch.profiler import ProfilerActivity, profile
    run(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    rows = []
    for e in p.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if t > 0:
            rows.append((e.key[:90], t / 1e3 / reps, e.count // reps))
    rows.sort(key=lambda x: -x[1])
    total = sum(t for _, t, _ in rows)
    return [("all kernels", total, sum(c for _, _, c in rows))] + rows[:top]


def _hf_model(a: ModelArgs, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=a.hidden_size, num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
                      num_key_value_heads=a.num_kv_heads, intermediate_size=a.intermediate_size,
                      vocab_size=a.vocab_size, max_position_embeddings=a.max_position_embeddings,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            m = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return m.eval().requires_grad_(False)


def bench_hf_generate(model, work, device) -> dict:
    """The model card's method: static left-padded batches through `generate`; on OOM the batch halves."""
    torch.cuda.reset_peak_memory_stats()
    batch, done, useful, wall, note = 64, 0, 0, 0.0, []
    t_start = time.perf_counter()
    while done < len(work) and time.perf_counter() - t_start < HF_GENERATE_BUDGET_S and batch >= 1:
        chunk = work[done:done + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= torch.tensor(
            [width - len(p) for p, _ in chunk], device=device)[:, None]).long()
        new = max(o for _, o in chunk)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                               top_p=CARD.top_p, temperature=CARD.temperature, pad_token_id=PAD_ID)
        except torch.OutOfMemoryError:
            note.append(f"OOM at batch {batch}")
            batch //= 2
            gc.collect(); torch.cuda.empty_cache()
            continue
        torch.cuda.synchronize()
        wall += time.perf_counter() - t0          # failed (OOM) batches are not counted
        done += len(chunk)
        useful += sum(o for _, o in chunk)      # tokens past a request's own length are padding waste
    note.append(f"batch {batch}, first {done} requests in {wall:.0f} s (capped at {HF_GENERATE_BUDGET_S:.0f} s); "
                f"tokens beyond a request's own length not counted")
    return dict(method="hf-generate", requests=done, output_tokens=useful, wall_s=wall,
                output_tok_s=useful / wall if done else 0.0, prefill_tok_s=None, decode_tok_s=None,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, note="; ".join(note))


def bench_hf_continuous(model, work, device) -> dict:
    """transformers' continuous batching manager (paged attention, its own scheduler)."""
    from transformers import GenerationConfig
    sub = work[:HF_CONTINUOUS_REQUESTS]
    torch.cuda.reset_peak_memory_stats()
    gc_cfg = GenerationConfig(max_new_tokens=512, do_sample=True, top_p=CARD.top_p, temperature=CARD.temperature,
                              eos_token_id=-1, pad_token_id=PAD_ID)
    manager = model.init_continuous_batching(generation_config=gc_cfg)
    manager.start()
    accepts_eos = "eos_token_id" in inspect.signature(manager.add_request).parameters
    t0 = time.perf_counter()
    for i, (p, o) in enumerate(sub):
        kw = {"eos_token_id": -1} if accepts_eos else {}
        manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=o, **kw)
    got, tokens = 0, 0
    while got < len(sub) and time.perf_counter() - t0 < HF_CONTINUOUS_BUDGET_S:
        r = manager.get_result(timeout=1.0)
        if r is not None:
            got += 1
            tokens += len(r.generated_tokens)
    wall = time.perf_counter() - t0
    try:
        manager.stop(block=True, timeout=10)
    except TypeError:
        manager.stop()
    return dict(method="hf-continuous", requests=got, output_tokens=tokens, wall_s=wall,
                output_tok_s=tokens / wall, prefill_tok_s=None, decode_tok_s=None,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                note=f"{got} of the first {len(sub)} requests finished in {wall:.0f} s "
                     f"(capped at {HF_CONTINUOUS_BUDGET_S:.0f} s); unfinished ones not counted")


def run_bench(opts: BenchOptions) -> list[dict]:
    if not torch.cuda.is_available():
        raise ModelError("ziya-batch bench needs a CUDA GPU: run it on a machine with one")
    if opts.tensor_parallel < 1:
        raise ModelError("bench --tensor-parallel must be at least 1")
    if opts.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ModelError(f"bench --kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                         f"not {opts.kv_cache_dtype!r}")
    for v in opts.logprobs:
        parse_logprobs_variant(v)          # a typo fails now, not after the first run
    if opts.schedule not in POLICIES:
        raise ModelError(f"bench --schedule must be one of {', '.join(POLICIES)}, not {opts.schedule!r}")
    only = set(opts.only) or set(METHODS)
    unknown = only - set(METHODS)
    if unknown:
        raise ModelError(f"unknown bench method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if opts.workload == "W3":
        if (opts.tensor_parallel != 1 or opts.markdown or opts.prefix_caching != "on" or opts.quantization
                or opts.logprobs):
            raise ModelError("bench --workload W3 runs one float16 engine on one GPU and prints its rows: leave out "
                             "--tensor-parallel, --markdown, --prefix-caching, --quantization and --logprobs")
        a = _args(opts.layers)
        return bench_w3(a, workload_w1(opts.requests, a.vocab_size, opts.seed), torch.device("cuda"), opts.seed)
    if opts.workload != "W1" or opts.prefix_caching != "on":
        return run_prefix_bench(opts)
    device = torch.device("cuda")
    a = _args(opts.layers)
    work = workload_w1(opts.requests, a.vocab_size, opts.seed)
    rows: list[dict] = []
    prof: Optional[dict] = None
    if opts.tensor_parallel > 1 and only & {"engine", "roofline"}:
        row, prof, bw = bench_engine_tp(opts)       # first, while no GPU memory is held in this process
    else:
        bw = measure_copy_bandwidth_bytes_s(device)
    if only & {"engine", "roofline"}:
        if opts.tensor_parallel == 1:
            row, prof = bench_engine(a, work, device, bw, opts.seed, schedule=opts.schedule,
                                     kv_cache_dtype=opts.kv_cache_dtype, quantization=opts.quantization)
        if "engine" in only:
            rows.append(row)
            _print_row(row)
        if "roofline" in only:
            rows.append(dict(method="roofline", requests=len(work), output_tokens=row["output_tokens"],
                             wall_s=None, output_tok_s=prof["floor_tok_s"], prefill_tok_s=None, decode_tok_s=None,
                             peak_gib=None, note=f"engine's decode steps at {bw / 1e12:.2f} TB/s copy bandwidth "
                                                 f"(weights + KV bytes per step"
                                                 + (f", per GPU of {opts.tensor_parallel})" if opts.tensor_parallel > 1
                                                    else ")")))
            _print_row(rows[-1])
    if opts.logprobs:
        rows += bench_logprobs(a, work, device, bw, opts)
    if only & {"hf-generate", "hf-continuous"}:
        model = _hf_model(a, device)
        for name, fn in (("hf-generate", bench_hf_generate), ("hf-continuous", bench_hf_continuous)):
            if name in only:
                try:
                    rows.append(fn(model, work, device))
                except Exception as e:  # a baseline failing must not lose the engine's numbers
                    rows.append(dict(method=name, requests=0, output_tokens=0, wall_s=None, output_tok_s=None,
                                     prefill_tok_s=None, decode_tok_s=None, peak_gib=None,
                                     note=f"failed: {type(e).__name__}: {str(e)[:160]}"))
                _print_row(rows[-1])
                gc.collect(); torch.cuda.empty_cache()
        del model
        gc.collect(); torch.cuda.empty_cache()
    meta = dict(card=torch.cuda.get_device_name(device), date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
                commit=settings.commit() or _git_commit(), layers=opts.layers,
                requests=opts.requests, bandwidth_tb_s=bw / 1e12, tensor_parallel=opts.tensor_parallel)
    _print_table(rows, meta, prof)
    if opts.markdown:
        write_markdown(opts.markdown, rows, meta, prof)
    return rows


def bench_logprobs(a: ModelArgs, work, device, bw: float, opts: BenchOptions) -> list[dict]:
    """The engine on W1 once per logprobs variant, output tok/s side by side with the cost against the first."""
    variants = [(v, parse_logprobs_variant(v)) for v in opts.logprobs]
    rows = []
    for name, params in variants:
        row, _ = bench_engine(a, work, device, bw, opts.seed, schedule=opts.schedule,
                              kv_cache_dtype=opts.kv_cache_dtype, logprobs=params,
                              quantization=opts.quantization)
        row = {**row, "method": f"engine [{name}]", "note": f"logprobs {name}; " + row["note"]}
        rows.append(row)
        _print_row(row)
    base = rows[0]["output_tok_s"]
    print(f"[bench] logprobs variants on W1 (cost against {rows[0]['method']}):", flush=True)
    for r in rows:
        cost = 100 * (1 - r["output_tok_s"] / base)
        print(f"[bench]   {r['method']:<32} {r['output_tok_s']:>9,.0f} tok/s  {cost:+6.2f}%", flush=True)
    return rows


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(v, spec=",.0f") -> str:
    return "–" if v is None else format(v, spec)


def _print_row(r: dict) -> None:
    print(f"[bench] {r['method']}: {_fmt(r['output_tok_s'])} output tok/s; {r['note']}", flush=True)


def _print_table(rows: list[dict], meta: dict, prof: Optional[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    tp = f", tensor parallel {meta['tensor_parallel']}" if meta.get("tensor_parallel", 1) > 1 else ""
    t = Table(title=f"{meta.get('workload', 'W1')} on {meta['card']}{tp}, {meta['layers']} layers, {meta['requests']} requests "
                    f"({meta['date']}, {meta['commit']})")
    for c in ("method", "output tok/s", "prefill tok/s", "decode tok/s", "peak GiB", "requests", "note"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["method"], _fmt(r["output_tok_s"]), _fmt(r["prefill_tok_s"]), _fmt(r["decode_tok_s"]),
                  _fmt(r["peak_gib"], ".1f"), str(r["requests"]), r["note"])
    Console(width=200).print(t)
    if prof:
        print(f"[bench] decode step: {prof['decode_step_ms']:.2f} ms measured vs {prof['floor_step_ms']:.2f} ms "
              f"byte floor at mean batch {prof['decode_batch']:.1f}; host (schedule + inputs + launch) "
              f"{prof['host_ms']:.2f} ms; on the GPU, from the end of the step before (or its first launch, if "
              f"the GPU was idle) to the end of its sampling {prof['decode_gpu_ms']:.2f} ms", flush=True)
        print(f"[bench] mixed steps (prefill + decode, eager): {prof['mixed_steps']} steps, {prof['mixed_step_ms']:.2f} "
              f"ms each, {prof['mixed_prefill']:.0f} prefill + {prof['mixed_decode']:.0f} decode tokens each; host "
              f"{prof['mixed_host_ms']:.2f} ms (median {prof['mixed_host_median_ms']:.2f}, max "
              f"{prof['mixed_host_max_ms']:.0f}); on the GPU {prof['mixed_gpu_ms']:.2f} ms", flush=True)
        print("[bench] " + _breakdown_text(prof), flush=True)
        for name, ms, n in (prof.get("breakdown") or {}).get("kernels", []):
            print(f"[bench]   {ms:8.3f} ms {n:5d}x  {name}", flush=True)
        print("[bench] decode kernel tuning (BLOCK_N, warps, stages, TAIL_N) -> us: " + ", ".join(
            f"{c}: {t * 1e6:.0f}" for c, t in prof.get("tuning", [])), flush=True)


def _breakdown_text(prof: dict) -> str:
    d = prof.get("breakdown")
    if not d:
        return ""
    return (f"Profile of one decode step (CUDA graph, {d['batch']} sequences of {d['context']} tokens): "
            f"{d['step_ms']:.2f} ms in all; the same step with 1-token contexts (weights, norms, sampling excluded) "
            f"{d['weights_only_ms']:.2f} ms against a weight-byte floor of {d['weights_floor_ms']:.2f} ms; "
            f"paged attention over all layers {d['attention_ms']:.2f} ms against a KV-byte floor of "
            f"{d['kv_floor_ms']:.2f} ms; sampling (top_p) {d['sampling_ms']:.2f} ms.")


def render_markdown(rows: list[dict], meta: dict, prof: Optional[dict]) -> str:
    lines = [GENERATED, "",
             f"Card: {meta['card']}; date: {meta['date']}; commit: {meta['commit']}; LLaMA-13B shape with "
             f"{meta['layers']} layers, float16 random weights; {meta['requests']} requests; "
             + (f"tensor parallel {meta['tensor_parallel']} (one GPU each, NCCL); "
                if meta.get("tensor_parallel", 1) > 1 else "") + "measured copy "
             f"bandwidth {meta['bandwidth_tb_s']:.2f} TB/s.", "",
             "| method | output tok/s | prefill tok/s | decode tok/s | peak GiB | requests | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r['output_tok_s'])} | {_fmt(r['prefill_tok_s'])} | "
                     f"{_fmt(r['decode_tok_s'])} | {_fmt(r['peak_gib'], '.1f')} | {r['requests']} | {r['note']} |")
    if prof:
        lines += ["", f"One decode-only step, mean over {prof['decode_steps']} steps: {prof['decode_step_ms']:.2f} ms "
                      f"measured against a byte floor of {prof['floor_step_ms']:.2f} ms (mean batch "
                      f"{prof['decode_batch']:.1f}); host time per step (schedule, inputs, launch) "
                      f"{prof['host_ms']:.2f} ms; on the GPU, from the end of the step before (or its first "
                      f"launch, if the GPU was idle) to the end of its sampling {prof['decode_gpu_ms']:.2f} ms. Steps with prefill (eager): {prof['mixed_steps']}, "
                      f"{prof['mixed_step_ms']:.2f} ms each ({prof['mixed_gpu_ms']:.2f} ms on the GPU), "
                      f"{prof['mixed_prefill']:.0f} prefill and {prof['mixed_decode']:.0f} decode tokens each.", "",
                      _breakdown_text(prof)]
    return "\n".join(lines) + "\n"


def write_markdown(path: str, rows: list[dict], meta: dict, prof: Optional[dict]) -> None:
    """Writes this run as the GENERATED subsection of SECTION: replaces the previous one, or puts it first in
    the section (adding the section at the end of the file if it has none). Everything else in the file, the
    section's hand-written subsections included, stays as it is."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = render_markdown(rows, meta, prof)
    start = text.find("\n" + GENERATED + "\n")
    if start >= 0:
        start += 1
        ends = [i for i in (text.find("\n## ", start), text.find("\n### ", start + len(GENERATED))) if i >= 0]
        end = min(ends) + 1 if ends else len(text)
        text = text[:start] + block + ("\n" if end < len(text) else "") + text[end:]
    else:
        sec = text.find(SECTION + "\n")
        if sec < 0:
            text = text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + block
        else:
            at = sec + len(SECTION) + 1
            nxt = [i for i in (text.find("\n## ", at), text.find("\n### ", at)) if i >= 0]
            at = min(nxt) + 1 if nxt else len(text)       # after the section's introduction
            text = text[:at] + block + "\n" + text[at:]
    with open(path, "w") as fh:
        fh.write(text)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The bench's one command line: `ziya-batch bench` hands its arguments to it, and so does
    `python -m ziya_batch.tools.bench`. Defaults are BenchOptions'."""
    d = BenchOptions
    p = argparse.ArgumentParser(prog=prog, description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--layers", type=_positive, default=d.layers,
                   help=f"decoder layers ({d.layers} = LLaMA-13B)")
    p.add_argument("--requests", type=_positive, default=d.requests, help="requests in workload W1")
    p.add_argument("--tensor-parallel", type=_positive, default=d.tensor_parallel,
                   help="the engine over this many GPUs (one process each, NCCL)")
    p.add_argument("--markdown", default=d.markdown, metavar="FILE",
                   help="write the table into this markdown file (docs/BENCHMARKS.md format)")
    p.add_argument("--only", action="append", default=[], metavar="METHODS",
                   help=f"run only these rows, comma-separated or repeated: {','.join(METHODS)}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--schedule", choices=POLICIES, default=d.schedule,
                   help="the engine's admission order (engine.schedule of a job spec)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=d.kv_cache_dtype,
                   help="the model's dtype (auto) or fp8 (engine.kv_cache_dtype of a job spec)")
    p.add_argument("--workload", choices=WORKLOADS, default=d.workload,
                   help="W1; W2 (a shared 1,024-token prefix); W2g (GRPO-like, n = 8); W3 (W1 constrained to a "
                        "JSON schema, against W1 at the same output lengths)")
    p.add_argument("--prefix-caching", choices=PREFIX_CACHING, default=d.prefix_caching,
                   help="on, off or both (one engine row each; engine.prefix_caching of a job spec)")
    p.add_argument("--quantization", choices=("fp8",), default=d.quantization,
                   help="fp8: float8 linear weights, W8A8 (model.quantization of a job spec)")
    p.add_argument("--logprobs", action="append", default=[], metavar="VARIANTS",
                   help="extra W1 engine runs, one per logprobs variant (MODE or MODE+topK), comma-separated or "
                        "repeated, e.g. processed,temperature,temperature+top5")
    return p


def parse_options(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> BenchOptions:
    a = parser(prog).parse_args(argv)
    only = tuple(x for o in a.only for x in o.split(",") if x)
    return BenchOptions(a.layers, a.requests, a.tensor_parallel, a.markdown, only, a.seed, a.schedule,
                        a.kv_cache_dtype, a.workload, a.prefix_caching, a.quantization,
                        tuple(x for o in a.logprobs for x in o.split(",") if x))


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> None:
    run_bench(parse_options(argv, prog))


# ---- shared-prefix workloads (prefix caching) ------------------------------------------------------------------
WORKLOADS = ("W1", "W2", "W2g", "W3")
PREFIX_CACHING = ("on", "off", "both")


def workload_w2(num_requests: int, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """A templated job: one 1,024-token prefix (system prompt and few-shot examples) shared by every request,
    then a unique 32..128-token suffix; outputs 32..256 tokens."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab_size) for _ in range(1024)]
    return [(prefix + [rng.randrange(3, vocab_size) for _ in range(rng.randint(32, 128))], rng.randint(32, 256))
            for _ in range(num_requests)]


def workload_w2g(num_requests: int, vocab_size: int, seed: int) -> list[tuple[list[int], int, int]]:
    """GRPO-style: num_requests / 8 prompts of 256..512 tokens, 8 samples each; outputs 32..256 tokens."""
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab_size) for _ in range(rng.randint(256, 512))], rng.randint(32, 256), 8)
            for _ in range(max(1, num_requests // 8))]


def _hit_note(eng: LLMEngine) -> str:
    if not eng.config.prefix_caching:
        return "off"
    q, h = eng.prefix_cache_query_tokens, eng.prefix_cache_hit_tokens
    return (f"on ({h:,} of {q:,} prompt tokens cached, {h / max(q, 1):.0%}; "
            f"{eng.scheduler.pool.num_evicted:,} evictions)")


def run_prefix_bench(opts: BenchOptions) -> list[dict]:
    """The engine alone, on one GPU, with prefix caching on, off or both (one row each, in one process, on the
    same workload); no transformers baselines. W2's prompts reach 1,152 tokens and its outputs 256: the
    engine's context is LLaMA's 2,048 (W1's runs use 1,024)."""
    if opts.workload not in WORKLOADS or opts.prefix_caching not in PREFIX_CACHING:
        raise ModelError(f"bench --workload must be one of {', '.join(WORKLOADS)} and --prefix-caching one of "
                         f"{', '.join(PREFIX_CACHING)}")
    if opts.tensor_parallel != 1 or opts.markdown:
        raise ModelError("bench --workload W2/W2g and --prefix-caching off/both run on one GPU and print their "
                         "table: leave out --tensor-parallel and --markdown")
    device = torch.device("cuda")
    a = _args(opts.layers)
    make = {"W1": workload_w1, "W2": workload_w2, "W2g": workload_w2g}[opts.workload]
    work = make(opts.requests, a.vocab_size, opts.seed)
    bw = measure_copy_bandwidth_bytes_s(device)
    settings = {"on": (True,), "off": (False,), "both": (True, False)}[opts.prefix_caching]
    rows, prof = [], None
    for on in settings:
        row, p = bench_engine(a, work, device, bw, opts.seed, schedule=opts.schedule,
                              kv_cache_dtype=opts.kv_cache_dtype, prefix_caching=on, quantization=opts.quantization,
                              max_model_len=2048 if opts.workload != "W1" else BENCH_ENGINE.max_model_len)
        row["method"] = f"engine, prefix caching {'on' if on else 'off'}"
        rows.append(row)
        prof = prof or p
        _print_row(row)
    if len(rows) == 2:
        print(f"[bench] {opts.workload}: prefix caching on / off = "
              f"{rows[0]['output_tok_s'] / rows[1]['output_tok_s']:.2f}x output tok/s", flush=True)
    meta = dict(card=torch.cuda.get_device_name(device), date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
                commit=settings.commit() or _git_commit(), layers=opts.layers,
                requests=len(work), bandwidth_tb_s=bw / 1e12, tensor_parallel=1, workload=opts.workload)
    _print_table(rows, meta, prof)
    return rows


if __name__ == "__main__":
    main()
