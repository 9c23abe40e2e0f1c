"""`ziya-batch forget` as a user runs it (real processes, the session's redis-server): what it prints, its exit
codes, one line per refusal, and bad arguments as one line each."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.processes import child_env
from ziya_batch.queue import Broker, ShardStats


def _cli(*args: str, url: str) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "ziya_batch.cli", "forget", *args, "--redis-url", url],
                       capture_output=True, text=True, timeout=120, env=child_env())
    return p.returncode, p.stdout, p.stderr


def _errors(err: str) -> list[str]:
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("ziya-batch: error: ") for line in lines), err
    return lines


@pytest.fixture
def queue(redis_server, redis_client, make_spec, make_shards):
    """The default-prefix broker the command uses (the database is flushed around the test), and a factory of jobs
    in a given state: job(name, state) -> id."""
    broker = Broker.from_url(redis_server.url)

    def job(name: str, state: str) -> str:
        spec = make_spec(name)
        job_id = broker.submit(spec, make_shards(spec, 2)).job_id
        if state == "completed":
            while (lease := broker.claim("w", accept=lambda j: j == job_id)) is not None:
                broker.commit(lease, ShardStats(prompts_done=10))
            broker.mark_completed(job_id)
        elif state == "cancelled":
            broker.cancel(job_id)
        return job_id

    return broker, job


def test_forget_by_id_prints_each_job_and_exits_0(queue, redis_server):
    broker, job = queue
    done, cancelled, kept = job("done", "completed"), job("gone", "cancelled"), job("kept", "completed")
    code, out, err = _cli(done, cancelled, done, url=redis_server.url)         # an id given twice counts once
    assert (code, err) == (0, ""), err
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"forgot {done} (done): completed 20") and lines[0].endswith(
        "2 shard(s); its output stays in /out/done")
    assert lines[1].startswith(f"forgot {cancelled} (gone): cancelled ")
    assert [s.job_id for s in broker.list_jobs()] == [kept]


def test_refusals_are_one_line_each_and_the_first_ones_exit_code(queue, redis_server):
    broker, job = queue
    running, done = job("running", "queued"), job("done", "completed")
    code, out, err = _cli(running, url=redis_server.url)
    assert code == 6 and out == ""
    [line] = _errors(err)
    assert f"job {running} is queued: only a completed, failed or cancelled job can be forgotten" in line
    assert f"ziya-batch cancel {running}" in line

    code, out, err = _cli("feedfacefeedface", url=redis_server.url)
    assert code == 4 and out == "" and "no job feedfacefeedface" in _errors(err)[0]

    # the finished one named beside them is forgotten; each refusal has its line; the exit code is the first one's
    code, out, err = _cli("feedfacefeedface", done, running, url=redis_server.url)
    assert code == 4 and out.startswith(f"forgot {done} ")
    lines = _errors(err)
    assert len(lines) == 2 and "no job feedfacefeedface" in lines[0] and f"job {running} is queued" in lines[1]
    assert [s.job_id for s in broker.list_jobs()] == [running]


def test_dry_run_and_finished_before(queue, redis_server):
    broker, job = queue
    old, new, running = job("old", "completed"), job("new", "completed"), job("running", "queued")
    now_ms = int(broker.server_time_s() * 1000)
    broker.client.hset(broker.keys.job(old), "finished_ms", now_ms - 8 * 86_400_000)
    broker.client.hset(broker.keys.job(new), "finished_ms", now_ms - 3_600_000)
    code, out, err = _cli("--finished-before", "7d", "--dry-run", url=redis_server.url)
    assert (code, err) == (0, "") and out.startswith(f"would forget {old} (old): completed ")
    assert len(out.splitlines()) == 1
    assert {s.job_id for s in broker.list_jobs()} == {old, new, running}
    code, out, err = _cli("--finished-before", "7d", url=redis_server.url)
    assert (code, err) == (0, "") and out.startswith(f"forgot {old} (old)")
    code, out, err = _cli("--finished-before", "1d", url=redis_server.url)
    assert (code, out, err) == (0, "no job finished more than 1d ago; nothing to forget\n", "")
    code, out, _ = _cli("--finished-before", "30m", url=redis_server.url)
    assert code == 0 and out.startswith(f"forgot {new} (new)")
    assert [s.job_id for s in broker.list_jobs()] == [running]


@pytest.mark.parametrize("args,expect", [
    ((), "give the JOB_IDs to forget, or --finished-before DURATION"),
    (("abc", "--finished-before", "7d"), "give JOB_IDs or --finished-before, not both"),
    (("--finished-before", "7"), "'7' is not a duration"),
    (("--finished-before", "-7d"), "'-7d' is not a duration"),
    (("--finished-before", "7 days"), "'7 days' is not a duration"),
    (("--finished-before", "٧d"), "is not a duration"),
    (("--finished-before", "99999999999d"), "is longer than 36500d"),
    (("--finished-before",), "'--redis-url' is not a duration"),       # the value left out: the next word is read
])
def test_bad_arguments_are_one_line_exit_2(redis_server, args, expect):
    code, out, err = _cli(*args, url=redis_server.url)
    assert code == 2 and out == "", (code, out, err)
    [line] = _errors(err)
    assert expect in line, line
