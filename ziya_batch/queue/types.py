"""Plain data the queue hands to the runtime: leases, per-shard stats, job status."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..records import ShardRef
from .states import JobState


@dataclass(frozen=True)
class Lease:
    """The right to work on one shard until `lease_s` after the last heartbeat.

    `token` fences the commit: it grows by one on every claim of the shard, and only the holder of the
    current token can heartbeat, record lines or commit."""

    job_id: str
    shard: ShardRef
    token: int                       # fencing token, monotonic per shard
    attempt: int                     # 1-based claim number of this shard
    lease_s: float
    worker_id: str
    isolate: bool = False            # the shard failed or expired before: run lines one by one
    bad_lines: frozenset[int] = frozenset()   # line numbers known to crash: write them as retries_exhausted
    dead_letter: bool = False        # retries exhausted: write every line as a retries_exhausted error
    read_back: bool = True           # dead_letter: read the input back for the lines' ids (False once its storage
                                     # failed it while answering the job's other shards: ids are FILE:LINE)


@dataclass
class ShardStats:
    """What a committed shard produced. `parts`: record kind -> (lines, sha256 of the part)."""

    prompts_done: int = 0
    prompts_failed: int = 0
    samples: int = 0
    output_tokens: int = 0
    prefix_cache_query_tokens: int = 0   # prompt tokens looked up in the engine's prefix cache
    prefix_cache_hit_tokens: int = 0     # of those, found there (not computed)
    parts: dict[str, tuple[int, str]] = field(default_factory=dict)
    # the attempt whose staged parts these are (io.stage_shard): unique even if a Redis that lost writes
    # hands one token to two workers
    attempt: str = ""
    dropped_constant_reward_groups: int = 0   # prompts left out of experience/ (output.filters)

    def to_dict(self) -> dict:
        d = {"prompts_done": self.prompts_done, "prompts_failed": self.prompts_failed,
             "samples": self.samples, "output_tokens": self.output_tokens,
             "prefix_cache_query_tokens": self.prefix_cache_query_tokens,
             "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
             "parts": {k: [int(v[0]), str(v[1])] for k, v in self.parts.items()}}
        if self.attempt:
            d["attempt"] = self.attempt
        if self.dropped_constant_reward_groups:
            d["dropped_constant_reward_groups"] = self.dropped_constant_reward_groups
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ShardStats":
        parts = d.get("parts") or {}
        if isinstance(parts, list):          # Lua's cjson writes an empty table as []
            parts = {}
        return cls(prompts_done=int(d.get("prompts_done", 0)), prompts_failed=int(d.get("prompts_failed", 0)),
                   samples=int(d.get("samples", 0)), output_tokens=int(d.get("output_tokens", 0)),
                   prefix_cache_query_tokens=int(d.get("prefix_cache_query_tokens", 0)),
                   prefix_cache_hit_tokens=int(d.get("prefix_cache_hit_tokens", 0)),
                   parts={k: (int(v[0]), str(v[1])) for k, v in parts.items()}, attempt=str(d.get("attempt") or ""))


@dataclass(frozen=True)
class UncommitResult:
    """What Broker.uncommit did with a commit whose staged parts storage lost before they were promoted."""

    # 'retry': taken back, the shard runs again; 'failed': taken back, but its parts were lost more times than the
    # job's max_retries, so it does not run again and the job failed; 'too recent': refused, a promote of the
    # commit may still be under way (wait_s); 'refused': the shard is not committed under that token and attempt
    # (a newer view took over), or the job is completed
    outcome: str
    message: str = ""                # why it was refused
    wait_s: float = 0.0              # 'too recent': seconds until it may be taken back
    times_lost: int = 0              # taken back: how many times this shard's parts were lost, this one included

    @property
    def taken_back(self) -> bool:
        return self.outcome in ("retry", "failed")


@dataclass(frozen=True)
class ForgetResult:
    """What Broker.forget_job did (or, on a dry run, would do) with a job's records."""

    # 'forgotten' (its keys and index entries are gone), 'would forget' (a dry run's yes), 'unknown' (no such job),
    # 'not finished' (queued, running, finalizing or cancelling), 'leased' (a lease on one of its shards has not
    # expired), 'too recent' (it finished after the cut-off given)
    outcome: str
    state: Optional[JobState] = None
    shards: int = 0                  # forgotten: its shards' records that went with it
    keys_deleted: int = 0
    notes_removed: int = 0           # workers' cannot_load notes about it
    live_leases: int = 0             # 'leased': leases not yet expired
    leases_expire_in_s: float = 0.0  # 'leased': until the last of them expires, unless renewed
    finished_at: Optional[float] = None   # 'too recent': when it finished (unix seconds, Redis clock)

    @property
    def done(self) -> bool:
        return self.outcome in ("forgotten", "would forget")


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    host: str
    info: dict
    started_at: float                # unix seconds (Redis server clock)
    last_seen_s: float               # seconds since the last heartbeat
    cannot_load: dict = field(default_factory=dict)   # job id -> why this worker could not load its engine

    def to_dict(self) -> dict:
        return {"worker_id": self.worker_id, "host": self.host, "info": self.info,
                "started_at": self.started_at, "last_seen_s": round(self.last_seen_s, 3),
                "cannot_load": self.cannot_load}


@dataclass(frozen=True)
class FinalizeWait:
    """Why a finalizing job is not finished yet: its last finalize try found its storage not answering (jobs.finalize
    leaves the job finalizing and tries again later). Kept in the job hash's finalize_wait (end_finalize.lua) until a
    try gets past storage or the job leaves finalizing. Times are unix seconds, Redis server clock."""

    reason: str                      # "<output url>: <error type>: <message>", one line
    at: float                        # the last try that waited
    since: float                     # the first of the tries in a row that waited
    tries: int                       # tries in a row that waited, the last included
    next_try_at: float               # from then on another caller may try (a worker's sweep, a submit)
    next_try_in_s: float             # next_try_at as the status was read; 0 once it has passed

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "at": self.at, "since": self.since, "tries": self.tries,
                "next_try_at": self.next_try_at, "next_try_in_s": round(self.next_try_in_s, 1)}


@dataclass(frozen=True)
class JobStatus:
    """One job as `status` shows it. `to_dict()` is the `status --json` / HTTP API shape."""

    job_id: str
    name: str
    state: JobState
    priority: int
    output_path: str
    created_at: float                # unix seconds
    updated_at: float
    finished_at: Optional[float]
    shards_total: int
    shards: dict                     # shard state -> count (pending, leased, committed, dead)
    prompts_total: int
    prompts_done: int
    prompts_failed: int
    samples: int
    output_tokens: int
    tokens_per_s: float              # output tokens/s over the last minute
    prompts_per_s: float
    eta_s: Optional[float]           # remaining prompts / prompts_per_s; None while nothing is moving or none remains
    workers: tuple                   # ({"worker_id", "host", "shards": [index, ...]}, ...) holding leases now
    retries: int                     # failed or expired attempts and re-runs of lost parts, all shards together
    lease_expiries: int              # of those, leases that expired (worker died, hung or lost Redis)
    dead_shards: int                 # shards that were dead-lettered
    dead_lines: int                  # lines given up on alone (they crashed generation in isolate mode)
    error: Optional[str] = None      # why the job failed
    prefix_cache_query_tokens: int = 0   # prompt tokens of committed shards looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0     # of those, found cached
    sealed: bool = True              # its whole shard list is written (no shard is handed out before)
    finalize_wait: Optional[FinalizeWait] = None   # finalizing: why its last finalize try waits (storage away)
    detail: bool = False
    leases: tuple = ()               # detail: ({"shard", "worker_id", "attempt", "token", "expires_in_s"}, ...)
    shard_lists: dict = field(default_factory=dict)   # detail: state -> shard indices (capped)
    errors: tuple = ()               # detail: latest failures, newest first

    @property
    def prefix_cache_hit_rate(self) -> Optional[float]:
        """Share of looked-up prompt tokens found in the prefix cache; None before any were looked up."""
        q = self.prefix_cache_query_tokens
        return round(self.prefix_cache_hit_tokens / q, 4) if q else None

    @property
    def prompts_remaining(self) -> int:
        return max(0, self.prompts_total - self.prompts_done - self.prompts_failed)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "job_id": self.job_id, "name": self.name, "state": self.state.value, "priority": self.priority,
            "output_path": self.output_path, "created_at": self.created_at, "updated_at": self.updated_at,
            "finished_at": self.finished_at, "shards_total": self.shards_total, "shards": dict(self.shards),
            "prompts_total": self.prompts_total, "prompts_done": self.prompts_done,
            "prompts_failed": self.prompts_failed, "samples": self.samples, "output_tokens": self.output_tokens,
            "tokens_per_s": round(self.tokens_per_s, 3), "prompts_per_s": round(self.prompts_per_s, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "workers": [dict(w) for w in self.workers], "retries": self.retries,
            "lease_expiries": self.lease_expiries,
            "dead_shards": self.dead_shards, "dead_lines": self.dead_lines, "error": self.error,
            "prefix_cache_query_tokens": self.prefix_cache_query_tokens,
            "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate, "sealed": self.sealed,
            "finalize_wait": None if self.finalize_wait is None else self.finalize_wait.to_dict(),
        }
        if self.detail:
            d["leases"] = [dict(x) for x in self.leases]
            d["shard_lists"] = {k: list(v) for k, v in self.shard_lists.items()}
            d["errors"] = [dict(e) for e in self.errors]
        return d
