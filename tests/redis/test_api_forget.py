"""DELETE /v1/jobs/{id}: 404 for an unknown job, 409 for one that is not finished, 200 with what was forgotten; after
it no listing (GET /v1/jobs, /metrics) names the job, and submitting the spec again is the job anew."""
from __future__ import annotations

import json

from api_support import AUTH, job_spec
from prometheus_client.parser import text_string_to_metric_families


def _job_ids_in_metrics(client) -> set[str]:
    text = client.get("/metrics", headers=AUTH).text
    return {s.labels["job_id"] for fam in text_string_to_metric_families(text) for s in fam.samples
            if "job_id" in s.labels}


def test_delete_forgets_a_finished_job_and_refuses_others(api_env):
    data, models, make_client = api_env
    client = make_client()
    kept = client.post("/v1/jobs", json=job_spec(data, models, name="kept", output={"path": str(data / "kept")}),
                       headers=AUTH).json()["id"]
    job_id = client.post("/v1/jobs", json=job_spec(data, models), headers=AUTH).json()["id"]

    r = client.delete(f"/v1/jobs/{job_id}", headers=AUTH)
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["type"] == "conflict" and err["code"] == 409
    assert f"job {job_id} is queued" in err["message"] and f"POST /v1/jobs/{job_id}/cancel" in err["message"]

    r = client.delete("/v1/jobs/feedfacefeedface", headers=AUTH)
    assert r.status_code == 404 and "no job feedfacefeedface" in r.json()["error"]["message"]
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 401            # the token, as everywhere

    # cancelled with nothing running: finished, its manifest written
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).json()["state"] == "cancelled"
    assert (data / "out" / "manifest.json").is_file()
    assert job_id in _job_ids_in_metrics(client)

    r = client.delete(f"/v1/jobs/{job_id}", params={"dry_run": "true"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["dry_run"] is True and r.json()["forgotten"] is False
    assert client.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 200

    r = client.delete(f"/v1/jobs/{job_id}", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body[k] for k in ("id", "name", "state", "shards", "forgotten", "dry_run")} == {
        "id": job_id, "name": "api-test", "state": "cancelled", "shards": 2, "forgotten": True, "dry_run": False}
    assert body["output_path"] == str(data / "out") and isinstance(body["finished_at"], float)

    assert client.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/manifest", headers=AUTH).status_code == 404
    assert [j["job_id"] for j in client.get("/v1/jobs", headers=AUTH).json()["jobs"]] == [kept]
    assert _job_ids_in_metrics(client) == {kept}
    assert client.delete(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 404
    # the output stays: a cancelled job's manifest lists what it committed (nothing here)
    assert (data / "out" / "manifest.json").is_file()

    # submitted again, a cancelled job resumes (runs what it had not committed): queued under the same id
    again = client.post("/v1/jobs", json=job_spec(data, models), headers=AUTH).json()
    assert again == {"id": job_id, "state": "queued"}


def test_a_cancelled_batch_whose_job_is_forgotten_stays_cancelled(api_env):
    """A batch cancelled while a worker held one of its shards is `cancelling` until it is read again, after the job
    became cancelled. A forget of the job in between (the job is finished) must not make the next read submit the job
    again: that reopened it, the batch went back to in_progress and ran what the cancel had stopped."""
    from test_api_openai import _create, _settled, _upload

    from ziya_batch import jobs

    _, _, make_client = api_env
    client = make_client()
    b = _settled(client, _create(client, _upload(client).json()["id"]).json()["id"])
    broker = client.app.state.brokers.get()
    job_id = broker.list_jobs()[0].job_id
    lease = broker.claim("w1")
    assert client.post(f"/v1/batches/{b['id']}/cancel", headers=AUTH).json()["status"] == "cancelling"
    broker.give_back(lease, "the worker stops")                    # nothing runs now: the job is cancelled
    jobs.finalize_if_ready(broker, job_id)                         # as the worker does: the cancelled manifest
    assert client.delete(f"/v1/jobs/{job_id}", headers=AUTH).json()["state"] == "cancelled"

    got = client.get(f"/v1/batches/{b['id']}", headers=AUTH)
    assert got.status_code == 200 and got.json()["status"] == "cancelled" and got.json()["cancelled_at"] is not None
    assert broker.find_job(job_id) is None and broker.claim("w2") is None
    lines = client.get(f"/v1/files/{got.json()['error_file_id']}/content", headers=AUTH).text.splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in lines) == ["r0", "r1", "r2"]
    assert [x["status"] for x in client.get("/v1/batches", headers=AUTH).json()["data"]] == ["cancelled"]
    assert broker.find_job(job_id) is None
