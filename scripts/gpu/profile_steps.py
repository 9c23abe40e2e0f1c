"""Where W1's steps spend their GPU time, measured on the engine's real batches rather than uniform ones.

Runs `ziya-batch bench`'s engine (LLaMA-13B's shape, random float16 weights, W1) until the batch is in its
steady state, then:
- at one decode-only step: replays its CUDA graph as it was (real mixed context lengths), the same graph with
  the contexts made uniform at their mean (random block tables, as the bench's uniform profile), with 1-token
  contexts (weights only), times the attention kernel alone both ways and every decode-kernel configuration on
  the real batch, and lists the kernels of the step run eagerly;
- at one step with prefill: runs it again eagerly and lists its kernels, and times every prefill-kernel
  configuration on its chunks;
- times the four GEMMs of a layer at the token counts these steps have.
Numbers only; nothing is changed.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/profile_steps.py [--warm-steps 400] [--kv-cache-dtype fp8]
[--quantization fp8 [--fp8-fast-accum]]"""
from __future__ import annotations

import argparse
import copy
import dataclasses

import torch

from ziya_batch.engine import attention
from ziya_batch.tools.bench import (_args, _build_engine, _kernel_profile, _sampling, _time_s, _weight_bytes,
                                     measure_copy_bandwidth_bytes_s, profile_kernels, workload_w1)
from ziya_batch.engine.kv_cache import kv_bytes_per_token
from ziya_batch.engine.scheduler import ScheduledChunk, SchedulerOutput
from ziya_batch.engine.types import Request


def frozen(out: SchedulerOutput) -> SchedulerOutput:
    """A copy of a step's plan whose sequences no longer change when the run goes on."""
    chunks = []
    for c in out.chunks:
        s = copy.copy(c.seq)
        # a token still pending on the device (async scheduling) becomes 0: the copy is for timing only
        s.token_ids = [max(t, 0) for t in c.seq.token_ids]
        s.block_ids = list(c.seq.block_ids)
        chunks.append(ScheduledChunk(s, c.start, c.num_tokens, c.samples))
    return SchedulerOutput(chunks, [], [])


def show(title: str, rows) -> None:
    print(f"  {title}")
    for name, ms, n in rows:
        print(f"    {ms:8.3f} ms  x{n:<4d} {name}")


def decode_step(eng, a, bw: float) -> None:
    r = eng.runner
    st = eng.last_step
    nd = st.num_decode_tokens
    b = next(x for x in r.graph_sizes if x >= nd)
    ctx = r.g_ctx[:nd].float()
    kv_tok = kv_bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, eng.kv_caches[0][0].dtype)
    wbytes = _weight_bytes(a, eng.config.quantization)
    floor = (wbytes + st.context_tokens * kv_tok) / bw
    print(f"decode step: {nd} sequences (graph {b}), context mean {ctx.mean():.0f} min {ctx.min():.0f} "
          f"max {ctx.max():.0f}; its wall time in the run {1e3 * st.wall_s:.2f} ms, GPU span "
          f"{1e3 * (st.gpu_s or 0):.2f} ms, byte floor {1e3 * floor:.2f} ms")
    real = _time_s(r.graphs[b].replay)
    kf, vf = r.flat_cache()
    q = torch.randn(b, a.num_heads, a.head_dim, device=eng.device, dtype=eng.model.embed.dtype)
    o = torch.empty_like(q)
    bt, lens = r.g_bt[:b].clone(), r.g_ctx[:b].clone()
    attn_real = _time_s(lambda: attention.decode_attention_triton(q, kf, vf, bt, lens, r.block_size, o))
    chosen = attention._decode_config.get(attention.kernel_key(a.num_heads, q.dtype, kf))
    print(f"  graph replay, real batch: {1e3 * real:.2f} ms; attention kernel alone x{a.num_layers} layers: "
          f"{1e3 * attn_real * a.num_layers:.2f} ms (config {chosen})")
    show("kernels of the real batch run eagerly (ms per step)", _kernel_profile(eng, b, top=12)[:13])
    print("  every decode config on the real batch (attention x layers):")
    for cfg in attention.decode_variants(kf.dtype):
        try:
            t = _time_s(lambda: attention.decode_attention_triton(q, kf, vf, bt, lens, r.block_size, o, cfg))
        except Exception as err:  # noqa: BLE001 - a config the compiler rejects
            print(f"    {cfg}: {type(err).__name__}")
            continue
        print(f"    {cfg}: {1e3 * t * a.num_layers:.2f} ms")
    # the rows in the other order (the runner's: longest context first unless decode_longest_first is off)
    order = torch.argsort(lens[:nd], descending=not r.decode_longest_first)
    bt_s, lens_s = bt.clone(), lens.clone()
    bt_s[:nd], lens_s[:nd] = bt[:nd][order], lens[:nd][order]
    t_sorted = _time_s(lambda: attention.decode_attention_triton(q, kf, vf, bt_s, lens_s, r.block_size, o))
    # uniform contexts at the mean, random blocks (the bench's profile)
    mean = int(ctx.mean().item())
    per_seq = -(-mean // r.block_size)
    ubt = torch.zeros_like(bt)
    ubt[:nd, :per_seq] = torch.randint(0, eng.num_blocks, (nd, per_seq), device=eng.device, dtype=torch.int32)
    ulens = torch.zeros_like(lens)
    ulens[:nd] = mean
    t_uni = _time_s(lambda: attention.decode_attention_triton(q, kf, vf, ubt, ulens, r.block_size, o))
    # the real lengths over random (not the run's) blocks
    rbt = torch.randint(0, eng.num_blocks, bt.shape, device=eng.device, dtype=torch.int32)
    t_rand = _time_s(lambda: attention.decode_attention_triton(q, kf, vf, rbt, lens, r.block_size, o))
    other = "shortest" if r.decode_longest_first else "longest"
    print(f"  attention x layers: real {1e3 * attn_real * a.num_layers:.2f} ms; rows {other} first "
          f"{1e3 * t_sorted * a.num_layers:.2f}; uniform at the mean ({mean}) {1e3 * t_uni * a.num_layers:.2f}; "
          f"real lengths over random blocks {1e3 * t_rand * a.num_layers:.2f}; KV floor "
          f"{1e3 * st.context_tokens * kv_tok / bw:.2f} ms")
    r.g_bt[:b].copy_(ubt); r.g_ctx[:b].copy_(ulens)
    uni = _time_s(r.graphs[b].replay)
    r.g_ctx[:nd].fill_(1)
    w_only = _time_s(r.graphs[b].replay)
    print(f"  graph replay: real {1e3 * real:.2f} ms; uniform contexts {1e3 * uni:.2f} ms; weights only "
          f"(1-token contexts) {1e3 * w_only:.2f} ms (weight floor {1e3 * wbytes / bw:.2f})")


def mixed_step(eng, a, out: SchedulerOutput) -> None:
    r = eng.runner
    pre = [c for c in out.chunks if c.num_tokens > 1]
    nd = len(out.chunks) - len(pre)
    ctx = sum(c.start + 1 for c in out.chunks if c.num_tokens == 1)
    print(f"step with prefill: {nd} decode rows (context {ctx} tokens), {len(pre)} prefill chunks "
          f"{[(c.start, c.num_tokens) for c in pre]}")
    run = lambda: r.execute(out)  # noqa: E731
    print(f"  eager step (forward + logits), median of 5 after one: {1e3 * _time_s(run, reps=5):.2f} ms")
    show("its kernels (ms per step)", profile_kernels(run, top=14))
    if pre and r.use_triton:
        chunks = sorted(out.chunks, key=lambda c: c.num_tokens != 1)
        tok, pch = nd, []
        for c in chunks[nd:]:
            pch.append((tok, c.num_tokens, c.start))
            tok += c.num_tokens
        bt = torch.zeros(len(pch), r.max_blocks, dtype=torch.int32, device=eng.device)
        for i, c in enumerate(chunks[nd:]):
            bt[i, :len(c.seq.block_ids)] = torch.tensor(c.seq.block_ids, dtype=torch.int32)
        pb = attention.prefill_batch(pch, bt)
        kf, vf = r.flat_cache()
        q = torch.randn(tok, a.num_heads, a.head_dim, device=eng.device, dtype=eng.model.embed.dtype)
        o = torch.empty_like(q)
        print("  every prefill config on this step's chunks (attention x layers):")
        for cfg in attention.PREFILL_CONFIGS:
            t = _time_s(lambda: attention.prefill_attention_triton(q, kf, vf, pb, r.block_size, o, cfg))
            print(f"    {cfg}: {1e3 * t * a.num_layers:.2f} ms")


def gemms(a, dev) -> None:
    H, I = a.hidden_size, a.intermediate_size
    shapes = {"qkv": (3 * H, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
    ws = {k: torch.randn(n, kk, device=dev, dtype=torch.float16) * 0.02 for k, (n, kk) in shapes.items()}
    print("GEMMs of one layer x layers (F.linear, float16):")
    for m in (128, 160, 192, 256, 512, 800, 808, 832, 1024, 2048):
        x = {k: torch.randn(m, w.shape[1], device=dev, dtype=torch.float16) for k, w in ws.items()}
        tot, parts = 0.0, []
        for k, w in ws.items():
            t = _time_s(lambda: torch.nn.functional.linear(x[k], w), reps=20)
            tot += t
            parts.append(f"{k} {1e3 * t * a.num_layers:.2f}")
        flop = 2 * m * sum(n * kk for n, kk in shapes.values()) * a.num_layers
        print(f"  M={m:5d}: {1e3 * tot * a.num_layers:6.2f} ms ({flop / tot / a.num_layers / 1e12:.0f} TFLOP/s; "
              + ", ".join(parts) + ")")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm-steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--quantization", default=None, choices=[None, "fp8"])
    ap.add_argument("--fp8-fast-accum", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    a = _args(40)
    bw = measure_copy_bandwidth_bytes_s(dev)
    eng, _ = _build_engine(a, dev, args.seed, kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
                           fp8_fast_accum=args.fp8_fast_accum)
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; {eng.num_blocks} KV blocks; "
          f"decode tuning {sorted(eng.runner.decode_tuning, key=lambda x: x[1])[:3]}")
    # each step read back before the next is launched: the graph's input buffers then hold the step just done
    eng.config = dataclasses.replace(eng.config, async_scheduling=False)
    eng.generate([Request("warm", list(range(3, 40)), _sampling(8))])
    eng.time_gpu = True
    for i, (p, o) in enumerate(workload_w1(1024, a.vocab_size, args.seed)):
        eng.add_request(Request(str(i), p, _sampling(o)))
    plans: list[SchedulerOutput] = []
    execute = eng.runner.execute
    eng.runner.execute = lambda out, *a: (plans.append(frozen(out)), execute(out, *a))[1]
    steps, done_decode, done_mixed = 0, False, False
    by_batch: dict[int, list[tuple[float, float, float]]] = {}
    kv_tok = kv_bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, eng.kv_caches[0][0].dtype)
    wbytes = _weight_bytes(a, eng.config.quantization)
    while eng.has_unfinished():
        plans.clear()
        eng.step()
        steps += 1
        st = eng.last_step
        if st is None:
            continue
        if st.decode_only:
            floor = (wbytes + st.context_tokens * kv_tok) / bw
            by_batch.setdefault(st.num_decode_tokens // 32 * 32, []).append((st.wall_s, st.gpu_s or 0.0, floor))
        if steps < args.warm_steps:
            continue
        if not done_decode and st.decode_only and st.num_decode_tokens >= 140:
            print(f"(after {steps} steps)")
            decode_step(eng, a, bw)
            done_decode = True
        elif done_decode and not done_mixed and not st.decode_only and st.num_prefill_tokens >= 256:
            mixed_step(eng, a, plans[0])
            done_mixed = True
    print("decode-only steps of the whole run by batch (sums over the steps; ms):")
    print("  batch     steps    wall     gpu   floor")
    for k in sorted(by_batch):
        w, g, f = (sum(x[i] for x in by_batch[k]) * 1e3 for i in range(3))
        print(f"  {k:3d}-{k + 31:<3d} {len(by_batch[k]):6d} {w:8.0f} {g:8.0f} {f:8.0f}")
    gemms(a, dev)


if __name__ == "__main__":
    main()
