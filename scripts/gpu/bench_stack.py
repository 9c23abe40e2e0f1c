"""Tensor parallelism and replicas through the whole stack (Redis, Ray, workers), on a machine with 2 GPUs.

1. Writes a checkpoint of LLaMA-13B's shape (hidden 5120, 40 layers, 40 heads, intermediate 13824, float16
   random weights) with the demo tokenizer (so its vocabulary is the demo's 4,096 rows, not 39,424).
2. Parity: `ziya-batch run` of the same greedy job (64 prompts, 32 tokens, EOS ignored) with
   tensor_parallel 1 and 2; counts prompts whose 32 token ids are equal.
3. Throughput on W1 (1,024 prompts, prompt and output lengths uniform in 32..512, EOS ignored, the model
   card's sampling) for one replica of TP=1, one of TP=2 and two of TP=1: a ReplicaManager on a local Ray
   cluster and a private redis-server, as `ziya-batch run` uses them; each configuration first runs a small
   warm-up job so every replica has loaded the model, then W1 is timed from submit to completed.

With --trained-steps N the checkpoint is not random but trained for N steps (bfloat16, AdamW, one GPU) on
prompts in Ziya's format around a few dozen tokens of the shipped corpus, each followed by a first-order Markov
chain over the demo vocabulary that starts from the prompt text's last token (each token: one successor with
probability 0.9, another with 0.1), as tests/gpu's trained tiny model is trained on such a chain: after a prompt
its next-token distributions are then peaked like a real model's, where random weights make most greedy choices
near-ties that float16 rounding decides (see docs/BENCHMARKS.md). The training's held-out accuracy (argmax = the
likely successor) and the gap between the two highest logits at the first generated token are printed and kept
in stack.json; a parity run on such weights says whether tensor parallelism changes what the model computes.

Usage (GPU machine, repo root): python scripts/gpu/bench_stack.py --work /tmp/stack --out $OUT
Writes $OUT/stack.json and $OUT/stack.md."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PARITY_TOKENS = 32
FIRST_WEIGHT = 20.0


SHAPES = {"13B": dict(hidden_size=5120, num_heads=40, num_kv_heads=40, intermediate_size=13824),
          # a quick check of this script on a machine without GPUs (logical GPUs, gloo)
          "small": dict(hidden_size=256, num_heads=4, num_kv_heads=4, intermediate_size=512)}


def write_checkpoint(path: Path, layers: int, shape: str = "13B", seed: int = 0) -> None:
    """Random float16 weights of the 13B shape, made on the GPU layer by layer, saved as safetensors."""
    from safetensors.torch import save_file

    from ziya_batch.tools.demo_model import demo_config, write_demo_tokenizer

    if (path / "config.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(num_layers=layers, max_position_embeddings=2048, dtype="float16", **SHAPES[shape])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*shape):
        return torch.empty(*shape, device=dev, dtype=torch.float16).normal_(0.0, 0.02, generator=g).cpu()

    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    save_file({"model.embed_tokens.weight": rnd(V, H), "model.norm.weight": torch.ones(H, dtype=torch.float16),
               "lm_head.weight": rnd(V, H)}, str(path / "model-00000.safetensors"), metadata={"format": "pt"})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(H, dtype=torch.float16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.float16)}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = rnd(H, H)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = rnd(I, H), rnd(I, H)
        t[p + "mlp.down_proj.weight"] = rnd(H, I)
        save_file(t, str(path / f"model-{i + 1:05d}.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(path))
    write_demo_tokenizer(path, model_max_length=2048)


def adamw_in_backward(n_params: int, free_bytes: int) -> bool:
    """Whether AdamW must step each parameter as soon as its gradient is complete (and free that gradient) instead
    of once after the backward pass: bfloat16 weights, gradients and two moments, 8 bytes a parameter, do not fit
    in free_bytes with 6 GiB to spare for activations, logits and the allocator; weights and moments alone do.
    The 13B shape (12.7 billion parameters with the demo vocabulary: ~95 GiB against ~71) trains so on an H100."""
    return 8 * n_params + 6 * 2 ** 30 > free_bytes


def lr_scale(step: int, steps: int, elapsed_s: float = 0.0, max_s: float = 0.0) -> float:
    """The learning rate's factor at `step`: a linear warm-up over the first tenth of the steps, then a cosine down
    to a tenth at the last. Where training also stops after max_s seconds, the clock runs the same schedule over
    max_s (warm-up over its first tenth) and the one further on wins, so a run the clock stops has still annealed
    (by steps alone, one stopped at 500 of 700 steps ended at 31% of the rate, its last steps' noise unsettled);
    where the steps end first, it is the schedule by steps exactly."""
    warmup = max(1, steps // 10)
    by_time = elapsed_s / max_s if max_s else 0.0
    if step < warmup and by_time < 0.1:
        return max((step + 1) / warmup, by_time / 0.1)
    angle = max(math.pi * (step - warmup) / max(1, steps - warmup) if step >= warmup else 0.0,
                math.pi * (by_time - 0.1) / 0.9 if by_time >= 0.1 else 0.0)
    return 0.1 + 0.45 * (1 + math.cos(min(math.pi, angle)))


def train_checkpoint(path: Path, layers: int, shape: str, steps: int, seed: int = 0, lr: float = 3e-4,
                     embed_lr_mult: float = 1.0, batch: int = 8, seq: int = 256, max_s: float = 0,
                     in_backward: bool | None = None) -> dict:
    """A checkpoint of the shape trained for `steps` on markov_chain() sequences (see the module's doc); saved
    in float16 with the demo tokenizer. Returns the training's summary (loss, held-out accuracy). in_backward:
    AdamW steps each parameter inside the backward pass (adamw_in_backward; None: where memory asks for it), one
    optimizer a parameter, gradients never all held at once; the same update except that gradients are not
    clipped to a global norm (which needs them all)."""
    from transformers import LlamaForCausalLM

    from transformers import AutoTokenizer

    from ziya_batch.tools.demo_model import corpus_text, demo_config, write_demo_tokenizer
    from ziya_batch.tools.testing import markov_chain

    summary_file = path / "trained.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    path.mkdir(parents=True, exist_ok=True)
    write_demo_tokenizer(path, model_max_length=2048)
    tok = AutoTokenizer.from_pretrained(str(path))
    text = tok(corpus_text(), add_special_tokens=False)["input_ids"]
    cfg = demo_config(num_layers=layers, max_position_embeddings=2048, dtype="float16", **SHAPES[shape])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 1 << 62     # before the weights are on it
    torch.manual_seed(seed)
    with dev:
        model = LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16)
    model.config.use_cache = False
    # 13B: the activations of 40 layers would not fit beside Adam's state (newer transformers name the call
    # activation_checkpointing_enable and warn on the old name, which older ones have only)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    chain = markov_chain(cfg.vocab_size, seed)
    # bfloat16 parameters and moments (13B: 26 GB each of weights, gradients and the two moments) and no
    # foreach temporaries, so the 13B shape trains on one 141 GB card
    # the embedding learns at embed_lr_mult times the rate of the other weights (muP's rule for Adam): an update of
    # about the rate to every entry of a hidden matrix or of lm_head, whose inputs are normalized, moves its
    # outputs in proportion to the width (20x more at 5,120 than at the small shape's 256), while an embedding
    # row's update moves only that row; at one rate for all, 100 steps at 3e-4 stayed at the unigram loss
    embed = model.model.embed_tokens.weight
    rest = [q for q in model.parameters() if q is not embed]
    if in_backward is None:
        in_backward = adamw_in_backward(sum(q.numel() for q in model.parameters()), free)
    adamw = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    if in_backward:
        # one AdamW a parameter, stepped by a hook once the parameter's gradient is complete; its param_groups
        # are what the schedule below sets, as for the one optimizer
        def stepper(o: torch.optim.Optimizer):
            def step(_: torch.Tensor) -> None:
                o.step()
                o.zero_grad(set_to_none=True)
            return step

        groups, hooks = [], []
        for q in model.parameters():
            o = torch.optim.AdamW([{"params": [q], "mult": embed_lr_mult if q is embed else 1.0}], **adamw)
            hooks.append(q.register_post_accumulate_grad_hook(stepper(o)))
            groups += o.param_groups
        opt = o = None          # the hooks hold the optimizers (the loop's last one would outlive them)
    else:
        opt = torch.optim.AdamW([{"params": rest, "mult": 1.0}, {"params": [embed], "mult": embed_lr_mult}], **adamw)
        groups, hooks = opt.param_groups, []
    print(f"[stack] training: AdamW {'stepped inside the backward pass' if in_backward else 'after each backward'}",
          flush=True)
    t0, losses = time.monotonic(), []
    for step in range(steps):
        elapsed = time.monotonic() - t0
        if max_s and elapsed > max_s:
            print(f"[stack] training stopped at step {step} of {steps}: {max_s:.0f} s spent", flush=True)
            break
        scale = lr_scale(step, steps, elapsed, max_s)
        for gr in groups:
            gr["lr"] = lr * gr["mult"] * scale
        x, _, firsts = text_then_chain(batch, seq, tok, text, chain, seed * 100_000 + step)
        x = x.to(dev)
        logits = model(x).logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        # a prompt's last position has one example per segment against ~20 in its chain: weighted up, or the
        # look-back past the format's tokens is learnt far more slowly than the chain itself
        w = torch.ones(batch, seq - 1, device=dev)
        for b, t, _ in firsts:
            w[b, t] = FIRST_WEIGHT
        loss = (ce * w.reshape(-1)).sum() / w.sum()
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            print(f"[stack] train step {step}: loss {losses[-1]:.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
    for h in hooks:                 # they hold the per-parameter optimizers, and so their moments
        h.remove()
    del opt, groups, hooks
    model.eval()
    with torch.no_grad():
        x, in_chain, firsts = text_then_chain(8, seq, tok, text, chain, seed * 100_000 + 99_999)
        logits = model(x.to(dev)).logits.float().cpu()
        pred = logits.argmax(-1)
        # in the chain, the prediction is the likely successor of the token before
        acc = (pred == chain[0][x])[in_chain].float().mean().item()
        # at a prompt's last token: the likely successor of the text's last token
        first = sum(int(pred[b, t] == chain[0][k]) for b, t, k in firsts) / max(1, len(firsts))
        # what decides near-ties at the first generated token: the gap between the two highest logits there
        top2 = torch.stack([logits[b, t].topk(2).values for b, t, _ in firsts]) if firsts else torch.zeros(1, 2)
        first_gap = (top2[:, 0] - top2[:, 1]).median().item()
    model = model.to(torch.float16)
    model.save_pretrained(str(path), safe_serialization=True)
    summary = dict(steps=len(losses), lr=lr, embed_lr_mult=embed_lr_mult, batch=batch, seq=seq,
                   adamw_in_backward=in_backward,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
                   final_loss=sum(losses[-10:]) / len(losses[-10:]),
                   heldout_accuracy=acc, heldout_first_accuracy=first, heldout_first_logit_gap=first_gap,
                   train_s=time.monotonic() - t0)
    summary_file.write_text(json.dumps(summary))
    print(f"[stack] trained: {summary}", flush=True)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return summary


def text_then_chain(batch: int, seq: int, tok, text: list[int], chain: tuple[torch.Tensor, torch.Tensor],
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """[batch, seq] token ids, each row segments of: a prompt as the workers build it (Ziya's format around
    8..64 tokens of corpus text, tokenized whole), then 8..32 tokens of the chain from the text's last token
    (before the format's "\\n<bot>:"), so the model must look back past the format's tokens. Also returns
    where x[b, t + 1] is the chain's step from x[b, t], and (b, t, key) for each prompt's last position t whose
    next token is the chain's step from the text's last token `key`."""
    from ziya_batch.prompts import HUMAN, build_prompt

    likely, unlikely = chain
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(batch, seq, dtype=torch.int64)
    in_chain = torch.zeros(batch, seq, dtype=torch.bool)
    firsts = []
    for b in range(batch):
        t = 0
        while t < seq:
            n = int(torch.randint(8, 65, (1,), generator=g))
            off = int(torch.randint(0, len(text) - n, (1,), generator=g))
            query = tok.decode(text[off:off + n]).strip() or "hello"
            ids = tok(build_prompt(query))["input_ids"]
            head = tok(HUMAN + query)["input_ids"]
            key = head[-1] if ids[:len(head)] == head else ids[-1]
            ids = ids[:seq - t]
            x[b, t:t + len(ids)] = torch.tensor(ids)
            t += len(ids)
            if t >= seq:
                break
            firsts.append((b, t - 1, key))
            prev = key
            for _ in range(int(torch.randint(8, 33, (1,), generator=g))):
                if t >= seq:
                    break
                prev = int((likely if torch.rand(1, generator=g).item() < 0.9 else unlikely)[prev])
                x[b, t] = prev
                if t + 1 < seq:
                    in_chain[b, t] = True
                t += 1
            in_chain[b, t - 1] = False          # its next token starts a new prompt
    return x, in_chain, firsts


def write_inputs(work: Path, model: Path, requests: int, seed: int = 0) -> tuple[Path, Path]:
    """W1 as JSONL (prompt text cut from the shipped corpus to the drawn token length, per-line output length)
    and the parity prompts (the demo prompts)."""
    from transformers import AutoTokenizer

    from ziya_batch.tools.demo_model import DATA_DIR, DEMO_PROMPTS_FILE, corpus_text

    tok = AutoTokenizer.from_pretrained(str(model))
    ids = tok(corpus_text(), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    w1 = work / "w1.jsonl"
    with open(w1, "w") as fh:
        for i in range(requests):
            plen, olen = rng.randint(32, 512), rng.randint(32, 512)
            off = rng.randrange(0, len(ids) - plen)
            fh.write(json.dumps({"id": f"w1-{i}", "prompt": tok.decode(ids[off:off + plen]) or "hello",
                                 "sampling": {"max_new_tokens": olen, "min_new_tokens": olen, "ignore_eos": True}},
                                ensure_ascii=False) + "\n")
    parity = work / "parity.jsonl"
    lines = (DATA_DIR / DEMO_PROMPTS_FILE).read_text(encoding="utf-8").splitlines()[:64]
    parity.write_text("".join(json.dumps({**json.loads(line), "id": f"p{i}"}, ensure_ascii=False) + "\n"
                              for i, line in enumerate(lines)), encoding="utf-8")
    return w1, parity


def job_spec(name: str, model: Path, inp: Path, out: Path, tp: int, replicas: int, **extra) -> dict:
    spec = {"name": name, "model": {"path": str(model), "tensor_parallel": tp, "replicas": replicas},
            "input": [str(inp)], "output": {"path": str(out)}}
    spec.update(extra)
    return spec


def parity(work: Path, model: Path, inp: Path, redis_url: str) -> dict:
    import yaml

    for tp in (1, 2):
        out = work / f"parity-out-tp{tp}"
        spec = job_spec(f"parity-tp{tp}", model, inp, out, tp, 1,
                        sampling={"temperature": 0, "max_new_tokens": PARITY_TOKENS, "min_new_tokens": PARITY_TOKENS,
                                  "ignore_eos": True}, shard_size=64)
        spec["output"]["records"] = ["results", "experience"]
        path = work / f"parity-tp{tp}.yaml"
        path.write_text(yaml.safe_dump(spec))
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "ziya_batch.cli", "run", str(path), "--redis-url", redis_url, "-q"],
                       check=True)
        print(f"[stack] parity tp={tp}: ziya-batch run took {time.time() - t0:.0f} s", flush=True)
    return compare_parity(work)


def compare_parity(work: Path) -> dict:
    from ziya_batch import io

    got = {tp: {r["id"]: r["response_ids"] for r in io.read_parts(str(work / f"parity-out-tp{tp}"), "experience")}
           for tp in (1, 2)}
    ids = sorted(got[1])
    equal = sum(got[1][i] == got[2].get(i) for i in ids)
    first_diff = [next((j for j, (x, y) in enumerate(zip(got[1][i], got[2].get(i, []))) if x != y), None)
                  for i in ids if got[1][i] != got[2].get(i)]
    return dict(prompts=len(ids), equal=equal, fraction=equal / max(1, len(ids)), first_divergence=first_diff)


def throughput(work: Path, model: Path, w1: Path, redis_url: str, configs: list[tuple[int, int]],
               parity_in: Path | None = None, shard_size: int = 512, schedule: str | None = None) -> list[dict]:
    import ray

    from ziya_batch.queue import Broker
    from ziya_batch.runtime.replicas import ReplicaManager
    from ziya_batch.jobs import submit_job
    from ziya_batch.spec import EngineSpec, parse_spec

    schedule = schedule or EngineSpec.model_fields["schedule"].default
    broker = Broker.from_url(redis_url)
    warm_in = work / "warm.jsonl"
    warm_in.write_text("".join(json.dumps({"id": f"warm{i}", "prompt": f"warm-up {i}"}) + "\n" for i in range(8)))
    ray.init(address="local", num_gpus=torch.cuda.device_count() or 2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for tp, replicas in configs:
            tag = f"tp{tp}-x{replicas}"
            engine = {"gpu_memory_fraction": 0.92, "schedule": schedule}
            warm = parse_spec(job_spec(f"warm-{tag}", model, warm_in, work / f"warm-out-{tag}", tp, replicas,
                                       shard_size=1, sampling={"max_new_tokens": 8}, engine=engine))
            job = parse_spec(job_spec(f"w1-{tag}", model, w1, work / f"w1-out-{tag}", tp, replicas,
                                      shard_size=shard_size, engine=engine))
            t_load = time.time()
            warm_id = submit_job(warm, broker).job_id
            manager = ReplicaManager(redis_url, tensor_parallel=tp, replicas=replicas, use_gpus=True,
                                     worker_prefix=f"bench-{tag}", job_id=warm_id)
            try:
                _wait(broker, manager, warm_id)
                load_s = time.time() - t_load
                if parity_in is not None and replicas == 1 and tp in (1, 2):
                    # greedy parity job on the same loaded replica (same engine key as W1's)
                    pspec = job_spec(f"parity-tp{tp}", model, parity_in, work / f"parity-out-tp{tp}", tp, replicas,
                                     sampling={"temperature": 0, "max_new_tokens": PARITY_TOKENS,
                                               "min_new_tokens": PARITY_TOKENS, "ignore_eos": True},
                                     shard_size=64, engine=engine)
                    pspec["output"]["records"] = ["results", "experience"]
                    _wait(broker, manager, submit_job(parse_spec(pspec), broker).job_id)
                t0 = time.time()
                job_id = submit_job(job, broker).job_id
                st = _wait(broker, manager, job_id, poll_s=0.2)
                wall = time.time() - t0
            finally:
                manager.stop()
            rows.append(dict(config=tag, tensor_parallel=tp, replicas=replicas, gpus=tp * replicas, shard_size=shard_size, schedule=schedule,
                             prompts=st.prompts_done, failed=st.prompts_failed, output_tokens=st.output_tokens,
                             wall_s=wall, output_tok_s=st.output_tokens / wall, warmup_s=load_s,
                             state=st.state.value))
            print(f"[stack] {tag}: {rows[-1]}", flush=True)
    finally:
        ray.shutdown()
    return rows


def _wait(broker, manager, job_id: str, poll_s: float = 0.5, timeout_s: float = 900):
    from ziya_batch.jobs import finalize_if_ready

    t0 = time.time()
    while time.time() - t0 < timeout_s:
        manager.reconcile()
        broker.reap()
        finalize_if_ready(broker, job_id)
        st = broker.status(job_id)
        if st.state.is_finished():
            return st
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} did not finish in {timeout_s} s")


def render(par: dict, rows: list[dict], card: str, commit: str) -> str:
    base = next((r for r in rows if r["config"] == "tp1-x1"), None)
    lines = [f"Card: {card} x{max(1, torch.cuda.device_count())}; date: {time.strftime('%Y-%m-%d')}; commit: {commit}.", ""]
    if par:
        lines += [f"Parity (`ziya-batch run`, tensor_parallel 2 against 1, greedy, {PARITY_TOKENS} tokens, EOS "
                  f"ignored): {par['equal']} of {par['prompts']} prompts equal ({100 * par['fraction']:.0f}%); first "
                  f"differing token of the others: {par['first_divergence']}.", ""]
    lines += ["| replicas x tensor_parallel | GPUs | shard_size | schedule | prompts | output tokens | seconds | "
              "output tok/s | vs 1 x TP1 | warm-up s |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        rel = f"{r['output_tok_s'] / base['output_tok_s']:.2f}x" if base else "–"
        lines.append(f"| {r['replicas']} x TP{r['tensor_parallel']} | {r['gpus']} | {r['shard_size']} | {r['schedule']} | {r['prompts']} | "
                     f"{r['output_tokens']:,} | {r['wall_s']:.1f} | {r['output_tok_s']:,.0f} | {rel} | "
                     f"{r['warmup_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/stack")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--shape", choices=sorted(SHAPES), default="13B")
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--parity-cli", action="store_true",
                   help="parity through two `ziya-batch run` calls (two more model loads) instead of jobs on the "
                        "throughput runs' loaded replicas")
    p.add_argument("--checkpoint-only", action="store_true", help="write the checkpoint and stop")
    p.add_argument("--trained-steps", type=int, default=0,
                   help="train the checkpoint this many steps on a Markov chain (0: random weights)")
    p.add_argument("--trained-lr", type=float, default=3e-4, help="peak learning rate of that training")
    p.add_argument("--trained-embed-lr-mult", type=float, default=1.0,
                   help="the embedding's rate as a multiple of --trained-lr")
    p.add_argument("--train-max-s", type=float, default=0, help="stop the training after this many seconds")
    p.add_argument("--shard-size", type=int, default=512, help="W1's shard_size (default 512, the spec's default)")
    p.add_argument("--schedule", default=None, help="the jobs' engine.schedule (default: the spec's)")
    p.add_argument("--configs", default="1x1,2x1,1x2", help="TPxREPLICAS,... (default 1x1,2x1,1x2)")
    a = p.parse_args()
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    trained = {}
    if a.trained_steps:
        model = work / f"model-trained{a.trained_steps}"
        trained = train_checkpoint(model, a.layers, a.shape, a.trained_steps, lr=a.trained_lr,
                                   embed_lr_mult=a.trained_embed_lr_mult, max_s=a.train_max_s)
    else:
        model = work / "model"
        write_checkpoint(model, a.layers, a.shape)
    print(f"[stack] checkpoint ready in {time.time() - t0:.0f} s", flush=True)
    if a.checkpoint_only:
        return
    from ziya_batch.queue.server import PrivateRedis

    w1, par_in = write_inputs(work, model, a.requests)
    redis = PrivateRedis(work / "redis")
    url = redis.start()
    try:
        configs = [tuple(int(x) for x in c.split("x")) for c in a.configs.split(",")]
        par = {}
        if a.parity_cli:
            par = parity(work, model, par_in, url)
        rows = throughput(work, model, w1, url, configs, None if a.parity_cli or a.skip_parity else par_in,
                          a.shard_size, a.schedule)
        if not a.parity_cli and not a.skip_parity:
            if {(1, 1), (2, 1)} <= set(configs):
                par = compare_parity(work)
            else:
                print("[stack] parity needs the configurations 1x1 and 2x1: not measured", flush=True)
        print(f"[stack] parity: {par}", flush=True)
    finally:
        redis.stop()
    commit = os.environ.get("ZIYA_BATCH_COMMIT", "unknown")
    (out / "stack.json").write_text(json.dumps({"parity": par, "rows": rows, "trained": trained}, indent=1))
    md = render(par, rows, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", commit)
    if trained:
        md = (f"Weights: trained {trained['steps']} steps on a Markov chain (final loss {trained['final_loss']:.3f}, "
              f"held-out accuracy {100 * trained['heldout_accuracy']:.1f}%, on the first token after the text "
              f"{100 * trained['heldout_first_accuracy']:.1f}%).\n\n") + md
    (out / "stack.md").write_text(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
