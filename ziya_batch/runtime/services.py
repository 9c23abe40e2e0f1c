"""Connecting to the services a command needs: the Redis queue, given by URL or else the one private
redis-server under $ZIYA_BATCH_HOME that every command of this home shares (started when not running)."""
from __future__ import annotations

import socket
import sys
from typing import Optional

import redis

from .. import settings
from ..errors import ServiceError, SpecError


def private_redis():
    """The private redis-server of this home (not started yet: call start())."""
    from ..queue.server import PrivateRedis

    return PrivateRedis(settings.home_dir() / "redis", idle_s=settings.redis_idle_s())


def start_private_redis(register: bool = False):
    """Start (or reuse) this home's private redis-server; refuses one that is unsafely configured."""
    from ..queue import Broker

    private = private_redis()
    url = private.start(register=register)
    problems = Broker.from_url(url).check_server()
    if problems:
        if register:
            private.release()
        raise ServiceError(f"the private redis-server is unsafely configured: {problems[0]}")
    return private


def redis_for(redis_url: Optional[str], register: bool = False) -> tuple[str, Optional[object]]:
    """The Redis URL a command uses and, without a given one, the PrivateRedis it shares (else None).
    `register`: a long-running command counts as a user of the private server until it calls release()."""
    url = settings.redis_url(redis_url)
    if url:
        return url, None
    private = start_private_redis(register=register)
    return private.url, private


def connect_broker(redis_url: Optional[str] = None, warn: bool = True):
    """A Broker on the given URL or $ZIYA_BATCH_REDIS_URL, else on this home's private redis-server; a Redis
    that cannot be reached is one line (with the URL's password masked); unsafe settings are named on stderr."""
    from ..queue import Broker
    from ..redact import mask_url

    url, _ = redis_for(redis_url)
    broker = Broker.from_url(url)
    try:
        broker.client.ping()
        problems = broker.check_server() if warn else []
    except redis.AuthenticationError:
        raise ServiceError(f"Redis at {mask_url(url)} refused the password: check the URL's password") from None
    except redis.ResponseError as err:
        if "NOAUTH" in str(err) or "WRONGPASS" in str(err):
            raise ServiceError(f"Redis at {mask_url(url)} needs a password: put it in the URL "
                               "(redis://:PASSWORD@host:port/0)") from None
        raise ServiceError(f"Redis at {mask_url(url)} answered with an error: {err}") from None
    except redis.RedisError as err:
        raise ServiceError(f"cannot reach Redis at {mask_url(url)} ({type(err).__name__}): start it, or pass "
                           f"the right --redis-url / {settings.REDIS_ENV}") from None
    for w in problems:
        print(f"ziya-batch: warning: {w}", file=sys.stderr)
    return broker



def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """A Ray address given as host:port (a head's GCS) or ray://host:port must be one and answer a TCP connect
    now: ray.init retries one that does not answer for many minutes, and takes a malformed one for a traceback.
    SpecError (exit 2) for the form, ServiceError (exit 3) for silence. "auto" and "local" are Ray's own."""
    from ..spec_load import show_text

    if address in ("auto", "local"):
        return
    scheme, sep, rest = address.partition("://")
    if sep and scheme not in ("ray", "http", "https", "") and scheme.isidentifier():
        return                      # a Ray client builder's own scheme (a module Ray imports): Ray's to judge
    target = rest if sep and scheme == "ray" else address
    host, sep, port = target.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host       # [IPv6]:port
    if not (sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65_536) or "/" in target \
            or any(c.isspace() for c in target) or (":" in host and not bracketed) or "[" in host or "]" in host:
        raise SpecError(f"Ray address '{show_text(address)}': expected host:port (the head's, e.g. 10.0.0.1:6379), "
                        "[IPv6]:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, UnicodeError) as err:
        why = getattr(err, "strerror", None) or type(err).__name__
        raise ServiceError(f"the Ray cluster at {show_text(address)} does not answer ({why}): start its head "
                           "(`ray start --head`), or give the right --address (or $RAY_ADDRESS)") from None
