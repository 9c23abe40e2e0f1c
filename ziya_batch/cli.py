"""The `ziya-batch` command. Every error a user can cause ends in one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from .errors import ZiyaBatchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Batch generation jobs for Ziya-LLaMA-13B on a Redis queue and a Ray cluster.")

REDIS_HELP = ("Redis URL (default: $ZIYA_BATCH_REDIS_URL; without it, the private redis-server under "
              "$ZIYA_BATCH_HOME that every command shares, started when not running)")
# Bounds of the numeric options: past them a value is a typo, and would fail later as a traceback (a port past
# 65535 is an OverflowError deep in the HTTP server) or never (a sleep of nan seconds)
MAX_PORT = 65_535
MAX_TENSOR_PARALLEL = 64          # as the spec's model.tensor_parallel
MAX_LOCAL_WORKERS = 1_024         # GPUs (or worker actors) on one host: far past any machine's
MAX_INTERVAL_S = 3_600.0
REMOTE_CODE_HELP = ("Let this command's workers load models with trust_remote_code (runs Python code from the model "
                    "directory); without it a job asking for it is refused. Also $ZIYA_BATCH_ALLOW_REMOTE_CODE=1")


def _allow_remote_code(given: bool) -> None:
    from . import settings

    if given:
        settings.set_allow_remote_code()


def _interval(value: float) -> float:
    # the range checked here, not by typer's min/max: those let nan through (every comparison with it is false)
    # or, in newer typers, refuse it as "should be <= 3600"
    if value != value:
        raise typer.BadParameter("not a number")
    if not 0.1 <= value <= MAX_INTERVAL_S:
        raise typer.BadParameter(f"{value:g} is outside 0.1..{MAX_INTERVAL_S:g} seconds")
    return value


def _broker(redis_url: Optional[str]):
    from .runtime.services import connect_broker

    return connect_broker(redis_url)


@app.command()
def run(
    job: str = typer.Argument(..., help="Job spec (YAML or JSON)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, max=MAX_LOCAL_WORKERS, help="Worker actors to start (default: one per local GPU, or one on the CPU)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
    cpu: bool = typer.Option(False, "--cpu", help="Run replicas on CPUs even where GPUs exist"),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code", help=REMOTE_CODE_HELP),
):
    """Start what is missing, submit the job (or resume it), run workers until it is done."""
    from .runtime.local import run_job

    _allow_remote_code(allow_remote_code)
    code = run_job(job, redis_url=redis_url, ray_address=address, num_workers=workers, progress=not quiet, cpu=cpu)
    raise typer.Exit(code)


@app.command()
def submit(
    job: str = typer.Argument(..., help="Job spec (YAML or JSON)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
):
    """Validate the spec, index the input into shards and queue it; prints the job id."""
    from .errors import escape_controls
    from .jobs import submit_job, unserved_note
    from .spec import load_spec

    spec = load_spec(job)
    broker = _broker(redis_url)
    changed: list[str] = []
    st = submit_job(spec, broker, check_model_dir=True, changes=changed)
    typer.echo(st.job_id)
    # the notes quote text others wrote (a worker's note: a model's load error, which may quote its config): escaped
    if changed:
        typer.echo(escape_controls(f"resumed with {'; '.join(changed)} (workers that start from now on use them)"),
                   err=True)
    try:
        note = None if st.state.is_finished() else unserved_note(broker, st.job_id)
    except Exception:  # noqa: BLE001 - the job is queued; a hint that cannot be worked out is left out
        note = None
    if note:
        typer.echo(escape_controls(f"note: {note}"), err=True)


@app.command()
def status(
    job_id: Optional[str] = typer.Argument(None, help="A job id; without it every job is listed"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh live until Ctrl-C"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
    interval_s: float = typer.Option(2.0, "--interval", callback=_interval,
                                     help="Seconds between refreshes with --watch"),
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


def _duration(value: Optional[str]) -> Optional[str]:
    from .jobs import parse_duration

    if value is not None:
        try:
            parse_duration(value)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
    return value


@app.command()
def forget(
    job_ids: Optional[list[str]] = typer.Argument(None, metavar="JOB_ID", show_default=False,
                                                  help="Finished jobs to forget"),
    finished_before: Optional[str] = typer.Option(None, "--finished-before", metavar="DURATION", callback=_duration,
                                                  help="Forget every job that finished more than DURATION ago "
                                                       "(30m, 12h, 7d, 2w; 1d12h), instead of naming them"),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be forgotten; change nothing"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
):
    """Drop finished jobs (completed, failed, cancelled) from Redis; their output (parts, manifest.json) stays.
    Submitting a completed job's spec again finds its manifest and runs nothing."""
    from .errors import escape_controls
    from .jobs import describe_forgotten, forget_finished_before, forget_job, parse_duration

    if not job_ids and finished_before is None:
        raise typer.BadParameter("give the JOB_IDs to forget, or --finished-before DURATION")
    if job_ids and finished_before is not None:
        raise typer.BadParameter("give JOB_IDs or --finished-before, not both")
    broker = _broker(redis_url)
    failed: list[ZiyaBatchError] = []
    if finished_before is not None:
        done, failed = forget_finished_before(broker, parse_duration(finished_before), dry_run=dry_run)
        if not done and not failed:
            typer.echo(f"no job finished more than {finished_before} ago; nothing to forget")
    else:
        done = []
        for job_id in dict.fromkeys(job_ids):           # each once, in the order given
            try:
                done.append(forget_job(broker, job_id, dry_run=dry_run))
            except ZiyaBatchError as err:
                failed.append(err)
    for job in done:
        typer.echo(escape_controls(describe_forgotten(job)))
    # each refusal is a line of its own (the jobs named besides it are forgotten); the exit code is the first one's
    for err in failed:
        _error(str(err))
    if failed:
        raise typer.Exit(failed[0].exit_code)


@app.command()
def worker(
    address: Optional[str] = typer.Option(None, "--address", help="Ray address to join, or `auto` for the cluster "
                                          "with a node on this host (default: $RAY_ADDRESS, else `auto`)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", min=1, max=MAX_TENSOR_PARALLEL,
                                        help="GPUs one replica is sharded over"),
    job: Optional[str] = typer.Option(None, "--job", help="With --tensor-parallel > 1: load this job's model at start "
                                      "(replicas otherwise load the model of the first shard they claim)"),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", min=0, max=MAX_LOCAL_WORKERS,
                                           help="GPUs the node offers when this command starts it (default: all)"),
    start_node: bool = typer.Option(False, "--start-node",
                                    help="Start a node even if this host already is one (e.g. a head offering no GPUs)"),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code", help=REMOTE_CODE_HELP),
):
    """Join a Ray cluster and serve the queue with this node's GPUs until stopped. Starts a Ray node for the
    purpose unless this host already is one; that node stops with the command."""
    from .errors import SpecError, ZiyaBatchError
    from .runtime.cluster import serve_node
    from .runtime.services import connect_broker

    _allow_remote_code(allow_remote_code)
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
    port: int = typer.Option(8000, "--port", min=1, max=MAX_PORT),
    model: Optional[str] = typer.Option(None, "--model", help="Model for OpenAI-batch jobs (default: $ZIYA_BATCH_MODEL)"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Where uploaded files and batch outputs go"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)"),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Serve without a bearer token (local experiments only)"),
    no_workers: bool = typer.Option(False, "--no-workers", help="Only the API: run no replicas here (a front door "
                                    "for a cluster's workers); on a Ray cluster (--address) there are none anyway"),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", min=1, max=MAX_TENSOR_PARALLEL,
                                        help="GPUs each local replica is sharded over"),
    cpu: bool = typer.Option(False, "--cpu", help="Run the local replica on CPUs even where GPUs exist"),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code", help=REMOTE_CODE_HELP),
):
    """The HTTP API on Ray Serve (token from $ZIYA_BATCH_API_TOKEN, input prefixes from $ZIYA_BATCH_ALLOWED_PREFIXES).
    Without a Ray cluster it also runs replicas on this machine's GPUs (or one on the CPU) until it stops."""
    from .api.serve import serve_main

    _allow_remote_code(allow_remote_code)
    serve_main(host=host, port=port, model=model, storage=storage, redis_url=redis_url, ray_address=address,
               insecure_no_auth=insecure_no_auth, workers=not no_workers, tensor_parallel=tensor_parallel, cpu=cpu)


@app.command()
def report(
    job_id: str = typer.Argument(..., help="A job id, or an output URL holding a manifest"),
    out: str = typer.Option("report.html", "--out", "-o", help="HTML file to write"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help=REDIS_HELP),
):
    """Write a self-contained HTML report of a job: throughput, lengths, finish reasons, rewards, errors."""
    from .report import report_main

    written = report_main(job_id, out, redis_url=redis_url)
    # to stderr where the page itself went to a stream (-o /dev/stdout > r.html): the line must not follow it
    typer.echo(f"report written to {out}", err=not written.is_file() or str(out).startswith(("/dev/", "/proc/")))


redis_app = typer.Typer(no_args_is_help=True, help="The private redis-server under $ZIYA_BATCH_HOME that commands "
                        "share when given no Redis URL")
app.add_typer(redis_app, name="redis")


@redis_app.command("status")
def redis_status():
    """Whether it runs, where (password masked), its data, and what keeps it busy."""
    from .runtime.services import private_redis

    srv = private_redis()
    if not srv.running():
        typer.echo(f"not running (data in {srv.data_dir}; any command without --redis-url starts it)")
        return
    use = srv.usage()
    typer.echo(f"running: pid {srv.pid} at {srv.masked_url} (data in {srv.data_dir}); {use['clients']} client(s), "
               f"{use['leased_shards']} leased shard(s), {use['commands']} command(s) using it; stops after "
               f"{srv.idle_s:.0f}s with none of these")


@redis_app.command("stop")
def redis_stop(force: bool = typer.Option(False, "--force", help="Stop it even while shards are leased or "
                                                                      "commands (run, serve, worker) use it")):
    """Shut it down (its AOF keeps every job for the next start)."""
    from .errors import ServiceError
    from .runtime.services import private_redis

    srv = private_redis()
    usage = srv.usage() if srv.running() else {}
    leased, commands = usage.get("leased_shards", 0), usage.get("commands", 0)
    if leased and not force:
        raise ServiceError(f"{leased} shard(s) are leased (a job is running on this server): stop its workers "
                           "first, or pass --force (their leases expire and are requeued at the next start)")
    if commands and not force:
        # a running `serve` or `worker` keeps the URL it started with: a server started again later has
        # another port, so it would answer 503 / stop serving until it is restarted
        raise ServiceError(f"{commands} command(s) use this server (`run`, `serve` or `worker` started without a "
                           "Redis URL; `ziya-batch redis status` counts them): stop them first (Ctrl-C), or pass "
                           "--force (they cannot reach Redis again until they are restarted)")
    # shutdown() also stops a redis-server left on the data dir that does not answer (running() is False then)
    if srv.shutdown():
        typer.echo(f"stopped (data kept in {srv.data_dir})")
    else:
        typer.echo("not running")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(ctx: typer.Context):
    """The throughput benchmark on the 13B shape, workload W1, with the baselines side by side
    (`ziya-batch bench --help` lists its options)."""
    # the options are defined once, by the bench's own parser (tools/bench.py), which gets the arguments as given
    from .tools.bench import main as run_bench

    run_bench(ctx.args, prog="ziya-batch bench")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def user_error(err: BaseException) -> Optional[tuple[str, int]]:
    """(message, exit code) for an error a user caused or can fix that arrives as a library's own exception:
    Redis unreachable or refusing writes (3), a malformed Redis URL (2), a file that cannot be written or read (2). None for
    anything else, which is a bug and keeps its traceback."""
    from .settings import REDIS_ENV

    try:
        import redis.exceptions as rex
    except ImportError:           # pragma: no cover - redis is a dependency
        rex = None
    if rex is not None and isinstance(err, (rex.ConnectionError, rex.TimeoutError)):
        return (f"cannot reach Redis ({_one_line(err)}): start it, or pass the right --redis-url "
                f"(or {REDIS_ENV})", 3)
    if rex is not None and isinstance(err, (rex.ReadOnlyError, rex.OutOfMemoryError)):
        return (f"Redis refused the write ({_one_line(err)}): point --redis-url at the primary, or give it "
                "memory", 3)
    if isinstance(err, ValueError) and _raised_in(err, "redis", ("from_url", "parse_url")):
        why = _one_line(err)
        if why.startswith("Port could not be cast"):
            # redis-py quotes what it took for the port: with a '/' in the password, the password's first part
            why = "its port is not a number; write a '/', '?' or '#' in the password as %2F, %3F, %23"
        return (f"bad Redis URL ({why}): expected redis://[:password@]host:port/db, rediss://... or "
                "unix:///path/to/redis.sock", 2)
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or _one_line(err)}", 2
    return None


def _raised_in(err: BaseException, package: str, functions: tuple[str, ...]) -> bool:
    """True when a frame of err's traceback is one of `functions` in `package` (how a library's ValueError
    for its own argument is told from a bug of ours)."""
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in functions and f"/{package}/" in code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


def _not_utf8(args: list) -> Optional[str]:
    """The first argument that is not UTF-8 text (Python holds its undecodable bytes as lone surrogates, which no
    Redis key, JSON spec or URL can carry), shown with those bytes escaped; None if all are."""
    for arg in args:
        try:
            str(arg).encode("utf-8")
        except UnicodeEncodeError:
            return str(arg).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return None


def _error(message: str) -> None:
    """The one line an error ends in. Every URL in it is shown masked (redact.mask_text): a message may quote a
    --redis-url, a storage URL or a library's text holding one, with the password the user gave. Its control
    characters and bidirectional overrides are escapes: a message may quote text others wrote (a file name a glob
    matched, a path or owner a manifest names), which must not drive the terminal or break the line."""
    from .errors import escape_controls
    from .redact import mask_text

    print(f"ziya-batch: error: {escape_controls(mask_text(message))}", file=sys.stderr)


def _escape_last_resort_logs() -> None:
    """A command's own warnings (`run`: a replica that died, a finalize waiting for storage) reach stderr through
    logging's last resort, which wrote users' text in them (an error quoting a path) as it was: one line now, with
    its control characters as escapes (errors.OneLineLogFormatter), the same text otherwise."""
    import logging

    from .errors import OneLineLogFormatter

    if logging.lastResort is not None:
        logging.lastResort.setFormatter(OneLineLogFormatter())


def main(argv: Optional[list] = None) -> None:
    from .redact import mask_logs, masked_traceback

    mask_logs()
    # the click typer parses with (a copy of its own in newer typers): its exceptions module
    click_errors = sys.modules[typer.BadParameter.__module__]
    bad = _not_utf8(sys.argv[1:] if argv is None else argv)
    if bad is not None:
        shown = bad.replace("\r", "\\r").replace("\n", "\\n")
        _error(f"argument '{shown}' is not UTF-8 text; give names, ids and paths in UTF-8")
        sys.exit(2)
    _escape_last_resort_logs()
    try:
        # not standalone: click's own errors (a bad option value) come here to be one line, not a usage panel
        code = app(args=argv, standalone_mode=False)
    except click_errors.UsageError as err:
        if type(err).__name__ != "NoArgsIsHelpError":     # that one's help is printed already
            where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
            _error(f"{_one_line(err.format_message()).rstrip('.')}{where}")
        sys.exit(err.exit_code)
    except click_errors.ClickException as err:
        _error(_one_line(err.format_message()))
        sys.exit(err.exit_code)
    except typer.Abort:
        print("ziya-batch: interrupted", file=sys.stderr)
        sys.exit(130)
    except ZiyaBatchError as err:
        _error(str(err))
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("ziya-batch: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        known = user_error(err)
        if known is None:
            # a bug: its traceback, as Python would print it, with URLs' passwords and signatures masked and the
            # control characters of the text it quotes (a file name, a manifest's value) as escapes, line by line
            from .errors import escape_lines

            print(escape_lines(masked_traceback(err)), file=sys.stderr)
            sys.exit(1)
        _error(known[0])
        sys.exit(known[1])
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
