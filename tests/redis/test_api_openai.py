"""The OpenAI Batch subset on the TestClient with a real private Redis and no worker: files, batch
creation, listing and paging, cancel and expiry. (The round trip with a worker and the official client
is tests/ray/test_api_e2e.py.)"""
from __future__ import annotations

import json
import time

from api_support import AUTH

LINES = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
          "body": {"model": "m", "prompt": f"hello {i}", "max_tokens": 2}} for i in range(3)]
DATA = ("\n".join(json.dumps(x) for x in LINES) + "\n").encode()


def _upload(client, data: bytes = DATA, purpose: str = "batch", name: str = "in.jsonl"):
    return client.post("/v1/files", files={"file": (name, data, "application/jsonl")}, data={"purpose": purpose},
                       headers=AUTH)


def _create(client, file_id: str, **extra):
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h", **extra}
    return client.post("/v1/batches", json=body, headers=AUTH)


def _settled(client, batch_id: str, timeout_s: float = 30.0) -> dict:
    """The batch once its background validation is over."""
    deadline = time.monotonic() + timeout_s
    while True:
        b = client.get(f"/v1/batches/{batch_id}", headers=AUTH).json()
        if b["status"] != "validating":
            return b
        assert time.monotonic() < deadline, b
        time.sleep(0.05)


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
    assert r.json()["status"] == "validating"
    b = _settled(client, r.json()["id"])
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
    # metadata within OpenAI's bounds (16 pairs, keys of 64 characters, values of 512), as anyone could fill the
    # store with what every read of the batch returns
    for metadata in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        r = _create(client, file_id, metadata=metadata)
        assert r.status_code == 422 and "metadata" in r.json()["error"]["message"], r.text[:200]
    r = _create(client, file_id, metadata={**{f"k{i}": "v" for i in range(15)}, "k" * 64: "v" * 512})
    assert r.status_code == 200, r.text[:200]


def test_an_empty_file_makes_an_empty_completed_batch(api_env):
    _, _, make_client = api_env
    client = make_client()
    file_id = _upload(client, data=b"").json()["id"]
    b = _settled(client, _create(client, file_id).json()["id"])
    assert b["status"] == "completed", b
    assert b["request_counts"] == {"total": 0, "completed": 0, "failed": 0}


def test_list_pages_newest_first(api_env):
    _, _, make_client = api_env
    client = make_client()
    file_id = _upload(client).json()["id"]
    ids = [_settled(client, _create(client, file_id).json()["id"])["id"] for _ in range(3)]
    page = client.get("/v1/batches?limit=2", headers=AUTH).json()
    assert page["object"] == "list" and page["has_more"] is True and len(page["data"]) == 2
    rest = client.get(f"/v1/batches?limit=2&after={page['last_id']}", headers=AUTH).json()
    assert rest["has_more"] is False
    assert sorted(x["id"] for x in page["data"] + rest["data"]) == sorted(ids)


def test_cancel_and_expiry(api_env, tmp_path):
    _, _, make_client = api_env
    client = make_client()
    file_id = _upload(client).json()["id"]
    b = _settled(client, _create(client, file_id).json()["id"])
    c = client.post(f"/v1/batches/{b['id']}/cancel", headers=AUTH).json()
    assert c["status"] == "cancelled" and c["cancelled_at"] is not None and c["output_file_id"] is None
    # every request is in one of the two files: those not run in the error file, as OpenAI writes them
    lines = [json.loads(x) for x in client.get(f"/v1/files/{c['error_file_id']}/content", headers=AUTH).text.splitlines()]
    assert [(x["custom_id"], x["error"]["code"], x["error"]["line"]) for x in lines] == \
        [(f"r{i}", "batch_cancelled", i + 1) for i in range(3)]
    assert client.post(f"/v1/batches/{b['id']}/cancel", headers=AUTH).json()["status"] == "cancelled"
    # a batch past its completion window is stopped and reported expired
    e = _settled(client, _create(client, file_id).json()["id"])
    record_path = tmp_path / "store" / "batches" / f"{e['id']}.json"
    record = json.loads(record_path.read_text())
    record["expires_at"] = record["created_at"] - 1
    record_path.write_text(json.dumps(record))
    got = client.get(f"/v1/batches/{e['id']}", headers=AUTH).json()
    assert got["status"] == "expired" and got["expired_at"] is not None
    lines = client.get(f"/v1/files/{got['error_file_id']}/content", headers=AUTH).text.splitlines()
    assert sorted((json.loads(x)["custom_id"], json.loads(x)["error"]["code"]) for x in lines) == \
        [(f"r{i}", "batch_expired") for i in range(3)]
    job = [j for j in client.get("/v1/jobs", headers=AUTH).json()["jobs"] if j["name"] == f"openai-{e['id']}"]
    assert job[0]["state"] == "cancelled"
    r = client.post("/v1/batches/batch_nope/cancel", headers=AUTH)
    assert r.status_code == 404


def test_cancel_while_validating_and_a_lost_validation(api_env, tmp_path):
    _, _, make_client = api_env
    client = make_client()
    batches = client.app.state.batches
    file_id = _upload(client).json()["id"]
    settled = _settled(client, _create(client, file_id).json()["id"])
    # a record as create() leaves it before its submitter has run
    record = json.loads((tmp_path / "store" / "batches" / f"{settled['id']}.json").read_text())
    record.update(id="batch_" + "a" * 24, status="validating", _job_id=None, in_progress_at=None,
                  _output=record["_output"].replace(settled["id"], "batch_" + "a" * 24))
    batches._save(dict(record))
    c = client.post(f"/v1/batches/{record['id']}/cancel", headers=AUTH).json()
    assert c["status"] == "cancelling" and c["cancelling_at"] is not None
    batches._submit(dict(record))                        # the submitter finishes and sees the cancel
    final = client.get(f"/v1/batches/{record['id']}", headers=AUTH).json()
    assert final["status"] == "cancelled"
    # a validation whose thread died with the server ends as failed, not validating forever
    record.update(id="batch_" + "b" * 24, created_at=record["created_at"] - 7200, status="validating")
    batches._save(dict(record))
    lost = client.get(f"/v1/batches/{record['id']}", headers=AUTH).json()
    assert lost["status"] == "failed" and lost["errors"]["data"][0]["code"] == "validation_interrupted"


def test_a_batch_whose_job_redis_lost_is_resubmitted(api_env):
    _, _, make_client = api_env
    client = make_client()
    file_id = _upload(client).json()["id"]
    b = _settled(client, _create(client, file_id).json()["id"])
    broker = client.app.state.brokers.get()
    job_id = broker.list_jobs()[0].job_id
    broker.delete_job(job_id)
    assert broker.find_job(job_id) is None
    again = client.get(f"/v1/batches/{b['id']}", headers=AUTH).json()
    assert again["status"] == "in_progress" and again["request_counts"]["total"] == 3
    assert broker.find_job(job_id) is not None                 # the same job id: same spec, same output


def test_an_upload_over_the_limit_is_a_413_and_leaves_nothing(api_env, tmp_path, monkeypatch):
    from ziya_batch.api import openai_batch

    _, _, make_client = api_env
    client = make_client()
    monkeypatch.setattr(openai_batch, "MAX_UPLOAD_BYTES", 3 * 2**20)
    r = _upload(client, data=b"x" * (3 * 2**20 + 1))
    assert r.status_code == 413 and "larger than 3 MiB" in r.json()["error"]["message"]
    assert client.get("/v1/files", headers=AUTH).json()["data"] == []
    assert list((tmp_path / "store" / "files").iterdir()) == []
    assert _upload(client, data=b"y" * (3 * 2**20)).status_code == 200


def test_cancel_right_after_create_always_ends_cancelled(api_env):
    _, _, make_client = api_env
    client = make_client()
    file_id = _upload(client).json()["id"]
    for _ in range(8):
        batch_id = _create(client, file_id).json()["id"]
        assert client.post(f"/v1/batches/{batch_id}/cancel", headers=AUTH).json()["status"] in ("cancelling", "cancelled")
        deadline = time.monotonic() + 30
        while (b := client.get(f"/v1/batches/{batch_id}", headers=AUTH).json())["status"] in ("validating", "cancelling"):
            assert time.monotonic() < deadline, b
            time.sleep(0.02)
        assert b["status"] == "cancelled", b


def test_the_file_store_opens_its_filesystem_once(api_env, monkeypatch):
    """Every upload, read and listing goes through one (filesystem, root) opened at the store's first use."""
    from ziya_batch import io

    opened = []
    real = io.open_output_fs
    monkeypatch.setattr(io, "open_output_fs", lambda url: opened.append(url) or real(url))
    _, _, make_client = api_env
    client = make_client()
    f = _upload(client).json()
    assert client.get(f"/v1/files/{f['id']}/content", headers=AUTH).content == DATA
    assert [x["id"] for x in client.get("/v1/files", headers=AUTH).json()["data"]] == [f["id"]]
    assert client.get(f"/v1/files/{f['id']}", headers=AUTH).json() == f
    assert len(opened) == 1


def _line(cid, **extra):
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}, **extra}


def test_an_input_openai_would_refuse_fails_the_batch_naming_each_line(api_env):
    """Before anything runs, as OpenAI's validation does: results are matched to requests by custom_id, so one
    that is missing, not a string or given twice would lose a request's result (a missing one also became the
    server's storage path in the output); a line for another endpoint or method; not JSON."""
    _, _, make_client = api_env
    client = make_client()
    rows = [json.dumps(_line("a")), json.dumps(_line("a")), json.dumps({"method": "POST", "body": {"prompt": "x"}}),
            json.dumps(_line(123)), json.dumps(_line("b", url="/v1/embeddings")),
            json.dumps(_line("c", method="GET")), "{not json", "", json.dumps(["x"]), json.dumps(_line("x" * 513)),
            json.dumps(_line("ok"))]
    file_id = _upload(client, ("\n".join(rows) + "\n").encode()).json()["id"]
    b = _settled(client, _create(client, file_id).json()["id"])
    assert b["status"] == "failed" and b["output_file_id"] is None
    got = [(e["code"], e["line"], e["param"]) for e in b["errors"]["data"]]
    assert got == [("duplicate_custom_id", 2, "custom_id"), ("missing_required_parameter", 3, "custom_id"),
                   ("missing_required_parameter", 3, "url"), ("invalid_custom_id", 4, "custom_id"),
                   ("mismatched_url", 5, "url"), ("invalid_method", 6, "method"), ("invalid_json_line", 7, None),
                   ("invalid_json_line", 9, None), ("invalid_custom_id", 10, "custom_id")]
    assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == []          # nothing was queued


def test_a_request_without_a_url_fails_the_batch(api_env):
    """OpenAI requires each request's url. Without one the job's reader sent a request where its body pointed: a
    chat batch's line with a completion body (prompt, no messages) passed validation and was answered as a
    text_completion. Now such a line fails the batch, naming the line and the parameter."""
    _, _, make_client = api_env
    client = make_client()
    chat = {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}]}}
    rows = [chat, {"custom_id": "no-url", "method": "POST", "body": {"prompt": "hi"}},
            {"custom_id": "null-url", "url": None, "body": {"messages": [{"role": "user", "content": "hi"}]}}]
    file_id = _upload(client, ("\n".join(json.dumps(r) for r in rows) + "\n").encode()).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    b = _settled(client, client.post("/v1/batches", json=body, headers=AUTH).json()["id"])
    assert b["status"] == "failed" and b["output_file_id"] is None, b
    assert [(e["code"], e["line"], e["param"]) for e in b["errors"]["data"]] == [
        ("missing_required_parameter", 2, "url"), ("mismatched_url", 3, "url")]
    assert "/v1/chat/completions" in b["errors"]["data"][0]["message"]
    assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == []          # nothing was queued


def test_a_custom_id_that_is_no_unicode_text_fails_the_batch(api_env):
    """A custom_id holding a lone surrogate escape passed validation; the job refused the line (no writer can echo
    it) and named its error line by its place: the server's storage path of the input became the custom_id the
    client saw, matching no request."""
    _, _, make_client = api_env
    client = make_client()
    data = (b'{"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}\n'
            b'{"custom_id": "x\\ud800", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}\n'
            b'{"custom_id": "\\udfff", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}\n'
            b'{"custom_id": "\\ud83d\\ude00", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}\n')
    b = _settled(client, _create(client, _upload(client, data).json()["id"]).json()["id"])
    assert b["status"] == "failed", b
    assert [(e["code"], e["line"], e["param"]) for e in b["errors"]["data"]] == [
        ("invalid_custom_id", 2, "custom_id"), ("invalid_custom_id", 3, "custom_id")]   # a surrogate pair is text


def test_too_many_requests_fail_the_batch(api_env, monkeypatch):
    from ziya_batch.api import openai_batch

    monkeypatch.setattr(openai_batch, "MAX_BATCH_REQUESTS", 2)
    _, _, make_client = api_env
    client = make_client()
    b = _settled(client, _create(client, _upload(client).json()["id"]).json()["id"])
    assert b["status"] == "failed" and b["errors"]["data"][0]["code"] == "too_many_requests"


def test_a_bom_and_blank_lines_are_read_as_the_job_reads_them(api_env):
    """A UTF-8 BOM at the start of the file, then a blank line: not a bad line (the job's reader skips both)."""
    _, _, make_client = api_env
    client = make_client()
    data = b"\xef\xbb\xbf\r\n" + DATA.replace(b"\n", b"\r\n\n")
    b = _settled(client, _create(client, _upload(client, data).json()["id"]).json()["id"])
    assert b["status"] == "in_progress" and b["errors"] is None and b["request_counts"]["total"] == 3


def test_a_cancel_while_validating_is_not_overwritten_when_validation_fails(api_env, tmp_path):
    """POST /v1/batches/{id}/cancel answered 'cancelling' with a cancelling_at while the batch validated; the
    submitting thread, finding the input invalid, saved its own copy of the record (taken before the cancel,
    without the record lock), and the cancel was lost: cancelling_at back to null, the batch failed. Now the
    batch ends cancelled, the cancel's stamp and the validation's errors both kept."""
    _, _, make_client = api_env
    client = make_client()
    batches = client.app.state.batches
    file_id = _upload(client, b'{"custom_id": 1}\n').json()["id"]       # an input validation refuses
    settled = _settled(client, _create(client, file_id).json()["id"])
    # the record as create() hands it to its submitting thread, before validation
    record = json.loads((tmp_path / "store" / "batches" / f"{settled['id']}.json").read_text())
    new_id = "batch_" + "e" * 24
    record.update(id=new_id, status="validating", _job_id=None, in_progress_at=None, failed_at=None, errors=None,
                  _output=record["_output"].replace(settled["id"], new_id))
    batches._save(dict(record))
    c = client.post(f"/v1/batches/{new_id}/cancel", headers=AUTH).json()
    assert c["status"] == "cancelling" and c["cancelling_at"] is not None
    batches._submit(dict(record))                      # the submitter's copy predates the cancel
    final = client.get(f"/v1/batches/{new_id}", headers=AUTH).json()
    assert final["cancelling_at"] == c["cancelling_at"], final
    assert final["status"] == "cancelled" and final["cancelled_at"] >= c["cancelling_at"] and final["failed_at"] is None
    assert final["errors"]["data"] and final["errors"]["data"][0]["line"] == 1
    # a submitter that finds the batch already ended (or queued) leaves it as it is
    batches._submit(dict(record))
    assert client.get(f"/v1/batches/{new_id}", headers=AUTH).json() == final
