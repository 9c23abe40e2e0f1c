"""The throughput benchmark (README, `ziya-batch bench`; docs/BENCHMARKS.md): LLaMA-13B's shape with random float16 weights made on
the GPU, workload W1 (prompt and output lengths uniform in 32..512, EOS ignored), and in one run:
our engine, the model card's method (transformers `generate` on static left-padded batches), transformers'
own continuous batching, and the decode roofline (weights + KV bytes of every decode step the engine ran,
over the measured device copy bandwidth).

The two transformers baselines are slow, so each runs on the first requests of the workload for a bounded
time and reports tokens/s over what it finished; the table's note says how much that was.

This module is the command (options, W1 over one GPU or several, the table and docs/BENCHMARKS.md); the engine
run it times is in bench_core.py, the other workloads in bench_workloads.py, the transformers baselines in
bench_baselines.py. Their names are importable from here too, where scripts/gpu/ imports them."""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import sys
from typing import Optional

import torch

from ziya_batch import settings
from ziya_batch.engine.kv_cache import KV_CACHE_DTYPES
from ziya_batch.engine.scheduler import POLICIES
from ziya_batch.errors import ModelError
from ziya_batch.tools.bench_baselines import _hf_model, bench_hf_continuous, bench_hf_generate
from ziya_batch.tools.bench_core import (VARIANT_KEYS, BenchOptions, _args, _breakdown_text, _build_engine, _fmt,
                                         _git_commit, _print_profile, _print_row, _print_table, bench_engine,
                                         max_seats, measure_copy_bandwidth_bytes_s, parse_variant, ratios_text,
                                         workload_w1)
# names scripts/gpu/ and the tests import from here
from ziya_batch.tools.bench_core import (BENCH_ENGINE, CARD, _kernel_profile, _sampling, _time_s,  # noqa: F401
                                         _weight_bytes, profile_decode_step, profile_kernels)
from ziya_batch.tools.bench_workloads import (PREFIX_CACHING, WORKLOADS, bench_logprobs, bench_w3,
                                              parse_logprobs_variant, run_prefix_bench)
from ziya_batch.tools.bench_workloads import w3_schema, workload_w2, workload_w2g  # noqa: F401

METHODS = ("engine", "hf-generate", "hf-continuous", "roofline")
MIXED_GRAPHS = {"on": (True,), "off": (False,), "both": (True, False)}
SECTION = "## Engine (workload W1)"
# the part of SECTION that --markdown rewrites; the section's other subsections are hand-written notes
GENERATED = "### Last `ziya-batch bench --markdown` run"


def _tp_bench_rank(rank: int, world_size: int, init_file: str, layers: int, requests: int, seed: int,
                   result_file: str, schedule: str = BenchOptions.schedule,
                   kv_cache_dtype: str = BenchOptions.kv_cache_dtype,
                   quantization: Optional[str] = BenchOptions.quantization, mixed_graphs: bool = True,
                   max_num_seqs: int = BenchOptions.max_num_seqs) -> None:
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
                                     schedule, kv_cache_dtype, quantization=quantization,
                                     mixed_step_graphs=mixed_graphs, max_num_seqs=max_num_seqs)
            with open(result_file, "w") as fh:
                json.dump({"row": row, "prof": prof, "bw": bw}, fh)
        else:
            eng, _ = _build_engine(a, device, seed, rank, world_size, schedule, kv_cache_dtype,
                                   quantization=quantization, mixed_step_graphs=mixed_graphs,
                                   max_num_seqs=max_num_seqs)
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
                                       opts.schedule, opts.kv_cache_dtype, opts.quantization,
                                       MIXED_GRAPHS[opts.mixed_graphs][0], opts.max_num_seqs), nprocs=k, join=True)
        with open(result) as fh:
            got = json.load(fh)
    return got["row"], got["prof"], got["bw"]


def _roofline_row(requests: int, row: dict, prof: dict, bw: float, tensor_parallel: int) -> dict:
    """The decode roofline of one engine row: its decode-only steps' tokens over their weight + KV bytes at the
    measured copy bandwidth."""
    return dict(method="roofline", requests=requests, output_tokens=row["output_tokens"], wall_s=None,
                output_tok_s=prof["floor_tok_s"], prefill_tok_s=None, decode_tok_s=None, peak_gib=None,
                note=f"engine's decode steps at {bw / 1e12:.2f} TB/s copy bandwidth (weights + KV bytes per step"
                     + (f", per GPU of {tensor_parallel})" if tensor_parallel > 1 else ")")
                     + (f"; {row['config']}" if row.get("config") else ""))


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
    if opts.mixed_graphs not in MIXED_GRAPHS:
        raise ModelError(f"bench --mixed-graphs must be one of {', '.join(MIXED_GRAPHS)}, not {opts.mixed_graphs!r}")
    if opts.mixed_graphs == "both" and opts.tensor_parallel > 1:
        raise ModelError("bench --mixed-graphs both runs on one GPU: leave out --tensor-parallel, or pick on or off")
    if opts.max_num_seqs != BenchOptions.max_num_seqs and (opts.workload != "W1" or opts.prefix_caching != "on"):
        raise ModelError("bench --max-num-seqs applies to workload W1's engine rows: leave it out for "
                         f"--workload {opts.workload} / --prefix-caching {opts.prefix_caching}")
    if opts.also and (opts.workload != "W1" or opts.prefix_caching != "on" or opts.tensor_parallel > 1):
        raise ModelError("bench --also adds engine rows to workload W1 on one GPU: leave out --workload, "
                         "--prefix-caching and --tensor-parallel")
    for text in opts.also:
        try:
            v = parse_variant(text)
        except ValueError as e:
            raise ModelError(f"bench --also {text[:80]!r}: {e}") from None
        if v.get("fp8_fast_accum") and v.get("quantization", opts.quantization) != "fp8":
            raise ModelError(f"bench --also {text[:80]!r}: fp8-fast-accum=on needs FP8 weights: add "
                             "quantization=fp8 (or run with --quantization fp8)")
    if opts.schedule not in POLICIES:
        raise ModelError(f"bench --schedule must be one of {', '.join(POLICIES)}, not {opts.schedule!r}")
    only = set(opts.only) or set(METHODS)
    unknown = only - set(METHODS)
    if unknown:
        raise ModelError(f"unknown bench method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if opts.also and not only & {"engine", "roofline"}:
        raise ModelError("bench --also adds engine rows: keep engine or roofline in --only")
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
        engine_rows = []
        if opts.tensor_parallel == 1:
            for mixed in MIXED_GRAPHS[opts.mixed_graphs]:        # the first variant's profile is the table's
                r, p = bench_engine(a, work, device, bw, opts.seed, schedule=opts.schedule,
                                    kv_cache_dtype=opts.kv_cache_dtype, quantization=opts.quantization,
                                    mixed_step_graphs=mixed, max_num_seqs=opts.max_num_seqs)
                engine_rows.append(r)
                if prof is None:
                    row, prof = r, p
                if "engine" in only:
                    _print_row(r)
        else:
            engine_rows.append(row)
            if "engine" in only:
                _print_row(row)
        if "engine" in only:
            rows += engine_rows
        if "roofline" in only:
            rows.append(_roofline_row(len(work), row, prof, bw, opts.tensor_parallel))
            _print_row(rows[-1])
        for text in opts.also:          # the variants, each with its roofline and profile
            cfg = dict(quantization=opts.quantization, kv_cache_dtype=opts.kv_cache_dtype,
                       mixed_step_graphs=MIXED_GRAPHS[opts.mixed_graphs][0], max_num_seqs=opts.max_num_seqs)
            cfg.update(parse_variant(text))
            try:
                r, p = bench_engine(a, work, device, bw, opts.seed, schedule=opts.schedule, **cfg)
            except Exception as e:  # a variant failing must not lose the rows before it or the baselines after
                rows.append(dict(method="engine", config=text, requests=0, output_tokens=0, wall_s=None,
                                 output_tok_s=None, prefill_tok_s=None, decode_tok_s=None, peak_gib=None,
                                 note=f"--also {text} failed: {type(e).__name__}: {str(e)[:160]}"))
                _print_row(rows[-1])
                r = None
            if r is None:                       # out of the except block, so its traceback no longer holds the engine
                gc.collect(); torch.cuda.empty_cache()
                continue
            if "engine" in only:
                rows.append(r)
                _print_row(r)
            if "roofline" in only:
                rows.append(_roofline_row(len(work), r, p, bw, opts.tensor_parallel))
                _print_row(rows[-1])
            print(f"[bench] --also {text}:", flush=True)
            _print_profile(p)
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
                     f"{_fmt(r['decode_tok_s'])} | {_fmt(r['peak_gib'], '.1f')} | {r['requests']} | {_cell(r['note'])} |")
    ratios = ratios_text(rows)
    if ratios:
        lines += ["", ratios]
    if prof:
        lines += ["", f"One decode-only step, mean over {prof['decode_steps']} steps: {prof['decode_step_ms']:.2f} ms "
                      f"measured against a byte floor of {prof['floor_step_ms']:.2f} ms (mean batch "
                      f"{prof['decode_batch']:.1f}); host time per step (schedule, inputs, launch) "
                      f"{prof['host_ms']:.2f} ms; on the GPU, from the end of the step before (or its first "
                      f"launch, if the GPU was idle) to the end of its sampling {prof['decode_gpu_ms']:.2f} ms. Steps with prefill "
                      f"({'CUDA graphs in pieces' if prof.get('mixed_graphs') else 'eager'}): {prof['mixed_steps']}, "
                      f"{prof['mixed_step_ms']:.2f} ms each ({prof['mixed_gpu_ms']:.2f} ms on the GPU), "
                      f"{prof['mixed_prefill']:.0f} prefill and {prof['mixed_decode']:.0f} decode tokens each.", "",
                      _breakdown_text(prof)]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A note as one markdown table cell: a failed row's exception text may hold newlines or '|'."""
    return " ".join(str(text).split()).replace("|", "\\|")


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


def _seats(text: str) -> int:
    """engine.max_num_seqs as a job spec bounds it."""
    n = _positive(text)
    top = max_seats()
    if n > top:
        raise argparse.ArgumentTypeError(f"must be at most {top} (engine.max_num_seqs), not {n}")
    return n


def _variant(text: str) -> str:
    try:
        parse_variant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


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
    p.add_argument("--max-num-seqs", type=_seats, default=d.max_num_seqs,
                   help="the engine's seats (engine.max_num_seqs of a job spec; CUDA graphs up to 512)")
    p.add_argument("--also", action="append", type=_variant, default=[], metavar="CONFIG",
                   help="one more W1 engine row in the same run (repeat for more), the first one's configuration "
                        f"changed by comma-separated KEY=VALUE with KEY one of {', '.join(VARIANT_KEYS)}, e.g. "
                        "quantization=fp8,kv-cache-dtype=fp8,max-num-seqs=512; each gets its roofline")
    p.add_argument("--mixed-graphs", choices=tuple(MIXED_GRAPHS), default=d.mixed_graphs,
                   help="steps with prefill from CUDA graphs captured in pieces (on) or eager (off); both: one "
                        "engine row each, in one process")
    return p


def parse_options(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> BenchOptions:
    a = parser(prog).parse_args(argv)
    only = tuple(x for o in a.only for x in o.split(",") if x)
    return BenchOptions(a.layers, a.requests, a.tensor_parallel, a.markdown, only, a.seed, a.schedule,
                        a.kv_cache_dtype, a.workload, a.prefix_caching, a.quantization,
                        tuple(x for o in a.logprobs for x in o.split(",") if x), a.mixed_graphs, a.max_num_seqs,
                        tuple(a.also))


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> None:
    run_bench(parse_options(argv, prog))


if __name__ == "__main__":
    main()
