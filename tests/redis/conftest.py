"""Every test session starts its own redis-server (temp dir, free port, AOF on); tests flush only it.

Never touches a Redis on 6379. `restartable_redis` is a second server per test that a test may SIGKILL
and restart from its AOF. `demo_model` is the tiny random-weight model, for tests that run a Worker."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from ziya_batch.queue import Broker

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    """Without a redis-server binary these tests are skipped with the way to install it (`make test`
    installs it)."""
    if shutil.which("redis-server") is not None:
        return
    skip = pytest.mark.skip(reason="redis-server is not installed (apt-get install redis-server)")
    for item in items:
        if HERE in Path(item.fspath).parents and "missing_binary" not in item.name:
            item.add_marker(skip)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProc:
    """A redis-server in `directory` on a fixed port, so a restart finds its AOF and its clients."""

    def __init__(self, directory: Path, fsync: str = "always"):
        # appendfsync always: a SIGKILL right after a reply must not lose that write, or the durability
        # tests would depend on timing (ziya-batch's private server uses everysec; see queue/server.py)
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.fsync = fsync
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProc":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "", "--maxmemory-policy",
             "noeviction", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c = redis.Redis(port=self.port, socket_connect_timeout=1)
        for _ in range(200):
            try:
                if c.ping():
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start; see {self.dir / 'redis.log'}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    srv = RedisProc(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def redis_client(redis_server):
    c = redis.Redis.from_url(redis_server.url, decode_responses=True)
    c.flushdb()
    # tests may change the config to check the warnings; put it back for the next test
    c.config_set("appendonly", "yes")
    c.config_set("maxmemory-policy", "noeviction")
    yield c
    c.flushdb()


@pytest.fixture
def broker(redis_client):
    # short backoff so retry tests need not wait; the default is seconds
    return Broker(redis_client, prefix="zbtest", backoff_base_s=0.05, backoff_max_s=0.2)


@pytest.fixture
def restartable_redis(tmp_path):
    srv = RedisProc(tmp_path / "restartable").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    from ziya_batch.tools.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("model") / "demo")
