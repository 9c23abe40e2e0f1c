"""The Redis job queue: jobs as shard descriptors, leases with fencing tokens, retries, dead letters.

    broker = Broker.from_url("redis://127.0.0.1:6379/0")
    broker.submit(spec, shards)            # idempotent: resubmitting resumes
    lease = broker.claim(worker_id)        # heartbeat(lease) while working, then commit(lease, stats)
"""
from .broker import Broker
from .keys import Keys
from .server import PrivateRedis, check_config
from .states import (JOB_TRANSITIONS, SHARD_TRANSITIONS, JobState, ShardState, TransitionError,
                     check_job_transition, check_shard_transition)
from .types import JobStatus, Lease, ShardStats, WorkerInfo

__all__ = ["Broker", "Keys", "PrivateRedis", "check_config", "JobState", "ShardState", "JOB_TRANSITIONS",
           "SHARD_TRANSITIONS", "TransitionError", "check_job_transition", "check_shard_transition",
           "JobStatus", "Lease", "ShardStats", "WorkerInfo"]
