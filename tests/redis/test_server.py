"""check_server's warnings, and the private redis-server of `ziya-batch run`."""
import os
import signal

import pytest
import redis

from ziya_batch.errors import ServiceError
from ziya_batch.queue import Broker, PrivateRedis


def test_safe_server_has_no_warnings(broker):
    assert broker.check_server() == []


def test_aof_off_is_named(broker, redis_client):
    redis_client.config_set("appendonly", "no")
    warnings = broker.check_server()
    assert len(warnings) == 1 and "appendonly no" in warnings[0] and "CONFIG SET appendonly yes" in warnings[0]


def test_evicting_policy_is_named(broker, redis_client):
    redis_client.config_set("maxmemory-policy", "allkeys-lru")
    redis_client.config_set("appendonly", "no")
    warnings = broker.check_server()
    assert len(warnings) == 2
    assert any("'allkeys-lru'" in w and "noeviction" in w for w in warnings)


def test_fsync_no_is_named(broker, redis_client):
    redis_client.config_set("appendfsync", "no")
    try:
        assert any("appendfsync" in w for w in broker.check_server())
    finally:
        redis_client.config_set("appendfsync", "always")


def test_private_server_is_safe_persistent_and_stops(tmp_path):
    srv = PrivateRedis(tmp_path / "zb")
    url = srv.start()
    try:
        b = Broker.from_url(url)
        assert b.check_server() == []
        cfg = b.client.config_get("*")
        assert cfg["appendfsync"] == "everysec" and cfg["dir"] == str((tmp_path / "zb" / "data").absolute())
        b.client.set("k", "v")
    finally:
        srv.stop()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    assert not (tmp_path / "zb" / "server.json").exists()
    assert (tmp_path / "zb" / "redis.log").exists()
    # the AOF carries the data to the next start
    srv2 = PrivateRedis(tmp_path / "zb")
    try:
        assert redis.Redis.from_url(srv2.start(), decode_responses=True).get("k") == "v"
    finally:
        srv2.stop()


def test_server_left_by_a_crashed_run_is_reused(tmp_path):
    first = PrivateRedis(tmp_path / "zb")
    url = first.start()
    pid = first.pid
    # the run that started it crashed: nobody called stop()
    second = PrivateRedis(tmp_path / "zb")
    try:
        assert second.start() == url and second.reused and second.pid == pid
    finally:
        second.stop()
    first._proc.wait(5)
    assert first._proc.returncode is not None


def test_stale_state_of_a_dead_server_is_replaced(tmp_path):
    first = PrivateRedis(tmp_path / "zb")
    first.start()
    redis.Redis.from_url(first.url).set("survives", 1)
    redis.Redis.from_url(first.url).execute_command("BGREWRITEAOF")
    import time
    time.sleep(0.3)
    os.kill(first.pid, signal.SIGKILL)
    first._proc.wait()
    second = PrivateRedis(tmp_path / "zb")
    try:
        url = second.start()
        assert not second.reused and second.pid != first.pid
        assert redis.Redis.from_url(url).get("survives") == b"1"
    finally:
        second.stop()


def test_unix_socket_server(tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp") as d:       # short path: socket names are length-limited
        with PrivateRedis(d, unix_socket=True) as srv:
            assert srv.url.startswith("unix://")
            assert Broker.from_url(srv.url).check_server() == []


def test_missing_binary_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ServiceError, match="apt-get install redis-server"):
        PrivateRedis(tmp_path / "zb").start()


def test_server_shared_by_two_runs_stays_up_until_the_last_stops(tmp_path):
    import subprocess

    srv = PrivateRedis(tmp_path / "zb")
    url = srv.start()
    other_run = subprocess.Popen(["sleep", "60"])             # another live process using the server
    try:
        (tmp_path / "zb" / "users" / str(other_run.pid)).touch()
        srv.stop()
        assert redis.Redis.from_url(url).ping()               # still serving the other run
        other_run.kill()
        other_run.wait()
        last = PrivateRedis(tmp_path / "zb")
        assert last.start() == url and last.reused
        last.stop()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    finally:
        other_run.kill()
        if srv._proc is not None:
            srv._proc.wait(10)
