"""What a failure means for the shards it touches: the worker's failure policy, in one table.

A worker meets failures at a few stages of a shard (loading its engine, reading its lines, adding them to the
shared engine, a shared step, producing and committing it alone, waiting for the shards in flight before it).
`decide(err, stage, ...)` says what happens to the shard(s) involved:

    GIVE_BACK  back to the queue untried (broker.give_back): not the shard's fault (out of memory, storage that
               does not answer), so no retry is counted; storage that keeps failing one shard while it answers the
               job's others is the shard's own trouble, and the queue counts those give-backs as failed tries
    REDO_ALONE drop the shared step's requests and generate each shard in flight again alone, bisecting down
               to the line that raises (generation.generate_lines)
    FAIL       the shard's own failure (broker.fail): retried, then isolated, then dead-lettered by the queue
    DROP       the lease was lost: commit nothing, the shard is someone else's now
    ABANDON    the process or replica is going down: stop heartbeating; the lease expires and the reaper
               requeues the shard (a counted retry; after one, the shard runs isolated, see run_mode)

Failures are told apart by type. The engine boundary (`engine_calls`) turns every way of running out of memory
into EngineOutOfMemory, so nothing past it reads message text.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TypeVar

from ..errors import ZiyaBatchError, utf8_text
from ..queue.errors import BROKER_UNREACHABLE
from ..redact import mask_text
from .models import ReplicaBroken

log = logging.getLogger(__name__)
T = TypeVar("T")


class LeaseLost(Exception):
    """The lease expired or the job was abandoned: stop working on this shard, commit nothing."""


class SpecUnreadable(ZiyaBatchError):
    """This worker cannot read a claimed shard's job spec: most likely a newer release wrote it during a rolling
    upgrade (the spec forbids unknown keys). The worker's trouble, not the shard's: workers that can read it
    should run it. Its message is one line: the reading error's type and first line."""


class EngineOutOfMemory(ZiyaBatchError):
    """The engine ran out of device or host memory (raised at the engine boundary, from the allocator's error).
    No line causes it alone: the memory the settings left ran out."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


class StorageAway(ZiyaBatchError):
    """A store the shard reads its input from or writes its parts to did not answer (a connection refused or cut,
    a time-out: io.storage.unreachable): not the shard's fault, and no retry of it helps until the store answers.
    Raised by `storage_calls`, so that a storage outage does not use up the shard's retries and dead-letter its
    lines. Where the job commits other shards meanwhile, the failure is the shard's own after all (a time-out on its
    range, an error of its one object): broker.give_back(storage=True) then counts it as a failed try."""


@contextmanager
def storage_calls() -> Iterator[None]:
    """Wrap a worker's reads of a shard's input and writes of its parts: storage that does not answer leaves as
    StorageAway (anything else it raises, a permission refused or a changed input, is unchanged)."""
    from ..io.storage import unreachable
    from ..queue.errors import BROKER_ERRORS

    try:
        yield
    except (StorageAway, *BROKER_ERRORS):
        raise                       # Redis's errors are named like a store's (redis.ConnectionError): not storage
    except Exception as err:
        if unreachable(err):
            raise StorageAway(one_line(err)) from err
        raise


STORAGE_RETRY_S = 5.0          # a worker's first pause in claiming after storage did not answer
STORAGE_RETRY_MAX_S = 120.0    # ... doubling with each such failure in a row, up to this


class StoragePause:
    """After a job's storage did not answer, a worker claims none of that job's shards for STORAGE_RETRY_S, twice as
    long after each such failure in a row up to STORAGE_RETRY_MAX_S: claiming shard after shard into an outage would
    only give them all back (after generating them, where the parts' store is the one away) and press on a store that
    is struggling. Other jobs (other stores) are claimed meanwhile. A commit of the job's ends its series."""

    def __init__(self):
        self._jobs: dict[str, tuple[float, float]] = {}     # job id -> (claims again after, pause s)

    def failed(self, job_id: str) -> None:
        seconds = min(STORAGE_RETRY_MAX_S, max(STORAGE_RETRY_S, 2 * self.seconds(job_id)))
        self._jobs[job_id] = (time.monotonic() + seconds, seconds)

    def answered(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def seconds(self, job_id: str) -> float:
        return self._jobs.get(job_id, (0.0, 0.0))[1]

    def active(self, job_id: str) -> bool:
        return time.monotonic() < self._jobs.get(job_id, (0.0, 0.0))[0]


REDIS_RETRY_S = 0.5           # a shard's call that met a Redis that did not answer is made again after this long
REDIS_RETRY_MAX_S = 5.0       # ... doubling with each try, up to this


class RedisPatience:
    """Makes the broker calls that settle a shard in flight (its commit, its failure or give-back, an isolated line's
    note) wait out a Redis that does not answer (killed and restarting, failing over, the network cut) rather than
    give the shard up: given up, its lease would expire and the reaper count a failed try (isolating the shard, and
    dead-lettering it past max_retries) of work that was done. The shard's heartbeat keeps trying meanwhile, and the
    call decides once Redis answers (a commit whose lease was taken back meanwhile is refused then). Only a worker
    that is stopping (`stop` set) gives up: what it has in flight is left to expire."""

    def __init__(self, stop: Optional[threading.Event] = None):
        self.stop = stop

    def __call__(self, call: Callable[[], T], what: str) -> T:
        delay = REDIS_RETRY_S
        while True:
            try:
                return call()
            except BROKER_UNREACHABLE as err:
                if self.stop is not None and self.stop.is_set():
                    raise
                log.warning("%s: Redis does not answer (%s); trying again in %.1f s", what, one_line(err), delay)
                if self.stop is None:
                    time.sleep(delay)
                elif self.stop.wait(delay):
                    raise
                delay = min(REDIS_RETRY_MAX_S, 2 * delay)


# cuBLAS and the CPU allocator report running out of memory as a plain RuntimeError: only their text tells.
# Read here, once, where the engine is called; everything after this boundary goes by type.
_ALLOCATOR_TEXTS = ("out of memory", "cublas_status_alloc_failed", "can't allocate memory")


@contextmanager
def engine_calls() -> Iterator[None]:
    """Wrap calls into the engine (load, add, step, score): an allocation failure leaves as EngineOutOfMemory."""
    import torch

    try:
        yield
    except EngineOutOfMemory:
        raise
    except torch.OutOfMemoryError as err:
        raise EngineOutOfMemory(one_line(err)) from err
    except Exception as err:
        if any(s in str(err).lower() for s in _ALLOCATOR_TEXTS):
            raise EngineOutOfMemory(one_line(err)) from err
        raise


class Stage(enum.Enum):
    CLAIM = "claim"     # a shard just claimed, before anything runs (reading its job's spec)
    LOAD = "load"       # loading the engine a claimed shard needs
    READ = "read"       # reading and tokenizing a shard's lines
    ADMIT = "admit"     # adding a shard's lines to the engine the shards in flight share
    STEP = "step"       # a step of that shared engine (every shard in flight is involved)
    SHARD = "shard"     # producing one shard (alone, or its results taken from the stream), scoring, committing
    DRAIN = "drain"     # a claimed shard waiting for the shards in flight to finish before it starts
    REDO = "redo"       # shards waiting to be generated alone again after a shared step failed


class Action(enum.Enum):
    GIVE_BACK = "give back"
    REDO_ALONE = "redo alone"
    FAIL = "fail"
    DROP = "drop"
    ABANDON = "abandon"


@dataclass(frozen=True)
class Decision:
    action: Action
    message: str = ""               # what the queue records for a shard given back or failed
    why: str = ""                   # one line for the worker's registration (why it gave the engine's jobs up)
    back_off: bool = False          # leave this engine's jobs to other workers for a while (worker.LOAD_RETRY_S)
    replica_down: bool = False      # then raise ReplicaBroken: only a new replica is in step again
    quietly: bool = False           # a Redis error while giving back must not replace the ReplicaBroken raised
    down_message: str = ""          # the ReplicaBroken's, when the replica goes down for a plain error
    pause_claims: bool = False      # storage did not answer: this worker claims nothing of the job for a while
                                    # (StoragePause), and the give-back is a storage one (broker.give_back)

    def replica_broken(self, err: BaseException) -> Optional[ReplicaBroken]:
        """The ReplicaBroken to raise once the decision is carried out, if it takes the replica down."""
        if not self.replica_down:
            return None
        return err if isinstance(err, ReplicaBroken) else ReplicaBroken(self.down_message)


def decide(err: BaseException, stage: Stage, worker_id: str = "this worker",
           tensor_parallel: bool = False) -> Decision:
    """The one place that says what a failure at `stage` does to the shard(s) involved. `tensor_parallel`: the
    worker is rank 0 of a replica whose other ranks may be stuck in a step that failed on it."""
    why = describe(err)
    if isinstance(err, LeaseLost):
        return Decision(Action.DROP)
    if isinstance(err, BROKER_UNREACHABLE):
        # Redis is away and the worker stops (RedisPatience waits until then): nothing can be recorded, and the shard
        # did not fail; its lease expires and the reaper requeues it
        return Decision(Action.ABANDON)
    if isinstance(err, ReplicaBroken):
        if stage is Stage.LOAD:
            # rank 0 could not load after the other ranks started: the replica goes, the shard back untried now
            # rather than through its lease's expiry (a counted retry)
            return Decision(Action.GIVE_BACK, f"engine would not load on {worker_id}: {why}", why,
                            replica_down=True, quietly=True)
        if stage is Stage.DRAIN:
            return Decision(Action.GIVE_BACK, f"replica {worker_id} broke before this shard started: {why}", why,
                            replica_down=True, quietly=True)
        if stage is Stage.REDO:
            return Decision(Action.GIVE_BACK, f"replica {worker_id} broke: {why}", why, replica_down=True,
                            quietly=True)
        return Decision(Action.ABANDON)
    if isinstance(err, SpecUnreadable):
        # no retry counted and no backoff on an engine: the job waits for a worker that reads its spec
        why = f"cannot read the job's spec ({err})"
        return Decision(Action.GIVE_BACK, f"{worker_id} {why}", why)
    if stage in (Stage.DRAIN, Stage.REDO) or not isinstance(err, Exception):
        # a waiting shard was not the one that failed; KeyboardInterrupt, SystemExit: the process is going down
        return Decision(Action.ABANDON)
    if stage is Stage.LOAD:
        # out of memory, or a checkpoint this node cannot read: this worker's trouble, not the shard's
        return Decision(Action.GIVE_BACK, f"engine would not load on {worker_id}: {why}", why, back_off=True)
    if isinstance(err, StorageAway) and stage in (Stage.READ, Stage.SHARD):
        # the queue keeps the shard for when the store answers again; this worker claims nothing for a while rather
        # than shard after shard into the same outage. No note on its registration: the engine is fine
        return Decision(Action.GIVE_BACK, f"storage did not answer on {worker_id}: {err}", pause_claims=True)
    if isinstance(err, EngineOutOfMemory) and stage in (Stage.STEP, Stage.SHARD):
        what, when = ("engine out of memory", " mid-step") if stage is Stage.STEP else ("out of memory", "")
        return Decision(Action.GIVE_BACK, f"{what} on {worker_id}: {why}", why, back_off=True,
                        replica_down=tensor_parallel, quietly=tensor_parallel,
                        down_message=f"tensor-parallel engine out of memory{when}: {why}")
    if stage in (Stage.STEP, Stage.ADMIT):
        return Decision(Action.REDO_ALONE)       # some line in the batch raised: find it shard by shard
    return Decision(Action.FAIL, f"{type(err).__name__}: {err}")


class RunMode(enum.Enum):
    SHARED = "shared"              # its lines join the engine the shards in flight share
    ISOLATE = "isolate"            # alone, one line at a time, each line noted before it starts
    DEAD_LETTER = "dead letter"    # no generation: every line becomes a retries_exhausted error line


def run_mode(lease) -> RunMode:
    """A worker process died holding this shard before (isolate): run it alone line by line, noting each line
    before it starts, so that a line that kills the process is known and set aside next time (lease.bad_lines).
    A shard past its retry limit (dead_letter) is not generated at all."""
    if lease.dead_letter:
        return RunMode.DEAD_LETTER
    return RunMode.ISOLATE if lease.isolate else RunMode.SHARED


def describe(err: BaseException) -> str:
    """One line naming the error: for an out-of-memory, the allocator's own (type and first line)."""
    return err.why if isinstance(err, EngineOutOfMemory) else one_line(err)


def one_line(err: BaseException) -> str:
    # kept in Redis and shown by status and the API: a storage library's text may name an endpoint with its password
    # (UTF-8 text: Redis takes no lone surrogate, which an exception may quote)
    text = utf8_text(mask_text(str(err).strip()))
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
