import os
import sys

import pytest

from ziya_batch.queue import PrivateRedis

HERE = os.path.dirname(__file__)


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
