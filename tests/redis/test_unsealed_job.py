"""A job whose submit stopped before its shard list was all written (the submitting process killed midway) hands
out no shard; `status` (CLI, JSON, HTTP) says so and how to finish it, and the same spec submitted again does."""
import json

import pytest

from ziya_batch import cli
from ziya_batch.jobs import job_status, waiting_note
from ziya_batch.jobs.service import UNSEALED_NOTE
from ziya_batch.queue import JobState


class Killed(Exception):
    pass


def _half_submitted(broker, make_spec, make_shards):
    spec = make_spec(shard_size=5)

    def shards_then_die():
        for i, ref in enumerate(make_shards(spec, 2500)):
            if i == 1500:
                raise Killed()
            yield ref

    with pytest.raises(Killed):
        broker.submit(spec, shards_then_die())
    return spec, spec.identity()


def test_an_unsealed_job_says_why_nothing_runs_and_a_resubmit_finishes_it(broker, make_spec, make_shards):
    spec, job_id = _half_submitted(broker, make_spec, make_shards)
    st = job_status(broker, job_id)
    assert not st.sealed and st.to_dict()["sealed"] is False
    assert st.state == JobState.QUEUED and broker.claim("w") is None
    assert waiting_note(broker, st) == UNSEALED_NOTE
    assert [j.sealed for j in broker.list_jobs() if j.job_id == job_id] == [False]

    st = broker.submit(spec, make_shards(spec, 2500))
    assert st.sealed and st.shards_total == 2500
    assert waiting_note(broker, st) != UNSEALED_NOTE
    assert broker.claim("w").shard.index == 0


def test_a_cancelled_unsealed_job_has_no_note(broker, make_spec, make_shards):
    _, job_id = _half_submitted(broker, make_spec, make_shards)
    st = broker.cancel(job_id)
    assert st.state == JobState.CANCELLED and not st.sealed and waiting_note(broker, st) is None


def test_status_shows_the_note_on_the_cli(broker, make_spec, make_shards, monkeypatch, capsys):
    _, job_id = _half_submitted(broker, make_spec, make_shards)
    monkeypatch.setattr(cli, "_broker", lambda url: broker)
    with pytest.raises(SystemExit) as ex:
        cli.main(["status", job_id, "--json"])
    assert ex.value.code in (0, None)
    data = json.loads(capsys.readouterr().out)
    assert data["sealed"] is False and data["note"] == UNSEALED_NOTE
    with pytest.raises(SystemExit):
        cli.main(["status"])
    assert "shard list is not all written" in capsys.readouterr().out.replace("\n", " ")
