"""The job queue on Redis: submit jobs as shard descriptors, lease shards to workers, commit them once.

All state changes are Lua scripts (scripts.py) checked against the transition tables (states.py); all
key names come from keys.py. Times that decide anything (lease expiry, backoff) are Redis server time.

Job hash fields: state, sealed ('1' once every shard is written), name, priority, lease_ms, max_retries,
output_path, created_ms, updated_ms, finished_ms, error, total_shards, total_prompts, n_pending, n_leased,
n_committed, n_dead (shards per state), prompts_done, prompts_failed, samples, output_tokens,
prefix_cache_query_tokens, prefix_cache_hit_tokens (sums of committed stats: uncommit takes a shard's off
again), retries, dead_lines, progress_seq, read_commits and read_commit_ms (how many commits of shards that read
their input, and the time of the last: commit.lua), storage_fail_ms, storage_fail_shard and storage_fail_other_ms
(the job's last storage give-back, its shard, and the last of another shard: requeue.lua); finalize_wait (JSON,
only while a finalizing job's last finalize try waited for storage: end_finalize.lua); restored ('1': recorded
completed from its manifest, with no shard records: restore.lua).

Shard records (JSON in the job's shards hash): file (position in the files list), start, end, first_line,
num_lines, identity (a local input's, ShardRef.identity; absent for object storage and in shards queued before
2026-12-07), state, token, attempts, failures, isolate, lease_isolate, in_flight, bad_lines, dead, owner,
stats, committed_token, committed_ms (Redis time of the commit), lost (times its staged parts were lost before
promotion and it ran again), storage_commits and storage_since (the job's read_commits at, and the Redis time of,
the first of its storage give-backs since it last committed; absent: none; storage_since moves to a give-back that
came after the shard sat untried for storage_series_gap_s), storage_last (the time of the last), claimed_ms (the
Redis time of its last claim), no_read_back (dead-lettered, and a storage give-back of it counted: its error lines
are written without reading its input back). About 200 bytes a shard: a 10-million-line job of 512-line shards is
~4 MB.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Callable, Iterable, Mapping, Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import JobNotFound
from ..spec import show_text
from ..records import ShardRef
from ..spec import JobSpec, stored_spec
from .keys import Keys
from .scripts import Scripts
from .server import check_config
from .states import JobState, ShardState
from .status import build_status, build_statuses
from .types import ForgetResult, JobStatus, Lease, ShardStats, UncommitResult, WorkerInfo

log = logging.getLogger(__name__)

SUBMIT_BATCH = 1000          # shards per add_shards call while the input streams
FINALIZE_TTL_S = 600.0       # a finalizer that has not finished in this long is presumed dead
# a commit is taken back (uncommit) no sooner than this after it: longer than any promote takes (a few moves and
# one small put), so a promoter of it has finished or failed by then; shorter than FINALIZE_TTL_S, so a finalizer
# still at work holds its election past it
PROMOTE_GRACE_S = 300.0
# a shard's storage give-backs are free for this long after the first of them even while the job commits others:
# where only the input's store is down, shards past their reads still commit, and an outage of a few minutes must not
# dead-letter the shards that could not be read; after it, a shard that keeps failing while others commit is taken
# for failing on its own (give_back)
STORAGE_GRACE_S = 600.0
# and a dead-lettered shard's read-back of its input (for its lines' ids) is given up, its lines written numbered
# FILE:LINE, only this long after the first: an input outage of up to an hour keeps every error line's own id
STORAGE_READ_BACK_GRACE_S = 3600.0
# a shard claimed this long after its last storage give-back sat untried meanwhile (behind the job's fresh shards, or
# its tries lost to lease expiries): its next storage give-back starts both graces again. Longer than a store that
# keeps failing a shard makes it wait between tries (backoff_max_s, the workers' claim pause, a read's time-outs)
STORAGE_SERIES_GAP_S = 1800.0
WORKER_FORGET_S = 86400.0    # registrations silent this long are deleted (worker ids are per process)


def _json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def shard_record(ref: ShardRef, file_pos: int) -> dict:
    """What the job's shards hash keeps of a shard when it is queued (its file as a position in the job's files
    list); identity only where there is one, so a shard without it is stored as before."""
    rec = {"file": file_pos, "start": ref.start, "end": ref.end, "first_line": ref.first_line,
           "num_lines": ref.num_lines}
    if ref.identity is not None:
        rec["identity"] = ref.identity
    return rec


def shard_ref(job_id: str, index, rec: dict, files: list[str]) -> ShardRef:
    """The ShardRef of a stored shard record (shard_record's fields; queue state fields are ignored). A record
    without identity (queued by a release before 2026-12-07) is read as it was then: not checked."""
    return ShardRef(job_id, int(index), files[rec["file"]], rec["start"], rec["end"], rec["first_line"],
                    rec["num_lines"], rec.get("identity"))


class Broker:
    def __init__(self, client: redis.Redis, prefix: str = "zb", backoff_base_s: float = 2.0,
                 backoff_max_s: float = 300.0, errors_kept: int = 50, worker_ttl_s: float = 60.0,
                 claim_scan: int = 64, promote_grace_s: float = PROMOTE_GRACE_S,
                 storage_grace_s: float = STORAGE_GRACE_S,
                 storage_read_back_grace_s: float = STORAGE_READ_BACK_GRACE_S,
                 storage_series_gap_s: float = STORAGE_SERIES_GAP_S, restart_grace: bool = True):
        """`backoff_base_s`: delay before the first retry of a failed shard, doubled per failure up to
        `backoff_max_s`. `errors_kept`: failures remembered per job for `status JOB_ID`. `worker_ttl_s`:
        a worker silent this long is no longer listed. `claim_scan`: jobs a claim looks through.
        `promote_grace_s`: how long after its commit a commit may be taken back (uncommit). `storage_grace_s`: how
        long a shard's storage give-backs stay free while the job commits other shards (give_back), and
        `storage_read_back_grace_s` how long before a dead-lettered one's lines are written without their ids;
        `storage_series_gap_s`: a shard claimed this long after its last storage give-back starts both again.
        `restart_grace`: a server that started less than a job's lease ago takes none of its expired leases back yet
        (reap); off, they are taken at once (tests that fake an expiry on a server they have just started)."""
        if not client.connection_pool.connection_kwargs.get("decode_responses"):
            pool = client.connection_pool
            client = redis.Redis(connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **{**pool.connection_kwargs, "decode_responses": True}))
        self.client = client
        self.keys = Keys(prefix)
        self.scripts = Scripts(client)
        self.backoff_base_ms = int(backoff_base_s * 1000)
        self.backoff_max_ms = int(backoff_max_s * 1000)
        self.errors_kept = errors_kept
        self.worker_ttl_s = worker_ttl_s
        self.claim_scan = claim_scan
        self.promote_grace_s = promote_grace_s
        self.storage_grace_ms = int(storage_grace_s * 1000)
        self.storage_read_back_grace_ms = int(storage_read_back_grace_s * 1000)
        self.storage_series_gap_ms = int(storage_series_gap_s * 1000)
        self.restart_grace = restart_grace
        self._files: dict[tuple[str, str], list[str]] = {}   # (job_id, created_ms) -> input files
        self._work: Optional[redis.client.PubSub] = None     # watch_work's subscription

    @classmethod
    def from_url(cls, url: str, prefix: str = "zb", **kwargs) -> "Broker":
        # A READONLY answer (a demoted primary, mid-failover) closes the connection it came on, so the caller's
        # next try connects again and reaches the new primary behind the same name; redis-py retries nothing
        # itself (retries=0): callers wait it out (BROKER_UNREACHABLE), and no script runs twice on a retry.
        readonly = (redis.ReadOnlyError,)
        return cls(redis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                        retry=Retry(NoBackoff(), 0, supported_errors=readonly),
                                        retry_on_error=list(readonly)), prefix, **kwargs)

    def check_server(self) -> list[str]:
        """Unsafe settings of this Redis, one sentence each (empty when it is safe to trust)."""
        return check_config(self.client)

    def server_time_s(self) -> float:
        sec, usec = self.client.time()
        return sec + usec / 1e6

    # -- jobs -------------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, shards: Iterable[ShardRef],
               committed: Mapping[int, ShardStats] = {},  # noqa: B006 - read only
               job_id: Optional[str] = None) -> JobStatus:
        """Queue a job, or find it again (resume). Idempotent: the job id is the spec's identity (or `job_id`:
        the id an earlier release gave it, jobs/submit.job_id_for).

        A job that exists is returned as it is, except that a failed or cancelled one is reopened, any shard
        `committed` names (storage holds its part) is recorded committed, and an unfinished one takes this
        spec's values of the fields the identity leaves out (spec.RUN_FIELDS: how the job runs). Shards stream
        into Redis in batches; a submit that died midway is completed by the next one, and no shard is
        claimable before the whole list is written."""
        k, job_id = self.keys, job_id or spec.identity()
        state, sealed = self.scripts.create_job(
            keys=[k.job(job_id), k.spec(job_id), k.jobs(), k.ready(), k.claim_seq()],
            args=[job_id, spec.to_json(), spec.name, spec.priority, int(spec.reliability.lease_s * 1000),
                  spec.reliability.max_retries, spec.output.path])
        if state in (JobState.FAILED.value, JobState.CANCELLED.value):
            self._reopen(job_id)
        if sealed == "1":
            items = list(committed.items())
            for at in range(0, len(items), SUBMIT_BATCH):
                self._add_shards(job_id, [x for i, st in items[at:at + SUBMIT_BATCH] for x in (i, "", _json(st.to_dict()))])
            return self.status(job_id)
        files = {f: i for i, f in enumerate(self.client.lrange(k.files(job_id), 0, -1))}
        refs: list[ShardRef] = []
        for ref in shards:
            if ref.job_id != job_id:
                raise ValueError(f"shard {ref.index} belongs to job {ref.job_id}, not {job_id}")
            refs.append(ref)
            if len(refs) >= SUBMIT_BATCH:
                self._add_refs(job_id, refs, files, committed)
                refs = []
        if refs:
            self._add_refs(job_id, refs, files, committed)
        self.scripts.seal(keys=[k.job(job_id), k.ready(), k.claim_seq()], args=[job_id])
        self.announce_work(job_id)
        return self.status(job_id)

    def _add_refs(self, job_id: str, refs: list[ShardRef], files: dict[str, int],
                  committed: Mapping[int, ShardStats]) -> None:
        """One batch of submit's shards: their files not yet in the job's files list appended in one pipeline (an
        input of many small files is not a round trip a file), then the shards in one add_shards call. `files`: file
        -> its position in the list, updated here."""
        new = [f for f in dict.fromkeys(ref.file for ref in refs) if f not in files]
        if new:
            with self.client.pipeline(transaction=False) as p:
                for f in new:
                    p.rpush(self.keys.files(job_id), f)
                # RPUSH's reply is the position, so two submitters racing on one job agree on it
                files.update((f, n - 1) for f, n in zip(new, p.execute()))
        batch: list = []
        for ref in refs:
            st = committed.get(ref.index)
            rec = shard_record(ref, files[ref.file])
            batch += [ref.index, _json(rec), _json(st.to_dict()) if st is not None else ""]
        self._add_shards(job_id, batch)

    def _add_shards(self, job_id: str, triples: list) -> int:
        k = self.keys
        added = self.scripts.add_shards(keys=[k.job(job_id), k.shards(job_id), k.pending(job_id), k.ready(),
                                              k.files(job_id)], args=[job_id, *triples])
        if added < 0:
            raise JobNotFound(f"job {job_id} was forgotten while this submit wrote its shards (cancelled and "
                              "forgotten meanwhile): nothing of it is left in Redis; submit it again to run it")
        return added

    def _reopen(self, job_id: str) -> str:
        k = self.keys
        state = self.scripts.reopen(keys=[k.job(job_id), k.shards(job_id), k.pending(job_id), k.dead(job_id),
                                          k.ready(), k.claim_seq(), k.finalizer(job_id)], args=[job_id])
        self.announce_work(job_id)
        return state

    # -- waking idle workers ----------------------------------------------------------------------------
    def announce_work(self, job_id: str) -> None:
        """Tell idle workers (wait_for_work) that `job_id` may have claimable shards: after a submit, a reopen
        and a requeue. A hint only: a worker also looks on its own after each idle interval, so a message that
        reaches nobody (no worker listening, one reconnecting) costs at most that interval. Never raises: what it
        announces is already written."""
        try:
            self.client.publish(self.keys.work_channel(), job_id)
        except redis.RedisError as err:
            log.debug("could not announce work of %s: %s", job_id, err)

    def watch_work(self) -> None:
        """Subscribe to announce_work's channel, before the first claim: what is announced between a claim that
        found nothing and the wait after it is then kept for that wait, not missed."""
        if self._work is None:
            work = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                work.subscribe(self.keys.work_channel())
            except BaseException:
                work.close()                  # kept unsubscribed, it would wait out every timeout from now on
                raise
            self._work = work

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` for an announcement; True if one came (those that came while this worker was
        busy are read at once, all of them: one claim round answers them)."""
        self.watch_work()
        end = time.monotonic() + timeout_s
        # get_message also returns None, early, for the subscription's own confirmation: wait out the rest
        while self._work.get_message(timeout=max(0.0, end - time.monotonic())) is None:
            if time.monotonic() >= end:
                return False
        for _ in range(10_000):
            if self._work.get_message(timeout=0) is None:
                break
        return True

    def unwatch_work(self) -> None:
        if self._work is not None:
            work, self._work = self._work, None
            try:
                work.close()
            except redis.RedisError:          # its connection is gone already
                pass

    def get_spec(self, job_id: str) -> JobSpec:
        raw = self.client.get(self.keys.spec(job_id))
        if raw is None:
            raise JobNotFound(f"no job {show_text(job_id)} in this Redis (list jobs with `ziya-batch status`)")
        return stored_spec(json.loads(raw), f"spec of job {job_id}")

    def find_job(self, job_id: str) -> Optional[JobStatus]:
        """The job's status, or None where this Redis has no such job: the id must be one the jobs index holds,
        not merely name a key (an id ending in ':spec' names the spec of the job before it)."""
        with self.client.pipeline(transaction=False) as p:       # one round trip
            p.zscore(self.keys.jobs(), job_id)
            p.exists(self.keys.job(job_id))
            indexed, exists = p.execute()
        if indexed is None or not exists:
            return None
        return self.status(job_id)

    def list_jobs(self) -> list[JobStatus]:
        """Every job, oldest first. A round trip per 250 jobs (status.build_statuses), not three a job: a /metrics
        scrape, a listing and a new job's submit each read every job."""
        return build_statuses(self.client, self.keys, self.client.zrange(self.keys.jobs(), 0, -1), self.scripts)

    def delete_job(self, job_id: str) -> None:
        """Forget a job (its output stays). Its leases are dropped: owners' commits then fail."""
        k = self.keys
        members = [k.lease_member(job_id, int(i)) for i in self.client.zrange(k.leased(job_id), 0, -1)]
        with self.client.pipeline() as p:
            if members:
                p.zrem(k.leases(), *members)
            p.zrem(k.ready(), job_id)
            p.zrem(k.jobs(), job_id)
            p.delete(*k.job_keys(job_id))
            p.execute()

    def forget_job(self, job_id: str, finished_before_ms: Optional[int] = None,
                   dry_run: bool = False) -> ForgetResult:
        """Drop a finished job's records in one step (forget.lua): every key of it (keys.job_keys), its members of the
        jobs, ready and leases indexes, and workers' cannot_load notes about it; its output stays. Refused, changing
        nothing, for a job that is not finished or holds a lease that has not expired, and, given
        `finished_before_ms` (Redis ms), for one that finished at or after it. `dry_run`: the verdict only."""
        k = self.keys
        job_keys = k.job_keys(job_id)
        workers = self.client.zrange(k.workers(), 0, -1)
        got = self.scripts.forget(
            keys=[k.jobs(), k.ready(), k.leases(), k.job(job_id), k.leased(job_id), *job_keys,
                  *(k.worker(w) for w in workers)],
            args=[job_id, k.lease_prefix(job_id), "" if finished_before_ms is None else int(finished_before_ms),
                  "1" if dry_run else "0", len(job_keys), *(s.value for s in JobState if s.is_finished())])
        outcome = got[0]
        state = JobState(got[1]) if len(got) > 1 else None
        if outcome in ("forgotten", "would forget"):
            return ForgetResult(outcome, state, shards=int(got[2]), keys_deleted=int(got[3]),
                                notes_removed=int(got[4]))
        if outcome == "leased":
            return ForgetResult(outcome, state, live_leases=int(got[2]), leases_expire_in_s=int(got[3]) / 1000)
        if outcome == "too recent":
            return ForgetResult(outcome, state, finished_at=int(got[2]) / 1000)
        return ForgetResult(outcome, state)

    def restore_completed(self, spec: JobSpec, job_id: str, shards: int, totals: ShardStats,
                          finished_ms: Optional[int] = None) -> Optional[JobStatus]:
        """Record a job this Redis does not know as completed, from what the completed manifest its finalizer wrote
        says (restore.lua): `shards` and the sums `totals`, finished at `finished_ms` (Redis ms; None: now). For a job
        forgotten, or lost with Redis's data, whose spec is submitted again (jobs.submit_job): nothing runs again and
        no input is read. No shard records are written: a completed job is never claimed, reopened or taken back (its
        output deleted, submit_job deletes it and it runs anew). None, writing nothing, where the job exists in
        another state (a submit of it got there first)."""
        k = self.keys
        state = self.scripts.restore(
            keys=[k.job(job_id), k.spec(job_id), k.jobs()],
            args=[job_id, spec.to_json(), spec.name, spec.priority, int(spec.reliability.lease_s * 1000),
                  spec.reliability.max_retries, spec.output.path, int(shards), totals.prompts_done,
                  totals.prompts_failed, totals.samples, totals.output_tokens, totals.prefix_cache_query_tokens,
                  totals.prefix_cache_hit_tokens, "" if finished_ms is None else int(finished_ms)])
        return self.status(job_id) if state == JobState.COMPLETED.value else None

    # -- leases -----------------------------------------------------------------------------------------
    def claim(self, worker_id: str, accept: Optional[Callable[[str], bool]] = None,
              prefer: Optional[Callable[[str], bool]] = None) -> Optional[Lease]:
        """The next shard for this worker: highest priority job first, equal priorities in turn. `accept(job_id)`
        False skips a job this worker cannot serve (its shards stay pending, their attempts untouched); jobs it
        skips do not count against claim_scan, or enough of them ahead would starve it. Among jobs of equal
        priority, those `prefer(job_id)` says yes to come first (a worker keeps the model it has loaded rather
        than reloading one on every shard)."""
        k = self.keys
        order, start, seen = [], 0, set()
        # skipped jobs do not count, but the scan stops somewhere: 16 pages
        while len(order) < self.claim_scan and start < 16 * self.claim_scan:
            page = self.client.zrange(k.ready(), start, start + self.claim_scan - 1, withscores=True)
            for job_id, score in page:
                if job_id in seen:      # other workers' claims move jobs back between pages
                    continue
                seen.add(job_id)
                if accept is None or accept(job_id):
                    # the score is (1000 - priority) * 1e12 + a turn counter (common.lua ready_add)
                    order.append((int(score // 1e12), prefer is not None and not prefer(job_id), len(order), job_id))
                    if len(order) >= self.claim_scan:
                        break
            if len(page) < self.claim_scan:
                break
            start += self.claim_scan
        for *_, job_id in sorted(order):
            res = self.scripts.claim(
                keys=[k.job(job_id), k.shards(job_id), k.pending(job_id), k.leased(job_id), k.leases(),
                      k.ready(), k.claim_seq()],
                args=[job_id, worker_id])
            if res:
                return self._lease(job_id, worker_id, *res)
        return None

    def _lease(self, job_id: str, worker_id: str, raw: str, index: str, lease_ms: str, created_ms: str) -> Lease:
        sh = json.loads(raw)
        files = self._files.get((job_id, created_ms))
        if files is None or sh["file"] >= len(files):
            files = self.client.lrange(self.keys.files(job_id), 0, -1)
            self._files[(job_id, created_ms)] = files
        ref = shard_ref(job_id, index, sh, files)
        bad = sh.get("bad_lines") or []
        return Lease(job_id=job_id, shard=ref, token=int(sh["token"]), attempt=int(sh["attempts"]),
                     lease_s=int(lease_ms) / 1000.0, worker_id=worker_id, isolate=bool(sh.get("isolate")),
                     bad_lines=frozenset(int(b) for b in bad) if isinstance(bad, list) else frozenset(),
                     dead_letter=bool(sh.get("dead")), read_back=not sh.get("no_read_back"))

    def heartbeat(self, lease: Lease) -> bool:
        """Renew the lease. False if it was lost (expired and re-claimed, or its job abandoned it)."""
        k, j = self.keys, lease.job_id
        return bool(self.scripts.heartbeat(
            keys=[k.job(j), k.shards(j), k.leased(j), k.leases()],
            args=[lease.shard.index, lease.token, k.lease_member(j, lease.shard.index), int(lease.lease_s * 1000)]))

    def line_started(self, lease: Lease, line_no: int) -> bool:
        """Isolate mode: `line_no` is being generated now. If the worker dies before the next call, that
        line becomes a bad line on the next claim (one crash of a line run alone is enough: rerunning it
        would crash the next worker too). False if the lease was lost."""
        return bool(self.scripts.line(keys=[self.keys.shards(lease.job_id)],
                                      args=[lease.shard.index, lease.token, line_no]))

    def line_finished(self, lease: Lease) -> bool:
        """Isolate mode: no line in flight any more (call after the last line, before writing parts)."""
        return bool(self.scripts.line(keys=[self.keys.shards(lease.job_id)],
                                      args=[lease.shard.index, lease.token, ""]))

    def commit(self, lease: Lease, stats: ShardStats) -> bool:
        """Record the shard committed with `stats`, only if `lease` is still the shard's current lease. True again
        for the same commit sent again (its token and `stats.attempt`), so a caller that got no reply (Redis killed or
        the connection cut after the commit ran) may send it again and learn that it stands."""
        k, j = self.keys, lease.job_id
        ok, _ = self.scripts.commit(
            keys=[k.job(j), k.shards(j), k.leased(j), k.leases(), k.progress(j), k.credit(j), k.ready()],
            args=[j, lease.shard.index, lease.token, _json(stats.to_dict()), lease.worker_id,
                  k.lease_member(j, lease.shard.index)])
        return ok == 1

    def uncommit(self, job_id: str, index: int, token: int, reason: str, attempt: str = "", caller: str = "",
                 staging: str = "") -> UncommitResult:
        """Take back a commit because storage lost its staged parts before they were promoted: the shard goes back
        to pending (dead, if it was dead-lettered) and runs again. Call only as the job's finalizer, once storage
        positively said the parts are gone, holds no commit marker for the shard, and what was left of the
        attempt's staging is discarded (jobs.finalize does all three).

        Acts only while the shard is committed under `token` (and `attempt`, where given), so a caller with an
        old view never undoes a newer commit, and only `promote_grace_s` after the commit: a promoter of it still
        at work would otherwise write over the re-run. The shard's stats come off the job's; each re-run counts in
        the job's retries; a finalizing job is running again; a failed, cancelling or cancelled job keeps its
        state (a resubmit runs the shard); a completed job is refused. Parts lost more times than the job's
        max_retries: the shard is taken back but the job fails (unless cancelled), its error naming `staging`
        (the URL of the output's staging folder), so a resubmit runs it once the cause is fixed. `reason` goes to
        the job's errors (status shows it)."""
        k, j = self.keys, job_id
        got = self.scripts.uncommit(
            keys=[k.job(j), k.shards(j), k.pending(j), k.ready(), k.claim_seq(), k.finalizer(j), k.errors(j)],
            args=[j, index, token, attempt, reason, self.errors_kept, caller, int(self.promote_grace_s * 1000),
                  staging or "its output's _staging/"])
        if got[0] != 1:
            log.info("shard %s/%d not taken back: %s", job_id, index, got[1])
            if got[1] == "too recent":
                return UncommitResult("too recent", got[1], wait_s=int(got[2]) / 1000)
            return UncommitResult("refused", got[1])
        outcome, state, times = got[1], got[2], int(got[3])
        if JobState(state).is_claimable():
            self.announce_work(job_id)
        return UncommitResult(outcome, times_lost=times)

    def fail(self, lease: Lease, message: str, bad_line: Optional[int] = None) -> str:
        """Give the shard back after a failure. Returns 'retry' (pending again after an exponential
        backoff), 'dead' (retries exhausted: the next claim has dead_letter=True) or 'lost' (the lease
        was no longer this worker's). `bad_line`: a line known to crash generation, dead-lettered alone;
        that attempt then does not count against the shard's retry limit."""
        out = self._requeue(lease.job_id, lease.shard.index, str(lease.token), message,
                            "" if bad_line is None else bad_line, lease.worker_id)
        return out or "lost"

    def give_back(self, lease: Lease, message: str, storage: bool = False) -> str:
        """Return the shard untried: this worker cannot run it (its engine would not load, or the job's spec
        changed to one it does not serve). Not a failure: no retry is counted and the shard is not isolated; it
        is claimable again after backoff_base_s. `message` goes to the job's errors (status shows it). Returns
        'retry', or 'lost' if the lease was no longer this worker's.

        `storage`: the shard's store did not answer. Such give-backs are bounded where the store answers the job's
        other shards: once the job has committed any shard that read its input (not a dead-lettered one written
        without reading it back) since this shard's first storage give-back (the first since the shard last
        committed) and storage_grace_s has passed since that one, each later one counts as a failed try, as `fail`
        does (isolated, retried, then 'dead'). An outage of the store, with no commit of the
        job meanwhile, counts none however long it lasts; nor does one shorter than the grace while shards already
        past their reads commit (an input store down, the output's answering). A dead-lettered shard's read-back of
        its input for its lines' ids counts (its lines then written numbered FILE:LINE) only once
        storage_read_back_grace_s has passed since the first. A shard claimed more than storage_series_gap_s after its
        last storage give-back (it sat untried meanwhile) starts both graces again at its next one. And none counts
        while another shard of the job has failed on storage since its last commit of a shard that read its input:
        the store is failing others too (an outage, of any length)."""
        out = self._requeue(lease.job_id, lease.shard.index, str(lease.token), message, "", lease.worker_id,
                            "storage" if storage else "1")
        return out or "lost"

    def _requeue(self, job_id: str, index: int, token: str, message: str, bad_line, worker_id: str,
                 given_back: str = "0", started_ms: int = 0):
        """requeue.lua; `given_back`: '0' failed, '1' given back, 'storage' given back as its store did not answer;
        `started_ms` (an expired lease's): when the server started, on its clock (0: unknown)."""
        k, j = self.keys, job_id
        out = self.scripts.requeue(
            keys=[k.job(j), k.shards(j), k.pending(j), k.leased(j), k.leases(), k.dead(j), k.errors(j),
                  k.ready(), k.claim_seq()],
            args=[j, index, token, message, bad_line, self.backoff_base_ms, self.backoff_max_ms,
                  self.errors_kept, k.lease_member(j, index), worker_id, given_back, self.storage_grace_ms,
                  self.storage_read_back_grace_ms, self.storage_series_gap_ms, started_ms])
        if out:
            self.announce_work(job_id)      # pending again (after its backoff) or dead-lettered: claimable
        return out

    def reap(self, limit: int = 1000) -> list[tuple[str, int, str]]:
        """Requeue shards whose lease expired (a failed attempt each). Returns (job_id, index, outcome)
        for each shard taken back. Cheap when nothing expired: one range query on the leases zset. A server
        that started less than a job's lease ago (restarted) takes none of its leases back yet: no owner could
        renew while it was down (requeue.lua)."""
        sec, usec = self.client.time()
        now_ms = sec * 1000 + usec // 1000
        done = []
        expired = self.client.zrangebyscore(self.keys.leases(), "-inf", now_ms, start=0, num=limit)
        started_ms = self._started_ms(now_ms) if expired and self.restart_grace else 0
        for member in expired:
            job_id, index = self.keys.parse_lease_member(member)
            if not self.client.exists(self.keys.job(job_id)):
                self.client.zrem(self.keys.leases(), member)      # job deleted under its lease
                continue
            out = self._requeue(job_id, index, "", "lease expired (worker died, hung or lost Redis)", "", "",
                                started_ms=started_ms)
            if out:
                done.append((job_id, index, out))
        return done

    def _started_ms(self, now_ms: int) -> int:
        """When this Redis server started, on its own clock in ms (its uptime back from `now_ms`); 0 where it does not
        say (INFO refused, as some managed services do): expired leases are then taken back at once, as before."""
        try:
            uptime_s = int(self.client.info("server")["uptime_in_seconds"])
        except (redis.ResponseError, KeyError, ValueError, TypeError):
            return 0
        return max(1, now_ms - uptime_s * 1000)      # whole seconds: up to 1 s late, a lease's grace that much longer

    def unfinished_finalizing(self) -> list[str]:
        """Jobs in state finalizing that no finalizer holds: none began (the worker that committed the last shard
        died before it finalized), or the one that began died and its election expired (FINALIZE_TTL_S). Every
        shard of them is committed; only their manifest is missing. One pipelined round trip over the jobs."""
        ids = self.client.zrange(self.keys.jobs(), 0, -1)
        if not ids:
            return []
        with self.client.pipeline(transaction=False) as p:
            for job_id in ids:
                p.hget(self.keys.job(job_id), "state")
                p.exists(self.keys.finalizer(job_id))
            got = p.execute()
        return [j for j, state, held in zip(ids, got[::2], got[1::2]) if state == "finalizing" and not held]

    def lease_expiries(self) -> int:
        """Leases that expired and were taken back by a reaper, over every job (the /metrics counter)."""
        ids = self.client.zrange(self.keys.jobs(), 0, -1)
        if not ids:
            return 0
        with self.client.pipeline(transaction=False) as p:      # one round trip over the jobs
            for job_id in ids:
                p.hget(self.keys.job(job_id), "lease_expiries")
            return sum(int(n or 0) for n in p.execute())

    # -- job life -----------------------------------------------------------------------------------------
    def begin_finalize(self, job_id: str, owner: Optional[str] = None, ttl_s: float = FINALIZE_TTL_S) -> bool:
        """True for exactly one caller while the job is finalizing (again after `ttl_s` if it died)."""
        k = self.keys
        return self.scripts.finalize(keys=[k.job(job_id), k.finalizer(job_id)],
                                     args=[owner or uuid.uuid4().hex, int(ttl_s * 1000)]) == 1

    def end_finalize(self, job_id: str, owner: str, after_s: float = 0.0, reason: str = "") -> bool:
        """Give up the election `owner` won with begin_finalize without finishing the job: another caller (the
        workers' sweep) may finalize it `after_s` from now. `reason`: why this try waits (its storage did not
        answer), kept in the job's finalize_wait for status, with the count of such tries in a row; none clears
        it. True if `owner` held it."""
        k = self.keys
        return self.scripts.end_finalize(keys=[k.finalizer(job_id), k.job(job_id)],
                                         args=[owner, max(0, int(after_s * 1000)), reason]) == 1

    def _set_state(self, job_id: str, state: JobState, message: str = "") -> None:
        k = self.keys
        old = self.scripts.set_state(keys=[k.job(job_id), k.ready(), k.finalizer(job_id)],
                                     args=[job_id, state.value, message])
        if old is None:
            raise JobNotFound(f"no job {show_text(job_id)} in this Redis")

    def mark_completed(self, job_id: str) -> None:
        self._set_state(job_id, JobState.COMPLETED)

    def mark_failed(self, job_id: str, message: str) -> None:
        self._set_state(job_id, JobState.FAILED, message or "failed")

    def cancel(self, job_id: str, abandon_running: bool = False) -> JobStatus:
        """No new claims from the job from now on. Running shards may finish (the job is cancelling until
        the last one commits, fails or expires), or with `abandon_running` are taken back at once."""
        k = self.keys
        res = self.scripts.cancel(
            keys=[k.job(job_id), k.shards(job_id), k.pending(job_id), k.leased(job_id), k.leases(), k.ready()],
            args=[job_id, "1" if abandon_running else "0"])
        if res is None:
            raise JobNotFound(f"no job {show_text(job_id)} in this Redis (list jobs with `ziya-batch status`)")
        return self.status(job_id)

    def commits(self, job_id: str) -> dict[int, tuple[int, ShardStats]]:
        """Committed shards: index -> (the token whose output won, its stats)."""
        out = {}
        for idx, raw in self.client.hscan_iter(self.keys.shards(job_id), count=1000):
            sh = json.loads(raw)
            if sh.get("state") == ShardState.COMMITTED.value:
                out[int(idx)] = (int(sh.get("committed_token", 0)), ShardStats.from_dict(sh.get("stats") or {}))
        return dict(sorted(out.items()))

    def shard_counts(self, job_id: str) -> dict[str, int]:
        vals = self.client.hmget(self.keys.job(job_id), [f"n_{s.value}" for s in ShardState])
        return {s.value: int(v or 0) for s, v in zip(ShardState, vals)}

    def add_progress(self, job_id: str, worker_id: str, prompts: int, samples: int, output_tokens: int) -> None:
        """Mid-shard progress, for a live tokens/s; the shard's commit later counts only the rest."""
        k = self.keys
        self.scripts.progress(keys=[k.job(job_id), k.progress(job_id), k.credit(job_id)],
                              args=[worker_id, int(prompts), int(output_tokens)])

    # -- workers ------------------------------------------------------------------------------------------
    def register_worker(self, worker_id: str, host: str, info: Optional[dict] = None) -> None:
        k = self.keys
        self.scripts.worker(keys=[k.workers(), k.worker(worker_id)], args=[worker_id, host, _json(info or {})])

    def worker_heartbeat(self, worker_id: str) -> None:
        k = self.keys
        self.scripts.worker(keys=[k.workers(), k.worker(worker_id)], args=[worker_id, "", ""])

    def note_cannot_load(self, worker_id: str, job_id: str, message: Optional[str]) -> None:
        """Record on the worker's entry that it could not load `job_id`'s engine (why), or, with None, that it
        can again; `ziya-batch run` stops when none of its workers can (WorkerInfo.cannot_load)."""
        key = self.keys.worker(worker_id)
        notes = json.loads(self.client.hget(key, "cannot_load") or "{}")
        if message is None:
            if notes.pop(job_id, None) is None:
                return
        else:
            notes[job_id] = message[:2000]
        self.client.hset(key, "cannot_load", _json(notes))

    def unregister_worker(self, worker_id: str) -> None:
        with self.client.pipeline() as p:
            p.zrem(self.keys.workers(), worker_id)
            p.delete(self.keys.worker(worker_id))
            p.execute()

    def workers(self) -> list[dict]:
        """Workers seen within worker_ttl_s: worker_id, host, info, started_at, last_seen_s."""
        return [w.to_dict() for w in self.worker_infos()]

    def worker_infos(self) -> list[WorkerInfo]:
        now_s = self.server_time_s()
        gone = self.client.zrangebyscore(self.keys.workers(), "-inf", (now_s - WORKER_FORGET_S) * 1000)
        if gone:
            with self.client.pipeline() as p:
                p.zrem(self.keys.workers(), *gone)
                p.delete(*(self.keys.worker(w) for w in gone))
                p.execute()
        seen = self.client.zrangebyscore(self.keys.workers(), (now_s - self.worker_ttl_s) * 1000, "+inf",
                                         withscores=True)
        with self.client.pipeline() as p:
            for wid, _ in seen:
                p.hgetall(self.keys.worker(wid))
            rows = p.execute()
        out = []
        for (wid, last_ms), h in zip(seen, rows):
            out.append(WorkerInfo(worker_id=wid, host=h.get("host", ""), info=json.loads(h.get("info") or "{}"),
                                  started_at=int(h.get("started_ms", 0)) / 1000.0,
                                  last_seen_s=max(0.0, now_s - last_ms / 1000.0),
                                  cannot_load=json.loads(h.get("cannot_load") or "{}")))
        return out

    # -- status -------------------------------------------------------------------------------------------
    def status(self, job_id: str, detail: bool = False) -> JobStatus:
        return build_status(self.client, self.keys, job_id, detail)
