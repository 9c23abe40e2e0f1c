"""The `ziya-batch` command. Every error a user can cause ends in one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from .errors import ZiyaBatchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Batch generation jobs for Ziya-LLaMA-13B on a Redis queue and a Ray cluster.")

REDIS_HELP = "Redis URL (default: $ZIYA_BATCH_REDIS_URL; `run` starts a private redis-server without it)"


def _broker(redis_url: Optional[str]):
    from .runtime.services import connect_broker

    return connect_broker(redis_url)


@app.command()
def run(
    job: str = typer.Argument(..., help="Job spec (YAML or JSON)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker actors to start (default: one per local GPU, or one on the CPU)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
    cpu: bool = typer.Option(False, "--cpu", help="Run replicas on CPUs even where GPUs exist"),
):
    """Start what is missing, submit the job (or resume it), run workers until it is done."""
    from .runtime.local import run_job

    code = run_job(job, redis_url=redis_url, ray_address=address, num_workers=workers, progress=not quiet, cpu=cpu)
    raise typer.Exit(code)


@app.command()
def submit(
    job: str = typer.Argument(..., help="Job spec (YAML or JSON)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
):
    """Validate the spec, index the input into shards and queue it; prints the job id."""
    from .jobs import submit_job
    from .work.models import unserved_note
    from .spec import load_spec

    spec = load_spec(job)
    broker = _broker(redis_url)
    changed: list[str] = []
    st = submit_job(spec, broker, check_model_dir=True, changes=changed)
    typer.echo(st.job_id)
    if changed:
        typer.echo(f"resumed with {'; '.join(changed)} (workers that start from now on use them)", err=True)
    try:
        note = None if st.state.is_finished() else unserved_note(broker, st.job_id)
    except Exception:  # noqa: BLE001 - the job is queued; a hint that cannot be worked out is left out
        note = None
    if note:
        typer.echo(f"note: {note}", err=True)


@app.command()
def status(
    job_id: Optional[str] = typer.Argument(None, help="A job id; without it every job is listed"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh live until Ctrl-C"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
    interval_s: float = typer.Option(2.0, "--interval", help="Seconds between refreshes with --watch"),
):
    """Jobs with state, prompts done/failed/total, tokens/s, ETA and workers."""
    from .runtime.status_view import show_status

    show_status(_broker(redis_url), job_id, watch=watch, as_json=as_json, interval_s=interval_s)


@app.command()
def cancel(
    job_id: str = typer.Argument(...),
    abandon: bool = typer.Option(False, "--abandon", help="Abandon running shards instead of letting them finish"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
):
    """Stop handing out the job's shards; committed parts stay."""
    from .jobs import cancel_job

    st = cancel_job(_broker(redis_url), job_id, abandon_running=abandon)
    how = "running shards are abandoned" if abandon else "running shards finish and are kept"
    typer.echo(f"{job_id}: {st.state.value} ({how})")


@app.command()
def worker(
    address: Optional[str] = typer.Option(None, "--address", help="Ray address to join (default: $RAY_ADDRESS)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", min=1, help="GPUs one replica is sharded over"),
    job: Optional[str] = typer.Option(None, "--job", help="With --tensor-parallel > 1: load this job's model at start "
                                      "(replicas otherwise load the model of the first shard they claim)"),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", min=0,
                                           help="GPUs the node offers when this command starts it (default: all)"),
    start_node: bool = typer.Option(False, "--start-node",
                                    help="Start a node even if this host already is one (e.g. a head offering no GPUs)"),
):
    """Join a Ray cluster and serve the queue with this node's GPUs until stopped. Starts a Ray node for the
    purpose unless this host already is one; that node stops with the command."""
    from .errors import SpecError, ZiyaBatchError
    from .runtime.cluster import serve_node
    from .runtime.services import connect_broker

    if job:

        try:
            want = connect_broker(redis_url, warn=False).get_spec(job).model.tensor_parallel
        except ZiyaBatchError:
            raise
        except Exception:  # noqa: BLE001 - Redis not reachable yet: the replicas wait for it, as without --job
            want = tensor_parallel
        if want != tensor_parallel:
            raise SpecError(f"--job {job} asks for tensor_parallel {want}, but --tensor-parallel is {tensor_parallel}: "
                            f"these replicas would never serve it")
    serve_node(redis_url=redis_url, ray_address=address, tensor_parallel=tensor_parallel, job_id=job,
               num_gpus=num_gpus, start_node=start_node)


@app.command("merge-delta")
def merge_delta(
    base: str = typer.Option(..., "--base", help="LLaMA base checkpoint directory"),
    delta: str = typer.Option(..., "--delta", help="Ziya delta checkpoint directory"),
    target: str = typer.Option(..., "--target", help="Where to write the merged checkpoint"),
):
    """The model card's apply_delta step, tensor by tensor in bounded memory."""
    from .engine.merge_delta import main as do_merge

    do_merge(base, delta, target)


@app.command()
def quantize(
    model: str = typer.Option(..., "--model", help="Float16 Hugging Face LLaMA checkpoint directory"),
    target: str = typer.Option(..., "--target", help="New or empty directory for the FP8 checkpoint"),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest output file (bounds host memory)"),
    device: str = typer.Option("auto", "--device", help="Where to quantise: auto (a GPU if any), cpu, cuda:N"),
):
    """Write an FP8 copy of a checkpoint (float8 linear weights with per-channel scales, compressed-tensors
    layout), tensor by tensor, for jobs with model.quantization: fp8."""
    from .engine.fp8_checkpoint import main as do_quantize

    do_quantize(model, target, max_shard_size, device)


@app.command("demo-model")
def demo_model(path: str = typer.Argument(..., help="Directory to write the tiny model into")):
    """Write a tiny random-weight model with Ziya's architecture and a real sentencepiece tokenizer."""
    from .tools.demo_model import main as write_demo

    write_demo(path)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    model: Optional[str] = typer.Option(None, "--model", help="Model for OpenAI-batch jobs (default: $ZIYA_BATCH_MODEL)"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Where uploaded files and batch outputs go"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)"),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Serve without a bearer token (local experiments only)"),
):
    """The HTTP API on Ray Serve (token from $ZIYA_BATCH_API_TOKEN, input prefixes from $ZIYA_BATCH_ALLOWED_PREFIXES)."""
    from .api.serve import serve_main

    serve_main(host=host, port=port, model=model, storage=storage, redis_url=redis_url, ray_address=address,
               insecure_no_auth=insecure_no_auth)


@app.command()
def report(
    job_id: str = typer.Argument(..., help="A job id, or an output URL holding a manifest"),
    out: str = typer.Option("report.html", "--out", "-o", help="HTML file to write"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
):
    """Write a self-contained HTML report of a job: throughput, lengths, finish reasons, rewards, errors."""
    from .report import report_main

    report_main(job_id, out, redis_url=redis_url)
    typer.echo(f"report written to {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(ctx: typer.Context):
    """The throughput benchmark on the 13B shape, workload W1, with the baselines side by side
    (`ziya-batch bench --help` lists its options)."""
    # the options are defined once, by the bench's own parser (tools/bench.py), which gets the arguments as given
    from .tools.bench import main as run_bench

    run_bench(ctx.args, prog="ziya-batch bench")


def main(argv: Optional[list] = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except ZiyaBatchError as err:
        print(f"ziya-batch: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("ziya-batch: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
