"""`ziya-batch worker`: join a Ray cluster as a node and serve the queue with this node's GPUs.

The node joins with `ray start --address` (unless this host already is a Ray node), then a replica
manager pinned to this node keeps GPUs // tensor_parallel replicas running until the command is stopped.
A `run` on the head sees the new GPUs too: both only ever fill free GPUs, so they never oversubscribe.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Optional

from ..errors import ServiceError
from .services import REDIS_ENV

log = logging.getLogger(__name__)


def _join(address: str) -> bool:
    """Start a Ray node that joins `address`; False if this host is already a node of a cluster."""
    import ray

    try:
        ray.init(address="auto", log_to_driver=False, logging_level=logging.WARNING)
        ray.shutdown()
        return False
    except Exception:  # noqa: BLE001 - no local node: start one
        pass
    res = subprocess.run(["ray", "start", f"--address={address}"], capture_output=True, text=True)
    if res.returncode != 0:
        raise ServiceError(f"could not join the Ray cluster at {address}: {res.stderr.strip().splitlines()[-1:]}")
    return True


def serve_node(redis_url: Optional[str] = None, ray_address: Optional[str] = None,
               tensor_parallel: int = 1, job_id: Optional[str] = None, poll_s: float = 5.0) -> None:
    import ray

    from .replicas import ReplicaManager

    address = ray_address or os.environ.get("RAY_ADDRESS")
    url = redis_url or os.environ.get(REDIS_ENV)
    if not address:
        raise ServiceError("no Ray cluster to join: pass --address or set RAY_ADDRESS (host:port of the head)")
    if not url:
        raise ServiceError(f"no Redis queue: pass --redis-url or set {REDIS_ENV}")
    started = _join(address)
    ray.init(address="auto", log_to_driver=False, logging_level=logging.WARNING)
    node_id = ray.get_runtime_context().get_node_id()
    manager = ReplicaManager(url, tensor_parallel=tensor_parallel, node_id=node_id, worker_prefix="node",
                             job_id=job_id)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving the queue at {url} from node {node_id[:12]} of {address}; Ctrl-C stops", flush=True)
    try:
        while not stop.is_set():
            manager.reconcile()
            stop.wait(poll_s)
    finally:
        manager.stop()
        ray.shutdown()
        if started:
            subprocess.run(["ray", "stop"], capture_output=True)
