"""The contracts that cross layers as objects: the queue broker as the jobs service and the worker use it, and
the engine as the worker drives it. queue.Broker and engine.LLMEngine (on one GPU, or on rank 0 of a
tensor-parallel replica) have these members (tests/unit/test_protocols.py checks it).

Typing only: nothing here is imported at run time by the modules that annotate with these (they import it
under TYPE_CHECKING), and this module imports the types it names the same way, so it pulls in neither redis
nor torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

if TYPE_CHECKING:
    from .engine.types import Request, RequestOutput
    from .queue.types import ForgetResult, JobStatus, Lease, ShardStats, UncommitResult, WorkerInfo
    from .records import ShardRef
    from .spec import JobSpec


class JobsBroker(Protocol):
    """The queue as the jobs service (jobs/) submits, finds, cancels and finalizes jobs through it."""

    def submit(self, spec: "JobSpec", shards: Iterable["ShardRef"], committed: Mapping[int, "ShardStats"] = ...,
               job_id: Optional[str] = None) -> "JobStatus": ...

    def find_job(self, job_id: str) -> Optional["JobStatus"]: ...

    def get_spec(self, job_id: str) -> "JobSpec": ...

    def status(self, job_id: str, detail: bool = False) -> "JobStatus": ...

    def list_jobs(self) -> list["JobStatus"]: ...

    def delete_job(self, job_id: str) -> None: ...

    # retention: a finished job's records leave Redis (its output stays); a completed one comes back from its manifest
    def forget_job(self, job_id: str, finished_before_ms: Optional[int] = None,
                   dry_run: bool = False) -> "ForgetResult": ...

    def restore_completed(self, spec: "JobSpec", job_id: str, shards: int, totals: "ShardStats",
                          finished_ms: Optional[int] = None) -> Optional["JobStatus"]: ...

    def server_time_s(self) -> float: ...

    def cancel(self, job_id: str, abandon_running: bool = False) -> "JobStatus": ...

    # finishing: exactly one caller wins begin_finalize, then marks the job completed or failed, or gives the
    # election up for the sweep to try again later
    def begin_finalize(self, job_id: str, owner: Optional[str] = None, ttl_s: float = ...) -> bool: ...

    def end_finalize(self, job_id: str, owner: str, after_s: float = ..., reason: str = ...) -> bool: ...

    def commits(self, job_id: str) -> dict[int, tuple[int, "ShardStats"]]: ...

    # the finalizer's: a commit whose staged parts storage lost before they were promoted; the shard runs again
    def uncommit(self, job_id: str, index: int, token: int, reason: str, attempt: str = "", caller: str = "",
                 staging: str = "") -> "UncommitResult": ...

    def mark_completed(self, job_id: str) -> None: ...

    def mark_failed(self, job_id: str, message: str) -> None: ...


class WorkerBroker(JobsBroker, Protocol):
    """The queue as a worker uses it: leases on shards (claim, heartbeat, commit, give back, fail), the
    isolate-mode line markers, its registration, and waiting for work. A worker finalizes the jobs whose
    last shard it commits, so it needs the jobs service's part too."""

    def claim(self, worker_id: str, accept: Optional[Callable[[str], bool]] = None,
              prefer: Optional[Callable[[str], bool]] = None) -> Optional["Lease"]: ...

    def heartbeat(self, lease: "Lease") -> bool: ...

    def line_started(self, lease: "Lease", line_no: int) -> bool: ...

    def line_finished(self, lease: "Lease") -> bool: ...

    def commit(self, lease: "Lease", stats: "ShardStats") -> bool: ...

    def fail(self, lease: "Lease", message: str, bad_line: Optional[int] = None) -> str: ...

    def give_back(self, lease: "Lease", message: str, storage: bool = False) -> str: ...

    def reap(self, limit: int = 1000) -> list[tuple[str, int, str]]: ...

    def register_worker(self, worker_id: str, host: str, info: Optional[dict] = None) -> None: ...

    def worker_heartbeat(self, worker_id: str) -> None: ...

    def note_cannot_load(self, worker_id: str, job_id: str, message: Optional[str]) -> None: ...

    def unregister_worker(self, worker_id: str) -> None: ...

    def worker_infos(self) -> list["WorkerInfo"]: ...

    def watch_work(self) -> None: ...

    def wait_for_work(self, timeout_s: float) -> bool: ...

    def unwatch_work(self) -> None: ...


class WaitingQueue(Protocol):
    """The part of the engine's scheduler the worker reads: requests not admitted yet (empty: room for more)."""

    @property
    def waiting(self) -> Sequence[Any]: ...


class GenerationEngine(Protocol):
    """The engine as the worker drives it (work/generation.py): add requests, step until they finish,
    abort the ones of a shard given up on. `tokenizer` encodes prompts; `max_model_len` is the longest
    prompt + output in tokens a request may have."""

    tokenizer: Any
    max_model_len: int

    @property
    def scheduler(self) -> WaitingQueue: ...

    def add_request(self, request: "Request") -> None: ...

    def step(self) -> list["RequestOutput"]: ...

    def abort(self, request_id: str) -> None: ...
