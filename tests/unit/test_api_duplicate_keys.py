"""POST /v1/jobs refuses a JSON body that gives a key twice (FastAPI would keep the last one silently), with one
422 line naming the key, as `ziya-batch submit` refuses it in a YAML or JSON file."""
import pytest
from fastapi.testclient import TestClient

from ziya_batch.api.app import create_app
from ziya_batch.api.settings import ApiSettings

TOKEN = "t" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def _no_broker():
    raise AssertionError("a refused body must never reach the queue")


@pytest.fixture
def client(tmp_path):
    return TestClient(create_app(ApiSettings(token=TOKEN, allowed_prefixes=(str(tmp_path / "allowed"),)), _no_broker))


def _spec(name: str = '"a"', sampling: str = '{"top_p": 0.5}') -> str:
    return ('{"name": %s, "model": {"path": "/m"}, "input": ["/elsewhere/in.jsonl"], "output": {"path": "/o"}, '
            '"sampling": %s}' % (name, sampling))


@pytest.mark.parametrize("body,key", [
    ('{"name": "a", "name": "b", "model": {"path": "/m"}, "input": ["/i"], "output": {"path": "/o"}}', "name"),
    (_spec(sampling='{"top_p": 0.5, "top_p": 0.9}'), "top_p"),                        # nested
    (_spec()[:-1] + ', "sampling": {"n": 2}}', "sampling"),                         # a second block
    (_spec(name='"a", "name\\nx": 1, "name\\nx": 2'), "name x"),                     # shown on one line
])
def test_a_key_given_twice_is_one_422_line_naming_it(client, body, key):
    r = client.post("/v1/jobs", content=body.encode(), headers=AUTH)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert message == f"job spec: duplicate key '{key}': give each key once"


def test_the_token_is_checked_before_the_body(client):
    r = client.post("/v1/jobs", content=b'{"name": "a", "name": "b"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 401


def test_bodies_without_duplicates_go_on_as_before(client):
    # `path` in both model and output is no duplicate: the spec is judged further on (here: its input is not allowed)
    r = client.post("/v1/jobs", content=_spec().encode(), headers=AUTH)
    assert r.status_code == 403 and "outside the allowed prefixes" in r.json()["error"]["message"], r.text
    r = client.post("/v1/jobs", content=b'{"name": "a", "name": ', headers=AUTH)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/jobs", content=b'{"name": "a", "name": "b"}', headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
