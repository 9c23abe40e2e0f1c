"""Ray actors: thin wrappers around the plain Worker. Ray is imported only in runtime/ and api/."""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import ray


@ray.remote(max_concurrency=4)
class WorkerActor:
    """One model replica (tensor_parallel 1) on one GPU, or on the CPU; serves the queue until stopped."""

    def __init__(self, redis_url: str, device: str, worker_id: str, cpu_threads: Optional[int] = None):
        from ..errors import log_one_line

        # users' text in a record (a file name, an error) stays on its line, escaped; URLs' passwords are ***
        log_one_line(logging.INFO)
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        from ..queue import Broker
        from ..work.worker import Worker

        self._stop = threading.Event()
        ctx = ray.get_runtime_context()
        self.worker = Worker(Broker.from_url(redis_url), worker_id=worker_id, device=device,
                             extra_info={"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]})

    def serve(self) -> str:
        self.worker.serve_forever(self._stop)
        return self.worker.worker_id

    def stop(self) -> None:
        self._stop.set()

    def node(self) -> dict:
        return {"worker_id": self.worker.worker_id, "host": self.worker.host, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}
