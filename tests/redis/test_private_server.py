"""The private redis-server commands share without a Redis URL: its password, the idle watchdog, and one
server per home whatever state its files are in."""
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.processes import child_env, wait_for
from ziya_batch.queue import Keys, PrivateRedis
from ziya_batch.queue.server import _pid_alive, free_port


def _cli(*args: str) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "ziya_batch.cli", *args], capture_output=True, text=True, timeout=120,
                       env=child_env())
    return p.returncode, p.stdout, p.stderr


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
        # idle now: the watchdog shuts it down
        # the watchdog removes server.json under the lock just after the process exits: wait for both
        wait_for(lambda: not _pid_alive(pid) and not (tmp_path / "zb" / "server.json").exists(), 15, 0.1,
                 what="the idle server to stop and its server.json to go")
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


def _servers_of(home) -> list[int]:
    """Live redis-server processes whose working directory or command line points into `home`, found without
    the code under test (a redis-server works in its `dir`)."""
    root = os.path.realpath(home)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if open(f"/proc/{name}/comm").read().strip() != "redis-server":
                continue
            if "Z" in open(f"/proc/{name}/stat").read().split(") ", 1)[1][:1]:
                continue                                   # exited, not yet reaped by its test parent
            cwd = os.readlink(f"/proc/{name}/cwd")
            cmdline = open(f"/proc/{name}/cmdline").read()
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + "/") or root in cmdline:
            found.append(int(name))
    return found


def _rogue(data_dir) -> subprocess.Popen:
    """A second redis-server working in the data dir (as an older ziya-batch could leave one), unrelated to
    redis.conf's port and password; no AOF and no snapshot, so it cannot damage the data it sits beside."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(data_dir), "--appendonly", "no", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def serving() -> bool:             # started up (in its dir, signal handlers set), not merely spawned
        try:
            return redis.Redis(port=port, socket_connect_timeout=1).ping()
        except redis.ConnectionError:
            return False

    wait_for(serving, 10, 0.1, what="the server to answer")
    return proc


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts processes through /proc")
def test_one_server_per_home_whatever_server_json_says(tmp_path):
    """Issue 19 review: commands between which server.json was deleted, pointed at a wrong port, or garbled
    each started another redis-server on the same AOF; now they find and reuse the one running."""
    home = Path(os.environ["ZIYA_BATCH_HOME"])
    state = home / "redis" / "server.json"
    (tmp_path / "model").mkdir()
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"name": "kept", "model": {"path": str(tmp_path / "model")},
                                "input": [str(tmp_path / "in.jsonl")], "output": {"path": str(tmp_path / "out")}}))
    rc, job_id, err = _cli("submit", str(spec))
    assert rc == 0, err
    job_id = job_id.strip()
    try:
        [pid] = _servers_of(home)
        right = json.loads(state.read_text())["url"]
        wrong_port = re.sub(r":\d+/0$", f":{free_port()}/0", right)
        for damage in (None, {"pid": pid, "url": wrong_port}, {"pid": 1, "url": "redis://127.0.0.1:1/0"}, [],
                       {"pid": None, "url": "x"}, {"pid": 1, "url": "garbage"}, "{not json"):
            if damage is None:
                state.unlink()
            else:
                state.write_text(damage if isinstance(damage, str) else json.dumps(damage))
            rc, out, err = _cli("status", "--json")
            assert rc == 0 and "Traceback" not in err, (damage, err)
            assert [j["job_id"] for j in json.loads(out)] == [job_id], damage     # the job data is intact
            assert _servers_of(home) == [pid], damage                            # the same one server
            assert json.loads(state.read_text())["url"] == right                 # and it is recorded again
        state.unlink()
        rc, out, err = _cli("redis", "stop")
        assert rc == 0 and out.startswith("stopped"), err
        assert _servers_of(home) == []
    finally:
        for left in _servers_of(home):
            os.kill(left, 9)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts processes through /proc")
def test_a_second_server_on_the_data_dir_is_stopped(tmp_path):
    srv = PrivateRedis(tmp_path / "zb")
    redis.Redis.from_url(srv.start()).set("kept", 1)
    rogue = _rogue(srv.data_dir)
    try:
        again = PrivateRedis(tmp_path / "zb")          # server.json intact: the recorded one stays, the other goes
        assert again.start() == srv.url and again.pid == srv.pid
        assert rogue.wait(15) is not None and _servers_of(tmp_path / "zb") == [srv.pid]
        rogue = _rogue(srv.data_dir)                   # and `redis stop` stops both, server.json or not
        (tmp_path / "zb" / "server.json").unlink()
        assert PrivateRedis(tmp_path / "zb").shutdown() is True
        assert rogue.wait(15) is not None and srv._proc.wait(15) is not None
        assert _servers_of(tmp_path / "zb") == [] and PrivateRedis(tmp_path / "zb").shutdown() is False
        last = PrivateRedis(tmp_path / "zb")
        assert redis.Redis.from_url(last.start()).get("kept") == b"1"
        last.stop()
    finally:
        rogue.kill()
        for left in _servers_of(tmp_path / "zb"):
            os.kill(left, 9)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts processes through /proc")
def test_a_server_that_does_not_answer_is_stopped_before_another_starts(tmp_path):
    srv = PrivateRedis(tmp_path / "zb")
    redis.Redis.from_url(srv.start()).set("kept", 1)
    srv.stop()
    rogue = _rogue(srv.data_dir)                       # on no port of ours: it cannot be reused
    try:
        again = PrivateRedis(tmp_path / "zb")
        again.start()
        assert not again.reused and rogue.wait(15) is not None
        assert _servers_of(tmp_path / "zb") == [again.pid]
        assert redis.Redis.from_url(again.url).get("kept") == b"1"
        again.stop()
    finally:
        rogue.kill()


@pytest.mark.parametrize("content", ["[]", '{"pid": null, "url": "x"}', '{"pid": 1, "url": "garbage"}',
                                     '{"pid": "12", "url": 5}', '{"pid": 1e300}', '{"pid": 99999999999999}', "\x00"])
def test_an_ill_typed_server_json_is_stale(tmp_path, content):
    srv = PrivateRedis(tmp_path / "zb")
    (tmp_path / "zb").mkdir()
    (tmp_path / "zb" / "server.json").write_text(content)
    assert not srv.running() and srv.shutdown() is False
    try:
        assert redis.Redis.from_url(srv.start()).ping() and not srv.reused
    finally:
        srv.stop()


def test_redis_stop_refuses_while_a_command_uses_the_server():
    """`redis stop` under a running `serve` (or `worker`, or `run` between shards) left that command on a dead
    URL: the next server starts on another port, so the API answered 503 until it was restarted. Now it refuses
    while a registered command runs, and --force stops it anyway."""
    srv = PrivateRedis(Path(os.environ["ZIYA_BATCH_HOME"]) / "redis")
    srv.start(register=True)                   # this test's process stands for the running command
    try:
        rc, out, err = _cli("redis", "stop")
        assert rc == 3 and "1 command(s) use this server" in err and "--force" in err, (rc, out, err)
        assert srv.running()
        rc, out, err = _cli("redis", "stop", "--force")
        assert rc == 0 and out.startswith("stopped"), err
        assert not srv.running()
    finally:
        srv.stop()
