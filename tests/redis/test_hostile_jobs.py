"""Hostile input end to end: the real command refuses inputs that are not regular files at once, with one line
and exit 2; a job whose lines used to fail their shard on every attempt completes with one error line per bad
line; a dead-lettered shard full of such lines still lets its job complete. Real redis-server, the demo model
on the CPU, local output; exact multisets of output ids."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.processes import child_env
from ziya_batch import io
from ziya_batch.queue import JobState
from ziya_batch.jobs import submit_job
from ziya_batch.work.worker import Worker
from ziya_batch.spec import parse_spec

HUGE = "9" * 5000


def _cli_submit(tmp_path, inputs, redis_url, timeout_s=60):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "hostile", "model": {"path": "m"}, "input": inputs,
                                   "output": {"path": str(tmp_path / "out")}}))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ziya_batch.cli", "submit", str(job), "--redis-url", redis_url],
                       capture_output=True, text=True, timeout=timeout_s,
                       env=child_env())
    return r, time.monotonic() - t0


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "glob_with_fifo", "symlink_to_urandom"])
def test_submit_refuses_inputs_that_are_not_regular_files(tmp_path, redis_server, redis_client, kind):
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "a", "prompt": "hi"}\n')
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    link = tmp_path / "link.jsonl"
    os.symlink("/dev/urandom", link)
    inputs = {"fifo": [str(fifo)], "dev_zero": ["/dev/zero"], "glob_with_fifo": [str(tmp_path / "*.jsonl")],
              "symlink_to_urandom": [str(good), str(link)]}[kind]
    r, took_s = _cli_submit(tmp_path, inputs, redis_server.url)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a regular file" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert took_s < 30
    assert redis_client.dbsize() == 0 or not any("shard" in k for k in redis_client.keys("*"))


def _job(tmp_path, model, lines: list[bytes], max_retries=3, shard_size=4):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    return parse_spec({"name": "hostile", "model": {"path": str(model)}, "input": [str(inp)],
                       "sampling": {"max_new_tokens": 2, "n": 2, "seed": 1},
                       "output": {"path": str(tmp_path / "out")}, "shard_size": shard_size,
                       "reliability": {"max_retries": max_retries}}), str(inp)


HOSTILE = [
    b"[" * 100_000 + b"]" * 100_000,                                # RecursionError in json
    f'{{"id": {HUGE}, "prompt": "p"}}'.encode(),                    # int past 4300 digits
    b'{"id": "nan", "prompt": "p", "sampling": {"temperature": NaN}}',
    b'{"id": "\\ud800", "prompt": "p"}',                            # lone surrogate: cannot be written as UTF-8
    b'{"id": "deep", "prompt": "p", "meta": ' + b"[" * 900 + b"]" * 900 + b"}",
    b'{"id": "big", "prompt": "' + b"x" * (17 * 2**20) + b'"}',    # past MAX_LINE_BYTES
]


def _expected_error_ids(file: str, first_line: int) -> list[str]:
    return [f"{file}:{first_line}", f"{file}:{first_line + 1}", "nan", f"{file}:{first_line + 3}", "deep",
            f"{file}:{first_line + 5}"]


def test_lines_that_used_to_sink_their_shard_are_their_own_errors(tmp_path, demo_model, broker):
    good = [json.dumps({"id": f"g{i}", "prompt": f"question {i}"}).encode() for i in range(6)]
    lines = good[:3] + HOSTILE + good[3:]
    spec, inp = _job(tmp_path, demo_model, lines)
    job = submit_job(spec, broker).job_id
    Worker(broker, device="cpu").run_until_idle()
    st = broker.status(job)
    assert st.state == JobState.COMPLETED and st.retries == 0 and st.dead_shards == 0
    out = str(tmp_path / "out")
    results = collections.Counter((r["id"], r["sample_index"]) for r in io.read_parts(out, "results"))
    assert results == collections.Counter({(f"g{i}", s): 1 for i in range(6) for s in range(2)})
    errs = list(io.read_parts(out, "errors"))
    assert collections.Counter(e["id"] for e in errs) == collections.Counter(_expected_error_ids(inp, 4))
    codes = {e["line"]: e["error"]["code"] for e in errs}
    assert codes == {4: "invalid_json", 5: "invalid_json", 6: "invalid_json", 7: "invalid_json", 8: "invalid_json",
                     9: "line_too_long"}
    assert all(len(e["error"]["message"]) <= 200 for e in errs)


def test_a_dead_lettered_shard_of_hostile_lines_lets_its_job_complete(tmp_path, demo_model, broker):
    good = [json.dumps({"id": f"g{i}", "prompt": f"question {i}"}).encode() for i in range(4)]
    # shard 0: the hostile lines (it fails and is dead-lettered); shard 1: good lines
    spec, inp = _job(tmp_path, demo_model, HOSTILE + good, max_retries=0, shard_size=len(HOSTILE))
    job = submit_job(spec, broker).job_id
    lease = broker.claim("doomed-worker")
    assert lease.shard.index == 0
    # the worker died on it (as a killed process's expired lease would): with max_retries 0 it is dead-lettered
    assert broker.fail(lease, "worker killed") == "dead"
    Worker(broker, device="cpu").run_until_idle()
    st = broker.status(job)
    assert st.state == JobState.COMPLETED, st
    assert st.dead_shards == 1 and st.prompts_failed == len(HOSTILE)
    out = str(tmp_path / "out")
    results = collections.Counter((r["id"], r["sample_index"]) for r in io.read_parts(out, "results"))
    assert results == collections.Counter({(f"g{i}", s): 1 for i in range(4) for s in range(2)})
    errs = list(io.read_parts(out, "errors"))
    assert collections.Counter(e["id"] for e in errs) == collections.Counter(_expected_error_ids(inp, 1))
    assert {e["error"]["code"] for e in errs} == {"retries_exhausted"}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["job_id"] == job


def test_a_dead_lettered_shard_whose_input_is_gone_still_lets_its_job_complete(tmp_path, demo_model, broker):
    lines = [json.dumps({"id": f"g{i}", "prompt": f"question {i}"}).encode() for i in range(3)]
    spec, inp = _job(tmp_path, demo_model, lines, max_retries=0, shard_size=3)
    job = submit_job(spec, broker).job_id
    assert broker.fail(broker.claim("doomed-worker"), "worker killed") == "dead"
    os.unlink(inp)                          # read_shard now raises: the dead letter must not fail again
    Worker(broker, device="cpu").run_until_idle()
    st = broker.status(job)
    assert st.state == JobState.COMPLETED and st.prompts_failed == 3, st
    errs = list(io.read_parts(str(tmp_path / "out"), "errors"))
    assert collections.Counter(e["id"] for e in errs) == collections.Counter(f"{inp}:{n}" for n in (1, 2, 3))
    assert all("could not be read back" in e["error"]["message"] for e in errs)
