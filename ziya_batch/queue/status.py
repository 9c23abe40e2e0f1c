"""Building a job's status from its Redis keys: counters, the last minute's rate, lease holders.

Takes the Redis client and the Keys, not the Broker, so that broker.py imports this module and not the
other way round."""
from __future__ import annotations

import json
from typing import Optional

import redis

from ..errors import JobNotFound
from ..spec import show_text
from .keys import Keys
from .states import JobState, ShardState
from .types import FinalizeWait, JobStatus

RATE_WINDOW_S = 60.0
LIST_CAP = 1000              # shard indices per state in `status JOB_ID`
STATUS_BATCH = 250           # jobs read per statuses.lua call by build_statuses (a listing, /metrics)
_COUNT_FIELDS = tuple((s.value, f"n_{s.value}") for s in ShardState)     # shards per state: the hash's counters
# the job hash's fields a status reads (HMGET: half the reply HGETALL's would be, which a listing of thousands parses)
STATUS_FIELDS = ("state", "name", "priority", "output_path", "created_ms", "updated_ms", "finished_ms", "total_shards",
                 *(f for _, f in _COUNT_FIELDS), "total_prompts", "prompts_done", "prompts_failed", "samples",
                 "output_tokens", "retries", "lease_expiries", "dead_lines", "error", "prefix_cache_query_tokens",
                 "prefix_cache_hit_tokens", "sealed", "finalize_wait")


def _rate(entries: list[str], window_s: float) -> tuple[float, float]:
    """(prompts/s, tokens/s) from progress members "<ms>:<seq>:<prompts>:<tokens>"."""
    prompts = tokens = 0
    for m in entries:
        _, _, p, t = m.split(":")
        prompts += int(p)
        tokens += int(t)
    return prompts / window_s, tokens / window_s


def build_status(client: redis.Redis, keys: Keys, job_id: str, detail: bool = False) -> JobStatus:
    k, c = keys, client
    sec, usec = c.time()
    now_ms = sec * 1000 + usec // 1000
    with c.pipeline(transaction=True) as p:
        _read_job(p, k, job_id, now_ms)
        if detail:
            p.zrange(k.pending(job_id), 0, LIST_CAP - 1)
            p.smembers(k.dead(job_id))
            p.lrange(k.errors(job_id), 0, -1)
        res = p.execute()
    res[0] = _fields(res[0])
    if not res[0]:
        raise JobNotFound(f"no job {show_text(job_id)} in this Redis (list jobs with `ziya-batch status`)")
    leases = _lease_records(c, k, {job_id: res[2]})
    hosts = _hosts(c, k, leases)
    return _assemble(job_id, res[:4], leases.get(job_id, []), hosts, now_ms, res[4:] if detail else None)


def build_statuses(client: redis.Redis, keys: Keys, job_ids: list[str], scripts) -> list[JobStatus]:
    """build_status (without detail) of many jobs in a few round trips whatever their number: statuses.lua reads
    STATUS_BATCH jobs a call (each job as one moment saw it) and packs them as one JSON string, then one pipeline reads
    their leased shards' records and one their lease holders' hosts. Jobs without a hash (deleted meanwhile) are left
    out. `scripts`: the broker's queue.scripts.Scripts."""
    k, c = keys, client
    if not job_ids:
        return []
    sec, usec = c.time()
    now_ms = sec * 1000 + usec // 1000
    rows: list[tuple[str, list]] = []
    for at in range(0, len(job_ids), STATUS_BATCH):
        chunk = job_ids[at:at + STATUS_BATCH]
        packed = json.loads(scripts.statuses(
            keys=[key for j in chunk for key in (k.job(j), k.progress(j), k.leased(j), k.dead(j))],
            args=[int(now_ms - RATE_WINDOW_S * 1000), *STATUS_FIELDS]))
        for job_id, (values, progress, leased, dead) in zip(chunk, packed):
            # cjson writes an empty table as {}, and an absent field as false
            h = _fields([v if v is not False else None for v in values])
            if h:
                rows.append((job_id, [h, list(progress or ()), [(i, float(e)) for i, e in leased or ()], dead]))
    leases = _lease_records(c, k, {job_id: r[2] for job_id, r in rows if r[2]})
    hosts = _hosts(c, k, leases)
    return [_assemble(job_id, r, leases.get(job_id, []), hosts, now_ms, None) for job_id, r in rows]


def _read_job(p, k: Keys, job_id: str, now_ms: int) -> None:
    """The four reads a job's status needs, queued on pipeline `p`: hash, last minute's progress, leases, dead count."""
    p.hmget(k.job(job_id), STATUS_FIELDS)
    p.zrangebyscore(k.progress(job_id), now_ms - RATE_WINDOW_S * 1000, "+inf")
    p.zrange(k.leased(job_id), 0, -1, withscores=True)
    p.scard(k.dead(job_id))


def _fields(values: list) -> dict:
    """The job hash's STATUS_FIELDS that it holds, as HGETALL would give them; empty where it has no state (no job)."""
    if not values or values[0] is None:
        return {}
    return {f: v for f, v in zip(STATUS_FIELDS, values) if v is not None}


def _lease_records(c: redis.Redis, k: Keys, leased: dict[str, list]) -> dict[str, list[tuple[int, float, dict]]]:
    """job id -> (shard index, expiry ms, shard record) of each of its leased shards: one round trip for all jobs."""
    leased = {j: rows for j, rows in leased.items() if rows}
    if not leased:
        return {}
    with c.pipeline(transaction=False) as p:
        for job_id, rows in leased.items():
            p.hmget(k.shards(job_id), [idx for idx, _ in rows])
        raws = p.execute()
    return {job_id: [(int(idx), expiry_ms, json.loads(raw) if raw else {}) for (idx, expiry_ms), raw in zip(rows, got)]
            for (job_id, rows), got in zip(leased.items(), raws)}


def _hosts(c: redis.Redis, k: Keys, leases: dict[str, list]) -> dict[str, str]:
    """worker id -> host of every lease holder: one round trip for all."""
    owners = sorted({sh.get("owner", "") for rows in leases.values() for _, _, sh in rows})
    if not owners:
        return {}
    with c.pipeline() as p:
        for wid in owners:
            p.hget(k.worker(wid), "host")
        return dict(zip(owners, p.execute()))


def _assemble(job_id: str, res: list, lease_recs: list, hosts: dict[str, str], now_ms: int,
              detail_res: Optional[list]) -> JobStatus:
    h, progress, _, dead_count = res
    state = JobState(h["state"])
    created_ms = int(h.get("created_ms", 0))
    # a job younger than the window is measured over its age, not diluted over a full minute
    window_s = min(RATE_WINDOW_S, max(1.0, (now_ms - created_ms) / 1000.0))
    prompts_per_s, tokens_per_s = _rate(progress, window_s)
    total = int(h.get("total_prompts", 0))
    done, failed = int(h.get("prompts_done", 0)), int(h.get("prompts_failed", 0))
    remaining = max(0, total - done - failed)
    eta_s = None
    # none once every prompt is done: what is left is finalizing, whose time nothing measures (it waits for storage)
    if not state.is_finished() and remaining > 0 and prompts_per_s > 0:
        eta_s = remaining / prompts_per_s

    holders: dict[str, list[int]] = {}
    lease_rows = []
    for idx, expiry_ms, sh in lease_recs:
        owner = sh.get("owner", "")
        if not owner:       # committed or given back between the lease read and the shard's: no longer leased
            continue
        holders.setdefault(owner, []).append(idx)
        lease_rows.append({"shard": idx, "worker_id": owner, "attempt": sh.get("attempts"),
                           "token": sh.get("token"), "isolate": bool(sh.get("lease_isolate")),
                           "dead_letter": bool(sh.get("dead")),
                           "expires_in_s": round((expiry_ms - now_ms) / 1000.0, 3)})
    workers = tuple({"worker_id": w, "host": hosts.get(w) or "", "shards": sorted(ix)}
                    for w, ix in sorted(holders.items()))
    counts = {s: int(h.get(f, 0)) for s, f in _COUNT_FIELDS}
    extra = {}
    if detail_res is not None:
        pending, dead, errors = detail_res
        dead_ix = sorted(int(i) for i in dead)
        dead_set = set(dead_ix)
        extra = {
            "detail": True,
            "leases": tuple(sorted(lease_rows, key=lambda r: r["shard"])),
            "shard_lists": {
                "pending": [int(i) for i in pending if int(i) not in dead_set][:LIST_CAP],
                "leased": sorted(r["shard"] for r in lease_rows)[:LIST_CAP],
                "dead_lettered": dead_ix[:LIST_CAP],
            },
            "errors": tuple(_error(json.loads(e)) for e in errors),
        }
    return JobStatus(
        job_id=job_id, name=h.get("name", ""), state=state, priority=int(h.get("priority", 0)),
        output_path=h.get("output_path", ""), created_at=created_ms / 1000.0,
        updated_at=int(h.get("updated_ms", created_ms)) / 1000.0,
        finished_at=int(h["finished_ms"]) / 1000.0 if h.get("finished_ms") else None,
        shards_total=int(h.get("total_shards", 0)), shards=counts, prompts_total=total, prompts_done=done,
        prompts_failed=failed, samples=int(h.get("samples", 0)), output_tokens=int(h.get("output_tokens", 0)),
        tokens_per_s=tokens_per_s, prompts_per_s=prompts_per_s, eta_s=eta_s, workers=workers,
        retries=int(h.get("retries", 0)), lease_expiries=int(h.get("lease_expiries", 0)),
        dead_shards=int(dead_count), dead_lines=int(h.get("dead_lines", 0)),
        error=h.get("error"), prefix_cache_query_tokens=int(h.get("prefix_cache_query_tokens", 0)),
        prefix_cache_hit_tokens=int(h.get("prefix_cache_hit_tokens", 0)), sealed=h.get("sealed") == "1",
        finalize_wait=_finalize_wait(h.get("finalize_wait"), now_ms) if state == JobState.FINALIZING else None,
        **extra)


def _finalize_wait(raw, now_ms: int) -> Optional[FinalizeWait]:
    """The job hash's finalize_wait (end_finalize.lua), or None: absent (records before 2026-12-07 have none), or
    not readable (then status goes without it rather than failing)."""
    if not raw:
        return None
    try:
        w = json.loads(raw)
        next_ms = int(w["next_ms"])
        return FinalizeWait(reason=str(w["reason"]), at=int(w["at_ms"]) / 1000.0, since=int(w["since_ms"]) / 1000.0,
                            tries=int(w["tries"]), next_try_at=next_ms / 1000.0,
                            next_try_in_s=max(0.0, (next_ms - now_ms) / 1000.0))
    except (ValueError, TypeError, KeyError):
        return None


def _error(e: dict) -> dict:
    e = dict(e)
    e["time"] = e.pop("ts_ms", 0) / 1000.0
    return e
