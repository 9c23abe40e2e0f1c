"""The job report by job id: the page adds what Redis knows of the job (the rest of the report's tests need
no server: tests/unit/test_report.py)."""
from __future__ import annotations

import pytest

from ziya_batch.report import report_main


def test_report_main_by_job_id_adds_the_redis_status(tmp_path, monkeypatch, redis_server, redis_client, job_output):
    from ziya_batch.queue import Broker
    from ziya_batch.jobs import submit_job
    from ziya_batch.spec import parse_spec

    inp = tmp_path / "in.jsonl"
    # 5 shards, 4 of them already in storage: the job is still open, so the page reads the commit markers
    inp.write_text("".join(f'{{"id": "p{i}", "prompt": "q{i}"}}\n' for i in range(125)))
    out = job_output(tmp_path / "out", shards=4, per_shard=25, manifest=False)
    spec = parse_spec({"name": "by-id", "model": {"path": "/m"}, "input": [str(inp)],
                       "output": {"path": str(out)}, "shard_size": 25})
    # as the job left it: its submit recorded it as the directory's owner before any part was written
    from ziya_batch.io import set_output_owner

    set_output_owner(str(out), spec.identity())
    monkeypatch.setenv("ZIYA_BATCH_REDIS_URL", redis_server.url)
    status = submit_job(spec, Broker.from_url(redis_server.url))
    assert status.shards_total == 5
    page = report_main(status.job_id, tmp_path / "r.html").read_text()
    assert "by-id" in page and status.job_id in page and "commit markers" in page
    assert "prompts total</th><td>125" in page
    from ziya_batch.errors import JobNotFound

    with pytest.raises(JobNotFound, match="no job nosuchjob"):
        report_main("nosuchjob", tmp_path / "x.html")

