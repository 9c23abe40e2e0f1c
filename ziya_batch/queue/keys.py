"""Every Redis key ziya-batch uses, built in this one module.

Layout (prefix `zb` by default; `<job>` is JobSpec.identity(), 16 hex digits):

    zb:jobs                 zset   job id -> created_ms            every job this Redis knows (list_jobs)
    zb:ready                zset   job id -> band + claim seq      jobs that may have claimable shards
    zb:claim_seq            string counter                         round-robin order between jobs
    zb:leases               zset   "<job>|<index>" -> expiry_ms    every leased shard (the reaper's view)
    zb:workers              zset   worker id -> last_seen_ms
    zb:work                 pub/sub job id, published when a job may have new claimable shards (wakes idle workers)
    zb:worker:<id>          hash   host, info (JSON), started_ms
    zb:job:<job>            hash   state, counters, lease_ms, max_retries, ... (see broker.py)
    zb:job:<job>:spec       string the job spec as JSON
    zb:job:<job>:files      list   input files; a shard names its file by position here
    zb:job:<job>:shards     hash   shard index -> shard record (JSON: byte range, state, token, ...)
    zb:job:<job>:pending    zset   shard index -> not_before_ms (fresh shards: their index)
    zb:job:<job>:leased     zset   shard index -> expiry_ms
    zb:job:<job>:dead       set    shard indices that were dead-lettered
    zb:job:<job>:errors     list   latest failures (JSON), capped
    zb:job:<job>:progress   zset   "<ms>:<seq>:<prompts>:<tokens>" -> ms   output of the last minutes
    zb:job:<job>:credit     hash   worker id -> tokens/prompts reported mid-shard, not yet committed
    zb:job:<job>:finalizer  string the one caller finalizing the job (expires)

Redis holds shard descriptors only, never prompts: memory grows with shards, not lines. A job's records stay until
`ziya-batch forget` drops them (forget.lua: the keys above of the job, and its members of jobs, ready and leases).
"""
from __future__ import annotations

from dataclasses import dataclass

JOB_ID_SEP = "|"   # between job id and shard index in zb:leases members; job ids are hex, never contain it


@dataclass(frozen=True)
class Keys:
    prefix: str = "zb"

    def __post_init__(self):
        if not self.prefix or self.prefix.endswith(":") or ":" in self.prefix:
            raise ValueError(f"key prefix must be a plain word without ':' (got {self.prefix!r})")

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # -- global -------------------------------------------------------------------------------------------
    def jobs(self) -> str:
        return self._k("jobs")

    def ready(self) -> str:
        return self._k("ready")

    def claim_seq(self) -> str:
        return self._k("claim_seq")

    def leases(self) -> str:
        return self._k("leases")

    def workers(self) -> str:
        return self._k("workers")

    def work_channel(self) -> str:
        """A pub/sub channel, not a key: Broker.announce_work publishes on it, idle workers listen."""
        return self._k("work")

    def worker(self, worker_id: str) -> str:
        return self._k("worker", worker_id)

    # -- per job ------------------------------------------------------------------------------------------
    def job(self, job_id: str) -> str:
        return self._k("job", job_id)

    def spec(self, job_id: str) -> str:
        return self._k("job", job_id, "spec")

    def files(self, job_id: str) -> str:
        return self._k("job", job_id, "files")

    def shards(self, job_id: str) -> str:
        return self._k("job", job_id, "shards")

    def pending(self, job_id: str) -> str:
        return self._k("job", job_id, "pending")

    def leased(self, job_id: str) -> str:
        return self._k("job", job_id, "leased")

    def dead(self, job_id: str) -> str:
        return self._k("job", job_id, "dead")

    def errors(self, job_id: str) -> str:
        return self._k("job", job_id, "errors")

    def progress(self, job_id: str) -> str:
        return self._k("job", job_id, "progress")

    def credit(self, job_id: str) -> str:
        return self._k("job", job_id, "credit")

    def finalizer(self, job_id: str) -> str:
        return self._k("job", job_id, "finalizer")

    def job_keys(self, job_id: str) -> list[str]:
        """Every key of one job (for deleting it: Broker.delete_job and forget.lua delete these). Besides them a job is
        named in the indexes jobs, ready and leases (members "<job>|<index>"), and in workers' cannot_load notes."""
        return [self.job(job_id), self.spec(job_id), self.files(job_id), self.shards(job_id),
                self.pending(job_id), self.leased(job_id), self.dead(job_id), self.errors(job_id),
                self.progress(job_id), self.credit(job_id), self.finalizer(job_id)]

    # -- members ------------------------------------------------------------------------------------------
    @staticmethod
    def lease_member(job_id: str, index: int) -> str:
        return f"{job_id}{JOB_ID_SEP}{index}"

    @staticmethod
    def lease_prefix(job_id: str) -> str:
        """What every zb:leases member of the job starts with (forget.lua appends the shard index)."""
        return f"{job_id}{JOB_ID_SEP}"

    @staticmethod
    def parse_lease_member(member: str) -> tuple[str, int]:
        job_id, _, index = member.rpartition(JOB_ID_SEP)
        return job_id, int(index)
