"""Connecting to the services a command needs: the Redis queue (given, or a private one for `run`)."""
from __future__ import annotations

import sys
from typing import Optional

from .. import settings
from ..errors import ServiceError
from ..settings import REDIS_ENV


def connect_broker(redis_url: Optional[str] = None, warn: bool = True):
    """A Broker on the given URL or $ZIYA_BATCH_REDIS_URL; unsafe server settings are named on stderr."""
    from ..queue import Broker

    url = settings.redis_url(redis_url)
    if not url:
        raise ServiceError(f"no Redis to talk to: pass --redis-url or set {REDIS_ENV} (e.g. redis://host:6379/0)")
    broker = Broker.from_url(url)
    if warn:
        for w in broker.check_server():
            print(f"ziya-batch: warning: {w}", file=sys.stderr)
    return broker
