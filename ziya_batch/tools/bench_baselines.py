"""The transformers baselines of W1: the model card's method (`generate` on static left-padded batches) and
transformers' own continuous batching, on a transformers LLaMA of the bench's shape with random weights. Both
are slow, so each runs on the first requests of the workload for a bounded time and reports tokens/s over what
it generated in that time (the continuous batching manager's stream shows unfinished requests' tokens too); its
row's note says how much that was."""
from __future__ import annotations

import gc
import inspect
import time

import torch

from ziya_batch.engine.model import ModelArgs
from ziya_batch.engine.types import PAD_ID
from ziya_batch.tools.bench_core import CARD

HF_GENERATE_BUDGET_S = 60.0      # wall-clock cap per transformers baseline
HF_CONTINUOUS_BUDGET_S = 75.0
HF_CONTINUOUS_REQUESTS = 256


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
    """transformers' continuous batching manager (paged attention, its own scheduler). Where the manager streams
    (add_request(streaming=True)), every token it generated within the cap counts, finished request or not;
    without streaming, only finished requests' tokens can be seen (fewer: a lower bound)."""
    from transformers import GenerationConfig
    sub = work[:HF_CONTINUOUS_REQUESTS]
    torch.cuda.reset_peak_memory_stats()
    gc_cfg = GenerationConfig(max_new_tokens=512, do_sample=True, top_p=CARD.top_p, temperature=CARD.temperature,
                              eos_token_id=-1, pad_token_id=PAD_ID)
    manager = model.init_continuous_batching(generation_config=gc_cfg)
    manager.start()
    params = inspect.signature(manager.add_request).parameters
    kw = {"eos_token_id": -1} if "eos_token_id" in params else {}
    if "streaming" in params:
        kw["streaming"] = True
    t0 = time.perf_counter()
    for i, (p, o) in enumerate(sub):
        manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=o, **kw)
    tally = StreamTally()
    while tally.finished < len(sub) and time.perf_counter() - t0 < HF_CONTINUOUS_BUDGET_S:
        r = manager.get_result(timeout=1.0)
        if r is not None:
            tally.add(r.request_id, len(r.generated_tokens), _finished(r) or not kw.get("streaming"))
    wall = time.perf_counter() - t0
    try:
        manager.stop(block=True, timeout=10)
    except TypeError:
        manager.stop()
    counted = ("every generated token counted (streamed), unfinished requests' too" if kw.get("streaming")
               else "unfinished ones not counted")
    return dict(method="hf-continuous", requests=len(sub), output_tokens=tally.tokens, wall_s=wall,
                output_tok_s=tally.tokens / wall, prefill_tok_s=None, decode_tok_s=None,
                finished_tok_s=tally.finished_tokens / wall if kw.get("streaming") else None,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                note=f"the first {len(sub)} requests for {wall:.0f} s (capped at {HF_CONTINUOUS_BUDGET_S:.0f} s): "
                     f"{tally.finished} finished, {tally.tokens:,} tokens; {counted}"
                     + (f" (finished requests' alone: {tally.finished_tokens:,}, "
                        f"{tally.finished_tokens / wall:,.0f} tok/s)" if kw.get("streaming") else ""))


def _finished(result) -> bool:
    done = getattr(result, "is_finished", None)
    if callable(done):
        return bool(done())
    return str(getattr(result, "status", "")).upper().endswith("FINISHED")


class StreamTally:
    """Tokens generated per request from a stream of results. A result carries either all of its request's
    tokens so far (cumulative: each longer than the last) or only the new ones (incremental); which, is told by
    the stream itself: a request whose result is shorter than its previous one, or as long without finishing it,
    streams increments (a cumulative stream may repeat its last length once, in the result that finishes it)."""

    def __init__(self) -> None:
        self.longest: dict[str, int] = {}
        self.summed: dict[str, int] = {}
        self.incremental = False
        self.done: set[str] = set()

    def add(self, request_id: str, n: int, finished: bool) -> None:
        prev = self.longest.get(request_id)
        if prev is not None and (n < prev or (n == prev and not finished)):
            self.incremental = True
        self.longest[request_id] = max(n, self.longest.get(request_id, 0))
        self.summed[request_id] = self.summed.get(request_id, 0) + n
        if finished:
            self.done.add(request_id)

    @property
    def tokens(self) -> int:
        return sum((self.summed if self.incremental else self.longest).values())

    @property
    def finished(self) -> int:
        return len(self.done)

    @property
    def finished_tokens(self) -> int:
        """Tokens of the requests that finished (what a count without streaming sees)."""
        counts = self.summed if self.incremental else self.longest
        return sum(counts[r] for r in self.done)
