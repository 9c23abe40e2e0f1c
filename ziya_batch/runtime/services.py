"""Connecting to the services a command needs: the Redis queue (given, or a private one for `run`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from ..errors import ServiceError

REDIS_ENV = "ZIYA_BATCH_REDIS_URL"
HOME_ENV = "ZIYA_BATCH_HOME"


def home_dir() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "ziya-batch")


def connect_broker(redis_url: Optional[str] = None, warn: bool = True):
    """A Broker on the given URL or $ZIYA_BATCH_REDIS_URL; unsafe server settings are named on stderr."""
    from ..queue import Broker

    url = redis_url or os.environ.get(REDIS_ENV)
    if not url:
        raise ServiceError(f"no Redis to talk to: pass --redis-url or set {REDIS_ENV} (e.g. redis://host:6379/0)")
    broker = Broker.from_url(url)
    if warn:
        for w in broker.check_server():
            print(f"ziya-batch: warning: {w}", file=sys.stderr)
    return broker
