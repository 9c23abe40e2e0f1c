"""What the HTTP API says of a request body that is not a JSON object: empty, sent under another media type, or a
JSON value of another kind. Each is one line naming what to send, before any broker is asked."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOKEN = "body-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _no_broker():
    raise AssertionError("a body the API refuses must not reach the broker")


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from ziya_batch.api.app import create_app
    from ziya_batch.api.settings import ApiSettings
    return TestClient(create_app(ApiSettings(token=TOKEN, allowed_prefixes=("/nowhere",), storage_url="/nowhere"),
                                 _no_broker), raise_server_exceptions=False)


def _error(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == status and "\n" not in body["message"]
    return body["message"]


@pytest.mark.parametrize("path,what", [("/v1/jobs", "job spec"), ("/v1/batches", "request")])
@pytest.mark.parametrize("ctype", [None, "application/json", "text/plain"])
def test_an_empty_body_says_it_is_empty(client, path, what, ctype):
    headers = {**AUTH, **({"Content-Type": ctype} if ctype else {})}
    msg = _error(client.post(path, headers=headers, content=b""), 400)
    assert msg.startswith("request body is empty") and f"send the {what} as a JSON object" in msg


@pytest.mark.parametrize("ctype", ["application/jsonx", "text/json", "application/x-json", "json", "application/xml",
                                   "multipart/form-data; boundary=x"])
def test_a_media_type_fastapi_does_not_parse_as_json_is_named(client, ctype):
    msg = _error(client.post("/v1/jobs", headers={**AUTH, "Content-Type": ctype}, content=b"{}"), 400)
    assert "Content-Type: application/json" in msg


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                                   "application/vnd.ziya+json"])
def test_json_media_types_reach_the_spec_check(client, ctype):
    # parsed as JSON: the empty object is then a spec without its keys (not a media-type complaint)
    msg = _error(client.post("/v1/jobs", headers={**AUTH, "Content-Type": ctype}, content=b"{}"), 422)
    assert msg.startswith("job spec:") and "Content-Type" not in msg


_KINDS = [(st.none(), "null"), (st.booleans(), "a boolean"), (st.integers(), "a number"),
          (st.floats(allow_nan=False, allow_infinity=False), "a number"), (st.text(max_size=20), "a string"),
          (st.lists(st.integers(), max_size=5), "an array")]


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(*(values.map(lambda v, kind=kind: (v, kind)) for values, kind in _KINDS)))
def test_a_json_value_other_than_an_object_is_named(client, case):
    value, kind = case
    r = client.post("/v1/jobs", headers={**AUTH, "Content-Type": "application/json"}, content=json.dumps(value))
    assert _error(r, 422) == f"job spec: the request body must be a JSON object, not {kind}"
