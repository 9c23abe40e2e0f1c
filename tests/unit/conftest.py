"""The unit suite starts no service: no redis-server, Ray, S3 or HTTP server (those tests live in
tests/redis, tests/s3 and tests/ray). A test here that tries to start one, or listens on any socket (every
server does), fails at once instead of passing on a machine that happens to have the service or a free port."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SERVICES = ("redis-server", "ray")


def _service(args) -> str | None:
    argv = [args] if isinstance(args, (str, bytes)) else list(args or [])
    first = Path(str(argv[0])).name if argv else ""
    return first if first in SERVICES else None


@pytest.fixture(autouse=True)
def _no_services(request, monkeypatch):
    if HERE not in request.path.parents:
        return
    real_init = subprocess.Popen.__init__

    def guarded_init(self, args, *a, **kw):
        name = _service(args)
        if name is not None:
            raise AssertionError(f"a unit test started {name}: move the test to the suite that provides it")
        real_init(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)

    def no_listen(self, *a, **kw):
        raise AssertionError("a unit test listened on a socket (a server): fake the call the code makes, or move "
                             "the test to the suite that provides the service")

    monkeypatch.setattr(socket.socket, "listen", no_listen)
    try:
        import ray
    except ImportError:
        return

    def no_ray(*a, **kw):
        raise AssertionError("a unit test started Ray: move the test to tests/ray")

    monkeypatch.setattr(ray, "init", no_ray)
