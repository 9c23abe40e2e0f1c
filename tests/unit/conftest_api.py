"""Fixtures for the API tests (imported explicitly by test_api*.py): a private redis-server for the
session, a fresh key prefix per test (no flushing: the server is ours alone anyway), and an app factory."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ziya_batch.api.app import create_app
from ziya_batch.api.settings import ApiSettings
from ziya_batch.queue import Broker, PrivateRedis

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def api_redis_url(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (`make redis-server` installs it from Debian's packages)")
    server = PrivateRedis(tmp_path_factory.mktemp("api-redis"))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture()
def api_env(tmp_path: Path, api_redis_url: str):
    """(data dir, model dir, make_client); make_client(**settings overrides) -> TestClient."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jsonl").write_text('{"id": "a", "prompt": "hello"}\n{"id": "b", "prompt": "你好"}\n')
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    prefix = f"t{uuid.uuid4().hex[:8]}"

    def make_client(**overrides) -> TestClient:
        kw = dict(token=TOKEN, allowed_prefixes=(str(data),), allowed_models=(str(models),),
                  storage_url=str(tmp_path / "store"), model=str(models / "m"))
        kw.update(overrides)
        app = create_app(ApiSettings(**kw), lambda: Broker.from_url(api_redis_url, prefix=prefix))
        return TestClient(app, raise_server_exceptions=False)

    return data, models, make_client


def job_spec(data: Path, models: Path, **extra) -> dict:
    spec = {"name": "api-test", "model": {"path": str(models / "m")}, "input": [str(data / "in.jsonl")],
            "sampling": {"max_new_tokens": 4}, "output": {"path": str(data / "out")}, "shard_size": 1}
    spec.update(extra)
    return spec
