"""`ziya-batch worker`: join a Ray cluster as a node and serve the queue with this node's GPUs.

If this host already is a node of that cluster, the command serves from it. Otherwise it starts one, as
`ray start --address ... --block` in a child process, so the node lives exactly as long as the command: when
the command stops, it stops that node and nothing else (other Ray nodes on the host, a head included, stay).
Then a replica manager pinned to the node keeps GPUs // tensor_parallel replicas running until the command is
stopped. A `run` on the head sees the new GPUs too: both only ever fill free GPUs, so they never oversubscribe.
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
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as e:  # noqa: BLE001 - Ray's own errors, made one clear line
            raise ServiceError(f"could not connect to the Ray cluster at {address}: {e}") from e
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


def serve_node(redis_url: Optional[str] = None, ray_address: Optional[str] = None,
               tensor_parallel: int = 1, job_id: Optional[str] = None, poll_s: float = 5.0,
               num_gpus: Optional[int] = None, start_node: bool = False) -> None:
    """num_gpus: the GPUs a node this command starts offers to Ray (default: Ray counts them). start_node:
    start one even if this host already is a node of the cluster (e.g. a head that offers no GPUs)."""
    import ray

    from .replicas import ReplicaManager

    address = settings.ray_address(ray_address)
    url = settings.redis_url(redis_url)
    if not address:
        raise ServiceError("no Ray cluster to join: pass --address or set RAY_ADDRESS (host:port of the head)")
    if not url:
        raise ServiceError(f"no Redis queue: pass --redis-url or set {REDIS_ENV}")
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
        if mine is not None:
            ray.init(address=mine, log_to_driver=False, logging_level=logging.WARNING)
            trap()
            node_id = ray.get_runtime_context().get_node_id()
        else:
            own = _OwnNode(address, num_gpus)
            node_id = own.wait_node_id(address, stop, trap)
            if node_id is None:
                return
        manager = ReplicaManager(url, tensor_parallel=tensor_parallel, node_id=node_id, worker_prefix="node",
                                 job_id=job_id)
        how = "started by this command" if own else "already running on this host"
        print(f"serving the queue at {url} from node {node_id[:12]} ({how}) of {address}; Ctrl-C stops", flush=True)
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
