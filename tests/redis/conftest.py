"""Every test session starts its own redis-server (temp dir, free port, AOF on); tests flush only it.

Never touches a Redis on 6379. `restartable_redis` is a second server per test that a test may SIGKILL
and restart from its AOF. `demo_model` is the tiny random-weight model, for tests that run a Worker.
`make_spec`, `make_shards`, `expire` and `wait_claim` build queue states; `api_env` builds API clients.
Every test here is marked `redis`, so `pytest -m "not redis"` leaves them out."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis
from api_support import TOKEN

from ziya_batch.queue import Broker
from ziya_batch.queue.server import free_port
from ziya_batch.records import ShardRef
from ziya_batch.spec import parse_spec

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    """Marks this suite `redis`. Without a redis-server binary its tests are skipped with the way to
    install it (`make test` installs it)."""
    # the hook sees every collected item, not only this directory's
    mine = [item for item in items if HERE in item.path.parents]
    missing = shutil.which("redis-server") is None
    skip = pytest.mark.skip(reason="redis-server is not installed (apt-get install redis-server)")
    for item in mine:
        item.add_marker(pytest.mark.redis)
        if missing and "missing_binary" not in item.name:
            item.add_marker(skip)


class RedisProc:
    """A redis-server in `directory` on a fixed port, so a restart finds its AOF and its clients."""

    def __init__(self, directory: Path, fsync: str = "always"):
        # appendfsync always: a SIGKILL right after a reply must not lose that write, or the durability
        # tests would depend on timing (ziya-batch's private server uses everysec; see queue/server.py)
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
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
    # short backoff so retry tests need not wait; the default is seconds. The session's server has just started, so
    # its restart grace would keep every lease `expire` fakes (test_durability checks the grace)
    return Broker(redis_client, prefix="zbtest", backoff_base_s=0.05, backoff_max_s=0.2, restart_grace=False)


@pytest.fixture
def restartable_redis(tmp_path):
    srv = RedisProc(tmp_path / "restartable").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    from ziya_batch.tools.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("model") / "demo")


def _make_spec(name: str = "job", priority: int = 0, lease_s: float = 30.0, max_retries: int = 2,
               shard_size: int = 10, output: str | None = None):
    return parse_spec({"name": name, "model": {"path": "/models/ziya"}, "input": [f"/data/{name}.jsonl"],
                       "output": {"path": output or f"/out/{name}"}, "shard_size": shard_size,
                       "priority": priority, "reliability": {"lease_s": lease_s, "max_retries": max_retries}})


def _make_shards(spec, n: int, lines_per_shard: int | None = None, files: int = 1):
    """n shard descriptors of one job, spread round-robin over `files` input files."""
    per = lines_per_shard or spec.shard_size
    job_id = spec.identity()
    for i in range(n):
        yield ShardRef(job_id, i, f"/data/{spec.name}-{i % files}.jsonl", i * per * 100, (i + 1) * per * 100,
                       i * per + 1, per)


def _expire(broker: Broker, lease) -> None:
    """Make a lease look expired to the reaper without waiting lease_s (test-only shortcut)."""
    k = broker.keys
    broker.client.zadd(k.leased(lease.job_id), {str(lease.shard.index): 0})
    broker.client.zadd(k.leases(), {k.lease_member(lease.job_id, lease.shard.index): 0})


def _wait_claim(broker: Broker, worker: str, timeout_s: float = 5.0):
    """Claim, waiting out a retry backoff."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lease = broker.claim(worker)
        if lease is not None:
            return lease
        time.sleep(0.01)
    return None


# Factories as fixtures: a test asks for the ones it uses. Session scope, since they hold no state.
@pytest.fixture(scope="session")
def make_spec():
    """make_spec(name="job", priority=0, lease_s=30.0, max_retries=2, shard_size=10, output=None) -> JobSpec"""
    return _make_spec


@pytest.fixture(scope="session")
def make_shards():
    """make_shards(spec, n, lines_per_shard=None, files=1) -> iterator of ShardRef"""
    return _make_shards


@pytest.fixture(scope="session")
def expire():
    """expire(broker, lease): the lease looks expired to the next reap"""
    return _expire


@pytest.fixture(scope="session")
def wait_claim():
    """wait_claim(broker, worker, timeout_s=5.0) -> Lease | None"""
    return _wait_claim


@pytest.fixture(scope="session")
def api_redis_url(redis_server):
    """The session's server, unflushed: each API test keeps to a fresh key prefix (api_env makes one)."""
    return redis_server.url


@pytest.fixture
def api_env(tmp_path: Path, api_redis_url: str):
    """(data dir, model dir, make_client); make_client(**settings overrides) -> TestClient."""
    from fastapi.testclient import TestClient

    from ziya_batch.api.app import create_app
    from ziya_batch.api.settings import ApiSettings

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
