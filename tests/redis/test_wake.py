"""Idle workers wake when work is announced (a submit, a reopen, a shard given back) instead of at their next
look: a job starts on an idle replica at once, and an idle worker still sees a stop at once. A real Redis; the
last test runs the demo model on the CPU."""
import json
import socket
import threading
import time

from ziya_batch.jobs import submit_job
from ziya_batch.queue import Broker, JobState
from ziya_batch.work.worker import Worker
from ziya_batch.spec import parse_spec


def _unreachable_url() -> str:
    """A Redis URL where nothing listens (a port taken from the OS, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def _small_job(tmp_path, model, name: str, lines: int):
    """A job of `lines` short prompts in shards of 3 on the demo model, 2 tokens each."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(lines)))
    return parse_spec({"name": name, "model": {"path": str(model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 2, "seed": 1}, "output": {"path": str(tmp_path / "out")},
                       "shard_size": 3})


def _listener(broker: Broker) -> Broker:
    other = Broker(broker.client, prefix=broker.keys.prefix)
    other.watch_work()
    return other


def test_an_announcement_wakes_a_waiting_broker_and_a_burst_wakes_it_once(broker):
    listener = _listener(broker)
    try:
        assert not listener.wait_for_work(0.2)
        waker = threading.Timer(0.3, broker.announce_work, args=("job",))
        t0 = time.monotonic()
        waker.start()
        assert listener.wait_for_work(10.0)
        assert time.monotonic() - t0 < 5.0
        # announced while the listener was busy: kept for its next wait, and read all at once
        for _ in range(3):
            broker.announce_work("job")
        time.sleep(0.1)
        assert listener.wait_for_work(0.0)
        assert not listener.wait_for_work(0.2)
    finally:
        listener.unwatch_work()


def test_submit_reopen_and_a_requeue_announce_work(broker, make_shards, make_spec):
    listener = _listener(broker)
    try:
        spec = make_spec(max_retries=3)
        job_id = broker.submit(spec, make_shards(spec, 2)).job_id
        assert listener.wait_for_work(2.0)
        lease = broker.claim("w1")
        assert not listener.wait_for_work(0.2)          # a claim announces nothing
        assert broker.fail(lease, "boom") == "retry"
        assert listener.wait_for_work(2.0)
        broker.cancel(job_id)
        assert broker.status(job_id).state == JobState.CANCELLED
        while listener.wait_for_work(0.1):
            pass
        broker.submit(spec, make_shards(spec, 2))       # resubmitting a cancelled job reopens it
        assert broker.status(job_id).state != JobState.CANCELLED
        assert listener.wait_for_work(2.0)
    finally:
        listener.unwatch_work()


def test_an_idle_worker_starts_a_submitted_job_at_once_and_stops_at_once(tmp_path, demo_model, broker):
    """The worker's idle interval is a minute here: only the announcement can make it claim within it."""
    worker = Worker(broker, worker_id="w-idle", device="cpu")
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve_forever, args=(stop,), kwargs={"idle_sleep_s": 60.0}, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)                                 # idle: it found nothing and waits
        spec = _small_job(tmp_path, demo_model, "wake", 6)
        t0 = time.monotonic()
        job_id = submit_job(spec, broker).job_id
        while broker.status(job_id).shards.get("committed", 0) < 2:
            assert time.monotonic() - t0 < 45.0, broker.status(job_id)
            time.sleep(0.05)
        assert broker.status(job_id).prompts_done == 6
        time.sleep(0.5)                                 # idle again
    finally:
        t_stop = time.monotonic()
        stop.set()
        thread.join(timeout=10.0)
    assert not thread.is_alive()
    assert time.monotonic() - t_stop < 2.0


def test_an_announcement_never_fails_what_it_follows():
    """What announce_work follows (a submit, a requeue) is written already: a Redis it cannot reach is not an
    error of that call."""
    Broker.from_url(_unreachable_url()).announce_work("job")


def test_a_subscription_that_failed_is_made_again_later(redis_client):
    """A worker that could not subscribe (Redis away) is not left with a subscription that never was, whose
    waits would time out from then on: it subscribes at its next wait."""
    import pytest
    import redis

    away = Broker.from_url(_unreachable_url())
    with pytest.raises(redis.ConnectionError):
        away.watch_work()
    assert away._work is None
    up = Broker(redis_client, prefix="zbwake")
    up.watch_work()
    waker = threading.Timer(0.2, Broker(redis_client, prefix="zbwake").announce_work, args=("job",))
    waker.start()
    assert up.wait_for_work(5.0)
    up.unwatch_work()


def test_an_idle_worker_still_wakes_for_work_after_redis_restarts(tmp_path, demo_model, restartable_redis):
    """Redis restarts under an idle worker (its subscription's connection closes): it subscribes again, and a
    job submitted afterwards starts at once, not after the worker's idle interval (a minute here)."""
    url = restartable_redis.url
    worker = Worker(Broker.from_url(url), worker_id="w-restart", device="cpu")
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve_forever, args=(stop,), kwargs={"idle_sleep_s": 60.0}, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        restartable_redis.kill()
        time.sleep(0.5)
        restartable_redis.start()
        time.sleep(1.0)                                 # a few slices: the worker is subscribed again
        spec = _small_job(tmp_path, demo_model, "restart", 3)
        broker = Broker.from_url(url)
        t0 = time.monotonic()
        job_id = submit_job(spec, broker).job_id
        while broker.status(job_id).shards.get("committed", 0) < 1:
            assert time.monotonic() - t0 < 30.0, broker.status(job_id)
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=10.0)
    assert not thread.is_alive()
