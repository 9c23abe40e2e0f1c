"""Cancelling a job does the same on every surface: `ziya-batch cancel` and POST /v1/jobs/{id}/cancel both go
through jobs.cancel_job, so a job with nothing running is cancelled at once and its manifest lists exactly the
parts committed before the cancel. The demo model on the CPU, a real Redis, local output."""
import json

import pytest
from fastapi.testclient import TestClient

from ziya_batch import io
from ziya_batch.api.app import create_app
from ziya_batch.api.settings import ApiSettings
from ziya_batch.jobs import submit_job
from ziya_batch.queue import Broker, JobState
from ziya_batch.work.worker import Worker
from ziya_batch.spec import parse_spec

TOKEN = "test-token-0123456789"


def _spec(tmp_path, model):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(4)))
    return parse_spec({"name": "parity", "model": {"path": str(model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 4, "ignore_eos": True, "seed": 1},
                       "output": {"path": str(tmp_path / "out")}, "shard_size": 2})


def _cancel_by_cli(url: str, job_id: str, capsys) -> str:
    from ziya_batch.cli import main

    with pytest.raises(SystemExit) as done:
        main(["cancel", job_id, "--redis-url", url])
    out = capsys.readouterr()
    assert done.value.code == 0, out.err
    return out.out.split(": ", 1)[1].split(" ", 1)[0]            # "<job>: cancelled (running shards ...)"


def _cancel_by_api(broker: Broker, job_id: str, tmp_path) -> str:
    client = TestClient(create_app(ApiSettings(token=TOKEN, storage_url=str(tmp_path / "store")), lambda: broker))
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    return r.json()["state"]


@pytest.mark.parametrize("surface", ["cli", "api"])
def test_cancel_writes_the_manifest_of_what_is_committed_on_every_surface(tmp_path, demo_model, redis_server,
                                                                         redis_client, capsys, surface):
    """One of two shards committed, nothing running: the cancel ends the job at once, on either surface,
    with a manifest that lists shard 0 (p0, p1) and nothing else."""
    broker = Broker.from_url(redis_server.url)          # the CLI's own key prefix, so both see the same job
    spec = _spec(tmp_path, demo_model)
    job_id = submit_job(spec, broker).job_id
    Worker(broker, device="cpu", max_in_flight=1).run_once()
    assert broker.status(job_id).shards["committed"] == 1
    out = str(tmp_path / "out")
    assert io.read_manifest(out) is None

    state = _cancel_by_cli(redis_server.url, job_id, capsys) if surface == "cli" else \
        _cancel_by_api(broker, job_id, tmp_path)

    assert state == "cancelled" and broker.status(job_id).state == JobState.CANCELLED
    manifest = io.read_manifest(out)
    assert manifest is not None and manifest["summary"]["state"] == "cancelled"
    assert io.manifest_shards(manifest) == {0}
    assert [r["id"] for r in io.read_parts(out, "results")] == ["p0", "p1"]
