"""`run` stops on a crash loop of replicas that cannot start or load the job's engine, and only then: replicas that
die for other reasons (a node lost, a line that kills its worker) do not stop it, however many die at once."""
from types import SimpleNamespace

from ziya_batch.runtime.local import DEATHS_WITHOUT_PROGRESS, _CrashLoop, _cannot_load


def worker(notes=None):
    return SimpleNamespace(cannot_load=notes or {})


def test_replicas_dying_as_they_start_stop_the_run_after_a_few_in_a_row():
    loop, deaths = _CrashLoop("job"), []
    for i in range(DEATHS_WITHOUT_PROGRESS):
        assert loop.update(0, deaths, {}) is None
        deaths.append((f"r{i}", "OutOfMemoryError: CUDA out of memory", True))
    why = loop.update(0, deaths, {})
    assert why and f"died {DEATHS_WITHOUT_PROGRESS} times in a row" in why and "CUDA out of memory" in why


def test_a_node_lost_with_many_registered_replicas_or_a_poison_line_does_not_stop_it():
    loop = _CrashLoop("job")
    workers = {f"r{i}": worker() for i in range(8)}
    deaths = [(f"r{i}", "ActorDiedError: the node died", False) for i in range(4)]   # one poll, no progress
    assert loop.update(0, deaths, workers) is None
    deaths += [("r4", "worker exited", False), ("r5", "worker exited", False)]      # lines that kill workers
    assert loop.update(0, deaths, workers) is None


def test_progress_resets_the_count_and_noted_load_failures_count():
    loop, deaths = _CrashLoop("job"), []
    workers = {"a": worker({"job": "OutOfMemoryError: CUDA out of memory"}), "b": worker(), "c": worker()}
    deaths += [("a", "x", False), ("b", "died starting", True)]
    assert loop.update(0, deaths, workers) is None and loop.streak == 2
    assert loop.update(5, deaths, workers) is None and loop.streak == 0              # a prompt finished
    deaths += [("a", "x", False)] * DEATHS_WITHOUT_PROGRESS
    # "a" has dropped out of the live list meanwhile (busy between heartbeats): its note is remembered
    assert "CUDA out of memory" in loop.update(5, deaths, {"b": worker()})


def test_replicas_lost_before_they_registered_do_not_stop_the_run():
    """A node lost while its replicas were still starting (loading the model): Ray reports a system error, not
    the constructor's, and their workers never registered. Not a crash loop."""
    loop = _CrashLoop("job")
    deaths = [(f"r{i}", "ActorDiedError: the node died", False) for i in range(4)]
    assert loop.update(0, deaths, {}) is None and loop.streak == 0


def test_the_run_stops_when_every_replica_noted_the_engine_would_not_load():
    manager = SimpleNamespace(replicas={"a": 1, "b": 1})
    assert _cannot_load("job", manager, {"a": worker({"job": "OOM"}), "b": worker()}) is None
    assert _cannot_load("job", manager, {"a": worker({"job": "OOM"})}) is None       # b not registered yet
    assert "every one of its 2 replica(s) (OOM)" in _cannot_load("job", manager, {"a": worker({"job": "OOM"}),
                                                                             "b": worker({"job": "OOM"})})
    assert _cannot_load("job", SimpleNamespace(replicas={}), {}) is None
