"""The API's settings and its answers when Redis is down, and serve's refusals to start: nothing here
needs a server (the rest of the API runs against a real Redis in tests/redis/test_api*.py)."""
from __future__ import annotations

import pytest

from ziya_batch.api.settings import ApiSettings
from ziya_batch.errors import ServiceError
from ziya_batch.queue import Broker

TOKEN = "test-token-0123456789"


def test_health_reports_redis_down_as_503(tmp_path):
    from fastapi.testclient import TestClient

    from ziya_batch.api.app import create_app

    app = create_app(ApiSettings(token=TOKEN, storage_url=str(tmp_path)),
                     lambda: Broker.from_url("redis://127.0.0.1:1/0"))
    r = TestClient(app).get("/healthz")
    assert r.status_code == 503 and r.json()["redis"] is False


def test_settings_refuse_to_start_without_a_token(monkeypatch):
    monkeypatch.delenv("ZIYA_BATCH_API_TOKEN", raising=False)
    with pytest.raises(ServiceError, match="--insecure-no-auth"):
        ApiSettings.from_env()
    monkeypatch.setenv("ZIYA_BATCH_API_TOKEN", "short")
    with pytest.raises(ServiceError, match="too short"):
        ApiSettings.from_env()
    # HTTP reads header values as latin-1 bytes: these could never be matched
    for token in ("pässwörd-long-enough", " leading-space-token", "trailing-space-token ", "tab\tseparated-token"):
        monkeypatch.setenv("ZIYA_BATCH_API_TOKEN", token)
        with pytest.raises(ServiceError, match="printable ASCII with no space at either end"):
            ApiSettings.from_env()
    monkeypatch.setenv("ZIYA_BATCH_API_TOKEN", "correct horse battery staple")     # matched as sent: kept
    assert ApiSettings.from_env().token == "correct horse battery staple"
    monkeypatch.delenv("ZIYA_BATCH_API_TOKEN")
    assert ApiSettings.from_env(insecure_no_auth=True).insecure_no_auth


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ZIYA_BATCH_API_TOKEN", TOKEN)
    monkeypatch.setenv("ZIYA_BATCH_ALLOWED_PREFIXES", " /data/a/ , s3://b/runs/,,")
    monkeypatch.setenv("ZIYA_BATCH_ALLOWED_MODELS", "/models/")
    monkeypatch.setenv("ZIYA_BATCH_MODEL", "/models/ziya")
    monkeypatch.setenv("ZIYA_BATCH_HOME", str(tmp_path))
    s = ApiSettings.from_env()
    assert s.allowed_prefixes == ("/data/a/", "s3://b/runs/")
    assert s.allowed_models == ("/models/",) and s.model == "/models/ziya" and s.model_name() == "ziya"
    assert s.storage_url == str(tmp_path / "files")
    assert ApiSettings.from_env(model="/m2", storage="s3://x/files").storage_url == "s3://x/files"


def test_worker_gpus_from_what_workers_register():
    from ziya_batch.api.metrics import worker_gpus

    assert worker_gpus({"info": {"device": "cpu", "pid": 1}}) == 0
    assert worker_gpus({"info": {"device": "NVIDIA H100 80GB HBM3"}}) == 1
    assert worker_gpus({"info": {"device": "NVIDIA H100", "gpu_ids": ["0", "1", "2"]}}) == 3
    assert worker_gpus({"info": {"gpus": 4}}) == 4


def test_serve_main_refuses_to_start_without_token_or_redis(monkeypatch):
    from ziya_batch.api.serve import serve_main

    monkeypatch.delenv("ZIYA_BATCH_API_TOKEN", raising=False)
    with pytest.raises(ServiceError, match="--insecure-no-auth"):
        serve_main(port=0)
    monkeypatch.setenv("ZIYA_BATCH_API_TOKEN", TOKEN)
    # (without a URL it would start the home's private redis-server: tests/ray/test_one_machine.py runs that)
    with pytest.raises(ServiceError, match=r"cannot reach Redis at redis://:\*\*\*@127.0.0.1:1/0"):
        serve_main(port=0, redis_url="redis://:pw@127.0.0.1:1/0")


def test_serve_main_names_a_busy_port(monkeypatch):
    import socket

    from ziya_batch.api.serve import serve_main

    monkeypatch.setenv("ZIYA_BATCH_API_TOKEN", TOKEN)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))         # bound is busy enough; listening is refused in unit tests (conftest)
        with pytest.raises(ServiceError, match="--port"):
            serve_main(host="127.0.0.1", port=busy.getsockname()[1])



def test_serve_main_refuses_a_model_that_its_own_replicas_cannot_find(monkeypatch, tmp_path):
    """`serve --model DIR` with DIR missing started, accepted every OpenAI batch, and left each in_progress while
    its replicas failed to load the model; now it stops at once, before it starts Redis or Ray."""
    from ziya_batch.api.serve import serve_main
    from ziya_batch.errors import ModelError

    monkeypatch.setenv("ZIYA_BATCH_API_TOKEN", TOKEN)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ModelError, match="--model .*missing is not a directory"):
        serve_main(port=0, model=str(tmp_path / "missing"), redis_url="redis://:pw@127.0.0.1:1/0")
    monkeypatch.setenv("ZIYA_BATCH_MODEL", str(tmp_path / "missing"))
    with pytest.raises(ModelError):
        serve_main(port=0, redis_url="redis://:pw@127.0.0.1:1/0")
    # no replicas here (a front door, or a cluster's workers): their hosts read the model, so it is not judged here
    with pytest.raises(ServiceError, match="cannot reach Redis"):
        serve_main(port=0, redis_url="redis://:pw@127.0.0.1:1/0", workers=False)
