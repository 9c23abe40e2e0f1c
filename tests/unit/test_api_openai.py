"""The OpenAI Batch subset on the TestClient with a real private Redis and no worker: files, batch
creation, listing and paging, cancel and expiry. (The round trip with a worker and the official client
is tests/ray/test_api_e2e.py.)"""
from __future__ import annotations

import json

from conftest_api import AUTH, api_env, api_redis_url  # noqa: F401 - fixtures

LINES = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
          "body": {"model": "m", "prompt": f"hello {i}", "max_tokens": 2}} for i in range(3)]
DATA = ("\n".join(json.dumps(x) for x in LINES) + "\n").encode()


def _upload(client, data: bytes = DATA, purpose: str = "batch", name: str = "in.jsonl"):
    return client.post("/v1/files", files={"file": (name, data, "application/jsonl")}, data={"purpose": purpose},
                       headers=AUTH)


def _create(client, file_id: str, **extra):
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h", **extra}
    return client.post("/v1/batches", json=body, headers=AUTH)


def test_files(api_env):
    _, _, make_client = api_env
    client = make_client()
    r = _upload(client)
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["object"] == "file" and f["bytes"] == len(DATA) and f["purpose"] == "batch" and f["filename"] == "in.jsonl"
    assert client.get(f"/v1/files/{f['id']}", headers=AUTH).json() == f
    assert client.get(f"/v1/files/{f['id']}/content", headers=AUTH).content == DATA
    assert [x["id"] for x in client.get("/v1/files", headers=AUTH).json()["data"]] == [f["id"]]
    assert client.get("/v1/files?purpose=batch_output", headers=AUTH).json()["data"] == []
    for bad in ("file-nope", "../../etc/passwd", "file-..", "x"):
        r = client.get(f"/v1/files/{bad}/content", headers=AUTH)
        assert r.status_code == 404, (bad, r.status_code)
    r = _upload(client, purpose="assistants")
    assert r.status_code == 400 and "purpose 'batch'" in r.json()["error"]["message"]
    r = client.post("/v1/files", data={"purpose": "batch"}, headers=AUTH)
    assert r.status_code == 422 and "file" in r.json()["error"]["message"]


def test_create_follows_the_job(api_env):
    _, _, make_client = api_env
    client = make_client()
    file_id = _upload(client).json()["id"]
    r = _create(client, file_id, metadata={"team": "rl"})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "batch" and b["status"] == "in_progress" and b["metadata"] == {"team": "rl"}
    assert b["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert b["expires_at"] == b["created_at"] + 24 * 3600 and b["in_progress_at"] >= b["created_at"]
    assert not any(k.startswith("_") for k in b)
    job = client.get("/v1/jobs", headers=AUTH).json()["jobs"]
    assert len(job) == 1 and job[0]["name"] == f"openai-{b['id']}" and job[0]["prompts_total"] == 3
    assert client.get(f"/v1/batches/{b['id']}", headers=AUTH).json()["status"] == "in_progress"


def test_create_refusals(api_env):
    _, _, make_client = api_env
    client = make_client()
    r = _create(client, "file-doesnotexist")
    assert r.status_code == 404 and "no file" in r.json()["error"]["message"]
    r = client.post("/v1/batches", json={"input_file_id": "f", "endpoint": "/v1/completions",
                                         "completion_window": "1h"}, headers=AUTH)
    assert r.status_code == 422 and "completion_window" in r.json()["error"]["message"]
    file_id = _upload(client).json()["id"]
    r = _create(make_client(model=None), file_id)
    assert r.status_code == 400 and "--model" in r.json()["error"]["message"]


def test_a_file_that_is_not_jsonl_fails_the_batch_not_the_server(api_env):
    _, _, make_client = api_env
    client = make_client()
    file_id = _upload(client, data=b"").json()["id"]
    b = _create(client, file_id).json()
    # an empty input is still a batch (zero requests); it must not be a 500
    assert b["status"] in ("in_progress", "completed", "failed")


def test_list_pages_newest_first(api_env):
    _, _, make_client = api_env
    client = make_client()
    file_id = _upload(client).json()["id"]
    ids = [_create(client, file_id).json()["id"] for _ in range(3)]
    page = client.get("/v1/batches?limit=2", headers=AUTH).json()
    assert page["object"] == "list" and page["has_more"] is True and len(page["data"]) == 2
    rest = client.get(f"/v1/batches?limit=2&after={page['last_id']}", headers=AUTH).json()
    assert rest["has_more"] is False
    assert sorted(x["id"] for x in page["data"] + rest["data"]) == sorted(ids)


def test_cancel_and_expiry(api_env, tmp_path):
    _, _, make_client = api_env
    client = make_client()
    file_id = _upload(client).json()["id"]
    b = _create(client, file_id).json()
    c = client.post(f"/v1/batches/{b['id']}/cancel", headers=AUTH).json()
    assert c["status"] == "cancelled" and c["cancelled_at"] is not None and c["output_file_id"] is None
    assert client.post(f"/v1/batches/{b['id']}/cancel", headers=AUTH).json()["status"] == "cancelled"
    # a batch past its completion window is stopped and reported expired
    e = _create(client, file_id).json()
    record_path = tmp_path / "store" / "batches" / f"{e['id']}.json"
    record = json.loads(record_path.read_text())
    record["expires_at"] = record["created_at"] - 1
    record_path.write_text(json.dumps(record))
    got = client.get(f"/v1/batches/{e['id']}", headers=AUTH).json()
    assert got["status"] == "expired" and got["expired_at"] is not None
    job = [j for j in client.get("/v1/jobs", headers=AUTH).json()["jobs"] if j["name"] == f"openai-{e['id']}"]
    assert job[0]["state"] == "cancelled"
    r = client.post("/v1/batches/batch_nope/cancel", headers=AUTH)
    assert r.status_code == 404
