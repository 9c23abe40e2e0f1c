"""One job cannot break another's output: an output path is claimed once (racing processes: exactly one of several
different specs wins a new path), and a path inside or around another job's output is refused."""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import child_env
from ziya_batch.errors import SpecError
from ziya_batch.io.claims import claim_output
from ziya_batch.jobs import absolute_locations, submit_job
from ziya_batch.spec import parse_spec


def _write_spec(path: Path, name: str, data: Path, out: str) -> Path:
    path.write_text(json.dumps({"name": name, "model": {"path": str(data / "model")}, "input": [str(data / "in.jsonl")],
                                "output": {"path": out}, "shard_size": 1}))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "yo"}\n')
    return tmp_path


def test_racing_submit_processes_one_new_output_exactly_one_wins(data, redis_server):
    n = 5
    specs = [_write_spec(data / f"s{i}.json", f"racer-{i}", data, str(data / "shared-out")) for i in range(n)]
    env = child_env()
    procs = [subprocess.Popen([sys.executable, "-m", "ziya_batch.cli", "submit", str(s),
                               "--redis-url", redis_server.url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=data)
             for s in specs]
    results = [(p.wait(120), *p.communicate()) for p in procs]
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1, results
    owner = json.loads((data / "shared-out" / "_owner.json").read_text())["job_id"]
    assert winners[0][1].strip() == owner
    for code, out, err in losers:
        assert code == 2 and out == "", (code, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "ziya-batch: error: output.path" in lines[0] and owner in lines[0], err


def _claim_at(url: str, job_id: str, start_at: float, results) -> None:
    while time.time() < start_at:
        time.sleep(0.0005)
    try:
        claim_output(url, job_id)
        results.put((job_id, "won"))
    except SpecError as err:
        results.put((job_id, str(err)))


def _race(claims: list[tuple[str, str]]) -> dict[str, str]:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 0.3
    procs = [ctx.Process(target=_claim_at, args=(url, job, start_at, results)) for url, job in claims]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    return got


def test_claims_racing_on_one_path_have_one_winner(tmp_path):
    for round_ in range(5):
        out = str(tmp_path / f"out{round_}")
        got = _race([(out, f"job{i}") for i in range(6)])
        winners = [j for j, r in got.items() if r == "won"]
        assert len(winners) == 1, got
        assert json.loads(Path(out, "_owner.json").read_text()) == {"job_id": winners[0]}
        assert all(winners[0] in r for r in got.values() if r != "won")


def test_nested_claims_racing_never_both_win(tmp_path):
    for round_ in range(8):
        outer, inner = tmp_path / f"r{round_}", tmp_path / f"r{round_}" / "x" / "inner"
        got = _race([(str(outer), "outer"), (str(inner), "inner")])
        assert list(got.values()).count("won") <= 1, got
        owners = [p for p in (outer / "_owner.json", inner / "_owner.json") if p.exists()]
        assert len(owners) == list(got.values()).count("won"), (got, owners)


def test_a_job_cannot_nest_in_another_known_only_to_redis(tmp_path, broker):
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    spec = parse_spec({"name": "a", "model": {"path": "/m"}, "input": [str(tmp_path / "in.jsonl")],
                       "output": {"path": str(tmp_path / "a")}})
    first = submit_job(spec, broker)
    (tmp_path / "a" / "_owner.json").unlink()          # storage forgot; Redis still knows the job
    inner = parse_spec({**spec.model_dump(), "name": "b", "output": {"path": str(tmp_path / "a" / "errors")}})
    with pytest.raises(SpecError, match=f"inside the output of job {first.job_id}"):
        submit_job(inner, broker)
    outer = parse_spec({**spec.model_dump(), "name": "c", "output": {"path": str(tmp_path)}})
    with pytest.raises(SpecError, match=f"contains the output of job {first.job_id}"):
        submit_job(outer, broker)
    again = submit_job(spec, broker)                   # the job itself resumes
    assert again.job_id == first.job_id


def test_a_relative_output_is_stored_absolute_and_resumes(tmp_path, broker, monkeypatch):
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    monkeypatch.chdir(tmp_path)
    spec = parse_spec({"name": "rel", "model": {"path": "m"}, "input": ["file:in.jsonl"], "output": {"path": "o"},
                       "experience": {"reward_model": "local://rm"}})
    st = submit_job(spec, broker)
    stored = broker.get_spec(st.job_id)
    assert stored.output.path == f"{tmp_path}/o" and stored.input == [f"{tmp_path}/in.jsonl"]
    assert stored.model.path == f"{tmp_path}/m" and stored.experience.reward_model == f"{tmp_path}/rm"
    assert submit_job(spec, broker).job_id == st.job_id
    assert submit_job(stored, broker).job_id == st.job_id


def test_a_job_stored_with_relative_paths_before_this_release_resumes_under_its_id(tmp_path, broker, monkeypatch):
    from ziya_batch import io

    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n{"prompt": "yo"}\n')
    monkeypatch.chdir(tmp_path)
    spec = parse_spec({"name": "old", "model": {"path": "/m"}, "input": ["in.jsonl"], "output": {"path": "o"},
                       "shard_size": 1})
    old_id = spec.identity()              # what earlier releases stored: the relative spec and its identity
    assert absolute_locations(spec).identity() != old_id
    broker.submit(spec, io.shard_refs(old_id, [str(tmp_path / "in.jsonl")], 1), job_id=old_id)
    io.set_output_owner(str(tmp_path / "o"), old_id)
    assert submit_job(spec, broker).job_id == old_id
    assert len(broker.list_jobs()) == 1
