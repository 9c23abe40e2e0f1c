"""A local Ray cluster and a private redis-server for end-to-end runs. Every test here is marked `ray`, so
`pytest -m "not ray"` leaves them out; the longest also carry `slow`."""
import os
import sys
from pathlib import Path

import pytest

from ziya_batch.queue import PrivateRedis

HERE = os.path.dirname(__file__)


def pytest_collection_modifyitems(config, items):
    # the hook sees every collected item, not only this directory's
    for item in items:
        if Path(HERE) in item.path.parents:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    from ziya_batch.tools.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("model") / "demo")


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server (AOF on) for one test; stopped afterwards."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    return redis_server.url


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def fault_worker_cmd():
    def cmd(redis_url, fault="none", poison=""):
        return [sys.executable, os.path.join(HERE, "fault_worker.py"), redis_url, fault, poison]
    return cmd
