"""A claimed shard in flight and the heartbeat that keeps its lease: the flight owns the heartbeat, and leaving
`with flight:` stops it, whatever way the shard ends (committed, given back, failed, dropped, abandoned)."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..spec import JobSpec
from .generation import ShardWork

if TYPE_CHECKING:
    from ..queue import Lease

log = logging.getLogger(__name__)


class Heartbeat:
    """Renews a lease every lease_s/3 in a background thread; records when the lease is lost. Stopping twice is
    harmless."""

    def __init__(self, broker, lease):
        self.broker, self.lease = broker, lease
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def _run(self):
        interval_s = max(0.2, self.lease.lease_s / 3)
        while not self._stop.wait(interval_s):
            try:
                if not self.broker.heartbeat(self.lease):
                    self.lost.set()
                    return
            except Exception as err:  # noqa: BLE001 - Redis down: keep trying until the lease would expire
                log.warning("heartbeat failed: %s", err)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


@dataclass
class Flight:
    """A claimed shard being worked on. Its heartbeat runs from `begin` until the code that ends the shard leaves
    `with flight:`."""

    lease: "Lease"
    spec: JobSpec
    heartbeat: Heartbeat
    work: Optional[ShardWork] = None      # its parsed lines, while they are in the shared engine

    @classmethod
    def begin(cls, broker, lease, spec: JobSpec) -> "Flight":
        return cls(lease, spec, Heartbeat(broker, lease).start())

    @property
    def key(self) -> str:
        """Unique in the engine: two jobs may read one file, and a shard may come back to the same worker."""
        return f"{self.lease.job_id}/{self.lease.shard.index}/{self.lease.token}"

    @property
    def lost(self) -> bool:
        return self.heartbeat.lost.is_set()

    def __enter__(self) -> "Flight":
        return self

    def __exit__(self, *exc) -> None:
        self.heartbeat.stop()
