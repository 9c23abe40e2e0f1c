"""The worker's failure policy (work/failures.py) on plain exceptions: what each failure at each stage does."""
import pytest
import torch

from ziya_batch.work.failures import (Action, EngineOutOfMemory, LeaseLost, RunMode, SpecUnreadable, Stage, decide,
                                      engine_calls, run_mode)
from ziya_batch.work.models import ReplicaBroken


def _oom(text="CUDA out of memory. Tried to allocate 2.00 GiB\nallocator details"):
    with pytest.raises(EngineOutOfMemory) as got:
        with engine_calls():
            raise torch.OutOfMemoryError(text)
    return got.value


def test_the_engine_boundary_turns_every_allocation_failure_into_one_type():
    assert _oom().why == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    for text in ("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate", "DefaultCPUAllocator: can't allocate memory"):
        with pytest.raises(EngineOutOfMemory, match="RuntimeError"):
            with engine_calls():
                raise RuntimeError(text)
    # anything else passes unchanged
    with pytest.raises(ValueError, match="bad token"):
        with engine_calls():
            raise ValueError("bad token")
    with pytest.raises(ReplicaBroken):
        with engine_calls():
            raise ReplicaBroken("rank 0 failed")


def test_out_of_memory_is_no_lines_fault():
    step = decide(_oom(), Stage.STEP, "w1")
    assert step.action is Action.GIVE_BACK and step.back_off and not step.replica_down
    assert step.message == ("engine out of memory on w1: "
                            "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    shard = decide(_oom(), Stage.SHARD, "w1")
    assert shard.action is Action.GIVE_BACK and shard.back_off and shard.message.startswith("out of memory on w1")
    # the same on a tensor-parallel replica: give back quietly, then the replica goes down
    tp = decide(_oom(), Stage.STEP, "w1", tensor_parallel=True)
    assert tp.action is Action.GIVE_BACK and tp.replica_down and tp.quietly
    broken = tp.replica_broken(_oom())
    assert isinstance(broken, ReplicaBroken) and "out of memory mid-step" in str(broken)
    # the message text alone, without the boundary, is not an out-of-memory: a line's failure is bisected
    assert decide(RuntimeError("CUDA out of memory"), Stage.STEP).action is Action.REDO_ALONE


def test_an_engine_that_will_not_load_gives_the_shard_back_and_backs_off():
    for err in (_oom(), OSError("no such checkpoint on this node")):
        d = decide(err, Stage.LOAD, "w1")
        assert d.action is Action.GIVE_BACK and d.back_off and not d.replica_down
        assert d.message.startswith("engine would not load on w1: ")
    d = decide(ReplicaBroken("rank 0 failed to load"), Stage.LOAD, "w1")
    assert d.action is Action.GIVE_BACK and d.replica_down and d.quietly and not d.back_off


def test_a_failed_step_is_redone_alone_and_a_shards_own_failure_fails_it():
    assert decide(ValueError("bad request"), Stage.STEP).action is Action.REDO_ALONE
    assert decide(ValueError("bad request"), Stage.ADMIT).action is Action.REDO_ALONE
    assert decide(_oom(), Stage.ADMIT).action is Action.REDO_ALONE
    for stage in (Stage.READ, Stage.SHARD):
        d = decide(KeyError("results"), stage)
        assert d.action is Action.FAIL and d.message == "KeyError: 'results'" and not d.back_off
    assert decide(_oom(), Stage.READ).action is Action.FAIL


def test_a_lost_lease_drops_and_a_dying_process_abandons():
    assert decide(LeaseLost(), Stage.SHARD).action is Action.DROP
    assert decide(LeaseLost(), Stage.STEP).action is Action.DROP
    for stage in Stage:
        assert decide(KeyboardInterrupt(), stage).action is Action.ABANDON
    for stage in (Stage.READ, Stage.ADMIT, Stage.STEP, Stage.SHARD):
        assert decide(ReplicaBroken("x"), stage).action is Action.ABANDON
    # shards waiting on others: a broken replica gives them back untried; any other error leaves them to expire
    for stage in (Stage.DRAIN, Stage.REDO):
        d = decide(ReplicaBroken("rank 1 died"), stage, "w1")
        assert d.action is Action.GIVE_BACK and d.replica_down and d.quietly and "replica w1 broke" in d.message
        assert decide(ConnectionError("Redis went away"), stage).action is Action.ABANDON


def test_a_spec_this_worker_cannot_read_goes_back_untried():
    # a newer release's spec (unknown keys) during a rolling upgrade: not the shard's fault, no engine to back off
    err = SpecUnreadable("SpecError: spec of job j1: name: Input should be a valid string")
    d = decide(err, Stage.CLAIM, "w1")
    assert d.action is Action.GIVE_BACK and not d.back_off and not d.replica_down
    assert d.why == f"cannot read the job's spec ({err})" and d.message == f"w1 {d.why}"
    # by type, whatever the stage; a plain error at the claim is still the shard's own
    assert decide(err, Stage.SHARD).action is Action.GIVE_BACK
    assert decide(ValueError("x"), Stage.CLAIM).action is Action.FAIL


class _Lease:
    def __init__(self, dead_letter=False, isolate=False):
        self.dead_letter, self.isolate = dead_letter, isolate


def test_run_mode():
    assert run_mode(_Lease()) is RunMode.SHARED
    assert run_mode(_Lease(isolate=True)) is RunMode.ISOLATE
    assert run_mode(_Lease(dead_letter=True, isolate=True)) is RunMode.DEAD_LETTER


def test_storage_that_does_not_answer_gives_the_shard_back_and_pauses_claims(monkeypatch):
    from ziya_batch.work import failures
    from ziya_batch.work.failures import StorageAway, StoragePause, storage_calls

    class EndpointConnectionError(Exception):      # botocore's, by name: io.storage.unreachable reads the type
        pass
    for err in (ConnectionResetError(104, "Connection reset by peer"), TimeoutError("timed out"),
                EndpointConnectionError('Could not connect to the endpoint URL: "http://s3:9000/b"')):
        with pytest.raises(StorageAway) as got:
            with storage_calls():
                raise err
        assert type(err).__name__ in str(got.value)
        for stage in (Stage.READ, Stage.SHARD):
            d = decide(got.value, stage, "w1")
            assert d.action is Action.GIVE_BACK and d.pause_claims and not d.back_off and not d.replica_down
            assert d.message.startswith("storage did not answer on w1: ") and d.why == ""
    # a store that answers with an error (a permission refused, a missing object) is the shard's failure as before
    for err in (PermissionError(13, "Permission denied"), FileNotFoundError(2, "No such file")):
        with pytest.raises(type(err)):
            with storage_calls():
                raise err
        assert decide(err, Stage.READ).action is Action.FAIL
    # the pause, by job: 5 s, doubling with each failure in a row up to 120 s; a commit of the job's ends the series;
    # other jobs (other stores) are not paused
    now = [1000.0]
    monkeypatch.setattr(failures.time, "monotonic", lambda: now[0])
    p = StoragePause()
    assert not p.active("a")
    seen = []
    for _ in range(7):
        p.failed("a")
        seen.append(p.seconds("a"))
    assert seen == [5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 120.0] and p.active("a") and not p.active("b")
    now[0] += 119.9
    assert p.active("a")
    now[0] += 0.2
    assert not p.active("a")
    p.failed("b")
    p.answered("a")
    p.failed("a")
    assert p.seconds("a") == 5.0 and p.seconds("b") == 5.0
    # Redis's own errors are named like a store's (redis.ConnectionError) but are never taken for storage
    import redis
    for err in (redis.ConnectionError("Error 111 connecting to localhost:6379"), redis.TimeoutError("timed out")):
        with pytest.raises(type(err)):
            with storage_calls():
                raise err


def test_redis_away_is_no_shards_failure_and_is_waited_out_until_the_worker_stops(monkeypatch):
    import threading

    import redis

    from ziya_batch.work import failures
    from ziya_batch.work.failures import RedisPatience

    monkeypatch.setattr(failures, "REDIS_RETRY_S", 0.01)

    # a shard whose commit meets no Redis did not fail: abandoned (its lease expires), never failed or given back
    for stage in (Stage.SHARD, Stage.READ, Stage.STEP):
        assert decide(redis.ConnectionError("Connection refused"), stage).action is Action.ABANDON
    calls = []

    def commit():
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return True

    stop = threading.Event()
    patience = RedisPatience(stop)
    assert patience(commit, "shard 0's commit") is True and len(calls) == 3     # Redis answered the third time
    with pytest.raises(ValueError):                 # anything but Redis being away is the caller's to handle
        patience(lambda: (_ for _ in ()).throw(ValueError("bad stats")), "shard 0's commit")
    stop.set()                                      # a stopping worker leaves what is in flight to expire
    calls.clear()
    with pytest.raises(redis.ConnectionError):
        patience(commit, "shard 0's commit")
    assert len(calls) == 1


def test_a_replica_answering_readonly_mid_failover_is_waited_out_like_redis_away(monkeypatch):
    import threading

    import redis

    from ziya_batch.work import failures
    from ziya_batch.work.failures import RedisPatience

    monkeypatch.setattr(failures, "REDIS_RETRY_S", 0.01)
    # a failover's old primary, demoted, refuses writes until the client reaches the new one: the shard's work is
    # done, so its commit waits (given up, the reaper would count a failed try of finished work)
    for stage in (Stage.SHARD, Stage.READ, Stage.STEP):
        assert decide(redis.ReadOnlyError("You can't write against a read only replica."), stage).action \
            is Action.ABANDON
    calls = []

    def commit():
        calls.append(1)
        if len(calls) < 2:
            raise redis.ReadOnlyError("You can't write against a read only replica.")
        return True

    assert RedisPatience(threading.Event())(commit, "shard 0's commit") is True and len(calls) == 2
    with pytest.raises(redis.ResponseError):        # other refusals are not waited out
        RedisPatience(threading.Event())(lambda: (_ for _ in ()).throw(redis.ResponseError("WRONGTYPE")), "x")


def test_a_message_kept_in_redis_is_utf8_text():
    # a failure's text goes to Redis (the job's errors), which takes UTF-8 only: a lone surrogate in an exception (a
    # value decoded with surrogateescape, a JSON escape in a model's config) made the worker's broker.fail raise
    from ziya_batch.work.failures import one_line

    err = ValueError("unknown model_type '" + b"llama\xff".decode("utf-8", "surrogateescape") + "'\nsecond line")
    assert one_line(err) == "ValueError: unknown model_type 'llama\\udcff'"
    one_line(err).encode("utf-8")
