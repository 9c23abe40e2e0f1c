"""queue.Broker and engine.LLMEngine have every member of the protocols the jobs service and the worker are
typed against, with the same parameters, so an annotation never names a method that is not there."""
from __future__ import annotations

import inspect

import pytest

from ziya_batch.protocols import GenerationEngine, JobsBroker, WaitingQueue, WorkerBroker


def _members(protocol) -> dict[str, object]:
    """The protocol's own methods and properties, those of the protocols it extends included."""
    out = {}
    for cls in reversed(protocol.__mro__):
        if cls in (object,) or cls.__name__ in ("Protocol", "Generic"):
            continue
        out.update({k: v for k, v in vars(cls).items()
                    if not k.startswith("_") and (callable(v) or isinstance(v, property))})
    return out


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def _check(protocol, impl) -> None:
    members = _members(protocol)
    assert members, protocol
    for name, member in members.items():
        if isinstance(member, property):
            continue            # an attribute the instance sets: checked against the constructor's source
        assert hasattr(impl, name), f"{impl.__name__} has no {name} ({protocol.__name__})"
        assert _params(getattr(impl, name)) == _params(member), f"{impl.__name__}.{name} differs from {protocol.__name__}"


def test_broker_is_a_worker_broker_and_a_jobs_broker():
    from ziya_batch.queue import Broker

    assert set(_members(JobsBroker)) < set(_members(WorkerBroker))
    _check(WorkerBroker, Broker)


def test_llm_engine_is_a_generation_engine():
    pytest.importorskip("torch")
    from ziya_batch.engine.engine import LLMEngine
    from ziya_batch.engine.scheduler import Scheduler

    _check(GenerationEngine, LLMEngine)
    # tokenizer, max_model_len and scheduler are set per instance: the constructor must set each
    init = inspect.getsource(LLMEngine)
    for attr in ("self.tokenizer", "self.max_model_len", "self.scheduler"):
        assert attr in init, attr
    waiting = inspect.getsource(Scheduler)
    assert "self.waiting" in waiting and set(_members(WaitingQueue)) == {"waiting"}


def test_a_missing_method_is_caught():
    class Partial:
        def find_job(self, job_id):
            return None

    with pytest.raises(AssertionError, match="has no"):
        _check(JobsBroker, Partial)
