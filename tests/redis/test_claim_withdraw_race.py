"""A claim on an output.path stays with its job id when the submit that made it is refused (a withdrawal of it was
tried, and removed for this race: jobs/submit.py makes no withdrawal). Two submits of the same spec at once (a client retrying over HTTP, `ziya-batch run` started twice, a Ctrl-C'd submit beside
another) must not leave the job queued without its claim: the first to claim is refused (an input that could not be
read while it was counted, an interrupt) while the second, which found the claim made, is still counting the input.
Without the owner file the job's path is free for any other spec, whose parts would land beside the job's under
the same names, and the job itself could no longer be resumed once it has written parts. Real redis-server."""
from __future__ import annotations

import json
import threading

import pytest

from ziya_batch import io
from ziya_batch.errors import InputError, SpecError
from ziya_batch.jobs import submit, submit_job
from ziya_batch.spec import parse_spec


def _spec(tmp_path, temperature: float = 1.0):
    inp = tmp_path / "in.jsonl"
    if not inp.exists():
        inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"hello {i}"}) + "\n" for i in range(6)))
    return submit.absolute_locations(parse_spec({
        "name": "race", "model": {"path": "m"}, "input": [str(inp)], "shard_size": 2,
        "sampling": {"temperature": temperature}, "output": {"path": str(tmp_path / "out")}}))


def test_a_refused_submit_does_not_withdraw_the_claim_of_a_concurrent_submit_of_the_same_spec(
        tmp_path, broker, monkeypatch):
    spec = _spec(tmp_path)
    job_id = submit.job_id_for(spec, broker)
    real = submit._counted_rows
    second_counting, first_done = threading.Event(), threading.Event()

    def counted_rows(*a, **k):
        if threading.current_thread().name == "second":
            second_counting.set()
            assert first_done.wait(10)          # a large input: still counting when the first submit gives up
            return real(*a, **k)
        assert second_counting.wait(10)
        raise InputError("input in.jsonl cannot be read: Connection reset by peer")
    monkeypatch.setattr(submit, "_counted_rows", counted_rows)

    got = {}

    def second():
        try:
            got["status"] = submit_job(spec, broker)
        except BaseException as err:  # noqa: BLE001 - the assertion below names it
            got["error"] = err

    # the first submit claims the path, then starts counting; the second finds the claim made (its own job id)
    t = threading.Thread(target=second, name="second")
    real_claim = submit.claim_output

    def claim_then_start_second(*a, **k):
        made = real_claim(*a, **k)
        if threading.current_thread().name != "second":
            t.start()
        return made
    monkeypatch.setattr(submit, "claim_output", claim_then_start_second)
    with pytest.raises(InputError):
        submit_job(spec, broker)
    first_done.set()
    t.join(20)
    assert "error" not in got, got
    assert got["status"].job_id == job_id and broker.find_job(job_id) is not None     # the job is queued
    # its output path is still its own: another spec writing there is refused, as it is for any queued job
    other = _spec(tmp_path, temperature=0.5)
    assert other.identity() != job_id
    monkeypatch.setattr(submit, "_counted_rows", real)
    monkeypatch.setattr(submit, "claim_output", real_claim)
    with pytest.raises(SpecError, match="another job"):
        submit_job(other, broker)
    assert io.OutputDir(str(tmp_path / "out")).owner() == job_id
