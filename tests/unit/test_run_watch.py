"""`ziya-batch run`'s watch loop, with a broker and replicas stood in: what it prints while a job finalizes."""
from __future__ import annotations

import dataclasses

from ziya_batch.queue import JobState
from ziya_batch.queue.types import FinalizeWait, JobStatus
from ziya_batch.runtime import local


def _status(state: JobState, wait: FinalizeWait | None = None) -> JobStatus:
    fields = {f.name: None for f in dataclasses.fields(JobStatus) if f.default is dataclasses.MISSING
              and f.default_factory is dataclasses.MISSING}
    fields.update(job_id="j1", name="n", state=state, prompts_total=4, prompts_done=4, prompts_failed=0,
                  samples=4, output_tokens=40, tokens_per_s=0.0, prompts_per_s=0.0, eta_s=None, retries=0,
                  shards={}, workers=[], sealed=True)
    return JobStatus(**{k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(JobStatus)}},
                     finalize_wait=wait)


class _Broker:
    def __init__(self, states):
        self.states = list(states)

    def status(self, job_id):
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def reap(self):
        pass

    def worker_infos(self):
        return []


class _Manager:
    replicas: dict = {}
    deaths: list = []

    def reconcile(self):
        pass


def test_run_says_once_why_finalizing_waits_and_when_storage_answers_again(monkeypatch, capsys):
    monkeypatch.setattr(local, "finalize_if_ready", lambda broker, job_id: False)
    away = FinalizeWait(reason="/out: ConnectTimeoutError: timed out", at=100.0, since=100.0, tries=1,
                        next_try_at=130.0, next_try_in_s=30.0)
    again = dataclasses.replace(away, at=130.0, tries=2, next_try_at=160.0)
    other = dataclasses.replace(away, reason="/out\x1b[2J: EndpointConnectionError: refused", tries=3)
    states = [_status(JobState.RUNNING), _status(JobState.FINALIZING, away), _status(JobState.FINALIZING, away),
              _status(JobState.FINALIZING, again), _status(JobState.FINALIZING, other),
              _status(JobState.FINALIZING), _status(JobState.COMPLETED)]
    got = local._watch(_Broker(states), "j1", _Manager(), progress=False, poll_s=0)
    assert got.state == JobState.COMPLETED
    out = capsys.readouterr().err           # run's console is stderr's: stdout carries the summary
    assert out.count("ConnectTimeoutError") == 1 and out.count("EndpointConnectionError") == 1
    assert out.count("finalize waits for storage") == 2
    assert out.count("the output's storage answers again") == 1
    assert "\x1b" not in out and "/out\\x1b[2J" in out          # a path's control characters as escapes
