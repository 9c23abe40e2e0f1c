"""The worker: claims shards from the queue, generates them, commits their parts exactly once.

A plain class (no Ray): Ray actors wrap it (runtime/actors.py) and tests drive it directly.
Exactly-once output: parts are staged under the lease's fencing token; only the owner whose commit Redis
accepts (compare-and-set on the token) promotes them to their final names; a stale owner discards its own.
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from .. import errors, filters, io
from ..records import LineFailure, LineResult
from ..spec import JobSpec
from .generation import (ShardStream, ShardWork, build_parts, generate_lines, line_id, out_of_memory, parse_shard,
                         score_results)
from .models import ModelCache, ReplicaBroken, engine_key

if TYPE_CHECKING:
    from ..protocols import WorkerBroker
    from ..queue import Lease

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


class LeaseLost(Exception):
    """The lease expired or the job was abandoned: stop working on this shard, commit nothing."""


class _Heartbeat:
    """Renews a lease every lease_s/3 in a background thread; records when the lease is lost."""

    def __init__(self, broker, lease):
        self.broker, self.lease = broker, lease
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def _run(self):
        interval_s = max(0.2, self.lease.lease_s / 3)
        while not self._stop.wait(interval_s):
            try:
                if not self.broker.heartbeat(self.lease):
                    self.lost.set()
                    return
            except Exception as err:  # noqa: BLE001 - Redis down: keep trying until the lease would expire
                log.warning("heartbeat failed: %s", err)

    def start(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class _Flight:
    """A claimed shard being worked on, with its lease's heartbeat."""

    lease: Lease
    spec: JobSpec
    hb: _Heartbeat
    work: Optional[ShardWork] = None      # its parsed lines, while they are in the shared engine


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
        self._flights: dict[str, _Flight] = {}          # stream key -> shard whose lines are in the stream
        self._same_model_claims = 0                     # claims in a row that needed no model load
        self._unloadable: dict[tuple, tuple[float, float]] = {}   # engine_key -> (retry after, backoff s)
        self._noted: set[str] = set()                   # jobs noted on the registration as not loadable here
        self.broker.register_worker(self.worker_id, self.host, {"device": self.models.device_name(), "pid": os.getpid(),
                                                                "tensor_parallel": 1, **(extra_info or {})})

    # -- the loop ---------------------------------------------------------------------------------------
    def run_once(self, claim: bool = True) -> bool:
        """Reap expired leases, claim a shard if the engine has room for one, then generate until a shard is
        done or the engine has room for the next. False when there was nothing to claim and nothing in
        flight. `claim=False` only carries on with the shards in flight."""
        self.broker.reap()
        self.broker.worker_heartbeat(self.worker_id)
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
        import redis

        backoff_s = idle_sleep_s
        try:
            self._watch_work()
            while not stop.is_set() or self._flights:
                try:
                    worked = self.run_once(claim=not stop.is_set())
                    backoff_s = idle_sleep_s
                except (redis.ConnectionError, redis.TimeoutError) as err:
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
        import redis

        try:
            self.broker.watch_work()
        except redis.RedisError as err:      # Redis not up yet: the loop waits it out; _idle subscribes later
            log.debug("cannot watch for work yet: %s", err)

    def _idle(self, stop: threading.Event, seconds: float) -> None:
        """Nothing to claim: wait `seconds` for a job to announce work (a submit, a shard given back), in slices
        short enough that `stop` is seen at once."""
        import redis

        end = time.monotonic() + seconds
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                if self.broker.wait_for_work(min(left, IDLE_SLICE_S)):
                    return
            except redis.RedisError:
                # the subscription broke (Redis restarted or away): the next slice subscribes again
                self.broker.unwatch_work()
                stop.wait(min(left, IDLE_SLICE_S))

    # -- shards -------------------------------------------------------------------------------------------
    def _serves(self, job_id: str) -> bool:
        """Claim filter: skip jobs this worker's models cannot serve (a job whose spec cannot even be read is
        claimed, so that its shards fail with the reason instead of waiting)."""
        try:
            spec = self.spec_for(job_id)
            return self.models.can_serve(spec) and not self._failed_to_load(spec)
        except Exception:  # noqa: BLE001 - see the docstring
            return True

    def _failed_to_load(self, spec: JobSpec) -> bool:
        """This worker could not load the spec's engine and its backoff (LOAD_RETRY_S, doubling) has not passed."""
        failed = self._unloadable.get(engine_key(spec))
        return failed is not None and time.monotonic() < failed[0]

    def _mark_unloadable(self, key: tuple) -> None:
        prev = self._unloadable.get(key)
        backoff = LOAD_RETRY_S if prev is None else min(LOAD_RETRY_MAX_S, max(LOAD_RETRY_S, 2 * prev[1]))
        self._unloadable[key] = (time.monotonic() + backoff, backoff)

    def _engine_or_give_back(self, flight: _Flight):
        """The flight's engine, or None after giving its shard back untried because the engine would not load
        here: not the shard's failure (broker.give_back), and this worker leaves the job's engine to others for
        LOAD_RETRY_S; `ziya-batch run` stops with the reason once none of its workers can load it."""
        lease, spec = flight.lease, flight.spec
        cached = self.models.holds(spec)
        try:
            engine = self._engine_for(spec)
        except Exception as err:  # noqa: BLE001 - out of memory, a broken checkpoint: this worker's, not the shard's
            flight.hb.stop()
            why = _one_line(err)
            log.error("shard %s/%d: the engine would not load on %s (%s); giving the shard back", lease.job_id,
                      lease.shard.index, self.worker_id, why)
            self._mark_unloadable(engine_key(spec))
            self._give_back(lease, f"engine would not load on {self.worker_id}: {why}", why)
            return None
        except ReplicaBroken as err:
            # a tensor-parallel replica whose rank 0 could not load after the others started: the replica goes
            # down, and the shard goes back untried now rather than through its lease's expiry (a counted retry)
            flight.hb.stop()
            self._give_back(lease, f"engine would not load on {self.worker_id}: {_one_line(err)}", _one_line(err),
                            quietly=True)
            raise
        except BaseException:
            flight.hb.stop()      # the process is going down: the lease expires and is requeued
            raise
        if not cached:                            # loaded now: a backoff for it (doubling) starts over
            self._unloadable.pop(engine_key(spec), None)
            if lease.job_id in self._noted:       # (perhaps with settings a resubmit changed)
                self._note(lease.job_id, None)
        return engine

    def _note(self, job_id: str, why: Optional[str]) -> None:
        self.broker.note_cannot_load(self.worker_id, job_id, why)
        (self._noted.add if why else self._noted.discard)(job_id)

    def _give_back(self, lease, message: str, why: str, quietly: bool = False) -> None:
        """Give the shard back untried (broker.give_back) and note why on this worker's registration. `quietly`:
        on the way out of a broken replica, where a Redis error must not replace the ReplicaBroken being raised
        (the lease then expires and is requeued, as it would have anyway)."""
        try:
            self.broker.give_back(lease, message)
            self._note(lease.job_id, why)
        except Exception as err:  # noqa: BLE001 - see the docstring
            if not quietly:
                raise
            log.warning("shard %s/%d: could not give it back (%s); its lease will expire", lease.job_id,
                        lease.shard.index, err)

    def _give_back_flights(self, message: str, why: str, quietly: bool = False) -> None:
        """Every shard still in flight goes back untried (_give_back)."""
        for flight in self._flights.values():
            flight.hb.stop()
            self._give_back(flight.lease, message, why, quietly)
        self._flights.clear()

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
        flight = _Flight(lease, self.spec_for(lease.job_id), _Heartbeat(self.broker, lease).start())
        if not lease.dead_letter and not self.models.can_serve(flight.spec):
            # the spec read again since the claim filter saw it asks for another shape (a resubmit changed it)
            flight.hb.stop()
            self.broker.give_back(lease, f"{self.worker_id} does not serve the job's spec as it is now "
                                         f"(model.tensor_parallel {flight.spec.model.tensor_parallel})")
            return
        alone = lease.dead_letter or lease.isolate
        if self._flights and (alone or not self._shares_engine(flight.spec)):
            try:
                self._drain()        # the new lease's heartbeat runs meanwhile
            except ReplicaBroken as err:
                flight.hb.stop()     # untried: back now, not through its lease's expiry (a counted retry)
                self._give_back(lease, f"replica {self.worker_id} broke before this shard started: "
                                       f"{_one_line(err)}", _one_line(err), quietly=True)
                raise
            except BaseException:
                flight.hb.stop()
                raise
        if alone:
            if lease.dead_letter or self._engine_or_give_back(flight) is not None:
                self._finish(flight, lambda: self._produce_alone(flight))
        else:
            self._admit(flight)

    def _shares_engine(self, spec: JobSpec) -> bool:
        try:
            return engine_key(spec) == self._engine_key
        except Exception:  # noqa: BLE001 - loading its engine raises again, and fails the shard, after the drain
            return False

    def _admit(self, flight: _Flight) -> None:
        """Add a shard's lines to the shared engine."""
        lease, spec, shard = flight.lease, flight.spec, flight.lease.shard
        engine = self._engine_or_give_back(flight)
        if engine is None:
            return
        try:
            flight.work = parse_shard(io.read_shard(shard), shard.file, spec, engine.tokenizer, engine.max_model_len,
                                      lease.bad_lines)
        except Exception as err:  # noqa: BLE001 - a failed shard is retried by the queue, never lost
            flight.hb.stop()
            self._fail(lease, err)
            return
        except BaseException:
            flight.hb.stop()      # the replica is going down (ReplicaBroken): the lease expires and is requeued
            raise
        if not self._flights:
            self._stream, self._engine_key = ShardStream(engine), engine_key(spec)
        # unique in the engine: two jobs may read one file, and a shard may come back to this worker
        key = f"{lease.job_id}/{shard.index}/{lease.token}"
        self._flights[key] = flight
        try:
            self._stream.add(key, flight.work.prompts)
        except Exception as err:  # noqa: BLE001 - a request the engine refuses is isolated like a failed step
            self._redo_alone(err)

    def _engine_for(self, spec: JobSpec):
        """The engine for a shard about to start. With nothing in flight the stream lets go of its engine first:
        if the shard needs another model, the one loaded is dropped before the next loads (the stream's
        reference kept its weights and KV cache on the device)."""
        if not self._flights:
            self._stream = self._engine_key = None
        return self.models.engine(spec)

    def _advance(self, until_room: bool) -> None:
        """Step the shared engine until a shard is done or, with `until_room`, until it has room for another."""
        while self._flights and not (until_room and self._has_room()):
            for key in [k for k, f in self._flights.items() if f.hb.lost.is_set()]:
                self._stream.abort(key)
                flight = self._flights.pop(key)
                flight.hb.stop()
                log.warning("shard %s/%d: lease lost; its lines aborted", flight.lease.job_id, flight.lease.shard.index)
            try:
                done = self._stream.step()
            except Exception as err:  # noqa: BLE001 - isolated line by line, as in a shard generated alone
                if out_of_memory(err):
                    self._give_back_all(err)
                else:
                    self._redo_alone(err)
                return
            for key, results in done:
                flight = self._flights.pop(key)
                self._finish(flight, lambda: (results, flight.work.failures))
            if done:
                return

    def _drain(self) -> None:
        while self._flights:
            self._advance(until_room=False)

    def _redo_alone(self, err: Exception) -> None:
        """The engine raised with shards in flight: drop all their requests and generate each shard again
        alone through generate_lines, which splits it until the line that raises stands alone."""
        log.warning("engine failed with %d shard(s) in flight (%s: %s); generating each alone",
                    len(self._flights), type(err).__name__, err)
        self._stream.abort()
        while self._flights:
            flight = self._flights.pop(next(iter(self._flights)))
            try:
                self._finish(flight, lambda: self._generate_alone(flight))
            except ReplicaBroken as broke:        # out of memory on a tensor-parallel replica (_finish)
                self._give_back_flights(f"replica {self.worker_id} broke: {_one_line(broke)}", _one_line(broke),
                                        quietly=True)
                raise

    def _give_back_all(self, err: Exception) -> None:
        """The engine ran out of memory mid-step: no line's fault (the KV cache and the step's budget are fixed;
        what ran out is the room the settings left). Give every shard in flight back untried and leave the
        engine's jobs to other workers for LOAD_RETRY_S, as for an engine that would not load (the engine itself
        stays loaded; a tensor-parallel replica, whose other ranks may be stuck in the failed step, goes down after
        giving its shards back, and its manager starts a new one)."""
        why = _one_line(err)
        log.error("engine out of memory with %d shard(s) in flight (%s); giving them back", len(self._flights), why)
        self._stream.abort()
        if self._engine_key is not None:
            self._mark_unloadable(self._engine_key)
        self._stream = self._engine_key = None
        broken = self._broken_replica()
        self._give_back_flights(f"engine out of memory on {self.worker_id}: {why}", why, quietly=broken)
        if broken:
            raise ReplicaBroken(f"tensor-parallel engine out of memory mid-step: {why}")

    def _abandon(self) -> None:
        """Stop the shards in flight without committing: their leases expire and the reaper requeues them."""
        for key, flight in self._flights.items():
            log.warning("shard %s/%d: abandoned in flight", flight.lease.job_id, flight.lease.shard.index)
            self._stream.abort(key)
            flight.hb.stop()
        self._flights.clear()

    # -- one shard ----------------------------------------------------------------------------------------
    def _finish(self, flight: _Flight, produce: Callable[[], tuple[list[LineResult], list[LineFailure]]]) -> bool:
        """Take the shard's results and error lines from `produce`, score them, stage the parts and commit
        them under the lease's token; promote them if Redis took the commit. True if this worker's output
        became the shard's part."""
        from ..queue import ShardStats

        lease, spec, hb, shard = flight.lease, flight.spec, flight.hb, flight.lease.shard
        try:
            try:
                results, failures = produce()
                if hb.lost.is_set():
                    raise LeaseLost()
                if results:
                    score_results(results, self.models.reference(spec), self.models.reward(spec), spec.experience)
                parts = build_parts(spec, results, failures)
                stats = ShardStats(prompts_done=len(results), prompts_failed=len(failures),
                                   samples=sum(len(r.samples) for r in results),
                                   output_tokens=sum(len(s.token_ids) for r in results for s in r.samples),
                                   dropped_constant_reward_groups=filters.dropped_constant_reward_groups(
                                       results, spec.output.filters))
                if hb.lost.is_set():
                    raise LeaseLost()
                stats.attempt = io.new_attempt()
                staged = io.stage_shard(spec.output.path, shard.index, lease.token, parts, spec.output.format,
                                        spec.format, attempt=stats.attempt)
                stats.parts = {k: (p.lines, p.sha256) for k, p in staged.items()}
                if not self.broker.commit(lease, stats):
                    io.discard_staged(spec.output.path, shard.index, lease.token, stats.attempt)
                    log.warning("shard %s/%d: lease lost before commit; output discarded", lease.job_id, shard.index)
                    return False
            finally:
                hb.stop()
            io.promote_shard(spec.output.path, shard.index, lease.token, stats.parts, stats=stats.to_dict(),
                             attempt=stats.attempt)
        except LeaseLost:
            log.warning("shard %s/%d: lease lost; stopped", lease.job_id, shard.index)
            return False
        except Exception as err:  # noqa: BLE001 - a failed shard is retried by the queue, never lost
            if out_of_memory(err):
                # generating it alone, or loading its reference or reward model: no line's failure either
                why = _one_line(err)
                log.error("shard %s/%d: out of memory (%s); giving the shard back", lease.job_id, shard.index, why)
                self._mark_unloadable(engine_key(spec))
                broken = self._broken_replica()
                self._give_back(lease, f"out of memory on {self.worker_id}: {why}", why, quietly=broken)
                if broken:
                    raise ReplicaBroken(f"tensor-parallel engine out of memory: {why}") from err
            else:
                self._fail(lease, err)
            return False
        from ..jobs import finalize_if_ready

        finalize_if_ready(self.broker, lease.job_id)
        if self.on_shard_done:
            self.on_shard_done(lease.job_id, shard.index)
        return True

    def _fail(self, lease, err: Exception) -> None:
        log.error("shard %s/%d failed", lease.job_id, lease.shard.index, exc_info=err)
        self.broker.fail(lease, f"{type(err).__name__}: {err}")

    def _generate_alone(self, flight: _Flight) -> tuple[list[LineResult], list[LineFailure]]:
        results, failures = generate_lines(self._stream.engine, flight.work.prompts)
        return results, flight.work.failures + failures

    def _produce_alone(self, flight: _Flight) -> tuple[list[LineResult], list[LineFailure]]:
        """A dead-letter shard's lines as errors, or an isolate shard generated one line at a time."""
        lease, spec, hb, shard = flight.lease, flight.spec, flight.hb, flight.lease.shard
        lines = list(io.read_shard(shard))
        if lease.dead_letter:
            return [], [LineFailure(line_id(raw, shard.file, no, spec.format), shard.file, no, errors.RETRIES_EXHAUSTED,
                                    f"shard {shard.index} failed {lease.attempt - 1} times; giving up on its lines")
                        for no, raw in lines]
        engine = self._engine_for(spec)
        work = parse_shard(lines, shard.file, spec, engine.tokenizer, engine.max_model_len, lease.bad_lines)

        def before_line(line_no: int) -> None:
            if hb.lost.is_set():
                raise LeaseLost()
            self.broker.line_started(lease, line_no)

        results, gen_failures = generate_lines(engine, work.prompts, before_line=before_line, one_by_one=True)
        self.broker.line_finished(lease)
        return results, work.failures + gen_failures


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
