"""An output location whose storage cannot be reached is one line at submit (InputError: exit 2 on the CLI, 400
over HTTP), as an input's is, never a storage backend's traceback (which was a 500 over HTTP)."""
from __future__ import annotations

import pytest

from ziya_batch.errors import InputError, ServiceError
from ziya_batch.jobs import submit_job
from ziya_batch.jobs.submit import open_output
from ziya_batch.spec import parse_spec


@pytest.mark.parametrize("url,why", [
    ("s3://bad bucket/out", ""),                                   # a name the store rejects (or no credentials)
    ("s3://no-such-bucket-zb/out", ""),
    ("/tmp/a\x00b", "embedded null byte"),
])
def test_an_unreachable_output_is_one_line(tmp_path, monkeypatch, url, why):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")      # no wait on an instance-metadata endpoint
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "q"}\n')
    spec = parse_spec({"name": "t", "model": {"path": str(tmp_path)}, "input": [str(tmp_path / "in.jsonl")],
                       "output": {"path": url}})
    for attempt in (lambda: open_output(spec), lambda: submit_job(spec, broker=None)):
        with pytest.raises(InputError, match=f"output.path .* not usable \\(.*{why}.*check the URL") as e:
            attempt()
        assert "\n" not in str(e.value)


def test_storage_that_does_not_answer_is_the_services_state(tmp_path):
    """Nothing listening where the output is: exit 3 / HTTP 503 (try again), not a wrong location."""
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "q"}\n')
    spec = parse_spec({"name": "t", "model": {"path": str(tmp_path)}, "input": [str(tmp_path / "in.jsonl")],
                       "output": {"path": "http://127.0.0.1:1/out"}})
    with pytest.raises(ServiceError, match="its storage does not answer \\(ClientConnectorError") as e:
        open_output(spec)
    assert "\n" not in str(e.value)


def test_a_report_of_storage_that_cannot_be_reached_is_one_line(tmp_path, monkeypatch):
    """`ziya-batch report URL`: the same one line as submit (it printed the backend's traceback, exit 1)."""
    from ziya_batch.report import report_main

    monkeypatch.setenv("ZIYA_BATCH_REDIS_URL", "redis://127.0.0.1:1/0")    # no Redis: the URL alone serves
    with pytest.raises(ServiceError, match="output http://127.0.0.1:1/x: its storage does not answer") as e:
        report_main("http://127.0.0.1:1/x", tmp_path / "r.html")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="output /tmp/a\x00b not usable") as e:
        report_main("/tmp/a\x00b", tmp_path / "r.html")
