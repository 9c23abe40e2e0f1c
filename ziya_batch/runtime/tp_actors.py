"""Tensor-parallel replicas: K rank actors in one placement group (one node), joined by a
torch.distributed group of their own (NCCL on GPUs, gloo on CPUs). Rank 0 claims shards and schedules;
every step's plan is broadcast and all ranks compute it on their shard of the weights and the KV cache."""
from __future__ import annotations

import datetime
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
    """One rank of a tensor-parallel replica. With job_id, every rank loads that job's model at start;
    without, the replica loads the model of the first shard it claims. Rank 0 switches models when it claims a
    shard of a job with another one (TPModelCache): the other ranks load it when rank 0 tells them."""

    def __init__(self, rank: int, world_size: int, init_method: str, redis_url: str, job_id: Optional[str],
                 worker_id: str, cpu_threads: Optional[int] = None):
        from ..errors import log_one_line

        # users' text in a record (a file name, an error) stays on its line, escaped; URLs' passwords are ***
        log_one_line(logging.INFO)
        import torch
        import torch.distributed as dist

        from ..engine import tp
        from ..queue import Broker
        from ..work.models import TPModelCache
        from ..work.worker import Worker

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"     # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        # the other ranks wait in a broadcast for as long as rank 0 finds no shard: the default timeouts (NCCL
        # 10 minutes, gloo 30) would end an idle replica, and its manager would rebuild and reload it
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(hours=24))
        self.rank, self.world_size = rank, world_size
        self._stop = threading.Event()
        broker = Broker.from_url(redis_url)
        spec = broker.get_spec(job_id) if job_id else None
        self.engine = self._build(spec) if spec is not None else None
        self.worker = None
        if rank == 0:
            self.driver = tp.PlanBroadcaster()
            if self.engine is not None:
                self.engine.plan_hook = self.driver
            ctx = ray.get_runtime_context()
            models = TPModelCache(self.device, world_size, self.driver,
                                  loaded=(spec, self.engine) if spec is not None else None)
            self.engine = None                      # the cache holds rank 0's engine, and drops it to switch
            self.worker = Worker(broker, worker_id=worker_id, device=self.device, models=models,
                                 extra_info={"node_id": ctx.get_node_id(), "tensor_parallel": world_size,
                                             "gpu_ids": [str(g) for g in ray.get_gpu_ids()]})

    def _build(self, spec):
        from ..engine.engine import LLMEngine
        from ..work.models import engine_config

        return LLMEngine(engine_config(spec, self.device), tensor_parallel=(self.rank, self.world_size))

    def _load(self, spec_json: str):
        """A follower's on_load: drop this rank's engine, build the one rank 0 switched to."""
        from ..spec import JobSpec
        from ..work.models import release_memory

        self.engine = None
        release_memory(self.device)
        self.engine = self._build(JobSpec.model_validate_json(spec_json))
        return self.engine

    def serve(self) -> int:
        from ..engine import tp

        if self.rank == 0:
            # no stop message after a failure: the other ranks may be inside a collective (loading a model)
            # that the message would be matched against; the manager sees this call end and stops them all
            self.worker.serve_forever(self._stop)
            self.driver.stop()                      # the followers return from serve_follower
            return 0
        return tp.serve_follower(self.engine, on_load=self._load)

    def stop(self) -> None:
        self._stop.set()
