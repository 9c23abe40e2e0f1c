"""The storage layer against S3: moto's server in a thread on 127.0.0.1 (no network, no AWS account). s3fs
talks to S3 through aiobotocore, which moto's in-process mock does not intercept, so a real endpoint it
is. Every test here is marked `s3` (`pytest -m "not s3"` leaves them out)."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from ziya_batch.queue.server import free_port

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # the hook sees every collected item, not only this directory's
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.s3)


@pytest.fixture(scope="session")
def moto_endpoint():
    """The URL of a moto S3 server for the session."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def bucket(moto_endpoint, monkeypatch):
    """A fresh bucket; the endpoint reaches s3fs the documented way, through ZIYA_BATCH_STORAGE_OPTIONS."""
    pytest.importorskip("s3fs")
    from ziya_batch.io import url_to_fs

    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("ZIYA_BATCH_STORAGE_OPTIONS",
                       json.dumps({"s3": {"client_kwargs": {"endpoint_url": moto_endpoint}}}))
    name = f"zb-{uuid.uuid4().hex[:12]}"
    fs, _ = url_to_fs(f"s3://{name}")
    fs.mkdir(name)
    return name


@pytest.fixture()
def store_to_stop(bucket, monkeypatch):
    """stop() -> None: a moto server of the test's own that ziya-batch's S3 calls go to from now on (moto's servers in
    one process share one store, so it holds `bucket`), for a test to stop midway: a store that goes away."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("ZIYA_BATCH_STORAGE_OPTIONS", json.dumps(
        {"s3": {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}}))
    stopped: list = []

    def stop() -> None:
        if not stopped:
            server.stop()
            stopped.append(True)

    yield stop
    stop()
