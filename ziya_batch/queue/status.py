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
        p.hgetall(k.job(job_id))
        p.zrangebyscore(k.progress(job_id), now_ms - RATE_WINDOW_S * 1000, "+inf")
        p.zrange(k.leased(job_id), 0, -1, withscores=True)
        p.scard(k.dead(job_id))
        if detail:
            p.zrange(k.pending(job_id), 0, LIST_CAP - 1)
            p.smembers(k.dead(job_id))
            p.lrange(k.errors(job_id), 0, -1)
        res = p.execute()
    h, progress, leased, dead_count = res[:4]
    if not h:
        raise JobNotFound(f"no job {show_text(job_id)} in this Redis (list jobs with `ziya-batch status`)")
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
    if leased:
        raws = c.hmget(k.shards(job_id), [idx for idx, _ in leased])
        for (idx, expiry_ms), raw in zip(leased, raws):
            sh = json.loads(raw) if raw else {}
            owner = sh.get("owner", "")
            holders.setdefault(owner, []).append(int(idx))
            lease_rows.append({"shard": int(idx), "worker_id": owner, "attempt": sh.get("attempts"),
                               "token": sh.get("token"), "isolate": bool(sh.get("lease_isolate")),
                               "dead_letter": bool(sh.get("dead")),
                               "expires_in_s": round((expiry_ms - now_ms) / 1000.0, 3)})
    hosts = {}
    if holders:
        with c.pipeline() as p:
            for wid in holders:
                p.hget(k.worker(wid), "host")
            hosts = dict(zip(holders, p.execute()))
    workers = tuple({"worker_id": w, "host": hosts.get(w) or "", "shards": sorted(ix)}
                    for w, ix in sorted(holders.items()))
    counts = {s.value: int(h.get(f"n_{s.value}", 0)) for s in ShardState}
    extra = {}
    if detail:
        pending, dead, errors = res[4], res[5], res[6]
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
