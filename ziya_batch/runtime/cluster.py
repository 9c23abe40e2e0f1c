"""`ziya-batch worker`: join a Ray cluster as a node and serve the queue with this node's GPUs.

If this host already is a node of that cluster, the command serves from it. Otherwise it starts one, as
`ray start --address ... --block` in a child process, so the node lives exactly as long as the command: when
the command stops, it stops that node and nothing else (other Ray nodes on the host, a head included, stay).
Then a replica manager pinned to the node keeps GPUs // tensor_parallel replicas running until the command is
stopped. A `run` on the head sees the new GPUs too: both only ever fill free GPUs, so they never oversubscribe.

`--address auto` (and no address at all) joins the cluster that has a node on this host. Without a Redis URL
the worker uses this home's private redis-server, which only a worker on this host can reach. Ray 2.x token
authentication: a head started by `ray.init()` (run, serve) or by `ray start --head` where a token exists
requires it, but `ray start --address` only sends the token when RAY_AUTH_MODE=token; with a token at hand
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, the file the local head uses) the worker sets that
mode itself, and without one it says which file or variable to set.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, Optional

from .. import settings
from ..errors import ServiceError
from ..settings import REDIS_ENV

log = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 120.0


def _this_host(ip: str) -> bool:
    if ip.startswith("127.") or ip == "::1":
        return True
    try:
        return ip in socket.gethostbyname_ex(socket.gethostname())[2] or ip == _primary_ip()
    except OSError:
        return False


def _primary_ip() -> str:
    """The address this host reaches others from (what Ray calls the node IP); no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _same_address(a: str, b: str) -> bool:
    """Whether two GCS addresses name the same server: same port, and the same host once resolved, where
    loopback and this host's own addresses are one host (Ray reports a head started on 127.0.0.1 or
    localhost by its node IP)."""
    def norm(x: str) -> tuple[str, str]:
        host, _, port = x.rpartition(":")
        try:
            return socket.gethostbyname(host), port
        except OSError:
            return host, port
    (ha, pa), (hb, pb) = norm(a), norm(b)
    return pa == pb and (ha == hb or (_this_host(ha) and _this_host(hb)))


def _local_clusters() -> list[str]:
    """GCS addresses of the clusters that have a node on this host, read off the raylets' command lines (no
    connection: `ray.init("auto")` would wait a minute for a raylet when Ray's address file is stale)."""
    try:
        from ray._private.services import find_gcs_addresses
    except ImportError:  # pragma: no cover - another Ray layout: ask Ray itself
        import ray
        try:
            ray.init(address="auto", log_to_driver=False, logging_level=logging.WARNING)
        except Exception:  # noqa: BLE001 - no local node
            return []
        try:
            return [ray.get_runtime_context().gcs_address]
        finally:
            ray.shutdown()
    return sorted(find_gcs_addresses())


def _ray_command() -> Optional[str]:
    """The `ray` script of this Python's environment (a venv's bin need not be on PATH), else PATH's; None if
    neither has one."""
    sibling = os.path.join(os.path.dirname(sys.executable), "ray")
    return sibling if os.access(sibling, os.X_OK) else shutil.which("ray")


# Runs `ray start` after asking the kernel (Linux) for SIGTERM when its parent, this command, dies, even by
# SIGKILL, so the node goes too. A separate interpreter, not a preexec_fn: ray.init may have left threads here.
_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                "try:\n    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
                "except (OSError, AttributeError):\n    pass\n"
                "os.execv(sys.argv[1], sys.argv[1:])\n")


class _OwnNode:
    """A Ray node this command started (`ray start --block`): stopping the child stops that node only."""

    def __init__(self, address: str, num_gpus: Optional[int]):
        self.tag = f"ziya_batch_node_{uuid.uuid4().hex[:12]}"     # a resource only this node has: finds it
        ray_cmd = _ray_command()
        if ray_cmd is None:
            raise ServiceError("could not start a Ray node: the `ray` command is not installed here")
        # appended to by the child, read by us: "a" mode, so our reads never move where its writes go
        fd, self.log_path = tempfile.mkstemp(prefix="ziya-batch-ray-start-", suffix=".log")
        os.close(fd)
        cmd = [sys.executable, "-c", _WITH_PARENT, ray_cmd, "start", f"--address={address}", "--block",
               f"--resources={json.dumps({self.tag: 1})}"]
        if num_gpus is not None:
            cmd.append(f"--num-gpus={num_gpus}")
        try:
            with open(self.log_path, "a") as out:
                self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            os.unlink(self.log_path)
            raise ServiceError(f"could not start a Ray node: {e}") from e

    def _log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def wait_node_id(self, address: str, stop: threading.Event, connected: Callable[[], None]) -> Optional[str]:
        """Waits for `ray start` to bring the node up, connects to the cluster (then calls `connected`) and
        returns the node's id once it has joined. None if `stop` is set first."""
        import ray

        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        # ray.init waits a minute for a local node: connect only once ours runs, so a failed start fails fast
        while "Ray runtime started" not in self._log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"could not join the Ray cluster at {address}: {self._last_line()}")
            if stop.wait(0.2):
                return None
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env=settings.worker_runtime_env() or None)
        except Exception as e:  # noqa: BLE001 - Ray's own errors, made one clear line
            raise _join_error(address, e) from None
        connected()
        while time.monotonic() < deadline and not stop.is_set():
            for n in ray.nodes():
                if n["Alive"] and self.tag in n.get("Resources", {}):
                    return n["NodeID"]
            if self.proc.poll() is not None:
                break
            stop.wait(0.5)
        if stop.is_set():
            return None
        raise ServiceError(f"could not join the Ray cluster at {address}: {self._last_line()}")

    def _last_line(self) -> str:
        lines = [x.strip() for x in self._log_text().splitlines() if x.strip()]
        return lines[-1] if lines else "ray start printed nothing"

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM, then SIGKILL of its process group after timeout_s (`ray start --block` drains its node for
        up to 30 s first)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)       # ray start --block shuts its node down on SIGTERM
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def _ray_token_file() -> str:
    return os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def _use_ray_token() -> bool:
    """Turn on Ray's token mode for this process and the `ray start` it runs when a token is at hand and no mode
    was chosen (the same rule `ray start --head` follows). Returns whether token mode is on."""
    mode = settings.ray_auth_mode()
    if mode is not None:
        return mode.lower() == "token"
    if not (settings.ray_auth_token_set() or os.path.isfile(_ray_token_file())):
        return False
    settings.set_ray_auth_mode("token")
    if "ray" in sys.modules:
        try:   # Ray caches its config on first use: read the mode again (as Ray's own _enable_token_auth does)
            from ray._raylet import Config
            Config.initialize("")
        except Exception:  # noqa: BLE001 - another Ray layout: `ray start` still gets it from the environment
            pass
    return True


def _is_auth_error(err: BaseException) -> bool:
    text = str(err).lower()
    return "authenticat" in text or "auth_token" in text or "ray_auth" in text or "unauthenticated" in text


def _join_error(address: str, err: BaseException) -> ServiceError:
    """Ray's error on joining, as one line that says what to do."""
    text = str(err)
    if _is_auth_error(err):
        return ServiceError(f"the Ray cluster at {address} requires token authentication and refused this node: "
                            f"copy the head's {_ray_token_file()} to this host, or set RAY_AUTH_TOKEN (or "
                            "RAY_AUTH_TOKEN_PATH) to the head's token, and RAY_AUTH_MODE=token")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    hint = ""
    if (settings.ray_auth_mode() or "").lower() != "token":
        # a head with token authentication answers a client without a token by closing the connection, which
        # Ray reports as a plain connection failure
        hint = (f"; if the head uses token authentication, copy its {_ray_token_file()} here or set "
                "RAY_AUTH_TOKEN and RAY_AUTH_MODE=token")
    return ServiceError(f"could not join the Ray cluster at {address}: {first[:300]}{hint}")


def connect_cluster(address: str, **init_kwargs) -> None:
    """Connect this process to the running cluster at `address` as a driver (`run --address`, `serve` on a
    cluster), with Ray's token when one is at hand, as the worker joins (a head started by `ray start --head`
    where a token exists requires it); one line when nothing answers there or Ray refuses."""
    import ray

    from .services import check_ray_address

    check_ray_address(address)
    _use_ray_token()
    try:
        ray.init(address=address, **init_kwargs)
    except Exception as err:  # noqa: BLE001 - Ray's own errors, made one line
        raise _join_error(address, err) from None


def _latest_local_cluster() -> Optional[str]:
    try:
        from ray._private.utils import read_ray_address
        return read_ray_address()
    except Exception:  # noqa: BLE001 - another Ray layout, or no file: no preference
        return None


def resolve_address(address: Optional[str]) -> str:
    """The GCS address to join: the given one, or for `auto` (and none given) the cluster with a node on this
    host."""
    if address and address != "auto":
        return address
    local = _local_clusters()
    if not local:
        raise ServiceError("no Ray cluster runs on this host: start one (`ray start --head`, or `ziya-batch "
                           "serve`), or pass --address HOST:PORT of the head (or set RAY_ADDRESS)")
    latest = _latest_local_cluster()
    if len(local) > 1 and latest:
        # several: the one Ray itself would pick for "auto" (its address file names the last one started here)
        local = [a for a in local if _same_address(a, latest)] or local
    if len(local) > 1:
        raise ServiceError(f"this host has nodes of {len(local)} Ray clusters ({', '.join(local)}): pass --address "
                           "with the one to join")
    return local[0]


def serve_node(redis_url: Optional[str] = None, ray_address: Optional[str] = None,
               tensor_parallel: int = 1, job_id: Optional[str] = None, poll_s: float = 5.0,
               num_gpus: Optional[int] = None, start_node: bool = False) -> None:
    """num_gpus: the GPUs a node this command starts offers to Ray (default: Ray counts them). start_node:
    start one even if this host already is a node of the cluster (e.g. a head that offers no GPUs)."""
    from .services import redis_for

    _use_ray_token()
    address = resolve_address(settings.ray_address(ray_address))
    host = address.rpartition(":")[0]
    if not settings.redis_url(redis_url) and not _this_host(_resolve(host)):
        raise ServiceError(f"the Ray cluster at {address} is on another host, and this host's private redis-server "
                           f"is not its queue: pass --redis-url or set {REDIS_ENV} to the queue the head uses")
    url, private = redis_for(redis_url, register=True)
    try:
        _serve_node(url, address, tensor_parallel, job_id, poll_s, num_gpus, start_node)
    finally:
        if private is not None:
            private.release()


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail in one line at once when nothing listens at the head's address (`ray start` would retry for
    minutes before giving up)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except ValueError:
        raise ServiceError(f"--address {address!r} is not HOST:PORT of a Ray head (or `auto`)") from None
    except OSError as err:
        raise ServiceError(f"could not join the Ray cluster at {address}: nothing answers there "
                           f"({err.strerror or type(err).__name__}); start the head (`ray start --head`) or "
                           "pass its --address") from None


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def _serve_node(url: str, address: str, tensor_parallel: int, job_id: Optional[str], poll_s: float,
                num_gpus: Optional[int], start_node: bool) -> None:
    import ray

    from ..redact import mask_url
    from .replicas import ReplicaManager

    stop = threading.Event()

    def on_signal(*_) -> None:
        # Event.set takes a lock the main thread may hold right now (inside stop.wait): set it from a thread
        threading.Thread(target=stop.set, daemon=True).start()

    def trap() -> None:
        # ray.init installs its own SIGTERM handler (exit at once): ours goes back on after each connect
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    trap()
    own = None
    local = [] if start_node else _local_clusters()
    trap()
    mine = next((a for a in local if _same_address(a, address)), None)
    if local and mine is None:
        # a second node on this host would offer its GPUs twice, unless the user says the first is another's
        raise ServiceError(f"this host is a node of the Ray cluster at {', '.join(local)}, not {address}: pass "
                           f"that --address, or --start-node to start a node of {address} beside it")
    try:
        try:
            if mine is not None:
                ray.init(address=mine, log_to_driver=False, logging_level=logging.WARNING,
                         runtime_env=settings.worker_runtime_env() or None)
                trap()
                node_id = ray.get_runtime_context().get_node_id()
            else:
                _check_reachable(address)
                own = _OwnNode(address, num_gpus)
                node_id = own.wait_node_id(address, stop, trap)
                if node_id is None:
                    return
        except ServiceError as err:
            raise (_join_error(address, err) if _is_auth_error(err) else err) from None
        except Exception as err:  # noqa: BLE001 - Ray's own errors, made one line
            raise _join_error(address, err) from None
        manager = ReplicaManager(url, tensor_parallel=tensor_parallel, node_id=node_id, worker_prefix="node",
                                 job_id=job_id)
        how = "started by this command" if own else "already running on this host"
        print(f"serving the queue at {mask_url(url)} from node {node_id[:12]} ({how}) of {address}; Ctrl-C stops", flush=True)
        try:
            while not stop.is_set():
                manager.reconcile()
                stop.wait(poll_s)
        finally:
            manager.stop()
    finally:
        try:
            ray.shutdown()
        finally:
            if own is not None:
                own.stop()
