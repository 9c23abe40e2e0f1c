"""Replica groups: as many model replicas as the cluster's GPUs allow (GPUs // tensor_parallel), each in a
placement group of its own so one replica's GPUs sit on one node. A replica whose actor or node dies is
rebuilt where resources allow; its shards come back through their leases. New nodes get new replicas."""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .actors import WorkerActor

log = logging.getLogger(__name__)


@dataclass
class Replica:
    replica_id: str
    pg: object
    actors: list
    serving: list                      # ObjectRefs of serve() calls; one finishing means the actor stopped
    started_s: float = field(default_factory=time.time)


class ReplicaManager:
    def __init__(self, redis_url: str, tensor_parallel: int = 1, replicas: Optional[int] = None,
                 use_gpus: Optional[bool] = None, cpu_threads: Optional[int] = None,
                 worker_prefix: str = "replica", node_id: Optional[str] = None, job_id: Optional[str] = None):
        self.redis_url = redis_url
        self.tp = tensor_parallel
        self.fixed = replicas                       # None = auto from the cluster's GPUs
        self.use_gpus = use_gpus
        self.cpu_threads = cpu_threads
        self.prefix = worker_prefix
        self.node_id = node_id                      # serve only this node's resources (`ziya-batch worker`)
        self.job_id = job_id                        # tensor_parallel > 1: a job whose model the ranks load first
        self.replicas: dict[str, Replica] = {}
        self.restarts = 0
        # replicas that died: (replica id, why in a line, whether it died starting: its constructor raised)
        self.deaths: list[tuple[str, str, bool]] = []
        self._pending = None                        # a placement group still waiting for its resources

    # -- sizing ------------------------------------------------------------------------------------------
    def _resources(self) -> dict:
        if self.node_id is None:
            return ray.cluster_resources()
        for node in ray.nodes():
            if node["NodeID"] == self.node_id and node["Alive"]:
                return node["Resources"]
        return {}

    def _gpu_mode(self) -> bool:
        if self.use_gpus is None:
            self.use_gpus = self._resources().get("GPU", 0) >= self.tp
        return self.use_gpus

    def desired(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self._gpu_mode():
            return 1
        return int(self._resources().get("GPU", 0) // self.tp)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _start_one(self) -> Optional[Replica]:
        gpu = self._gpu_mode()
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        if self.node_id is not None:
            # every node carries a tiny `node:<ip>` resource: asking for a sliver of it pins the bundle there
            ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == self.node_id)
            bundle[f"node:{ip}"] = 0.001
        if self._pending is None:
            # kept across reconcile calls: on a busy or autoscaling cluster it may take a while to place
            self._pending = placement_group([dict(bundle) for _ in range(self.tp)], strategy="STRICT_PACK")
        ready, _ = ray.wait([self._pending.ready()], timeout=0.2)
        if not ready:
            return None
        pg, self._pending = self._pending, None
        rid = f"{self.prefix}-{uuid.uuid4().hex[:8]}"
        if self.tp > 1:
            return self._start_tp(rid, pg, gpu)
        opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        actor = WorkerActor.options(
            **opts, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote(self.redis_url, "auto" if gpu else "cpu", rid, self.cpu_threads)
        rep = Replica(rid, pg, [actor], [actor.serve.remote()])
        self.replicas[rid] = rep
        log.info("started replica %s (%s)", rid, "GPU" if gpu else "CPU")
        return rep

    def _start_tp(self, rid: str, pg, gpu: bool) -> Replica:
        from .tp_actors import TPRankActor, rendezvous_address

        in_bundle = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
        init_method = ray.get(rendezvous_address.options(scheduling_strategy=in_bundle(0)).remote())
        opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        actors = [TPRankActor.options(**opts, scheduling_strategy=in_bundle(r)).remote(
                      r, self.tp, init_method, self.redis_url, self.job_id, rid, self.cpu_threads)
                  for r in range(self.tp)]
        rep = Replica(rid, pg, actors, [a.serve.remote() for a in actors])
        self.replicas[rid] = rep
        log.info("started tensor-parallel replica %s (%d ranks, %s)", rid, self.tp, "GPU" if gpu else "CPU")
        return rep

    def _drop(self, rep: Replica) -> None:
        for a in rep.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            remove_placement_group(rep.pg)
        except Exception:  # noqa: BLE001
            pass
        self.replicas.pop(rep.replica_id, None)

    def reconcile(self) -> None:
        """Drop dead replicas, start missing ones where resources allow. Call it every few seconds."""
        for rep in list(self.replicas.values()):
            done, _ = ray.wait(rep.serving, timeout=0)
            if done:
                try:
                    ray.get(done)
                    log.info("replica %s stopped", rep.replica_id)
                except Exception as err:  # noqa: BLE001 - actor or node died
                    log.warning("replica %s died: %s", rep.replica_id, str(err).splitlines()[0])
                    at_start = bool(getattr(err, "actor_init_failed", False)) or "creation task" in str(err)
                    self.deaths.append((rep.replica_id, _cause(err), at_start))
                self.restarts += 1
                self._drop(rep)
        while len(self.replicas) < self.desired():
            if self._start_one() is None:
                break

    def stop(self, timeout_s: float = 30.0) -> None:
        for rep in self.replicas.values():
            for a in rep.actors:
                try:
                    a.stop.remote()
                except Exception:  # noqa: BLE001
                    pass
        if self._pending is not None:
            remove_placement_group(self._pending)
            self._pending = None
        refs = [r for rep in self.replicas.values() for r in rep.serving]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for rep in list(self.replicas.values()):
            self._drop(rep)


def _cause(err: Exception) -> str:
    """A dead actor's error in one line: the exception its task raised (the last line of Ray's text, which ends
    with the original traceback), else its first line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    last = next((ln for ln in reversed(lines) if "Error" in ln.split(":")[0]), lines[0])
    return last[:500]
