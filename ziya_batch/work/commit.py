"""Committing one shard exactly once: score its results, build its parts, stage them under the lease's fencing
token, commit in Redis (compare-and-set on the token), and promote them only if Redis took the commit; a stale
owner discards what it staged (io/parts.py has the storage side of the protocol). A Redis that does not answer the
commit is waited for (failures.RedisPatience; a commit sent again after a lost reply is answered as the one that
ran). A promote that fails after Redis took the commit leaves the commit to the job's finalizer (jobs/finalize.py):
it promotes the parts, or takes the commit back where storage lost them."""
from __future__ import annotations

import logging

from .. import filters, io
from ..records import LineFailure, LineResult
from .failures import LeaseLost, RedisPatience, engine_calls, storage_calls
from .flight import Flight
from .generation import build_parts, score_results

log = logging.getLogger(__name__)


class ShardCommit:
    """The one commit path of a worker's shards."""

    def __init__(self, broker, models, patience: RedisPatience | None = None):
        self.broker, self.models = broker, models
        self.patience = patience or RedisPatience()

    def __call__(self, flight: Flight, results: list[LineResult], failures: list[LineFailure]) -> bool:
        """True if this worker's output became the shard's part; False if Redis refused the commit (the lease
        was lost meanwhile), or took it but the promote failed (the lease is spent, so nothing is failed or given
        back: the shard stays committed for the job's finalizer). Raises LeaseLost when the heartbeat lost the
        lease before the commit was tried."""
        from ..queue import ShardStats

        lease, spec, shard = flight.lease, flight.spec, flight.lease.shard
        if flight.lost:
            raise LeaseLost()
        if results:
            with engine_calls():          # the reference and reward models load here, and run on the device
                score_results(results, self.models.reference(spec), self.models.reward(spec), spec.experience)
        parts = build_parts(spec, results, failures)
        stats = ShardStats(prompts_done=len(results), prompts_failed=len(failures),
                           samples=sum(len(r.samples) for r in results),
                           output_tokens=sum(len(s.token_ids) for r in results for s in r.samples),
                           prefix_cache_query_tokens=sum(len(r.prompt_ids) for r in results)
                           if spec.engine.prefix_caching else 0,
                           prefix_cache_hit_tokens=sum(r.cached_tokens for r in results),
                           dropped_constant_reward_groups=filters.dropped_constant_reward_groups(
                               results, spec.output.filters))
        if flight.lost:
            raise LeaseLost()
        out = io.OutputDir(spec.output.path, spec.output.format)
        stats.attempt = io.new_attempt()
        with storage_calls():
            staged = out.stage(shard.index, lease.token, stats.attempt, parts, spec.format)
        stats.parts = {k: (p.lines, p.sha256) for k, p in staged.items()}
        if not self.patience(lambda: self.broker.commit(lease, stats), f"shard {lease.job_id}/{shard.index}'s commit"):
            out.discard(shard.index, lease.token, stats.attempt)
            log.warning("shard %s/%d: lease lost before commit; output discarded", lease.job_id, shard.index)
            return False
        try:
            out.promote(shard.index, lease.token, stats.attempt, stats.parts, stats=stats.to_dict())
        except Exception as err:  # noqa: BLE001 - storage down or parts lost: the commit stands either way
            # only the elected finalizer takes a commit back, once every promote of it has had time to end; the
            # workers' finalize sweep comes by within FINALIZE_SWEEP_S. The lease is spent: the failure policy has
            # nothing to give back
            log.warning("shard %s/%d: committed, but its parts could not be moved into place (%s: %s); the job's "
                        "finalizer promotes them, or runs the shard again if storage lost them",
                        lease.job_id, shard.index, type(err).__name__, err)
            return False
        return True
