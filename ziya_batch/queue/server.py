"""The Redis a queue may trust, and the private redis-server every command shares when given none.

Safe means: persistence on (AOF, so a restart loses at most a second of queue state) and
`maxmemory-policy noeviction` (an evicting Redis silently drops job keys under memory pressure; with
noeviction writes fail loudly instead).

The private server runs with `appendfsync everysec`, not `always`: `always` makes every claim and heartbeat
wait for a disk sync, and the second `everysec` can lose is recoverable — a commit lost with it is found
again from the commit markers in storage when the job is resubmitted, and a lease lost with it is run
again under a new fencing token. Its data, log, pid and port files live under one directory; a server
left running (by a command that ended, or crashed) is found through them, or through its process when they
are gone or wrong, and reused, so its AOF state carries over; a second server on the same AOF is stopped.
Commands sharing the directory share the server: starting is serialized by a file lock, long-running
commands (run, serve, worker) register under users/, and a small watchdog process stops the server once
nothing has used it for `idle_s` (no client, no registered command, no leased shard).

It requires a password, on 127.0.0.1 (not a unix socket only): the Ray workers of `run` and `serve` are
other processes, possibly of a Ray node started by another user on this host, and 127.0.0.1 is reachable by
every local user; the password (generated once, in files of mode 0600) keeps out whoever cannot read this
home. A unix socket alone would do the same for local users but leaves nothing for a later remote worker to
use; the bind to 127.0.0.1 keeps other hosts out either way. URLs carrying it are shown only through mask_url.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import redis

from ..errors import ServiceError
from ..redact import mask_url

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


_ADMIN_NAME = "ziya-batch-admin"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the tests start servers on such ports too)."""
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


def _redis_pids_in(data_dir: Path) -> list[int]:
    """Live redis-server processes working in `data_dir` (a redis-server chdirs to its `dir`, and its argv is
    rewritten to `redis-server HOST:PORT`, so the working directory is what ties it to a home): how a server
    that server.json no longer names is found. Reads Linux's /proc; elsewhere none are found."""
    target = os.path.realpath(data_dir)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for name in entries:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            # the name as well as the directory: a shell cd'd into data/ must never be signalled
            if os.readlink(f"/proc/{name}/cwd") != target or \
                    Path(f"/proc/{name}/comm").read_text().strip() != "redis-server":
                continue
        except OSError:
            continue                        # gone meanwhile, a zombie, or another user's process
        if _pid_alive(int(name)):
            found.append(int(name))
    return sorted(found)


def _stop_pid(pid: int, timeout_s: float) -> None:
    """SIGTERM (a redis-server flushes its AOF on it), then SIGKILL if it has not exited within timeout_s."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.05)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 0600 from the start, never readable in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)      # an older file of wider mode keeps its mode through O_CREAT: narrow it


class PrivateRedis:
    """A redis-server of our own under `base_dir`: data/ (the AOF), redis.conf, password, redis.log,
    redis.pid, server.json (pid and URL), users/ (pids of the commands using it)."""

    def __init__(self, base_dir: str | os.PathLike, port: Optional[int] = None, unix_socket: bool = False,
                 start_timeout_s: float = 15.0, idle_s: Optional[float] = None):
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "redis.log"
        self.pid_path = self.base_dir / "redis.pid"
        self.state_path = self.base_dir / "server.json"
        self.socket_path = self.base_dir / "redis.sock"
        self.conf_path = self.base_dir / "redis.conf"
        self.password_path = self.base_dir / "password"
        self.port = port
        # unix socket paths are limited to ~107 bytes; fall back to TCP on localhost when too long
        self.unix_socket = unix_socket and len(str(self.socket_path.absolute())) < 100
        self.start_timeout_s = start_timeout_s
        self.idle_s = idle_s                 # None: no watchdog (the server stops with stop() only)
        self.url: Optional[str] = None
        self.pid: Optional[int] = None
        self.reused = False
        self._proc: Optional[subprocess.Popen] = None

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    # -- lifecycle ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o700)
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

    def start(self, register: bool = True) -> str:
        """Start the server, or reuse the running one. Returns its redis:// URL (with the password: show it
        only through mask_url). `register`: count this process as a user until stop() or release()."""
        with self._locked():
            url = self._start_locked()
            if register:
                self._users().mkdir(exist_ok=True)
                (self._users() / str(os.getpid())).touch()
            return url

    def _password(self) -> str:
        """The server's password, generated on first start and kept (the AOF outlives any one server)."""
        try:
            found = self.password_path.read_text().strip()
            if found:
                os.chmod(self.password_path, 0o600)
                return found
        except OSError:
            pass
        password = secrets.token_urlsafe(32)
        _write_private(self.password_path, password + "\n")
        return password

    def _start_locked(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        found, recorded, others = self._survey()
        for pid in others:
            # a second server on one AOF would interleave writes with the first (lost or corrupt queue state)
            _stop_pid(pid, 10.0)
        if found and "@" not in found[0].split("://", 1)[1]:
            # a server of an older ziya-batch, without a password: stopped (its AOF flushed), started again below
            self.url, self.pid = found
            self._shutdown(10.0)
            found = None
        if found:
            self.url, self.pid, self.reused = found[0], found[1], True
            if not recorded:
                # found through its process, not server.json: record it again, and watch it (its watchdog
                # gave up when server.json went away)
                self._write_state()
                if self.idle_s is not None:
                    self._start_watchdog()
            return self.url
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError(f"redis-server is not installed; {INSTALL_HINT}")
        for stale in (self.state_path, self.pid_path, self.socket_path):
            stale.unlink(missing_ok=True)
        port = 0 if self.unix_socket else (self.port or free_port())
        password = self._password()
        conf = [f"port {port}", "bind 127.0.0.1", f'dir "{self.data_dir.absolute()}"', "appendonly yes",
                "appendfsync everysec", "maxmemory-policy noeviction", 'save ""', "daemonize no",
                "protected-mode yes", f'pidfile "{self.pid_path.absolute()}"', f'logfile "{self.log_path.absolute()}"',
                # in a file of mode 0600, not on the command line: every local user can read a process's argv
                f'requirepass "{password}"']
        if self.unix_socket:
            conf += [f'unixsocket "{self.socket_path.absolute()}"', "unixsocketperm 700"]
        _write_private(self.conf_path, "\n".join(conf) + "\n")
        # a session of its own: Ctrl-C on a command must not kill it before the AOF is flushed by SHUTDOWN
        self._proc = subprocess.Popen([binary, str(self.conf_path.absolute())], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True, close_fds=True)
        self.pid = self._proc.pid
        self.url = self._url(password, None if self.unix_socket else port)
        self._wait_ready()
        self._write_state()
        if self.idle_s is not None:
            self._start_watchdog()
        return self.url

    def _url(self, password: str, port: Optional[int]) -> str:
        secret = quote(password, safe="")
        return (f"unix://:{secret}@{self.socket_path.absolute()}?db=0" if port is None
                else f"redis://:{secret}@127.0.0.1:{port}/0")

    def _write_state(self) -> None:
        _write_private(self.state_path, json.dumps({"pid": self.pid, "url": self.url,
                                                    "data_dir": str(self.data_dir.absolute())}))

    def _start_watchdog(self) -> None:
        # a detached process: the commands that use the server come and go, the watchdog stays with the server
        subprocess.Popen([sys.executable, "-m", "ziya_batch.queue.server", "watch", str(self.base_dir.absolute()),
                          str(self.idle_s), str(self.pid)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)

    def _client(self, url: str) -> redis.Redis:
        # named, so that usage() does not count our own checks as clients
        return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True,
                                    client_name=_ADMIN_NAME)

    def _recorded(self) -> Optional[tuple[str, int]]:
        """(url, pid) from server.json; None when it is missing or unreadable in any way (hand-edited, cut
        short by a full disk): such a file is stale, and the server is then looked for by its process."""
        try:
            state = json.loads(self.state_path.read_text())
            url, pid = state["url"], state["pid"]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        if not isinstance(url, str) or type(pid) is not int or not 0 < pid < 2**31:
            return None
        return url, pid

    def _serves(self, url: str, pid: int) -> bool:
        """Whether the redis-server at `url` is process `pid`, alive, answers with our password and serves
        our data dir."""
        if not _pid_alive(pid):
            return False
        try:
            c = self._client(url)
        except ValueError:                  # a URL redis-py cannot parse: stale
            return False
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                return (bool(c.ping())
                        and os.path.realpath(c.config_get("dir").get("dir", "")) == os.path.realpath(self.data_dir)
                        and int(c.info("server").get("process_id", -1)) == pid)
            except redis.BusyLoadingError:  # loading a large AOF: it is ours, wait for it
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)
            except (redis.RedisError, ValueError):
                return False
            finally:
                c.close()

    def _conf_url(self) -> Optional[str]:
        """The URL of a server started from our redis.conf (its port or unix socket, and our password)."""
        try:
            conf = self.conf_path.read_text()
            password = self.password_path.read_text().strip()
        except OSError:
            return None
        port = re.search(r"^port (\d+)$", conf, re.M)
        if not password or port is None:
            return None
        return self._url(password, None if "\nunixsocket " in conf else int(port[1]))

    def _survey(self, find_others: bool = True) -> tuple[Optional[tuple[str, int]], bool, list[int]]:
        """(the server to use or None, whether server.json names it, other redis-servers on our data dir).
        The one server.json names comes first; else one found by its process (the pid file, then every
        redis-server working in data/) that answers at redis.conf's address with our password."""
        found = recorded = self._recorded()
        if found and not self._serves(*found):
            found = recorded = None
        pids = _redis_pids_in(self.data_dir) if find_others or not found else []
        if found is None:
            url = self._conf_url()
            try:
                pidfile = [int(self.pid_path.read_text().strip())]
            except (OSError, ValueError):
                pidfile = []
            for pid in dict.fromkeys(pidfile + pids):
                if url and 0 < pid < 2**31 and self._serves(url, pid):
                    found = (url, pid)
                    break
        others = [pid for pid in pids if found is None or pid != found[1]]
        return found, recorded is not None, others

    def _find_running(self) -> Optional[tuple[str, int]]:
        """The running server: its pid alive, answering PING with our password, and serving our data dir."""
        return self._survey(find_others=False)[0]

    def running(self) -> bool:
        """Whether the server runs now (and then self.url and self.pid name it); starts nothing."""
        found = self._find_running()
        if found:
            self.url, self.pid = found
        return bool(found)

    def usage(self) -> dict:
        """What keeps the running server busy: clients connected, shards leased, commands registered."""
        from .keys import Keys

        c = self._client(self.url)
        others = [x for x in c.client_list() if x.get("name") != _ADMIN_NAME]
        return {"clients": len(others), "leased_shards": int(c.zcard(Keys().leases())),
                "commands": len(self._live_users())}

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

    def release(self) -> None:
        """This process no longer uses the server; it keeps running for the others (and the watchdog)."""
        (self._users() / str(os.getpid())).unlink(missing_ok=True)
        self.url = None

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

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Shut the running server down, whoever uses it (`ziya-batch redis stop`), and any other
        redis-server working in our data dir. Whether there was one to stop."""
        with self._locked():
            found, _, others = self._survey()
            for pid in others:
                _stop_pid(pid, timeout_s)
            if found:
                self.url, self.pid = found
                self._shutdown(timeout_s)
            return bool(found or others)

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


def watch_idle(base_dir: str, idle_s: float, pid: int) -> None:
    """Stop the server of `base_dir` (pid `pid`) once it has been idle for idle_s: no client but this one, no
    registered command alive, no shard leased (a job running). Returns when the server is gone."""
    srv = PrivateRedis(base_dir)
    check_s = max(0.5, min(30.0, idle_s / 4))
    idle_since = time.monotonic()
    while True:
        time.sleep(check_s)
        with srv._locked():
            if not srv.running() or srv.pid != pid:
                return                      # stopped, or replaced by a newer server with its own watchdog
            try:
                busy = any(srv.usage().values())
            except redis.RedisError:
                continue
            if busy:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= idle_s:
                srv._shutdown(10.0)
                return


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "watch":
    watch_idle(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
