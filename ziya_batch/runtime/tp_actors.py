"""Tensor-parallel replicas: K rank actors in one placement group (one node), joined by a
torch.distributed group of their own (NCCL on GPUs, gloo on CPUs). Rank 0 claims shards and schedules;
every step's plan is broadcast and all ranks compute it on their shard of the weights and the KV cache."""
from __future__ import annotations

import logging
import socket
import threading
from typing import Optional

import ray


@ray.remote(num_cpus=0)
def rendezvous_address() -> str:
    """A free TCP port on the node that runs this task (the placement group's node): rank 0 listens there."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


@ray.remote(max_concurrency=4)
class TPRankActor:
    def __init__(self, rank: int, world_size: int, init_method: str, redis_url: str, job_id: str,
                 worker_id: str, cpu_threads: Optional[int] = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        import torch
        import torch.distributed as dist

        from ..engine import tp
        from ..engine.engine import LLMEngine
        from ..queue import Broker
        from .models import ModelCache, engine_config
        from .worker import Worker

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        cuda = torch.cuda.is_available()
        device = "cuda" if cuda else "cpu"          # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                                world_size=world_size)
        self.rank = rank
        self._stop = threading.Event()
        broker = Broker.from_url(redis_url)
        spec = broker.get_spec(job_id)
        self.engine = LLMEngine(engine_config(spec, device), tensor_parallel=(rank, world_size))
        self.worker = None
        if rank == 0:
            self.driver = tp.enable_tp_driver(self.engine)
            ctx = ray.get_runtime_context()
            self.worker = Worker(broker, worker_id=worker_id, device=device,
                                 models=ModelCache(device, pinned=(spec, self.engine)),
                                 extra_info={"node_id": ctx.get_node_id(), "tensor_parallel": world_size,
                                             "gpu_ids": [str(g) for g in ray.get_gpu_ids()]})

    def serve(self) -> int:
        from ..engine import tp

        if self.rank == 0:
            try:
                self.worker.serve_forever(self._stop)
            finally:
                self.driver.stop()                  # the followers return from serve_follower
            return 0
        return tp.serve_follower(self.engine)

    def stop(self) -> None:
        self._stop.set()
