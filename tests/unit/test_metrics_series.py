"""/metrics over a queue that has run many jobs: a finished job's own series leave an hour after it finished, the
queue's totals keep counting it."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ziya_batch.api.metrics import FINISHED_SERIES_S, QueueCollector

NOW = 1_800_000_000.0


def _job(i: int, state: str, finished_ago_s=None, done=10, tokens=100) -> dict:
    return {"job_id": f"{i:016x}", "name": f"job-{i}", "state": state, "prompts_total": done, "prompts_done": done,
            "prompts_failed": 1, "samples": 2 * done, "output_tokens": tokens, "shards": {"committed": 2},
            "finished_at": None if finished_ago_s is None else NOW - finished_ago_s}


class _Broker:
    def __init__(self, jobs, now=NOW):
        self.jobs = jobs
        self.now = now

    def server_time_s(self):
        return self.now

    def list_jobs(self):
        return self.jobs

    def workers(self):
        return []


class _Holder:
    def __init__(self, broker):
        self.broker = broker

    def get(self):
        return self.broker


def _scrape(jobs, monkeypatch, local_clock_s=NOW) -> dict:
    import ziya_batch.api.metrics as metrics

    monkeypatch.setattr(metrics.time, "time", lambda: local_clock_s)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(QueueCollector(_Holder(_Broker(jobs))))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_old_finished_jobs_leave_their_series_and_stay_in_the_totals(monkeypatch):
    old = [_job(i, "completed", finished_ago_s=FINISHED_SERIES_S + 60 + i) for i in range(500)]
    recent = _job(1000, "failed", finished_ago_s=FINISHED_SERIES_S - 60)
    running = _job(1001, "running")
    cancelling = _job(1002, "cancelling", finished_ago_s=None)
    m = _scrape([*old, recent, running, cancelling], monkeypatch)
    per_job = {labels for (name, labels) in m if name == "ziya_batch_job_prompts"}
    assert {dict(lv)["job_id"] for lv in per_job} == {recent["job_id"], running["job_id"], cancelling["job_id"]}
    assert m[("ziya_batch_jobs", ())] == 503
    assert m[("ziya_batch_jobs_by_state", (("state", "completed"),))] == 500
    assert m[("ziya_batch_jobs_by_state", (("state", "failed"),))] == 1
    assert m[("ziya_batch_jobs_by_state", (("state", "running"),))] == 1
    assert m[("ziya_batch_jobs_by_state", (("state", "queued"),))] == 0
    assert m[("ziya_batch_prompts_done", ())] == 503 * 10
    assert m[("ziya_batch_prompts_failed", ())] == 503
    assert m[("ziya_batch_samples", ())] == 503 * 20
    assert m[("ziya_batch_output_tokens", ())] == 503 * 100
    # a scrape's size no longer grows with the jobs run long ago
    assert len(m) < 200, len(m)


def test_a_finished_job_without_an_end_time_keeps_its_series(monkeypatch):
    # records from before the end time was kept: shown rather than lost
    job = _job(1, "completed")
    m = _scrape([job], monkeypatch)
    assert m[("ziya_batch_job_prompts_done_total", (("job_id", job["job_id"]), ("name", "job-1")))] == 10


def test_a_finished_jobs_age_is_read_on_the_redis_clock(monkeypatch):
    # finished_at is the Redis server's time: the API host's clock, hours off, neither hides a job that ended a
    # minute ago nor keeps one that ended a day ago
    recent = _job(1, "completed", finished_ago_s=60)
    old = _job(2, "completed", finished_ago_s=FINISHED_SERIES_S * 24)
    for skew_s in (-2 * FINISHED_SERIES_S, 0.0, 3 * FINISHED_SERIES_S, -48 * FINISHED_SERIES_S):
        m = _scrape([recent, old], monkeypatch, local_clock_s=NOW + skew_s)
        per_job = {dict(lv)["job_id"] for (name, lv) in m if name == "ziya_batch_job_prompts"}
        assert per_job == {recent["job_id"]}, skew_s
