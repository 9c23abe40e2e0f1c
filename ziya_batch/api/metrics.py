"""Prometheus metrics, read from Redis at scrape time.

A custom collector on its own CollectorRegistry (never the global one, so two apps in one process, as in
tests, do not collide): each scrape asks the broker for every job's status and the registered workers,
and turns them into metric families. Nothing is counted in the API process itself, so every replica of
the API reports the same numbers and a restart loses nothing.

Per job (labels job_id, name): prompts done/failed, samples, output tokens (counters); prompts total,
tokens/s, prompts/s, ETA, state, shards by state, retries, dead-lettered shards and lines; for every job
not finished and every job finished in the last FINISHED_SERIES_S on the Redis clock (a dashboard sees each job
end), not for older ones, so the series do not grow with every job the queue has ever run. Over the queue (every job,
however old): jobs by state, prompts done and failed, samples and output tokens (gauges: a completed job whose
output was deleted runs again from 0 under its id, so a sum may drop), queue depth (pending shards of jobs that can be claimed), leased shards,
dead-lettered shards, lease expiries (when the broker counts them). Workers (each worker process is one
model replica): count, GPUs, and one info series per worker.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

JOB_STATES = ("queued", "running", "finalizing", "completed", "failed", "cancelling", "cancelled")
FINISHED_STATES = ("completed", "failed", "cancelled")
SHARD_STATES = ("pending", "leased", "committed", "dead")
# a finished job's own series are exported this long after it finished (then only the queue's totals count it)
FINISHED_SERIES_S = 3600.0


def _as_dict(obj: Any) -> dict:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def worker_gpus(info: dict) -> int:
    """GPUs a registered worker drives: an explicit count, the Ray GPU ids it holds, or one when its
    device is a GPU (the worker registers the device's name, e.g. "NVIDIA H100 80GB HBM3", or "cpu")."""
    inner = info.get("info") if isinstance(info.get("info"), dict) else info
    if isinstance(inner.get("gpus"), int):
        return inner["gpus"]
    for key in ("gpu_ids", "devices"):
        if isinstance(inner.get(key), (list, tuple)) and inner[key]:
            return len(inner[key])
    device = str(inner.get("device", "")).strip().lower()
    return 0 if device in ("", "cpu") or device.startswith("cpu") else 1


class QueueCollector:
    """Collects from the broker on every scrape."""

    def __init__(self, brokers):
        self.brokers = brokers

    def describe(self):
        return []       # families depend on Redis; describe nothing so registering never scrapes

    def collect(self):
        up = GaugeMetricFamily("ziya_batch_redis_up", "1 if the queue's Redis answered this scrape")
        try:
            broker = self.brokers.get()
            jobs = [_as_dict(j) for j in broker.list_jobs()]
            workers = [_as_dict(w) for w in broker.workers()]
            # the clock jobs' end times are on: this host's may be hours off (a job ended a minute ago, left out)
            now = broker.server_time_s()
        except Exception as err:  # noqa: BLE001 - a scrape reports Redis down instead of failing
            log.warning("metrics: queue unreachable: %s", err)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._job_families(jobs, now)
        yield from self._worker_families(workers)

    @staticmethod
    def _job_families(jobs: list[dict], now: Optional[float] = None):
        now = time.time() if now is None else now
        labels = ["job_id", "name"]
        fam = {
            "done": CounterMetricFamily("ziya_batch_job_prompts_done", "Prompts generated", labels=labels),
            "failed": CounterMetricFamily("ziya_batch_job_prompts_failed", "Prompts that became error lines", labels=labels),
            "samples": CounterMetricFamily("ziya_batch_job_samples", "Samples generated", labels=labels),
            "tokens": CounterMetricFamily("ziya_batch_job_output_tokens", "Output tokens generated", labels=labels),
            "retries": CounterMetricFamily("ziya_batch_job_retries", "Failed or expired shard attempts", labels=labels),
            "expiries": CounterMetricFamily("ziya_batch_job_lease_expiries", "Leases of the job that expired "
                                            "(reported once the queue counts them per job)", labels=labels),
            "total": GaugeMetricFamily("ziya_batch_job_prompts", "Prompts in the job", labels=labels),
            "tps": GaugeMetricFamily("ziya_batch_job_tokens_per_second", "Output tokens/s over the last minute", labels=labels),
            "pps": GaugeMetricFamily("ziya_batch_job_prompts_per_second", "Prompts/s over the last minute", labels=labels),
            "eta": GaugeMetricFamily("ziya_batch_job_eta_seconds", "Estimated seconds until every prompt is done (absent while idle and once none remains)", labels=labels),
            "dead": GaugeMetricFamily("ziya_batch_job_dead_letter_shards", "Shards whose retries are exhausted", labels=labels),
            "dead_lines": GaugeMetricFamily("ziya_batch_job_dead_letter_lines", "Lines given up on alone", labels=labels),
            "pc_hit": CounterMetricFamily("ziya_batch_job_prefix_cache_hit_tokens",
                                          "Prompt tokens found in the prefix cache", labels=labels),
            "pc_query": CounterMetricFamily("ziya_batch_job_prefix_cache_query_tokens",
                                            "Prompt tokens looked up in the prefix cache", labels=labels),
            "pc_rate": GaugeMetricFamily("ziya_batch_job_prefix_cache_hit_rate",
                                         "Share of looked-up prompt tokens found cached (absent before any)",
                                         labels=labels),
        }
        state = GaugeMetricFamily("ziya_batch_job_state", "1 for the job's current state", labels=labels + ["state"])
        shards = GaugeMetricFamily("ziya_batch_job_shards", "Shards by state", labels=labels + ["state"])
        depth = leased = dead = expiries = 0
        by_state = dict.fromkeys(JOB_STATES, 0)
        totals = dict.fromkeys(("prompts_done", "prompts_failed", "samples", "output_tokens"), 0)
        for j in jobs:
            counts = j.get("shards") or {}
            if j.get("state") in ("queued", "running"):
                depth += counts.get("pending", 0)
            leased += counts.get("leased", 0)
            dead += j.get("dead_shards", 0)
            expiries += j.get("lease_expiries") or 0
            if j.get("state") in by_state:
                by_state[j["state"]] += 1
            for key in totals:
                totals[key] += j.get(key, 0) or 0
            finished_at = j.get("finished_at")
            if j.get("state") in FINISHED_STATES and finished_at is not None and now - finished_at > FINISHED_SERIES_S:
                continue
            lv = [str(j.get("job_id")), str(j.get("name", ""))]
            fam["done"].add_metric(lv, j.get("prompts_done", 0))
            fam["failed"].add_metric(lv, j.get("prompts_failed", 0))
            fam["samples"].add_metric(lv, j.get("samples", 0))
            fam["tokens"].add_metric(lv, j.get("output_tokens", 0))
            fam["retries"].add_metric(lv, j.get("retries", 0))
            if j.get("lease_expiries") is not None:
                fam["expiries"].add_metric(lv, j["lease_expiries"])
            fam["total"].add_metric(lv, j.get("prompts_total", 0))
            fam["tps"].add_metric(lv, j.get("tokens_per_s", 0.0))
            fam["pps"].add_metric(lv, j.get("prompts_per_s", 0.0))
            if j.get("eta_s") is not None:
                fam["eta"].add_metric(lv, j["eta_s"])
            fam["dead"].add_metric(lv, j.get("dead_shards", 0))
            fam["dead_lines"].add_metric(lv, j.get("dead_lines", 0))
            fam["pc_hit"].add_metric(lv, j.get("prefix_cache_hit_tokens", 0))
            fam["pc_query"].add_metric(lv, j.get("prefix_cache_query_tokens", 0))
            if j.get("prefix_cache_hit_rate") is not None:
                fam["pc_rate"].add_metric(lv, j["prefix_cache_hit_rate"])
            for s in JOB_STATES:
                state.add_metric(lv + [s], 1 if j.get("state") == s else 0)
            for s in SHARD_STATES:
                shards.add_metric(lv + [s], counts.get(s, 0))
        yield from fam.values()
        yield state
        yield shards
        jobs_by_state = GaugeMetricFamily("ziya_batch_jobs_by_state", "Jobs the queue knows, by state",
                                          labels=["state"])
        for s, n in by_state.items():
            jobs_by_state.add_metric([s], n)
        yield jobs_by_state
        # gauges, not counters: a completed job whose output was deleted runs again under its id from 0, and the sum
        # drops (rates come from the per-job counters: sum(rate(ziya_batch_job_output_tokens_total[5m])))
        for key, name, doc in (
            ("prompts_done", "ziya_batch_prompts_done", "Prompts generated, over every job the queue knows"),
            ("prompts_failed", "ziya_batch_prompts_failed", "Prompts that became error lines, over every job"),
            ("samples", "ziya_batch_samples", "Samples generated, over every job"),
            ("output_tokens", "ziya_batch_output_tokens", "Output tokens generated, over every job"),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], totals[key])
            yield g
        for name, doc, value in (
            ("ziya_batch_queue_depth", "Pending shards of jobs that can be claimed", depth),
            ("ziya_batch_leased_shards", "Shards held by workers under a lease now", leased),
            ("ziya_batch_dead_letter_shards", "Dead-lettered shards over all jobs", dead),
            ("ziya_batch_jobs", "Jobs the queue knows", len(jobs)),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        # over the statuses just listed (each job's counter), not a second read of every job
        c = CounterMetricFamily("ziya_batch_lease_expiries", "Leases that expired and were requeued by the reaper")
        c.add_metric([], expiries)
        yield c

    @staticmethod
    def _worker_families(workers: list[dict]):
        count = GaugeMetricFamily("ziya_batch_workers", "Registered workers (model replicas)")
        count.add_metric([], len(workers))
        gpus = GaugeMetricFamily("ziya_batch_worker_gpus", "GPUs driven by registered workers")
        gpus.add_metric([], sum(worker_gpus(w) for w in workers))
        info = GaugeMetricFamily("ziya_batch_worker_info", "One series per registered worker",
                                 labels=["worker_id", "host", "device"])
        seen = GaugeMetricFamily("ziya_batch_worker_last_seen_seconds", "Seconds since the worker's heartbeat",
                                 labels=["worker_id"])
        for w in workers:
            inner = w.get("info") if isinstance(w.get("info"), dict) else w
            info.add_metric([str(w.get("worker_id")), str(w.get("host", "")), str(inner.get("device", ""))], 1)
            if w.get("last_seen_s") is not None:
                seen.add_metric([str(w.get("worker_id"))], w["last_seen_s"])
        yield from (count, gpus, info, seen)


_lock = threading.Lock()


def registry_for(brokers) -> CollectorRegistry:
    """The app's own registry, kept on its broker holder (one per app)."""
    with _lock:
        reg = getattr(brokers, "metrics_registry", None)
        if reg is None:
            reg = CollectorRegistry(auto_describe=False)
            reg.register(QueueCollector(brokers))
            brokers.metrics_registry = reg
        return reg


def metrics_response(brokers) -> tuple[bytes, str]:
    return generate_latest(registry_for(brokers)), CONTENT_TYPE_LATEST
