"""The worker: claims shards from the queue, generates them, commits their parts exactly once.

A plain class (no Ray): Ray actors wrap it (runtime/actors.py) and tests drive it directly.
Exactly-once output: parts are staged under the lease's fencing token; only the owner whose commit Redis
accepts (compare-and-set on the token) promotes them to their final names; a stale owner discards its own.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Callable, Optional

from .. import errors, io
from ..records import LineFailure
from ..spec import JobSpec
from .generation import build_parts, generate_lines, line_id, parse_shard, score_results
from .models import ModelCache

log = logging.getLogger(__name__)


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

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


class Worker:
    def __init__(self, broker, worker_id: Optional[str] = None, device: str = "auto",
                 models: Optional[ModelCache] = None, host: Optional[str] = None,
                 on_shard_done: Optional[Callable[[str, int], None]] = None, extra_info: Optional[dict] = None):
        self.broker = broker
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.host = host or socket.gethostname()
        self.models = models or ModelCache(device)
        self.on_shard_done = on_shard_done
        self._specs: dict[str, JobSpec] = {}
        self.broker.register_worker(self.worker_id, self.host, {"device": self.models.device_name(), "pid": os.getpid(),
                                                                **(extra_info or {})})

    # -- the loop ---------------------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Reap expired leases, claim one shard and process it. False when there was nothing to claim."""
        self.broker.reap()
        self.broker.worker_heartbeat(self.worker_id)
        lease = self.broker.claim(self.worker_id)
        if lease is None:
            return False
        self.process(lease)
        return True

    def run_until_idle(self) -> int:
        done = 0
        while self.run_once():
            done += 1
        return done

    def serve_forever(self, stop: threading.Event, idle_sleep_s: float = 0.5, max_backoff_s: float = 10.0) -> None:
        """Serve until `stop` is set. A Redis outage (restart, failover) is waited out, not fatal: leases
        that expire meanwhile come back through the reaper and fencing keeps the output exactly-once."""
        import redis

        backoff_s = idle_sleep_s
        try:
            while not stop.is_set():
                try:
                    worked = self.run_once()
                    backoff_s = idle_sleep_s
                except (redis.ConnectionError, redis.TimeoutError) as err:
                    log.warning("Redis unreachable (%s); retrying in %.1fs", err, backoff_s)
                    stop.wait(backoff_s)
                    backoff_s = min(max_backoff_s, backoff_s * 2)
                    continue
                if not worked:
                    stop.wait(idle_sleep_s)
        finally:
            try:
                self.broker.unregister_worker(self.worker_id)
            except Exception:  # noqa: BLE001 - Redis gone at shutdown: the registration expires by itself
                pass

    # -- one shard ----------------------------------------------------------------------------------------
    def spec_for(self, job_id: str) -> JobSpec:
        if job_id not in self._specs:
            self._specs[job_id] = self.broker.get_spec(job_id)
        return self._specs[job_id]

    def process(self, lease) -> bool:
        """Generate one shard and commit it. True if this worker's output became the shard's part."""
        spec = self.spec_for(lease.job_id)
        shard = lease.shard
        try:
            with _Heartbeat(self.broker, lease) as hb:
                parts, stats = self._produce(spec, lease, hb)
                if hb.lost.is_set():
                    raise LeaseLost()
                staged = io.stage_shard(spec.output.path, shard.index, lease.token, parts, spec.output.format, spec.format)
                stats.parts = {k: (p.lines, p.sha256) for k, p in staged.items()}
                if not self.broker.commit(lease, stats):
                    io.discard_staged(spec.output.path, shard.index, lease.token)
                    log.warning("shard %s/%d: lease lost before commit; output discarded", lease.job_id, shard.index)
                    return False
            io.promote_shard(spec.output.path, shard.index, lease.token, stats.parts, stats=stats.to_dict())
        except LeaseLost:
            log.warning("shard %s/%d: lease lost; stopped", lease.job_id, shard.index)
            return False
        except Exception as err:  # noqa: BLE001 - a failed shard is retried by the queue, never lost
            log.exception("shard %s/%d failed", lease.job_id, shard.index)
            self.broker.fail(lease, f"{type(err).__name__}: {err}")
            return False
        from .finalize import finalize_if_ready

        finalize_if_ready(self.broker, lease.job_id)
        if self.on_shard_done:
            self.on_shard_done(lease.job_id, shard.index)
        return True

    def _produce(self, spec: JobSpec, lease, hb: _Heartbeat):
        from ..queue import ShardStats

        shard = lease.shard
        lines = list(io.read_shard(shard))
        if lease.dead_letter:
            failures = [LineFailure(line_id(raw, shard.file, no, spec.format), shard.file, no, errors.RETRIES_EXHAUSTED,
                                    f"shard {shard.index} failed {lease.attempt - 1} times; giving up on its lines")
                        for no, raw in lines]
            parts = build_parts(spec, [], failures)
            return parts, ShardStats(prompts_done=0, prompts_failed=len(failures), samples=0, output_tokens=0, parts={})
        engine = self.models.engine(spec)
        work = parse_shard(lines, shard.file, spec, engine.tokenizer, engine.max_model_len, lease.bad_lines)

        def before_line(line_no: int) -> None:
            if hb.lost.is_set():
                raise LeaseLost()
            self.broker.line_started(lease, line_no)

        results, gen_failures = generate_lines(engine, work.prompts, before_line=before_line, one_by_one=lease.isolate)
        if lease.isolate:
            self.broker.line_finished(lease)
        if hb.lost.is_set():
            raise LeaseLost()
        score_results(results, self.models.reference(spec), self.models.reward(spec))
        failures = work.failures + gen_failures
        parts = build_parts(spec, results, failures)
        samples = sum(len(r.samples) for r in results)
        tokens = sum(len(s.token_ids) for r in results for s in r.samples)
        return parts, ShardStats(prompts_done=len(results), prompts_failed=len(failures), samples=samples,
                                 output_tokens=tokens, parts={})

