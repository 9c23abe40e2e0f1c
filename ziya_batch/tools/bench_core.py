"""What every bench workload shares: the options of one run, the random-weight engine of LLaMA-13B's shape,
one timed engine run over a workload (bench_engine, with its per-step profile and the decode-step breakdown),
and the printed rows and table. tools/bench.py (the W1 command), tools/bench_workloads.py (W2, W2g, W3, the
logprobs variants) and tools/bench_baselines.py (transformers) build on it."""
from __future__ import annotations

import dataclasses
import gc
import random
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ziya_batch.engine.attention import DECODE_CONFIG_FIELDS
from ziya_batch.engine.engine import LLMEngine
from ziya_batch.engine.kv_cache import kv_bytes_per_token
from ziya_batch.engine.model import PRESETS, LlamaModel, ModelArgs
from ziya_batch.engine.piecewise import gpu_seconds as _time_s
from ziya_batch.engine.types import EngineConfig, Request, SamplingParams
from ziya_batch.tools.bandwidth import measure_copy_bandwidth_bytes_s  # noqa: F401 - bench.py's and the scripts'


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
    # steps with prefill from CUDA graphs captured in pieces (engine.piecewise) or eager: on | off | both (one
    # engine row each, in that order, in one process: the A/B of one card)
    mixed_graphs: str = "on"
    max_num_seqs: int = EngineConfig.max_num_seqs      # the engine's seats (engine.max_num_seqs of a job spec)
    # more engine rows on W1 in the same run, after the first, each a variant of it (parse_variant's text:
    # "quantization=fp8,kv-cache-dtype=fp8,max-num-seqs=512"), each with its roofline
    also: tuple[str, ...] = ()


# what an --also variant may change in the first engine row, with how its value is read
VARIANT_KEYS = ("quantization", "kv-cache-dtype", "max-num-seqs", "max-num-batched-tokens", "mixed-graphs",
                "fp8-fast-accum", "adaptive-step-size")


def max_seats() -> int:
    """The most engine.max_num_seqs a job spec accepts: the bound the bench's seats keep too."""
    return _spec_bounds("max_num_seqs")[1]


def _spec_bounds(field: str) -> tuple[int, int]:
    """(ge, le) of a whole-number field of a job spec's engine section."""
    from ziya_batch.spec import EngineSpec
    meta = EngineSpec.model_fields[field].metadata
    return (next(m.ge for m in meta if getattr(m, "ge", None) is not None),
            next(m.le for m in meta if getattr(m, "le", None) is not None))


def parse_variant(text: str) -> dict:
    """"key=value,key=value" over VARIANT_KEYS -> the bench_engine overrides {quantization, kv_cache_dtype,
    max_num_seqs, max_num_batched_tokens, mixed_step_graphs, fp8_fast_accum, adaptive_step_size} it names;
    ValueError with one line for anything else."""
    from ziya_batch.engine.kv_cache import KV_CACHE_DTYPES
    top = max_seats()
    out: dict = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        key, value = key.strip().replace("_", "-"), value.strip()
        if not eq or key not in VARIANT_KEYS:
            raise ValueError(f"{part.strip()!r} is not KEY=VALUE with KEY one of {', '.join(VARIANT_KEYS)}")
        name = {"mixed-graphs": "mixed_step_graphs"}.get(key, key.replace("-", "_"))
        if name in out:
            raise ValueError(f"{key} is given twice")
        if key == "quantization":
            if value not in ("none", "fp8"):
                raise ValueError(f"quantization must be none or fp8, not {value!r}")
            out[name] = None if value == "none" else value
        elif key == "kv-cache-dtype":
            if value not in KV_CACHE_DTYPES:
                raise ValueError(f"kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {value!r}")
            out[name] = value
        elif key == "max-num-seqs":
            if not value.isdigit() or not 1 <= int(value) <= top:
                raise ValueError(f"max-num-seqs must be a whole number in 1..{top} (engine.max_num_seqs), "
                                 f"not {value[:40]!r}")
            out[name] = int(value)
        elif key == "max-num-batched-tokens":
            low, high = _spec_bounds("max_num_batched_tokens")
            if not value.isdigit() or not low <= int(value) <= high:
                raise ValueError(f"max-num-batched-tokens must be a whole number in {low}..{high} "
                                 f"(engine.max_num_batched_tokens), not {value[:40]!r}")
            out[name] = int(value)
        else:
            if value not in ("on", "off"):
                raise ValueError(f"{key} must be on or off, not {value!r}")
            out[name] = value == "on"
    return out


# the engine the bench runs: the engine's defaults (float16 on the GPU) but W1's prompt + output within 1,024
# positions, and a larger share of the GPU (nothing else runs on it)
BENCH_ENGINE = EngineConfig(model_path="", max_model_len=1024, gpu_memory_fraction=0.95)


def workload_w1(num_requests: int, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request: both lengths uniform in 32..512, ids random (no EOS, id 2)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        plen, olen = rng.randint(32, 512), rng.randint(32, 512)
        out.append(([rng.randrange(3, vocab_size) for _ in range(plen)], olen))
    return out


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
    config_parts = config_note_parts(cfg)
    row = dict(method="engine", requests=len(reqs), output_tokens=out_tokens, wall_s=wall,
               output_tok_s=out_tokens / wall, prefill_tok_s=pre_tok / max(pre_s, 1e-9),
               decode_tok_s=dec_tok / max(dec_s, 1e-9), peak_gib=peak / 2**30,
               note=f"{eng.num_blocks} KV blocks of {cfg.block_size}; {eng.scheduler.num_preemptions} preemptions; "
                    f"{eng.scheduler.num_cut_steps} steps cut back to a bucket; "
                    f"{n_dec_steps} decode-only steps ({dec_s:.1f} s), {n_mix_steps} mixed steps ({pre_s:.1f} s, host "
                    f"{1e3 * sum(mix_hosts) / max(n_mix_steps, 1):.1f} ms each); init {init_s:.0f} s; "
                    f"fused kernels {'on' if model.use_fused else 'off'}; mixed steps "
                    f"{'from graphs' if eng.runner.mixed is not None else 'eager'}; schedule {schedule}"
                    + "".join(f"; {p}" for p in config_parts)
                    + (f"; tensor parallel {world_size} (NCCL)" if world_size > 1 else "")
                    + f"; prefix caching {_hit_note(eng)}",
               config=", ".join(config_parts))
    prof = dict(decode_steps=n_dec_steps, decode_step_ms=1e3 * dec_s / max(n_dec_steps, 1),
                floor_step_ms=1e3 * floor_s / max(n_dec_steps, 1), host_ms=1e3 * host_dec / max(n_dec_steps, 1),
                decode_batch=dec_tok / max(n_dec_steps, 1), floor_tok_s=dec_tok / max(floor_s, 1e-9),
                mixed_steps=n_mix_steps, mixed_step_ms=1e3 * pre_s / max(n_mix_steps, 1),
                mixed_prefill=pre_tok / max(n_mix_steps, 1), mixed_decode=mix_dec / max(n_mix_steps, 1),
                mixed_host_ms=1e3 * sum(mix_hosts) / max(n_mix_steps, 1),
                mixed_host_median_ms=1e3 * sorted(mix_hosts)[len(mix_hosts) // 2] if mix_hosts else 0.0,
                mixed_host_max_ms=1e3 * max(mix_hosts, default=0.0),
                decode_gpu_ms=1e3 * gpu_dec / max(n_dec_steps, 1), mixed_gpu_ms=1e3 * gpu_mix / max(n_mix_steps, 1),
                mixed_graphs=eng.runner.mixed is not None)
    prof["tuning"] = eng.runner.decode_tuning
    prof["buckets"] = buckets_text(eng.runner.bucket_seconds, eng.runner.dropped_buckets())
    if driver is not None:
        driver.stop()     # the step profile replays rank 0's graphs alone: single GPU only
    else:
        prof["breakdown"] = profile_decode_step(eng, a, bw, batch=128, context=512)
        if eng.runner.mixed is not None:
            try:          # a profile that fails must not lose the run's numbers
                prof["mixed_breakdown"] = profile_mixed_step(eng, decode=224, context=512, prefill=(256, 256))
            except Exception as e:  # noqa: BLE001
                prof["mixed_breakdown"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    del eng, model
    gc.collect(); torch.cuda.empty_cache()
    return row, prof


def config_note_parts(cfg: EngineConfig) -> list[str]:
    """How an engine row's configuration differs from the engine's defaults, as its note and the roofline beside
    it name it: KV cache dtype, weights, seats, the step's token budget, FP8 fast accumulation, fixed step sizes."""
    return ([f"KV cache {cfg.kv_cache_dtype}"] if cfg.kv_cache_dtype != EngineConfig.kv_cache_dtype else []) + \
        ([f"weights {cfg.quantization}"] if cfg.quantization else []) + \
        ([f"{cfg.max_num_seqs} seats"] if cfg.max_num_seqs != EngineConfig.max_num_seqs else []) + \
        ([f"step budget {cfg.max_num_batched_tokens} tokens"]
         if cfg.max_num_batched_tokens != EngineConfig.max_num_batched_tokens else []) + \
        (["FP8 fast accumulation"] if cfg.fp8_fast_accum else []) + \
        (["fixed step size"] if not cfg.adaptive_step_size else [])


def _hit_note(eng: LLMEngine) -> str:
    if not eng.config.prefix_caching:
        return "off"
    q, h = eng.prefix_cache_query_tokens, eng.prefix_cache_hit_tokens
    return (f"on ({h:,} of {q:,} prompt tokens cached, {h / max(q, 1):.0%}; "
            f"{eng.scheduler.pool.num_evicted:,} evictions)")


def profile_decode_step(eng: LLMEngine, a: ModelArgs, bw: float, batch: int, context: int) -> dict:
    """Where one decode step's time goes: the graph replayed at `batch` sequences of `context` tokens, the same
    with 1-token contexts (weights only), the attention kernel alone, and sampling; each against bytes / bw."""
    from ziya_batch.engine.attention import decode_attention_triton
    from ziya_batch.engine.sampling import SamplingTensors, sample
    r = eng.runner
    b = next(x for x in r.graph_sizes if x >= batch)
    dev = eng.device
    # every sequence on blocks of its own, as in a real batch (blocks read twice would come from L2 and look
    # faster than HBM): the context shrinks to what the cache holds for b sequences
    per_seq = max(min(-(-context // r.block_size), eng.num_blocks // b), 1)
    context = min(context, per_seq * r.block_size)
    r.g_ids[:b].random_(3, a.vocab_size)
    r.g_pos[:b].fill_(context - 1)
    r.g_slots[:b].fill_(r.scratch_slot)
    r.g_bt[:b, :per_seq].copy_(distinct_blocks(eng.num_blocks, b, per_seq, torch.Generator().manual_seed(0)))
    r.g_ctx[:b].fill_(context)
    full = _time_s(r.graphs[b].replay)
    r.g_ctx[:b].fill_(1)
    weights_only = _time_s(r.graphs[b].replay)
    # the kernels of that replay as the graph runs them: their sum against the replay's time is what the
    # kernel boundaries cost
    weights_kernels = profile_kernels(r.graphs[b].replay, top=16)
    kf, vf = r.flat_cache()
    q = torch.randn(b, a.num_heads, a.head_dim, device=dev, dtype=eng.model.embed.dtype)
    out = torch.empty_like(q)
    lens = torch.full((b,), context, device=dev, dtype=torch.int32)
    attn = _time_s(lambda: decode_attention_triton(q, kf, vf, r.g_bt[:b], lens, r.block_size, out)) * a.num_layers
    logits = torch.randn(b, a.vocab_size, device=dev)
    st = SamplingTensors(torch.ones(b, device=dev), torch.full((b,), CARD.top_p, device=dev),
                         torch.zeros(b, dtype=torch.int64, device=dev), torch.arange(b, device=dev), None, None,
                         None, any_top_k=False, any_top_p=True, all_greedy=False)
    samp = _time_s(lambda: sample(logits, st))
    kv_bytes = b * context * kv_bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, kf.dtype)
    r.g_ctx[:b].fill_(context)
    return dict(batch=b, context=context, step_ms=1e3 * full, weights_only_ms=1e3 * weights_only,
                attention_ms=1e3 * attn, sampling_ms=1e3 * samp,
                weights_floor_ms=1e3 * _weight_bytes(a, eng.config.quantization) / bw,
                kv_floor_ms=1e3 * kv_bytes / bw, kernels=_kernel_profile(eng, b, top=16),
                weights_kernels=weights_kernels)


def distinct_blocks(num_blocks: int, rows: int, per: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, per] int32 block ids drawn without repeats while rows * per <= num_blocks (a random permutation,
    laid out again only when more are asked for than the cache has)."""
    need = rows * per
    perm = torch.randperm(num_blocks, generator=generator)
    ids = perm.repeat(-(-need // num_blocks))[:need] if need > num_blocks else perm[:need]
    return ids.view(rows, per).to(torch.int32)


def mixed_step_inputs(eng: LLMEngine, decode: int, context: int, prefill: tuple[int, ...], seed: int = 0):
    """A synthetic step with prefill on eng's cache: `decode` sequences of `context` tokens each taking one token,
    then one chunk per entry of `prefill` (that many new tokens after as many cached ones), every sequence over
    blocks of its own (the decode context shrinks to what the cache holds beside the chunks); every new token's
    K/V goes to the scratch slot. Returns (ids, positions, meta, logits rows) as the runner hands them to the
    model or its pieces."""
    from ziya_batch.engine.attention import AttentionMetadata, prefill_batch
    r, dev, bs = eng.runner, eng.device, eng.runner.block_size
    g = torch.Generator().manual_seed(seed)
    pre_blocks = sum(-(-2 * n // bs) for n in prefill)
    context = max(min(context, (eng.num_blocks - pre_blocks) // max(decode, 1) * bs), 1)
    pool = iter(distinct_blocks(eng.num_blocks, 1, pre_blocks + decode * -(-context // bs), g)[0].tolist())
    T = decode + sum(prefill)
    ids = torch.randint(3, eng.model.args.vocab_size, (T,), generator=g)
    pos, chunks, tok = [context - 1] * decode, [], decode
    for n in prefill:
        chunks.append((tok, n, n))
        pos += list(range(n, 2 * n))
        tok += n
    rows = list(range(decode)) + [start + n - 1 for start, n, _ in chunks]

    def blocks(k: int, per: int) -> torch.Tensor:
        return torch.tensor([next(pool) for _ in range(k * per)], dtype=torch.int32, device=dev).view(k, per)
    pre_bt = torch.zeros(len(chunks), r.max_blocks, dtype=torch.int32, device=dev)
    for i, (_, n, _) in enumerate(chunks):
        pre_bt[i, :-(-2 * n // bs)] = blocks(1, -(-2 * n // bs))[0]
    dec_bt = torch.zeros(decode, r.max_blocks, dtype=torch.int32, device=dev)
    dec_bt[:, :-(-context // bs)] = blocks(decode, -(-context // bs))
    meta = AttentionMetadata(torch.full((T,), r.scratch_slot, dtype=torch.int64, device=dev), decode, dec_bt,
                             torch.full((decode,), context, dtype=torch.int32, device=dev), bs,
                             prefill_batch(chunks, pre_bt) if chunks else None, r.use_triton)
    return ids.to(dev), torch.tensor(pos, device=dev), meta, torch.tensor(rows, device=dev)


def profile_mixed_step(eng: LLMEngine, decode: int, context: int, prefill: tuple[int, ...]) -> dict:
    """Where a step with prefill goes through the runner's pieces: its time, and its kernels under the profiler
    (the pieces' graph replays show their kernels too)."""
    ids, pos, meta, rows = mixed_step_inputs(eng, decode, context, prefill)

    def run():
        return eng.runner.mixed.run(ids, pos, meta, rows)
    return dict(decode=decode, context=int(meta.context_lens[0]) if decode else context, prefill=list(prefill),
                step_ms=1e3 * _time_s(run), kernels=profile_kernels(run, top=16))


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


def ratios_text(rows: list[dict]) -> str:
    """Each engine row of the run against transformers' continuous batching of the same run: by its streamed
    count and, where it streamed, by its finished requests alone. "" without that baseline's number."""
    base = next((r for r in rows if r["method"] == "hf-continuous" and r.get("output_tok_s")), None)
    engines = [r for r in rows if r["method"] == "engine" and r.get("output_tok_s")]
    if base is None or not engines:
        return ""
    fin = base.get("finished_tok_s")
    parts = []
    for r in engines:
        label = f"engine ({r['config']})" if r.get("config") else "engine"
        parts.append(f"{label} {r['output_tok_s'] / base['output_tok_s']:.1f}x"
                     + (f" ({r['output_tok_s'] / fin:.1f}x)" if fin else ""))
    return (f"Against transformers' continuous batching in this run ({_fmt(base['output_tok_s'])} tok/s, every "
            f"streamed token" + (f"; {_fmt(fin)} tok/s counting finished requests alone, in brackets" if fin else "")
            + "): " + "; ".join(parts) + ".")


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
    ratios = ratios_text(rows)
    if ratios:
        print(f"[bench] {ratios}", flush=True)
    if prof:
        _print_profile(prof)


def buckets_text(seconds: dict[str, list[tuple[int, float]]], dropped: dict[str, list[int]]) -> str:
    """The graph sizes the runner dropped, each with its projections' time and the next size kept."""
    parts = []
    for what, rows in seconds.items():
        t = dict(rows)
        kept = sorted(n for n in t if n not in dropped.get(what, []))
        gone = [f"{n} ({1e6 * t[n]:.0f} us; {k} kept at {1e6 * t[k]:.0f})" for n in dropped.get(what, [])
                for k in [next(x for x in kept if x > n)]]
        parts.append(f"{what} {', '.join(gone) if gone else 'none'}")
    if not parts:
        return ""
    return ("graph sizes dropped (one layer's projections slower there than at a larger size, so steps pad to "
            "it): " + "; ".join(parts))


def _print_profile(prof: dict) -> None:
    """One engine row's step times, its decode-step breakdown and kernels, and its decode kernel tuning."""
    print(f"[bench] decode step: {prof['decode_step_ms']:.2f} ms measured vs {prof['floor_step_ms']:.2f} ms "
          f"byte floor at mean batch {prof['decode_batch']:.1f}; host (schedule + inputs + launch) "
          f"{prof['host_ms']:.2f} ms; on the GPU, from the end of the step before (or its first launch, if "
          f"the GPU was idle) to the end of its sampling {prof['decode_gpu_ms']:.2f} ms", flush=True)
    print(f"[bench] mixed steps (prefill + decode, {'graphs in pieces' if prof.get('mixed_graphs') else 'eager'}): "
          f"{prof['mixed_steps']} steps, {prof['mixed_step_ms']:.2f} "
          f"ms each, {prof['mixed_prefill']:.0f} prefill + {prof['mixed_decode']:.0f} decode tokens each; host "
          f"{prof['mixed_host_ms']:.2f} ms (median {prof['mixed_host_median_ms']:.2f}, max "
          f"{prof['mixed_host_max_ms']:.0f}); on the GPU {prof['mixed_gpu_ms']:.2f} ms", flush=True)
    print("[bench] " + _breakdown_text(prof), flush=True)
    for name, ms, n in (prof.get("breakdown") or {}).get("kernels", []):
        print(f"[bench]   {ms:8.3f} ms {n:5d}x  {name}", flush=True)
    if (prof.get("breakdown") or {}).get("weights_kernels"):
        print("[bench] the 1-token-context replay's kernels, as the graph runs them:", flush=True)
        for name, ms, n in prof["breakdown"]["weights_kernels"]:
            print(f"[bench]   {ms:8.3f} ms {n:5d}x  {name}", flush=True)
    mb = prof.get("mixed_breakdown")
    if mb:
        print(f"[bench] a step with prefill through the pieces ({mb.get('decode')} decode rows of "
              f"{mb.get('context')} tokens, prefill chunks {mb.get('prefill')}): "
              + (f"{mb['step_ms']:.2f} ms" if "step_ms" in mb else mb.get("error", "")), flush=True)
        for name, ms, n in mb.get("kernels", []):
            print(f"[bench]   {ms:8.3f} ms {n:5d}x  {name}", flush=True)
    print(f"[bench] decode kernel tuning {DECODE_CONFIG_FIELDS} -> us: " + ", ".join(
        f"{c}: {t * 1e6:.0f}" for c, t in prof.get("tuning", [])), flush=True)
    if prof.get("buckets"):
        print(f"[bench] {prof['buckets']}", flush=True)


def _breakdown_text(prof: dict) -> str:
    d = prof.get("breakdown")
    if not d:
        return ""
    return (f"Profile of one decode step (CUDA graph, {d['batch']} sequences of {d['context']} tokens): "
            f"{d['step_ms']:.2f} ms in all; the same step with 1-token contexts (weights, norms, sampling excluded) "
            f"{d['weights_only_ms']:.2f} ms against a weight-byte floor of {d['weights_floor_ms']:.2f} ms; "
            f"paged attention over all layers {d['attention_ms']:.2f} ms against a KV-byte floor of "
            f"{d['kv_floor_ms']:.2f} ms; sampling (top_p) {d['sampling_ms']:.2f} ms.")
