"""The worker: claims shards from the queue, shares the engine between them, commits their parts exactly once.

A plain class (no Ray): Ray actors wrap it (runtime/actors.py) and tests drive it directly. Its rules live one
place each: what a failure means in failures.decide (carried out by Worker._act), the commit path in
commit.ShardCommit (stage under the lease's fencing token, commit in Redis, promote), and each claimed shard's
heartbeat in its flight.Flight (`with flight:` stops it, however the shard ends).
The engine's batch does not drain at each shard's end: once the scheduler has admitted every line in flight,
the next shard is claimed and its lines join the same engine (ShardStream); each shard is committed as soon
as its own lines are done. Dead-letter and isolate shards run alone, after the shards in flight are done; so
does the first shard of a job that needs another engine.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Callable, Optional

from .. import io
from ..errors import InputError, JobNotFound
from ..queue.errors import BROKER_ERRORS, BROKER_UNREACHABLE
from ..records import LineFailure, LineResult
from ..spec import JobSpec
from .commit import ShardCommit
from .failures import (Action, Decision, LeaseLost, RedisPatience, RunMode, SpecUnreadable, Stage, StoragePause,
                       decide, engine_calls, one_line, run_mode, storage_calls)
from .flight import Flight
from .generation import ShardStream, dead_letter_failures, generate_lines, parse_shard
from .models import ModelCache, ReplicaBroken, engine_key

if TYPE_CHECKING:
    from ..protocols import WorkerBroker

log = logging.getLogger(__name__)

# Shards whose lines share the engine at once: the one finishing its longest lines and the one filling the
# batch behind it. More would only hold more leases; a shard is claimed only when the batch has room.
MAX_SHARDS_IN_FLIGHT = 2
# Claims in a row that prefer jobs of the loaded model (among equal priorities) before one is made in the fair
# order again: a model loads at most about once per this many shards, and jobs of equal priority still take turns.
STICKY_CLAIMS = 8
# Job specs a worker keeps read (a long-lived worker sees every job ever queued)
SPECS_KEPT = 256
# a job's spec is read again after this long: a resubmit may change how the job runs (spec.RUN_FIELDS), and the
# shards claimed after it then run with the new settings (a shard in flight keeps the spec it started with)
SPEC_REREAD_S = 10.0
# A worker that could not load a job's engine (out of memory, a broken checkpoint on this node) gives the shard back
# untried and leaves that engine's jobs to other workers for this long before it tries again, twice as long after
# each failure in a row up to LOAD_RETRY_MAX_S (a load that fails drops the engine loaded before it)
LOAD_RETRY_S = 60.0
LOAD_RETRY_MAX_S = 3600.0
# An idle worker waits for announced work in slices of this long, to see a stop at once
IDLE_SLICE_S = 0.1
# How often a worker looks for jobs whose shards are all committed but that nobody is finalizing (the worker that
# committed the last shard died before it wrote the manifest or could not promote its parts, a finalizer died, or
# one gave up until a lost commit may be taken back): it finalizes them
FINALIZE_SWEEP_S = 30.0


class LoadBackoff:
    """The engines this worker could not load (or ran out of memory in): it leaves their jobs to other workers for
    LOAD_RETRY_S, twice as long after each failure in a row up to LOAD_RETRY_MAX_S, and notes why on its
    registration, so that status and `ziya-batch run` can say why a job waits. A load that works starts over."""

    def __init__(self, broker, worker_id: str):
        self.broker, self.worker_id = broker, worker_id
        self._until: dict[tuple, tuple[float, float]] = {}   # engine_key -> (retry after, backoff s)
        self._noted: set[str] = set()                        # jobs noted on the registration as not loadable

    def blocks(self, spec: JobSpec) -> bool:
        """This worker could not load the spec's engine and its backoff has not passed."""
        failed = self._until.get(engine_key(spec))
        return failed is not None and time.monotonic() < failed[0]

    def backoff_s(self, key: tuple) -> Optional[float]:
        return self._until[key][1] if key in self._until else None

    def failed(self, key: tuple) -> None:
        prev = self._until.get(key)
        backoff = LOAD_RETRY_S if prev is None else min(LOAD_RETRY_MAX_S, max(LOAD_RETRY_S, 2 * prev[1]))
        self._until[key] = (time.monotonic() + backoff, backoff)

    def loaded(self, spec: JobSpec, job_id: str) -> None:
        """The spec's engine loaded (perhaps with settings a resubmit changed): no backoff, no note left."""
        self._until.pop(engine_key(spec), None)
        if job_id in self._noted:
            self.note(job_id, None)

    def note(self, job_id: str, why: Optional[str]) -> None:
        self.broker.note_cannot_load(self.worker_id, job_id, why)
        (self._noted.add if why else self._noted.discard)(job_id)


def _read_shard(shard):
    """io.read_shard, a store that does not answer raised as StorageAway (the shard goes back untried)."""
    with storage_calls():
        return io.read_shard(shard)


def _not_read_back(shard):
    """A dead-lettered shard's input is not read back once its storage failed it while answering the job's other
    shards (Lease.read_back): its error lines are numbered FILE:LINE (dead_letter_failures) rather than the shard
    going back for ever."""
    raise InputError(f"storage kept failing shard {shard.index} while it answered the job's other shards")


class Worker:
    def __init__(self, broker: "WorkerBroker", worker_id: Optional[str] = None, device: str = "auto",
                 models: Optional[ModelCache] = None, host: Optional[str] = None,
                 on_shard_done: Optional[Callable[[str, int], None]] = None, extra_info: Optional[dict] = None,
                 max_in_flight: int = MAX_SHARDS_IN_FLIGHT):
        self.broker = broker
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.host = host or socket.gethostname()
        self.models = models or ModelCache(device)
        self.on_shard_done = on_shard_done
        self.max_in_flight = max_in_flight
        self._specs: dict[str, tuple[float, JobSpec]] = {}      # job id -> (monotonic time read, spec)
        self._stream: Optional[ShardStream] = None      # the engine the shards in flight share
        self._engine_key: Optional[tuple] = None        # engine_key of the jobs in the stream
        self._flights: dict[str, Flight] = {}           # flight.key -> shard whose lines are in the stream
        self._same_model_claims = 0                     # claims in a row that needed no model load
        self._backoff = LoadBackoff(broker, self.worker_id)
        self._storage = StoragePause()                  # jobs whose claims pause: their storage did not answer
        self._unreadable: dict[str, str] = {}           # job id -> why its spec could not be read (noted)
        self._patience = RedisPatience()               # a shard's commit, failure or line note waits out Redis
        self._commit = ShardCommit(broker, self.models, self._patience)
        self._next_sweep = 0.0                          # monotonic time of the next finalize sweep
        self.broker.register_worker(self.worker_id, self.host, {"device": self.models.device_name(), "pid": os.getpid(),
                                                                "tensor_parallel": 1, **(extra_info or {})})

    # -- the loop ---------------------------------------------------------------------------------------
    def run_once(self, claim: bool = True) -> bool:
        """Reap expired leases, claim a shard if the engine has room for one, then generate until a shard is
        done or the engine has room for the next. False when there was nothing to claim and nothing in
        flight. `claim=False` only carries on with the shards in flight."""
        self.broker.reap()
        self.broker.worker_heartbeat(self.worker_id)
        self._sweep_finalizing()
        lease = None
        if claim and self._has_room():
            sticky = self._same_model_claims < STICKY_CLAIMS
            lease = self.broker.claim(self.worker_id, accept=self._serves, prefer=self._loaded if sticky else None)
            if lease is not None:
                self._same_model_claims = self._same_model_claims + 1 if self._loaded(lease.job_id) else 0
        if lease is None and not self._flights:
            return False
        try:
            if lease is not None:
                self._start(lease)
            if self._flights:
                self._advance(until_room=lease is not None)
        except BaseException:
            self._abandon()       # Redis down mid-commit, or a bug: leave nothing heartbeating unattended
            raise
        return True

    def run_until_idle(self) -> int:
        """Run until there is nothing to claim and nothing in flight; the number of rounds that worked."""
        done = 0
        while self.run_once():
            done += 1
        return done

    def serve_forever(self, stop: threading.Event, idle_sleep_s: float = 0.5, max_backoff_s: float = 10.0) -> None:
        """Serve until `stop` is set, then finish the shards in flight. A Redis outage (restart, failover) is
        waited out, not fatal: leases that expire meanwhile come back through the reaper and fencing keeps
        the output exactly-once."""
        backoff_s = idle_sleep_s
        self._patience.stop = stop
        try:
            self._watch_work()
            while not stop.is_set() or self._flights:
                try:
                    worked = self.run_once(claim=not stop.is_set())
                    backoff_s = idle_sleep_s
                except BROKER_UNREACHABLE as err:
                    if stop.is_set():
                        break         # stopping: what is in flight is left to expire
                    log.warning("Redis unreachable (%s); retrying in %.1fs", err, backoff_s)
                    stop.wait(backoff_s)
                    backoff_s = min(max_backoff_s, backoff_s * 2)
                    continue
                if not worked:
                    self._idle(stop, idle_sleep_s)
        finally:
            self._abandon()
            self.broker.unwatch_work()
            try:
                self.broker.unregister_worker(self.worker_id)
            except Exception:  # noqa: BLE001 - Redis gone at shutdown: the registration expires by itself
                pass

    def _watch_work(self) -> None:
        try:
            self.broker.watch_work()
        except BROKER_ERRORS as err:      # Redis not up yet: the loop waits it out; _idle subscribes later
            log.debug("cannot watch for work yet: %s", err)

    def _idle(self, stop: threading.Event, seconds: float) -> None:
        """Nothing to claim: wait `seconds` for a job to announce work (a submit, a shard given back), in slices
        short enough that `stop` is seen at once."""
        end = time.monotonic() + seconds
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                if self.broker.wait_for_work(min(left, IDLE_SLICE_S)):
                    return
            except BROKER_ERRORS:
                # the subscription broke (Redis restarted or away): the next slice subscribes again
                self.broker.unwatch_work()
                stop.wait(min(left, IDLE_SLICE_S))

    # -- shards -------------------------------------------------------------------------------------------
    def _serves(self, job_id: str) -> bool:
        """Claim filter: skip jobs this worker's models cannot serve, and jobs whose spec it cannot read (noted on
        its registration, so that status says why the job waits: workers of the release that wrote the spec
        run it; failing its shards here would dead-letter lines that nothing was wrong with)."""
        try:
            spec = self._readable_spec(job_id)
        except SpecUnreadable as err:
            why = decide(err, Stage.CLAIM, self.worker_id).why
            if self._unreadable.get(job_id) != why and not isinstance(err.__cause__, JobNotFound):
                self._backoff.note(job_id, why)           # once per reason: the filter runs on every claim
                self._unreadable[job_id] = why
            return False
        if self._unreadable.pop(job_id, None) is not None:
            self._backoff.note(job_id, None)
        try:
            return self.models.can_serve(spec) and not self._backoff.blocks(spec) and not self._storage.active(job_id)
        except Exception:  # noqa: BLE001 - claimed: loading its engine then fails with the reason
            return True

    def _readable_spec(self, job_id: str) -> JobSpec:
        """spec_for, with every way of failing to read the spec (a newer release's keys, a corrupt record, the job
        deleted) as SpecUnreadable; Redis being away still raises as it is, for the loop to wait out."""
        try:
            return self.spec_for(job_id)
        except BROKER_UNREACHABLE:
            raise
        except Exception as err:  # noqa: BLE001 - see the docstring
            raise SpecUnreadable(one_line(err)) from err

    def _engine_or_give_back(self, flight: Flight):
        """The flight's engine, or None after the failure policy dealt with a load that failed (an engine that will
        not load here is this worker's trouble, not the shard's: the shard goes back untried and this worker
        leaves the engine to others for LOAD_RETRY_S; `ziya-batch run` stops with the reason once none of its
        workers can load it)."""
        cached = self.models.holds(flight.spec)
        try:
            engine = self._engine_for(flight.spec)
        except BaseException as err:
            self._act(err, Stage.LOAD, [flight])
            return None
        if not cached:                            # loaded now: a backoff for it (doubling) starts over
            self._backoff.loaded(flight.spec, flight.lease.job_id)
        return engine

    def _give_back(self, lease, message: str, why: str, quietly: bool = False, storage: bool = False) -> None:
        """Give the shard back untried (broker.give_back) and note why on this worker's registration. `quietly`:
        on the way out of a broken replica, where a Redis error must not replace the ReplicaBroken being raised
        (the lease then expires and is requeued, as it would have anyway). `storage`: its store did not answer (the
        queue counts it as a failed try once the store answered the job's other shards meanwhile)."""
        try:
            if quietly:
                self.broker.give_back(lease, message, storage=storage)
            else:
                self._patience(lambda: self.broker.give_back(lease, message, storage=storage),
                               f"shard {lease.job_id}/{lease.shard.index}'s give-back")
            self._backoff.note(lease.job_id, why or None)
        except Exception as err:  # noqa: BLE001 - see the docstring
            if not quietly:
                raise
            log.warning("shard %s/%d: could not give it back (%s); its lease will expire", lease.job_id,
                        lease.shard.index, err)

    def _broken_replica(self) -> bool:
        """A tensor-parallel replica: after a failed step its other ranks may be stuck in the step's collectives,
        so only a new replica is in step again."""
        return getattr(self.models, "world_size", 1) > 1

    def _loaded(self, job_id: str) -> bool:
        """Claim preference: the job runs on the engine this worker holds (no model to load)."""
        try:
            return self.models.holds(self.spec_for(job_id))
        except Exception:  # noqa: BLE001 - a spec that cannot be read is no preference
            return False

    def spec_for(self, job_id: str) -> JobSpec:
        now = time.monotonic()
        got = self._specs.get(job_id)
        if got is None or now - got[0] > SPEC_REREAD_S:
            if got is None and len(self._specs) >= SPECS_KEPT:
                # claims look at every ready job's spec: keep those in flight, read the others again when needed
                busy = {f.lease.job_id for f in self._flights.values()}
                self._specs = {j: sp for j, sp in self._specs.items() if j in busy}
            got = self._specs[job_id] = (now, self.broker.get_spec(job_id))
        return got[1]

    def _has_room(self) -> bool:
        return not self._flights or (len(self._flights) < self.max_in_flight and self._stream.admitted())

    def _start(self, lease) -> None:
        """Begin a claimed shard: beside the shards in flight if it can share their engine, else after them."""
        try:
            spec = self._readable_spec(lease.job_id)       # read again: it may have changed since the claim filter
        except SpecUnreadable as err:
            d = decide(err, Stage.CLAIM, self.worker_id)   # back untried; dead-letter shards too (they need its format)
            log.error("shard %s/%d: %s; giving the shard back", lease.job_id, lease.shard.index, d.message)
            self._give_back(lease, d.message, d.why)
            self._unreadable[lease.job_id] = d.why
            return
        flight = Flight.begin(self.broker, lease, spec)
        mode = run_mode(lease)
        if mode is not RunMode.DEAD_LETTER and not self.models.can_serve(flight.spec):
            # the spec read again since the claim filter saw it asks for another shape (a resubmit changed it)
            with flight:
                self.broker.give_back(lease, f"{self.worker_id} does not serve the job's spec as it is now "
                                             f"(model.tensor_parallel {flight.spec.model.tensor_parallel})")
            return
        if self._flights and (mode is not RunMode.SHARED or not self._shares_engine(flight.spec)):
            try:
                self._drain()        # the new lease's heartbeat runs meanwhile
            except BaseException as err:
                self._act(err, Stage.DRAIN, [flight])        # (raises: the replica or the process goes down)
                raise
        if mode is RunMode.DEAD_LETTER:
            self._finish(flight, lambda: self._dead_lettered(flight))
        elif mode is RunMode.ISOLATE:
            if self._engine_or_give_back(flight) is not None:
                self._finish(flight, lambda: self._isolated(flight))
        else:
            self._admit(flight)

    def _shares_engine(self, spec: JobSpec) -> bool:
        try:
            return engine_key(spec) == self._engine_key
        except Exception:  # noqa: BLE001 - loading its engine raises again, and fails the shard, after the drain
            return False

    def _admit(self, flight: Flight) -> None:
        """Add a shard's lines to the shared engine."""
        lease, spec, shard = flight.lease, flight.spec, flight.lease.shard
        engine = self._engine_or_give_back(flight)
        if engine is None:
            return
        try:
            flight.work = parse_shard(_read_shard(shard), shard.file, spec, engine.tokenizer, engine.max_model_len,
                                      lease.bad_lines)
        except BaseException as err:
            self._act(err, Stage.READ, [flight])
            return
        if not self._flights:
            self._stream, self._engine_key = ShardStream(engine), engine_key(spec)
        self._flights[flight.key] = flight
        try:
            self._stream.add(flight.key, flight.work.prompts)
        except Exception as err:  # noqa: BLE001 - the failure policy decides (a refused request is isolated)
            self._act(err, Stage.ADMIT, list(self._flights.values()))

    def _engine_for(self, spec: JobSpec):
        """The engine for a shard about to start. With nothing in flight the stream lets go of its engine first:
        if the shard needs another model, the one loaded is dropped before the next loads (the stream's
        reference kept its weights and KV cache on the device)."""
        if not self._flights:
            self._stream = self._engine_key = None
        with engine_calls():
            return self.models.engine(spec)

    def _advance(self, until_room: bool) -> None:
        """Step the shared engine until a shard is done or, with `until_room`, until it has room for another."""
        while self._flights and not (until_room and self._has_room()):
            for flight in [f for f in self._flights.values() if f.lost]:
                self._act(LeaseLost(), Stage.STEP, [flight])
            try:
                done = self._stream.step()
            except Exception as err:  # noqa: BLE001 - the failure policy decides (out of memory, or a line's fault)
                self._act(err, Stage.STEP, list(self._flights.values()))
                return
            for key, results in done:
                flight = self._flights.pop(key)
                self._finish(flight, lambda: (results, flight.work.failures))
            if done:
                return

    def _drain(self) -> None:
        while self._flights:
            self._advance(until_room=False)

    # -- failures (the policy is failures.decide; this carries it out) ----------------------------------------
    def _act(self, err: BaseException, stage: Stage, flights: list[Flight]) -> None:
        """Carry out what the failure policy decides for `flights` after `err` at `stage`: each flight is done
        with here (out of the stream, its heartbeat stopped) unless they are to be generated again alone. Raises
        when the replica or the process goes down."""
        d = decide(err, stage, self.worker_id, tensor_parallel=self._broken_replica())
        if d.action is Action.REDO_ALONE:
            self._split_failed_step(err)
            return
        if d.back_off and flights:
            self._backoff.failed(engine_key(flights[0].spec))
        if d.pause_claims:
            for job_id in {f.lease.job_id for f in flights}:
                self._storage.failed(job_id)
        if stage is Stage.STEP and d.action is Action.GIVE_BACK:
            # out of memory mid-step: every request goes; the engine itself stays loaded (a tensor-parallel replica
            # goes down after giving its shards back, and its manager starts a new one)
            log.error("engine out of memory with %d shard(s) in flight (%s); giving them back", len(flights), d.why)
            self._stream.abort()
            self._stream = self._engine_key = None
        for flight in flights:
            if self._flights.pop(flight.key, None) is not None and self._stream is not None:
                self._stream.abort(flight.key)
            with flight:
                self._settle(flight, d, err)
        broken = d.replica_broken(err)
        if broken is err or d.action is Action.ABANDON:
            raise err
        if broken is not None:
            raise broken from err

    def _settle(self, flight: Flight, d: Decision, err: BaseException) -> None:
        job_id, index = flight.lease.job_id, flight.lease.shard.index
        if d.action is Action.GIVE_BACK:
            log.error("shard %s/%d: %s; giving the shard back", job_id, index, d.message)
            self._give_back(flight.lease, d.message, d.why, d.quietly, storage=d.pause_claims)
        elif d.action is Action.FAIL:
            log.error("shard %s/%d failed", job_id, index, exc_info=err)
            self._patience(lambda: self.broker.fail(flight.lease, d.message), f"shard {job_id}/{index}'s failure")
        elif d.action is Action.DROP:
            log.warning("shard %s/%d: lease lost; stopped", job_id, index)
        else:
            log.warning("shard %s/%d: abandoned in flight (%s)", job_id, index, one_line(err))

    def _split_failed_step(self, err: Exception) -> None:
        """The shared engine raised with shards in flight: drop all their requests and generate each shard again
        alone through generate_lines, which splits it until the line that raises stands alone."""
        log.warning("engine failed with %d shard(s) in flight (%s: %s); generating each alone",
                    len(self._flights), type(err).__name__, err)
        self._stream.abort()
        while self._flights:
            flight = self._flights.pop(next(iter(self._flights)))
            try:
                self._finish(flight, lambda: self._bisected(flight))
            except ReplicaBroken as broke:        # out of memory on a tensor-parallel replica (_finish)
                self._act(broke, Stage.REDO, list(self._flights.values()))
                raise

    def _abandon(self) -> None:
        """Stop the shards in flight without committing: their leases expire and the reaper requeues them."""
        for flight in list(self._flights.values()):
            with flight:
                log.warning("shard %s/%d: abandoned in flight", flight.lease.job_id, flight.lease.shard.index)
                self._stream.abort(flight.key)
        self._flights.clear()

    def _sweep_finalizing(self) -> None:
        """Finalizes the jobs nobody finalizes (Broker.unfinished_finalizing), at most every FINALIZE_SWEEP_S:
        without it, in a cluster (submit + workers) such a job stayed finalizing until someone resubmitted it.
        finalize_if_ready elects one finalizer, so every worker may sweep."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + FINALIZE_SWEEP_S
        for job_id in self.broker.unfinished_finalizing():
            if self._finalize(job_id):
                log.info("job %s: finalized by %s's sweep (its last committer did not)", job_id, self.worker_id)

    def _finalize(self, job_id: str) -> bool:
        """finalize_if_ready, for a worker: Redis down is raised (the serving loop waits for it); any other failure
        is logged, and finalize has marked the job failed with the reason (unless the job left finalizing
        meanwhile), while the replica serves on."""
        from ..jobs import finalize_if_ready

        try:
            return finalize_if_ready(self.broker, job_id)
        except BROKER_UNREACHABLE:
            raise
        except Exception as err:  # noqa: BLE001 - see above
            log.error("job %s: finalizing failed (%s: %s)", job_id, type(err).__name__, err)
            return False

    # -- one shard ----------------------------------------------------------------------------------------
    def _finish(self, flight: Flight, produce: Callable[[], tuple[list[LineResult], list[LineFailure]]]) -> bool:
        """Take the shard's results and error lines from `produce` and commit them (ShardCommit). True if this
        worker's output became the shard's part."""
        with flight:
            try:
                results, failures = produce()
                if not self._commit(flight, results, failures):
                    return False
            except BaseException as err:
                self._act(err, Stage.SHARD, [flight])
                return False
        self._storage.answered(flight.lease.job_id)
        try:
            self._finalize(flight.lease.job_id)      # the shard is committed whatever finalizing does
        except BROKER_UNREACHABLE as err:
            # the shards still in flight go on (raised, the loop would abandon them); a sweep finalizes the job
            log.warning("job %s: not finalized now, Redis does not answer (%s)", flight.lease.job_id, one_line(err))
        if self.on_shard_done:
            self.on_shard_done(flight.lease.job_id, flight.lease.shard.index)
        return True

    def _bisected(self, flight: Flight) -> tuple[list[LineResult], list[LineFailure]]:
        """A shard of the failed step, from its parsed lines, split until the line that raises stands alone."""
        results, failures = generate_lines(self._stream.engine, flight.work.prompts)
        return results, flight.work.failures + failures

    def _isolated(self, flight: Flight) -> tuple[list[LineResult], list[LineFailure]]:
        """An isolate shard (a process died on it) generated one line at a time, each line noted before it
        starts, so that a line that kills the process is known next time."""
        lease, spec, shard = flight.lease, flight.spec, flight.lease.shard
        engine = self._engine_for(spec)
        work = parse_shard(_read_shard(shard), shard.file, spec, engine.tokenizer, engine.max_model_len,
                           lease.bad_lines)

        what = f"shard {lease.job_id}/{shard.index}'s line note"

        def before_line(line_no: int) -> None:
            if flight.lost:
                raise LeaseLost()
            # given up, the lease would expire with the line noted in flight: a bad line, though it crashed nothing
            self._patience(lambda: self.broker.line_started(lease, line_no), what)

        results, gen_failures = generate_lines(engine, work.prompts, before_line=before_line, one_by_one=True)
        self._patience(lambda: self.broker.line_finished(lease), what)
        return results, work.failures + gen_failures

    def _dead_lettered(self, flight: Flight) -> tuple[list[LineResult], list[LineFailure]]:
        """A dead-letter shard's lines, every one a retries_exhausted error line."""
        lease, spec, shard = flight.lease, flight.spec, flight.lease.shard
        return [], dead_letter_failures(shard, spec.format, f"shard {shard.index} failed {lease.attempt - 1} times; "
                                                            "giving up on its lines",
                                        _read_shard if lease.read_back else _not_read_back)
