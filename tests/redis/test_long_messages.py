"""A failure's message is kept in the job's errors (`status JOB_ID`, GET /v1/jobs/{id}) cut to MESSAGE_BYTES bytes by
the script that records it. The cut falls between characters: one inside a character's UTF-8 bytes left an entry
that is not UTF-8, and every read of the job's detail failed on it (UnicodeDecodeError: a traceback on the CLI, a 500
over HTTP) until 50 newer failures pushed it out. Messages quote users' text (a file name, a model's error), in any
script."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ziya_batch.queue import ShardStats

RUNS = itertools.count()
MESSAGE_BYTES = 2000        # requeue.lua and uncommit.lua keep this much of a message

# one to four bytes a character in UTF-8, so the cut falls inside characters of every length
TEXT = st.text(st.sampled_from("a\u00e9\u897f\u5b89\U0001f600"), min_size=600, max_size=1200)


def _kept(message: str) -> str:
    """What an entry may keep of `message`: its longest head of at most MESSAGE_BYTES bytes."""
    data = message.encode("utf-8")[:MESSAGE_BYTES]
    return data.decode("utf-8", "ignore")


def _check(broker, job_id: str, message: str) -> None:
    st_ = broker.status(job_id, detail=True)                # decodes every kept entry
    shown = st_.errors[0]["message"]
    assert shown == _kept(message), (len(shown), len(message))
    assert len(shown.encode("utf-8")) <= MESSAGE_BYTES
    assert len(broker.list_jobs()) >= 1


@pytest.mark.parametrize("lead", range(4))
@pytest.mark.parametrize("char", ["\u00e9", "\u897f", "\U0001f600"])
def test_a_long_failure_message_is_cut_between_characters(broker, make_spec, make_shards, lead, char):
    spec = make_spec(f"cut-{lead}-{ord(char)}", max_retries=5)
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    message = "InputError: " + "x" * lead + char * 1000
    assert broker.fail(broker.claim("w"), message) == "retry"
    _check(broker, job_id, message)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT, st.booleans())
def test_any_failure_or_give_back_message_reads_back(broker, make_spec, make_shards, text, storage):
    spec = make_spec(f"any-{next(RUNS)}")
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    lease = broker.claim("w", accept=lambda j: j == job_id)       # not an earlier example's shard, due again
    if storage:
        assert broker.give_back(lease, text, storage=True) == "retry"
    else:
        assert broker.fail(lease, text) == "retry"
    _check(broker, job_id, text)


@pytest.mark.parametrize("lead", range(3))
def test_a_long_reason_for_taking_a_commit_back_is_cut_between_characters(broker, make_spec, make_shards, lead):
    broker.promote_grace_s = 0.0
    spec = make_spec(f"uncommit-{lead}")
    job_id = broker.submit(spec, make_shards(spec, 1)).job_id
    lease = broker.claim("w")
    assert broker.commit(lease, ShardStats(prompts_done=1, samples=1, attempt="a1"))
    reason = "staged parts lost: " + "x" * lead + "\u897f\u5b89" * 600
    assert broker.uncommit(job_id, 0, lease.token, reason, attempt="a1").outcome in ("retry", "pending")
    _check(broker, job_id, reason)
