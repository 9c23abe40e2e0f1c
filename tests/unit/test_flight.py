"""A shard in flight owns its lease's heartbeat: leaving `with flight:` stops it, however the shard ends."""
import threading
import time
from types import SimpleNamespace

import pytest

from ziya_batch.work.flight import Flight


class _Broker:
    def __init__(self, holds=True):
        self.beats = 0
        self.holds = holds

    def heartbeat(self, lease):
        self.beats += 1
        return self.holds


def _lease(lease_s=0.3):
    return SimpleNamespace(job_id="j", shard=SimpleNamespace(index=4), token=9, lease_s=lease_s)


def _beating() -> int:
    return sum(t.name == "lease-heartbeat" for t in threading.enumerate())


def test_leaving_with_flight_stops_the_heartbeat_even_on_an_error():
    before = _beating()
    broker = _Broker()
    flight = Flight.begin(broker, _lease(), spec=None)
    assert flight.key == "j/4/9" and _beating() == before + 1
    with pytest.raises(KeyError):
        with flight:
            time.sleep(0.5)              # renewed every lease_s/3, but never faster than every 0.2 s
            raise KeyError("a failure on the way")
    assert broker.beats >= 1 and _beating() == before
    beats = broker.beats
    time.sleep(0.3)
    assert broker.beats == beats         # nothing renews the lease after the shard ended
    with flight:                         # a second stop is harmless
        pass


def test_a_heartbeat_the_queue_refuses_marks_the_flight_lost():
    flight = Flight.begin(_Broker(holds=False), _lease(), spec=None)
    with flight:
        deadline = time.monotonic() + 5
        while not flight.lost:
            assert time.monotonic() < deadline
            time.sleep(0.05)
