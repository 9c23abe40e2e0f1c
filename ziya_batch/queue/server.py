"""The Redis a queue may trust, and the private redis-server `ziya-batch run` starts when given none.

Safe means: persistence on (AOF, so a restart loses at most a second of queue state) and
`maxmemory-policy noeviction` (an evicting Redis silently drops job keys under memory pressure; with
noeviction writes fail loudly instead).

The private server runs with `appendfsync everysec`, not `always`: `always` makes every claim and heartbeat
wait for a disk sync, and the second `everysec` can lose is recoverable — a commit lost with it is found
again from the commit markers in storage when the job is resubmitted, and a lease lost with it is run
again under a new fencing token. Its data, log, pid and port files live under one directory; a server
left running by a crashed run is found through them and reused, so its AOF state carries over. Two runs
sharing the directory share the server: starting is serialized by a file lock, and each run registers
itself under users/, so the last one to stop shuts the server down.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import redis

from ..errors import ServiceError

INSTALL_HINT = ("install it with `apt-get install redis-server` (Debian/Ubuntu) or `brew install redis` "
                "(macOS), or point ziya-batch at a running Redis with --redis-url or ZIYA_BATCH_REDIS_URL")


def check_config(client: redis.Redis) -> list[str]:
    """Unsafe settings of a Redis, one sentence each that says what to change."""
    try:
        cfg = {}
        for name in ("appendonly", "appendfsync", "maxmemory-policy"):
            cfg.update({str(k): str(v) for k, v in client.config_get(name).items()})
    except redis.ResponseError as err:
        return [f"cannot read the Redis configuration ({err}); make sure AOF persistence is on "
                "(appendonly yes) and maxmemory-policy is noeviction, or queue state may be lost"]
    problems = []
    if cfg.get("appendonly") != "yes":
        problems.append("Redis persistence is off (appendonly no): a Redis restart loses every job's queue "
                        "state; turn on AOF with `CONFIG SET appendonly yes` and `appendonly yes` in redis.conf")
    elif cfg.get("appendfsync") == "no":
        problems.append("Redis appendfsync is 'no': the OS decides when the AOF reaches disk, so a crash can "
                        "lose many seconds of queue state; set `appendfsync everysec`")
    policy = cfg.get("maxmemory-policy", "")
    if policy != "noeviction":
        problems.append(f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis would evict job "
                        "and lease keys; set `CONFIG SET maxmemory-policy noeviction` (and in redis.conf)")
    return problems


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # a zombie (exited, not yet reaped by its parent) answers kill(0) but serves nothing
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


class PrivateRedis:
    """A redis-server of our own under `base_dir`: data/ (the AOF), redis.log, redis.pid, server.json."""

    def __init__(self, base_dir: str | os.PathLike, port: Optional[int] = None, unix_socket: bool = False,
                 start_timeout_s: float = 15.0):
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "redis.log"
        self.pid_path = self.base_dir / "redis.pid"
        self.state_path = self.base_dir / "server.json"
        self.socket_path = self.base_dir / "redis.sock"
        self.port = port
        # unix socket paths are limited to ~107 bytes; fall back to TCP on localhost when too long
        self.unix_socket = unix_socket and len(str(self.socket_path.absolute())) < 100
        self.start_timeout_s = start_timeout_s
        self.url: Optional[str] = None
        self.pid: Optional[int] = None
        self.reused = False
        self._proc: Optional[subprocess.Popen] = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with open(self.base_dir / "start.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _users(self) -> Path:
        return self.base_dir / "users"

    def _live_users(self) -> list[int]:
        live = []
        for entry in self._users().glob("*"):
            pid = int(entry.name) if entry.name.isdigit() else -1
            if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                live.append(pid)
            elif pid != os.getpid():
                entry.unlink(missing_ok=True)
        return live

    def start(self) -> str:
        """Start the server, or reuse one a previous run left behind. Returns its redis:// URL."""
        with self._locked():
            url = self._start_locked()
            self._users().mkdir(exist_ok=True)
            (self._users() / str(os.getpid())).touch()
            return url

    def _start_locked(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        found = self._find_running()
        if found:
            self.url, self.pid, self.reused = found[0], found[1], True
            return self.url
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError(f"redis-server is not installed; {INSTALL_HINT}")
        for stale in (self.state_path, self.pid_path, self.socket_path):
            stale.unlink(missing_ok=True)
        port = 0 if self.unix_socket else (self.port or _free_port())
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.data_dir.absolute()),
                "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
                "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                "--pidfile", str(self.pid_path.absolute()), "--logfile", str(self.log_path.absolute())]
        if self.unix_socket:
            args += ["--unixsocket", str(self.socket_path.absolute()), "--unixsocketperm", "700"]
        # a session of its own: Ctrl-C on `run` must not kill it before the AOF is flushed by SHUTDOWN
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        self.pid = self._proc.pid
        self.url = (f"unix://{self.socket_path.absolute()}?db=0" if self.unix_socket
                    else f"redis://127.0.0.1:{port}/0")
        self._wait_ready()
        self.state_path.write_text(json.dumps({"pid": self.pid, "url": self.url, "data_dir": str(self.data_dir.absolute())}))
        return self.url

    def _client(self, url: str) -> redis.Redis:
        return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)

    def _find_running(self) -> Optional[tuple[str, int]]:
        """A server from an earlier run: its pid alive, answering PING, and serving our data dir."""
        try:
            state = json.loads(self.state_path.read_text())
            url, pid = state["url"], int(state["pid"])
        except (OSError, ValueError, KeyError):
            return None
        if not _pid_alive(pid):
            return None
        try:
            c = self._client(url)
            if not c.ping() or c.config_get("dir").get("dir") != str(self.data_dir.absolute()):
                return None
        except redis.RedisError:
            return None
        return url, pid

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        c = self._client(self.url)
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise ServiceError(f"redis-server exited at start (code {self._proc.returncode}); see "
                                   f"{self.log_path}: {self._log_tail()}")
            try:
                if c.ping():
                    # loading a large AOF answers PING with LOADING: wait for it to finish
                    return
            except redis.BusyLoadingError:
                pass
            except redis.RedisError:
                pass
            time.sleep(0.05)
        self._shutdown(2.0)
        raise ServiceError(f"redis-server did not answer within {self.start_timeout_s:.0f}s; see {self.log_path}")

    def _log_tail(self, n: int = 3) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the server down (SHUTDOWN flushes the AOF) and wait for it to exit, unless another live
        process still uses it."""
        if self.url is None:
            return
        with self._locked():
            (self._users() / str(os.getpid())).unlink(missing_ok=True)
            if self._live_users():
                self.url = None
                return
            self._shutdown(timeout_s)

    def _shutdown(self, timeout_s: float) -> None:
        try:
            self._client(self.url).shutdown(nosave=False)
        except redis.ConnectionError:
            pass            # the reply never comes: the server closed the connection as it exited
        except redis.RedisError:
            if self.pid:
                _terminate(self.pid)
        deadline = time.monotonic() + timeout_s
        while self.pid and time.monotonic() < deadline:
            if self._proc is not None:
                if self._proc.poll() is not None:
                    break
            elif not _pid_alive(self.pid):
                break
            time.sleep(0.05)
        self.state_path.unlink(missing_ok=True)
        self.url = None

    def __enter__(self) -> "PrivateRedis":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        pass
