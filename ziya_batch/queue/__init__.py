"""The Redis job queue: jobs as shard descriptors, leases with fencing tokens, retries, dead letters.

    broker = Broker.from_url("redis://127.0.0.1:6379/0")
    broker.submit(spec, shards)            # idempotent: resubmitting resumes
    lease = broker.claim(worker_id)        # heartbeat(lease) while working, then commit(lease, stats)

Modules: keys (every key name), states (the transition tables), scripts + *.lua (every state change, one
atomic script each), broker (the API), status (what `status` shows), server (config checks and the
private redis-server of `run`), types (Lease, ShardStats, JobStatus, FinalizeWait), errors (what callers
catch when Redis is away, without importing redis).

Policies:
- Retries: a shard is tried once and retried `reliability.max_retries` times; the failure after that
  dead-letters it (max_retries=0: the first failure does). Each retry waits backoff_base_s * 2^(n-1),
  capped. An expired lease counts as a failure, like `fail()`, except that a server that (re)started less than
  a job's lease ago takes none of its leases back: no owner could renew while it was down.
- Dead letters: a dead-lettered shard is claimed once more with `dead_letter=True`; the worker writes
  every line as a `retries_exhausted` error and commits, so the job still ends with one part per shard.
- Poison lines: after a shard's first failure its claims have `isolate=True`: lines run one by one and
  the worker calls `line_started` before each. If the worker then dies (lease expires) with a line in
  flight, that line becomes a bad line at once — one crash of a line run alone is enough, since running
  it again would crash the next worker too. A failure that finds a new bad line does not count against
  the shard's limit (the shard made progress); the worker writes bad lines as `retries_exhausted` errors.
- Fairness: claims take the highest-priority job with a claimable shard; among equal priorities, the
  job claimed from least recently (round robin per claim).
- Lost staged parts: a commit whose staged parts storage lost before they were promoted is taken back by the
  job's finalizer (uncommit), no sooner than PROMOTE_GRACE_S after the commit, and the shard runs again; each
  re-run counts in the job's retries, and parts lost more than `max_retries` times fail the job instead.
- Losing Redis: submit() with `committed` (from storage) records those shards committed; a job is only
  ever `completed` by a finalizer (mark_completed from finalizing), never by a rebuild of its shards; a job Redis
  does not know whose finalizer wrote its completed manifest is recorded completed from it (restore_completed).
- Forgetting: forget_job drops a finished job's keys and index entries in one script (forget.lua); a job with a
  lease not yet expired, or not finished, is refused. Its output stays.
"""
from .broker import Broker
from .errors import BROKER_ERRORS, BROKER_UNREACHABLE
from .keys import Keys
from .server import PrivateRedis, check_config
from .states import (JOB_TRANSITIONS, SHARD_TRANSITIONS, JobState, ShardState, TransitionError,
                     check_job_transition, check_shard_transition)
from .types import FinalizeWait, ForgetResult, JobStatus, Lease, ShardStats, UncommitResult, WorkerInfo

__all__ = ["Broker", "BROKER_ERRORS", "BROKER_UNREACHABLE", "Keys", "PrivateRedis", "check_config", "JobState",
           "ShardState", "JOB_TRANSITIONS", "SHARD_TRANSITIONS", "TransitionError", "check_job_transition",
           "check_shard_transition", "FinalizeWait", "ForgetResult", "JobStatus", "Lease", "ShardStats",
           "UncommitResult", "WorkerInfo"]
