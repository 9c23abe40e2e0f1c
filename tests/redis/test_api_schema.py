"""Property-based run over the API's OpenAPI schema (schemathesis): no generated request, valid or not,
gets a server error. Runs against the FastAPI app in-process (ASGI), with a real private Redis."""
from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import schemathesis
from api_support import AUTH, TOKEN
from hypothesis import HealthCheck, settings

from ziya_batch.api.app import create_app
from ziya_batch.api.settings import ApiSettings
from ziya_batch.queue import Broker


# The schema is loaded at import (schemathesis parametrizes at collection), so the app is built here;
# its broker is made on the first request, from the URL the fixture below provides.
_ROOT = Path(tempfile.mkdtemp(prefix="zb-schema-"))
atexit.register(shutil.rmtree, _ROOT, True)        # also when the module is only collected
(_ROOT / "data").mkdir()
(_ROOT / "data" / "in.jsonl").write_text('{"id": "a", "prompt": "hello"}\n')
_REDIS: dict[str, str] = {}
_PREFIX = f"s{uuid.uuid4().hex[:8]}"
api_app = create_app(
    ApiSettings(token=TOKEN, allowed_prefixes=(str(_ROOT / "data"),), allowed_models=(str(_ROOT / "models"),),
                model=str(_ROOT / "models" / "m"), storage_url=str(_ROOT / "store")),
    lambda: Broker.from_url(_REDIS["url"], prefix=_PREFIX))
schema = schemathesis.openapi.from_asgi("/openapi.json", api_app, headers=AUTH)


@pytest.fixture(scope="module", autouse=True)
def _redis_for_app(api_redis_url):
    _REDIS["url"] = api_redis_url


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error(case):
    response = case.call(headers=AUTH)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert body["error"]["message"] and "\n" not in body["error"]["message"], body


def test_schema_names_every_endpoint():
    from fastapi.testclient import TestClient

    assert TestClient(api_app).get("/openapi.json").status_code == 401       # the schema is behind the token too
    paths = TestClient(api_app).get("/openapi.json", headers=AUTH).json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/manifest", "/healthz",
            "/metrics", "/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/batches",
            "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel"} <= set(paths)
    assert "JobSpec" in str(paths["/v1/jobs"]["post"]["requestBody"])


# The same app over a Redis that cannot be reached: the queue's absence is a 503 JSON error, never a 500.
_DOWN_ROOT = Path(tempfile.mkdtemp(prefix="zb-schema-down-"))
atexit.register(shutil.rmtree, _DOWN_ROOT, True)
(_DOWN_ROOT / "data").mkdir()
down_app = create_app(
    ApiSettings(token=TOKEN, allowed_prefixes=(str(_DOWN_ROOT / "data"),), allowed_models=(str(_DOWN_ROOT / "m"),),
                model=str(_DOWN_ROOT / "m"), storage_url=str(_DOWN_ROOT / "store")),
    lambda: Broker.from_url("redis://127.0.0.1:1/0"))
down_schema = schemathesis.openapi.from_asgi("/openapi.json", down_app, headers=AUTH)


@down_schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_redis_down_is_never_a_server_error(case):
    response = case.call(headers=AUTH)
    assert response.status_code < 500 or response.status_code == 503, (case.method, case.path, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        error = body["error"]            # /healthz says {"status": "degraded", "error": "..."}
        message = error["message"] if isinstance(error, dict) else error
        assert message and "\n" not in message, body
