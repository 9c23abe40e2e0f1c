"""The private redis-server commands share without a Redis URL: its password and the idle watchdog."""
import json
import os
import stat
import time

import pytest
import redis

from ziya_batch.queue import Keys, PrivateRedis
from ziya_batch.queue.server import _pid_alive, mask_url


def _wait(fn, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not fn():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_password_is_required_kept_private_and_survives_a_restart(tmp_path):
    srv = PrivateRedis(tmp_path / "zb")
    url = srv.start()
    try:
        password = (tmp_path / "zb" / "password").read_text().strip()
        assert len(password) >= 32 and password in url and password not in srv.masked_url
        for name in ("password", "redis.conf", "server.json"):
            assert stat.S_IMODE((tmp_path / "zb" / name).stat().st_mode) == 0o600
        # not on the command line, which every local user can read
        assert password not in open(f"/proc/{srv.pid}/cmdline").read()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).set("k", "v")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="guess", socket_timeout=2).set("k", "v")
    finally:
        srv.stop()
    again = PrivateRedis(tmp_path / "zb")
    try:
        again.start()
        assert not again.reused and password in again.url       # a new server, the same password
    finally:
        again.stop()


@pytest.mark.parametrize("url,shown", [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://user:s3cret@host:1/2", "redis://user:***@host:1/2"),
    ("rediss://:a%40b@h:1/0", "rediss://:***@h:1/0"),
    ("unix://:s3cret@/tmp/r.sock?db=0", "unix://:***@/tmp/r.sock?db=0"),
    ("unix:///tmp/r.sock?db=0&password=s3cret", "unix:///tmp/r.sock?db=0&password=***"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def test_the_idle_server_stops_but_not_while_used(tmp_path):
    srv = PrivateRedis(tmp_path / "zb", idle_s=1.0)
    url = srv.start(register=False)
    pid = srv.pid
    try:
        client = redis.Redis.from_url(url)
        client.ping()
        time.sleep(2.5)                                     # a client holds a connection: busy
        assert _pid_alive(pid)
        client.zadd(Keys().leases(), {"job|0": 1})          # a shard leased: a job runs, whether connected or not
        client.close()
        client.connection_pool.disconnect()
        time.sleep(2.5)
        assert _pid_alive(pid)
        redis.Redis.from_url(url).delete(Keys().leases())
        _wait(lambda: not _pid_alive(pid), 10)              # idle now: the watchdog shuts it down
        assert not (tmp_path / "zb" / "server.json").exists()
        # and the next command starts it again with the data
        again = PrivateRedis(tmp_path / "zb")
        assert redis.Redis.from_url(again.start()).exists(Keys().leases()) == 0
        again.stop()
    finally:
        if _pid_alive(pid):
            os.kill(pid, 9)


def test_a_server_left_without_a_password_is_replaced_by_one_with(tmp_path):
    old = PrivateRedis(tmp_path / "zb")
    url = old.start()
    client = redis.Redis.from_url(url)
    client.set("kept", 1)
    client.config_set("requirepass", "")                 # as an older ziya-batch left it: no password
    state = json.loads((tmp_path / "zb" / "server.json").read_text())
    state["url"] = url.replace(url.split("://")[1].split("@")[0] + "@", "")
    (tmp_path / "zb" / "server.json").write_text(json.dumps(state))
    new = PrivateRedis(tmp_path / "zb")
    try:
        new.start()
        assert not new.reused and new.pid != old.pid and "@" in new.url
        assert redis.Redis.from_url(new.url).get("kept") == b"1"
        old._proc.wait(5)
    finally:
        new.stop()
