"""Hostile requests over HTTP get a 4xx (or a 503 for a service that is down) with a one-line JSON error, never a
500: URLs the allow-list used to read differently from fsspec, outputs inside another job's, insane numbers,
bodies over the limit (refused while read), Redis unreachable."""
from __future__ import annotations

import json

import pytest
from api_support import AUTH, TOKEN, job_spec


def _error(r, status: int) -> str:
    assert r.status_code == status, r.text[:500]
    msg = r.json()["error"]["message"]
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.mark.parametrize("output", [
    "file:out/../../escaped", "file:../escaped", "local://../escaped", "file://../escaped",
    "simplecache::file:///tmp/escaped", "~/escaped", "{data}/out/../../escaped", "{data}/../escaped",
    "{data}-secret/out", "{data}/link-out/x", "{data}/%2e%2e/x/../../../escaped", "//{data}/../escaped",
    "FILE://{data}/out", "memory://{data}/out",
])
def test_outputs_that_resolve_outside_the_allowed_prefixes_are_403(api_env, tmp_path, output, monkeypatch):
    data, models, make_client = api_env
    (data / "link-out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(data)          # relative outputs resolve from the server's working directory
    client = make_client()
    spec = job_spec(data, models, output={"path": output.format(data=data)})
    msg = _error(client.post("/v1/jobs", json=spec, headers=AUTH), 403)
    assert "output.path" in msg
    assert not (tmp_path / "escaped").exists() and not list((tmp_path / "elsewhere").iterdir())


def test_a_relative_output_under_the_prefix_is_stored_absolute(api_env, monkeypatch):
    data, models, make_client = api_env
    monkeypatch.chdir(data)
    client = make_client()
    r = client.post("/v1/jobs", json=job_spec(data, models, output={"path": "file:sub/out"}), headers=AUTH)
    assert r.status_code == 200, r.text
    job = client.get(f"/v1/jobs/{r.json()['id']}", headers=AUTH).json()
    assert job["output_path"] == f"{data}/sub/out"
    assert json.loads((data / "sub" / "out" / "_owner.json").read_text())["job_id"] == r.json()["id"]


def test_an_output_inside_or_around_another_jobs_output_is_refused(api_env):
    data, models, make_client = api_env
    client = make_client()
    first = client.post("/v1/jobs", json=job_spec(data, models, output={"path": str(data / "a" / "out")}),
                        headers=AUTH)
    assert first.status_code == 200, first.text
    for inner in (data / "a" / "out" / "_staging", data / "a" / "out" / "results" / "x", data / "a"):
        spec = job_spec(data, models, name="other", output={"path": str(inner)})
        msg = _error(client.post("/v1/jobs", json=spec, headers=AUTH), 422)
        assert "another job" in msg or first.json()["id"] in msg, msg
    # the first job's directory holds no second owner or stray bookkeeping
    assert json.loads((data / "a" / "out" / "_owner.json").read_text())["job_id"] == first.json()["id"]
    assert not (data / "a" / "_owner.json").exists()


@pytest.mark.parametrize("sampling,field", [
    ({"top_k": 10**20}, "top_k"), ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"), ({"min_new_tokens": 8, "max_new_tokens": 4}, "min_new_tokens"),
    ({"stop": ["x"] * 1000}, "stop"), ({"stop": ["x" * 5000]}, "stop"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": [10**12]}, "stop_token_ids"),
])
def test_insane_numbers_are_one_line_422(api_env, sampling, field):
    data, models, make_client = api_env
    spec = job_spec(data, models, sampling=sampling)
    msg = _error(make_client().post("/v1/jobs", json=spec, headers=AUTH), 422)
    assert field in msg


def test_bodies_over_the_limit_are_413_while_read(api_env, monkeypatch):
    from ziya_batch.api import limits, openai_batch

    data, models, make_client = api_env
    client = make_client()
    big = json.dumps(job_spec(data, models, name="x" * (limits.MAX_BODY_BYTES + 10)))
    msg = _error(client.post("/v1/jobs", content=big, headers={**AUTH, "Content-Type": "application/json"}), 413)
    assert "larger than" in msg

    def chunks():                   # no Content-Length: only counting while reading can stop it
        yield b'{"name": "'
        for _ in range(4):
            yield b"x" * limits.MAX_BODY_BYTES
        yield b'"}'

    r = client.post("/v1/jobs", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert "larger than" in _error(r, 413)

    monkeypatch.setattr(openai_batch, "MAX_UPLOAD_BYTES", 2**20)
    seen = []
    real = openai_batch.Batches.save_upload

    def spy(self, *a, **kw):
        seen.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(openai_batch.Batches, "save_upload", spy)
    r = client.post("/v1/files", headers=AUTH, data={"purpose": "batch"},
                    files={"file": ("in.jsonl", b"x" * (3 * 2**20), "application/jsonl")})
    assert "larger than 1 MiB" in _error(r, 413)
    assert seen == []                # refused before the route ran (the whole body never spooled)


def test_redis_unreachable_is_503_json(api_env, tmp_path):
    from fastapi.testclient import TestClient

    from ziya_batch.api.app import create_app
    from ziya_batch.api.settings import ApiSettings
    from ziya_batch.queue import Broker

    data, models, _ = api_env
    settings = ApiSettings(token=TOKEN, allowed_prefixes=(str(data),), allowed_models=(str(models),),
                           storage_url=str(tmp_path / "store"), model=str(models / "m"))
    app = create_app(settings, lambda: Broker.from_url("redis://127.0.0.1:1/0"))
    client = TestClient(app, raise_server_exceptions=False)
    for method, path, body in (("get", "/v1/jobs", None), ("get", "/v1/jobs/abc", None),
                               ("post", "/v1/jobs", job_spec(data, models)), ("post", "/v1/jobs/abc/cancel", None)):
        r = getattr(client, method)(path, headers=AUTH, **({"json": body} if body else {}))
        assert "Redis" in _error(r, 503), path


def test_a_corrupt_owner_file_is_a_4xx(api_env):
    data, models, make_client = api_env
    (data / "out").mkdir()
    (data / "out" / "_owner.json").write_bytes(b"\xff{not json")
    msg = _error(make_client().post("/v1/jobs", json=job_spec(data, models), headers=AUTH), 400)
    assert "_owner.json" in msg and "corrupt" in msg


def test_an_unwritable_output_is_a_4xx(api_env):
    data, models, make_client = api_env
    spec = job_spec(data, models, output={"path": "/sys/ziya-batch-test/out"})   # sysfs: not even root may
    client = make_client(allowed_prefixes=(str(data), "/sys/ziya-batch-test"))
    assert "cannot be written" in _error(client.post("/v1/jobs", json=spec, headers=AUTH), 422)


@pytest.mark.parametrize("below", ["", "/sub"])
def test_an_output_that_is_a_file_is_a_4xx(api_env, below):
    data, models, make_client = api_env
    (data / "afile").write_text("x")
    spec = job_spec(data, models, output={"path": str(data / "afile") + below})
    assert "is a file" in _error(make_client().post("/v1/jobs", json=spec, headers=AUTH), 400)


def test_a_redis_refusing_writes_is_503_json(api_env, tmp_path):
    import redis.exceptions as rex
    from fastapi.testclient import TestClient

    from ziya_batch.api.app import create_app
    from ziya_batch.api.settings import ApiSettings

    class ReadOnlyBroker:
        def list_jobs(self):
            raise rex.ReadOnlyError("READONLY You can't write against a read only replica.")

    data, models, _ = api_env
    settings = ApiSettings(token=TOKEN, allowed_prefixes=(str(data),), storage_url=str(tmp_path / "store"))
    client = TestClient(create_app(settings, ReadOnlyBroker), raise_server_exceptions=False)
    r = client.get("/v1/jobs", headers=AUTH)
    assert "READONLY" in _error(r, 503) and r.headers["Retry-After"] == "5"


@pytest.mark.parametrize("extra,where", [
    ({"experience": {"reward_function": "exact_match", "reward_weights": {"\ud800": 1.0}}}, "reward_weights"),
    ({"sampling": {"json_schema": {"type": "object", "properties": {"\udc80x": {"type": "string"}}}}}, "properties"),
    ({"name": "x-\ud800"}, "name"),
])
def test_text_that_is_not_utf8_in_a_key_or_value_is_a_422(api_env, extra, where):
    """Lone surrogate escapes (JSON allows them; no storage, Redis key or log line can carry them): a 500 from
    inside pydantic or the spec's identity, or silently stored as U+FFFD, before."""
    data, models, make_client = api_env
    body = json.dumps(job_spec(data, models, **extra))          # ensure_ascii: the escapes travel as \ud800
    r = make_client().post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "application/json"})
    msg = _error(r, 422)
    assert "not UTF-8 text" in msg and where in msg


def test_a_path_too_deep_is_a_422(api_env):
    data, models, make_client = api_env
    spec = job_spec(data, models, output={"path": str(data) + "/a" * 2000})
    msg = _error(make_client().post("/v1/jobs", json=spec, headers=AUTH), 422)
    assert "more than 256 folders deep" in msg
    assert not (data / "a").exists()


def test_a_cancel_whose_manifest_cannot_be_written_says_so(api_env):
    """The job is cancelled; its manifest cannot be written (its output directory became a file): a 400 that says
    both (a 500 before), and cancelling again once the storage is fixed writes the manifest."""
    data, models, make_client = api_env
    client = make_client()
    job_id = client.post("/v1/jobs", json=job_spec(data, models), headers=AUTH).json()["id"]
    out = data / "out"
    moved = data / "out.moved"
    out.rename(moved)
    out.write_text("not a directory")
    msg = _error(client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH), 400)
    assert f"job {job_id} is cancelled, but its manifest could not be written" in msg
    assert client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["state"] == "cancelled"
    out.unlink()
    moved.rename(out)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 200
    assert (out / "manifest.json").exists()


def test_control_characters_in_a_name_do_not_reach_the_operators_terminal(api_env, monkeypatch, capsys):
    from ziya_batch import cli
    from ziya_batch.queue import Broker

    data, models, make_client = api_env
    client = make_client()
    r = client.post("/v1/jobs", json=job_spec(data, models, name="\x1b[2J\x1b[31mRED\x9b0m\x07"), headers=AUTH)
    assert r.status_code == 200, r.text
    broker = client.app.state.brokers.get()
    assert isinstance(broker, Broker)
    monkeypatch.setattr(cli, "_broker", lambda url: broker)
    for argv in (["status"], ["status", r.json()["id"]]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x9b" not in out and "\x07" not in out
        assert "\\x1b[2J\\x1b[31mRED\\x9b0m\\x07" in out.replace("\n", "")


@pytest.mark.parametrize("path, content, ctype", [
    ("/v1/jobs", b"{", "application/json"),
    ("/v1/jobs", b"[" * 100_000, "application/json"),
    ("/v1/batches", b"{", "application/json"),
    ("/v1/files", b"garbage", "multipart/form-data; boundary=xx"),
])
def test_a_request_without_a_token_is_401_before_its_body_is_parsed(api_env, path, content, ctype):
    """Every endpoint but /healthz needs the token: a caller without one gets 401 before anything reads its body
    (the routes' token dependency ran only after FastAPI had parsed it: an anonymous caller heard the parser's
    verdict, and its upload was spooled first)."""
    _, _, make_client = api_env
    client = make_client()
    r = client.post(path, content=content, headers={"Content-Type": ctype})
    assert r.status_code == 401, (r.status_code, r.text[:200])


def test_behind_a_mount_prefix_only_healthz_answers_without_the_token(api_env):
    """The token gate judges the path the routes see: under a prefix (an ASGI server's root_path) /healthz is still
    open, and a path made to look like it under the prefix is not."""
    from fastapi.testclient import TestClient

    _, _, make_client = api_env
    client = TestClient(make_client().app, root_path="/api", raise_server_exceptions=False)
    assert client.get("/api/healthz").status_code == 200
    assert client.get("/api/v1/jobs").status_code == 401
    assert client.get("/api/v1/jobs", headers=AUTH).status_code == 200
    assert client.get("/api/healthz/../v1/jobs").status_code == 401
