"""`ziya-batch run`: the one-machine path. Starts what is missing (a private redis-server with AOF, a local
Ray), submits or resumes the job, runs replicas until it is done, shows progress, stops the Ray it started
(the private redis-server stays for the commands that follow, until it has been idle a while)."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from .. import settings
from ..errors import ModelError, escape_controls
from ..jobs import finalize_if_ready, submit_job
from ..jobs.service import finalize_note
from ..spec import load_spec
from .services import redis_for
from .status_view import _plain

log = logging.getLogger(__name__)
console = Console(stderr=True)


def _start_ray(address: Optional[str]):
    import ray

    address = settings.ray_address(address)
    if ray.is_initialized():
        return False
    if address:
        # a clear line now, not ray.init retrying for minutes (the job stays queued: `run` again resumes it)
        from .cluster import connect_cluster

        connect_cluster(address, log_to_driver=False, logging_level=logging.WARNING,
                        runtime_env=settings.worker_runtime_env() or None)
        return True
    # address="local": a fresh local Ray, never another cluster that happens to run on this machine
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             num_cpus=max(2, os.cpu_count() or 2))
    return True


def run_job(job_path: str, redis_url: Optional[str] = None, ray_address: Optional[str] = None,
            num_workers: Optional[int] = None, progress: bool = True, poll_s: float = 1.0,
            cpu: bool = False) -> int:
    t0 = time.time()
    spec = load_spec(job_path)
    url, private = redis_for(redis_url, register=True)
    try:
        if private is not None:
            console.print(Text(f"private redis-server at {private.masked_url} (data in {private.data_dir}; "
                               "`ziya-batch status` from any shell shows this job)", style="dim"))
            if settings.ray_address(ray_address):
                console.print("[yellow]warning:[/yellow] the queue is this host's private redis-server (127.0.0.1 "
                              "only): replicas on other nodes cannot reach it; give a Redis they can reach with "
                              f"--redis-url or {settings.REDIS_ENV}", markup=True)
        return _run(spec, url, private, ray_address, num_workers, progress, poll_s, cpu, t0)
    finally:
        if private is not None:
            private.release()      # the server stays for `status` and the next command; it stops when idle


def start_local_replicas(url: str, ray_address: Optional[str], tensor_parallel: int = 1,
                         replicas: Optional[int] = None, cpu: bool = False, worker_prefix: str = "run",
                         job_id: Optional[str] = None):
    """A ReplicaManager for the Ray this process is connected to: on a local Ray, one replica per
    tensor_parallel local GPUs, or one on the CPU threads left over; on a cluster, replicas that wait for
    GPU nodes. Call reconcile() on it every few seconds and stop() at the end (`run` and `serve` do)."""
    from .replicas import ReplicaManager

    external = bool(settings.ray_address(ray_address))
    cpu_threads = None if external else max(1, ((os.cpu_count() or 2) - 1) // tensor_parallel)
    # on a cluster, replicas wait for GPU nodes to join rather than load the model on a CPU node
    use_gpus = False if cpu else (True if external else None)
    return ReplicaManager(url, tensor_parallel=tensor_parallel, use_gpus=use_gpus, replicas=replicas,
                          cpu_threads=cpu_threads, worker_prefix=worker_prefix, job_id=job_id)


def _run(spec, url: str, private, ray_address, num_workers, progress: bool, poll_s: float, cpu: bool,
         t0: float) -> int:
    import ray

    from ..queue import Broker, JobState

    broker = Broker.from_url(url)
    if private is None:
        for w in broker.check_server():
            console.print(Text.assemble(("warning:", "yellow"), f" {w}"))
    changed: list[str] = []
    status = submit_job(spec, broker, check_model_dir=True, changes=changed)
    job_id = status.job_id
    console.print(_job_line(status, spec))
    if changed:
        console.print(_plain(f"resumed with {'; '.join(changed)}"))
    started_ray = False
    manager = None
    try:
        if not status.state.is_finished():
            started_ray = _start_ray(ray_address)
            manager = start_local_replicas(
                url, ray_address, spec.model.tensor_parallel, cpu=cpu, worker_prefix=f"run-{job_id[:6]}",
                replicas=num_workers or (None if spec.model.replicas == "auto" else spec.model.replicas),
                job_id=job_id)
            status = _watch(broker, job_id, manager, progress, poll_s)
        _print_summary(spec, status, time.time() - t0)
        return 0 if status.state == JobState.COMPLETED else 1
    finally:
        if manager is not None:
            manager.stop()
        if started_ray:
            ray.shutdown()


# replicas that die this many times in a row while starting or loading the job's engine, with no prompt finished
# meanwhile, stop the run (a crash loop: e.g. a tensor-parallel replica whose ranks run out of memory loading it)
DEATHS_WITHOUT_PROGRESS = 3


def _watch(broker, job_id: str, manager, progress: bool, poll_s: float):
    from ..queue import JobState

    status = broker.status(job_id)
    loop = _CrashLoop(job_id)
    waits: Optional[str] = None          # the reason finalizing last waited for storage, as printed
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                  disable=not progress, transient=False) as bar:
        task = bar.add_task("prompts", total=status.prompts_total, rate="")
        while True:
            manager.reconcile()
            broker.reap()
            finalize_if_ready(broker, job_id)
            status = broker.status(job_id)
            done = status.prompts_done + status.prompts_failed
            bar.update(task, completed=done,
                       rate=f"{status.tokens_per_s:,.0f} tok/s  {len(manager.replicas)} replica(s)")
            if status.state.is_finished():
                return status
            # every prompt is done but the job is not: say why finalizing waits (its output's storage is away),
            # once for each new reason and once when a try gets past it, not on every poll
            reason = status.finalize_wait.reason if status.finalize_wait is not None else None
            if reason != waits:
                if reason is not None:
                    bar.console.print(_plain(finalize_note(status)))     # users' text: escaped
                elif status.state == JobState.FINALIZING:
                    bar.console.print("finalizing: the output's storage answers again")
                waits = reason
            workers = {w.worker_id: w for w in broker.worker_infos()}
            why = loop.update(done, manager.deaths, workers) or _cannot_load(job_id, manager, workers)
            if why:
                raise ModelError(f"job {job_id} cannot run here: {why}. It stays queued with its committed parts: "
                                 "fix the cause (out of memory: lower engine.gpu_memory_fraction or "
                                 "engine.max_num_seqs, or raise model.tensor_parallel) and run again to resume it")
            time.sleep(poll_s)


class _CrashLoop:
    """Counts replica deaths in a row that say the job's engine cannot run here: a replica that died starting
    (its constructor raised: e.g. tensor-parallel ranks loading the model), or one whose worker had noted that
    it could not load the job's engine or ran out of memory with it. A finished prompt, or a replica that dies
    otherwise (a node lost, a line that crashes its worker: the queue sets such lines aside), resets it.
    Workers are remembered across polls: a busy worker drops out of the live list between its heartbeats."""

    def __init__(self, job_id: str):
        self.job_id, self.streak, self.last, self.seen, self.done = job_id, 0, "", 0, -1
        self.notes: dict[str, Optional[str]] = {}        # worker id -> its last note for this job (None: none)

    def update(self, done: int, deaths: list, workers: dict) -> Optional[str]:
        for wid, w in workers.items():
            self.notes[wid] = w.cannot_load.get(self.job_id)
        if done != self.done:
            self.done, self.streak = done, 0
        for rid, cause, at_start in deaths[self.seen:]:
            note = self.notes.get(rid)
            if at_start or note:
                self.streak, self.last = self.streak + 1, note or cause
            else:
                self.streak = 0
        self.seen = len(deaths)
        if self.streak >= DEATHS_WITHOUT_PROGRESS:
            return f"its replicas died {self.streak} times in a row starting or loading its engine ({self.last})"
        return None


def _cannot_load(job_id: str, manager, workers: dict) -> Optional[str]:
    """Every replica of this run reports that the job's engine would not load on it (Worker gives such shards
    back untried), or None."""
    if not manager.replicas:
        return None
    reasons = [workers[rid].cannot_load.get(job_id) if rid in workers else None for rid in manager.replicas]
    if all(reasons):
        return (f"the engine would not load, or ran out of memory, on every one of its {len(reasons)} replica(s) "
                f"({reasons[0]})")
    return None


def _job_line(status, spec) -> Text:
    # names and paths are the user's text, printed as it is (rich would take "[v2]" for markup, ":x:" for an
    # emoji), their control characters as escapes
    return Text.assemble("job ", (status.job_id, "bold"), _plain(f" ({spec.name}): {status.prompts_total} prompts in "
                                                                 f"{status.shards_total} shards -> {spec.output.path}"))


def _print_summary(spec, status, seconds: float) -> None:
    out = sys.stdout
    print(f"job {status.job_id}: {status.state.value}", file=out)
    print(f"  prompts   {status.prompts_done} done, {status.prompts_failed} failed, {status.prompts_total} total", file=out)
    print(f"  samples   {status.samples}", file=out)
    print(f"  tokens    {status.output_tokens} generated", file=out)
    print(f"  seconds   {seconds:.1f}", file=out)
    print(f"  output    {escape_controls(spec.output.path)} (manifest.json lists the committed parts)", file=out)
