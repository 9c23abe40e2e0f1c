"""The jobs API on FastAPI's TestClient with a real private Redis: auth, allow-list, error bodies, metrics."""
from __future__ import annotations

import re

import pytest
from api_support import AUTH, TOKEN, job_spec
from prometheus_client.parser import text_string_to_metric_families

from ziya_batch.api.settings import ApiSettings
from ziya_batch.queue import Broker


def _routes(client) -> list[tuple[str, str]]:
    schema = client.get("/openapi.json", headers=AUTH).json()
    return [(m.upper(), re.sub(r"\{[^}]+\}", "x1", path)) for path, ops in schema["paths"].items() for m in ops]


def test_health_answers_without_a_token(api_env):
    _, _, make_client = api_env
    r = make_client().get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "redis": True}


def test_every_other_endpoint_needs_the_token(api_env):
    _, _, make_client = api_env
    client = make_client()
    # the schema itself and FastAPI's pages too (the schema lists neither of them)
    routes = [r for r in _routes(client) if r[1] != "/healthz"] + [("GET", "/openapi.json")]
    assert len(routes) >= 15
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect", "/no/such/path"):
        # FastAPI's pages do not exist; nothing, known or not, answers without the token
        assert client.get(page).status_code == 401 and client.get(page, headers=AUTH).status_code == 404
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong-token-xxxxxxxx"}, {"Authorization": f"Basic {TOKEN}"}):
            r = client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "ZIYA_BATCH_API_TOKEN" in r.json()["error"]["message"]


def test_insecure_no_auth_serves_without_a_token(api_env):
    _, _, make_client = api_env
    r = make_client(token=None, insecure_no_auth=True).get("/v1/jobs")
    assert r.status_code == 200 and r.json() == {"jobs": []}


def test_submit_list_get_cancel(api_env):
    data, models, make_client = api_env
    client = make_client()
    r = client.post("/v1/jobs", json=job_spec(data, models), headers=AUTH)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    assert r.json()["state"] == "queued"
    again = client.post("/v1/jobs", json=job_spec(data, models), headers=AUTH)
    assert again.json()["id"] == job_id                     # same spec and output: the same job
    listed = client.get("/v1/jobs", headers=AUTH).json()["jobs"]
    assert [j["job_id"] for j in listed] == [job_id]
    st = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert st["prompts_total"] == 2 and st["shards_total"] == 2 and st["state"] == "queued"
    assert {"tokens_per_s", "eta_s", "workers", "prompts_done", "prompts_failed"} <= set(st)
    # the fields of `ziya-batch status JOB --json`, with its note: no worker runs here, so nothing takes the job
    assert set(st) == set(client.app.state.brokers.get().status(job_id, detail=True).to_dict()) | {"note"}
    assert st["note"].startswith("no live worker serves tensor_parallel 1 jobs")
    m = client.get(f"/v1/jobs/{job_id}/manifest", headers=AUTH)
    assert m.status_code == 404 and "no manifest yet" in m.json()["error"]["message"]
    c = client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert c.status_code == 200 and c.json()["state"] in ("cancelling", "cancelled")
    assert client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["state"] == "cancelled"
    # nothing was running: the cancel wrote the manifest of what is committed (nothing), as `ziya-batch cancel` does
    m = client.get(f"/v1/jobs/{job_id}/manifest", headers=AUTH)
    assert m.status_code == 200 and m.json()["summary"]["state"] == "cancelled" and m.json()["parts"] == {}


def test_submit_lists_the_inputs_once(api_env, monkeypatch):
    """The allowed-prefix check and the shard index read one listing of the input globs, not two."""
    from ziya_batch import io

    data, models, make_client = api_env
    (data / "in2.jsonl").write_text('{"id": "c", "prompt": "x"}\n')
    calls = []
    real = io.expand_inputs
    monkeypatch.setattr(io, "expand_inputs", lambda urls: calls.append(list(urls)) or real(urls))
    r = make_client().post("/v1/jobs", json=job_spec(data, models, input=[str(data / "in*.jsonl")]), headers=AUTH)
    assert r.status_code == 200, r.text
    assert calls == [[str(data / "in*.jsonl")]]
    assert make_client().get(f"/v1/jobs/{r.json()['id']}", headers=AUTH).json()["prompts_total"] == 3


def test_unknown_job_is_404(api_env):
    _, _, make_client = api_env
    client = make_client()
    for method, path in (("GET", "/v1/jobs/nope"), ("POST", "/v1/jobs/nope/cancel"), ("GET", "/v1/jobs/nope/manifest")):
        r = client.request(method, path, headers=AUTH)
        assert r.status_code == 404 and "no job nope" in r.json()["error"]["message"]


def test_no_prefixes_refuses_every_job_and_says_how_to_allow(api_env):
    data, models, make_client = api_env
    r = make_client(allowed_prefixes=()).post("/v1/jobs", json=job_spec(data, models), headers=AUTH)
    assert r.status_code == 403
    assert "ZIYA_BATCH_ALLOWED_PREFIXES" in r.json()["error"]["message"]


def _refused(client, spec) -> str:
    r = client.post("/v1/jobs", json=spec, headers=AUTH)
    assert r.status_code == 403, r.text
    return r.json()["error"]["message"]


def test_locations_outside_the_prefixes_are_refused(api_env, tmp_path):
    data, models, make_client = api_env
    client = make_client()
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"prompt": "server secret"}\n')
    (data / "link.jsonl").symlink_to(outside)
    (data / "linkdir").symlink_to(tmp_path)
    evil = tmp_path / (data.name + "-evil")
    evil.mkdir()
    (evil / "x.jsonl").write_text('{"prompt": "x"}\n')
    for inputs in (["/etc/passwd"], [str(data / ".." / "secret.jsonl")], [str(data / "link.jsonl")],
                   [str(data / "linkdir" / "secret.jsonl")], [str(evil / "x.jsonl")], ["~/.ssh/id_rsa"],
                   [f"file://{outside}"], [str(data / "in.jsonl"), "/etc/hostname"],
                   [f"simplecache::file://{data / 'in.jsonl'}"]):
        msg = _refused(client, job_spec(data, models, input=inputs))
        assert "input" in msg and ("outside the allowed prefixes" in msg or "chained" in msg), msg
    msg = _refused(client, job_spec(data, models, output={"path": str(tmp_path / "out")}))
    assert msg.startswith("output.path")
    msg = _refused(client, job_spec(data, models, output={"path": str(data / ".." / "out")}))
    assert msg.startswith("output.path")
    assert not (tmp_path / "out").exists()


def test_a_glob_that_matches_a_link_out_is_refused(api_env, tmp_path):
    data, models, make_client = api_env
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"prompt": "server secret"}\n')
    (data / "z.jsonl").symlink_to(outside)
    msg = _refused(make_client(), job_spec(data, models, input=[str(data / "*.jsonl")]))
    assert "input file" in msg and str(outside) in msg


def test_models_must_be_allowed(api_env, tmp_path):
    data, models, make_client = api_env
    client = make_client()
    msg = _refused(client, job_spec(data, models, model={"path": str(tmp_path / "elsewhere")}))
    assert "model.path" in msg and "ZIYA_BATCH_ALLOWED_MODELS" in msg
    msg = _refused(client, job_spec(data, models, experience={"reward_model": "/root/rm"}))
    assert "experience.reward_model" in msg
    msg = _refused(client, job_spec(data, models, model={"path": str(models / "m"), "trust_remote_code": True}))
    assert "trust_remote_code" in msg
    # the server's own --model is allowed even with no ZIYA_BATCH_ALLOWED_MODELS
    r = make_client(allowed_models=()).post("/v1/jobs", json=job_spec(data, models), headers=AUTH)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,kwargs,status,fragment", [
    (b"{not json", {"headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    (b'{"name": "x"}', {}, 400, "Content-Type: application/json"),
    (b"[1, 2]", {"headers": {"Content-Type": "application/json"}}, 422, "job spec"),
    (None, {"json": {"name": "x"}}, 422, "missing required key 'model'"),
    (None, {"json": "a string"}, 422, "job spec"),
    # what FastAPI's parser gives up on other than by a syntax error: said, not "an error parsing the body"
    (b'{"name": "a\xff"}', {"headers": {"Content-Type": "application/json"}}, 400, "not valid JSON (UnicodeDecodeError"),
    (b"[" * 100_000 + b"]" * 100_000, {"headers": {"Content-Type": "application/json"}}, 400,
     "not valid JSON (nested too deeply)"),
    (b'{"shard_size": ' + b"9" * 5000 + b"}", {"headers": {"Content-Type": "application/json"}}, 400,
     "not valid JSON (ValueError"),
])
def test_malformed_bodies_get_a_4xx_with_one_line(api_env, body, kwargs, status, fragment):
    _, _, make_client = api_env
    headers = {**AUTH, **kwargs.pop("headers", {})}
    r = make_client().post("/v1/jobs", content=body, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    assert fragment in msg and "\n" not in msg


def test_spec_errors_read_like_the_cli(api_env):
    data, models, make_client = api_env
    client = make_client()
    spec = job_spec(data, models, sampling={"top_pp": 0.5, "temperature": -1})
    r = client.post("/v1/jobs", json=spec, headers=AUTH)
    msg = r.json()["error"]["message"]
    assert r.status_code == 422
    assert msg.startswith("job spec: ") and "unknown key 'sampling.top_pp' (did you mean 'top_p'?)" in msg
    assert "'sampling.temperature'" in msg and "body" not in msg


def test_missing_input_is_a_400_naming_it(api_env):
    data, models, make_client = api_env
    r = make_client().post("/v1/jobs", json=job_spec(data, models, input=[str(data / "nope.jsonl")]), headers=AUTH)
    assert r.status_code == 400 and "nope.jsonl" in r.json()["error"]["message"]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_read_the_queue_at_scrape_time(api_env, api_redis_url):
    data, models, make_client = api_env
    client = make_client()
    job_id = client.post("/v1/jobs", json=job_spec(data, models), headers=AUTH).json()["id"]
    broker = client.app.state.brokers.get()
    broker.register_worker("w-gpu", "host-a", {"device": "NVIDIA H100 80GB HBM3", "gpu_ids": ["0", "1"]})
    broker.register_worker("w-cpu", "host-b", {"device": "cpu"})
    lease = broker.claim("w-gpu")
    assert lease is not None
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)
    job = (("job_id", job_id), ("name", "api-test"))
    assert m[("ziya_batch_redis_up", ())] == 1
    assert m[("ziya_batch_job_prompts", job)] == 2
    assert m[("ziya_batch_job_prompts_done_total", job)] == 0
    assert m[("ziya_batch_job_state", job + (("state", "running"),))] == 1
    assert m[("ziya_batch_job_state", job + (("state", "queued"),))] == 0
    assert m[("ziya_batch_queue_depth", ())] == 1
    assert m[("ziya_batch_leased_shards", ())] == 1
    assert m[("ziya_batch_workers", ())] == 2
    assert m[("ziya_batch_worker_gpus", ())] == 2
    assert m[("ziya_batch_worker_info", (("device", "NVIDIA H100 80GB HBM3"), ("host", "host-a"), ("worker_id", "w-gpu")))] == 1
    assert ("ziya_batch_job_tokens_per_second", job) in m and ("ziya_batch_job_retries_total", job) in m
    assert ("ziya_batch_job_dead_letter_shards", job) in m
    assert m[("ziya_batch_job_lease_expiries_total", job)] == 0 and m[("ziya_batch_lease_expiries_total", ())] == 0
    # a second scrape sees the change: nothing is cached in the API process
    broker.unregister_worker("w-cpu")
    assert _samples(client.get("/metrics", headers=AUTH).text)[("ziya_batch_workers", ())] == 1


def test_metrics_report_redis_down(tmp_path):
    from fastapi.testclient import TestClient

    from ziya_batch.api.app import create_app

    app = create_app(ApiSettings(token=TOKEN, storage_url=str(tmp_path)), lambda: Broker.from_url("redis://127.0.0.1:1/0"))
    r = TestClient(app).get("/metrics", headers=AUTH)
    assert r.status_code == 200 and _samples(r.text)[("ziya_batch_redis_up", ())] == 0
