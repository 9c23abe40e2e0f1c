"""Job and shard states and the transitions allowed between them.

The tables below are the only place transitions are defined. The Lua scripts get them rendered as Lua
tables (`lua_tables()`) and refuse anything else, so no code path can write a state Redis was not allowed
to reach from the current one.
"""
from __future__ import annotations

import enum

from ..errors import ZiyaBatchError


class _Ordered(str, enum.Enum):
    """A string enum (stored as its value in Redis and JSON) ordered by declaration."""

    def _rank(self) -> int:
        return list(type(self)).index(self)

    def __lt__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._rank() < other._rank()

    def __le__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._rank() <= other._rank()

    def __gt__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._rank() > other._rank()

    def __ge__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._rank() >= other._rank()

    def __str__(self) -> str:
        return self.value


class JobState(_Ordered):
    QUEUED = "queued"            # submitted; no shard claimed yet
    RUNNING = "running"          # at least one shard was claimed
    FINALIZING = "finalizing"    # every shard committed (dead-lettered ones as error parts); manifest next
    COMPLETED = "completed"      # manifest written (only a finalizer that checked storage gets here)
    FAILED = "failed"            # finalizing found missing parts, or an operator failed it; resubmit reopens
    CANCELLING = "cancelling"    # no new claims; waiting for leased shards to commit, fail or expire
    CANCELLED = "cancelled"      # no leased shard left; committed parts stay; resubmit reopens

    def is_finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)

    def is_claimable(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


class ShardState(_Ordered):
    PENDING = "pending"          # waiting for a claim (maybe not before a backoff time)
    LEASED = "leased"            # a worker holds it under a fencing token until its lease expires
    COMMITTED = "committed"      # its part is committed (back to pending/dead only if storage lost it unpromoted)
    DEAD = "dead"                # retries exhausted: the next claim writes every line as a retries_exhausted error


J, S = JobState, ShardState

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    J.QUEUED: frozenset({J.RUNNING, J.FINALIZING, J.CANCELLING, J.CANCELLED, J.FAILED}),
    J.RUNNING: frozenset({J.FINALIZING, J.CANCELLING, J.CANCELLED, J.FAILED}),
    # running: a shard's staged parts were lost before promotion, so it runs again (uncommit.lua)
    J.FINALIZING: frozenset({J.COMPLETED, J.FAILED, J.RUNNING}),
    J.COMPLETED: frozenset(),
    J.FAILED: frozenset({J.QUEUED, J.FINALIZING}),          # resubmitted: reopened
    J.CANCELLING: frozenset({J.CANCELLED, J.FAILED}),
    J.CANCELLED: frozenset({J.QUEUED, J.FINALIZING}),       # resubmitted: reopened
}

SHARD_TRANSITIONS: dict[ShardState, frozenset[ShardState]] = {
    S.PENDING: frozenset({S.LEASED, S.COMMITTED}),          # committed: found committed in storage on resubmit
    S.LEASED: frozenset({S.COMMITTED, S.PENDING, S.DEAD}),  # commit; fail/expiry/abandon; retries exhausted
    S.DEAD: frozenset({S.LEASED, S.PENDING, S.COMMITTED}),  # claimed to write error lines; reopened; storage
    # Redis accepted the commit but storage lost the staged parts before they were promoted (no commit marker):
    # the shard runs again (uncommit.lua); a dead-lettered one goes back to dead, its error lines unwritten
    S.COMMITTED: frozenset({S.PENDING, S.DEAD}),
}


class TransitionError(ZiyaBatchError):
    """A state change the transition table does not allow (e.g. completing a job that is still running)."""


def check_job_transition(src: JobState, dst: JobState) -> None:
    if dst not in JOB_TRANSITIONS[src]:
        raise TransitionError(f"job cannot go from {src.value} to {dst.value}")


def check_shard_transition(src: ShardState, dst: ShardState) -> None:
    if dst not in SHARD_TRANSITIONS[src]:
        raise TransitionError(f"shard cannot go from {src.value} to {dst.value}")


def lua_tables() -> str:
    """The transition tables as Lua source, prepended to every script."""

    def render(name: str, table) -> str:
        rows = []
        for src, dsts in table.items():
            inner = ", ".join(f'["{d.value}"]=true' for d in sorted(dsts))
            rows.append(f'  ["{src.value}"]={{{inner}}}')
        return f"local {name} = {{\n" + ",\n".join(rows) + "\n}\n"

    return render("JOB_ALLOWED", JOB_TRANSITIONS) + render("SHARD_ALLOWED", SHARD_TRANSITIONS)
