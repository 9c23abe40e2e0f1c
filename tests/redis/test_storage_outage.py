"""Storage that does not answer while a worker reads a shard's input or writes its parts (an S3 endpoint down, a
connection cut, a time-out) gives the shard back untried: no retry is counted, nothing is dead-lettered, and once the
store answers again the job completes with every prompt generated. Before, each such failure counted against
reliability.max_retries, and an outage of a few seconds turned whole shards into retries_exhausted error lines. The
demo model on the CPU, a real Redis, local output with the outage injected; exact output ids.

A failure of one shard that only looks like an outage (a time-out on its huge range, an error of its one object) must
not be given back for ever, though: once the job commits other shards after the shard's first storage give-back, the
store evidently answers, and each further one counts as a failed try (retried, then dead-lettered)."""
import collections
import json
import time

from ziya_batch import io
from ziya_batch.jobs import submit_job
from ziya_batch.queue import JobState, ShardStats
from ziya_batch.spec import parse_spec
from ziya_batch.work import failures
from ziya_batch.work.worker import Worker


def _job(tmp_path, model, broker, name, ids, max_retries=1, priority=0, max_new_tokens=3):
    """A job of one line a record id (`ids`), in shards of two, writing to tmp_path/out-NAME."""
    inp = tmp_path / f"{name}.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n" for i in ids))
    return submit_job(parse_spec({
        "name": name, "model": {"path": str(model)}, "input": [str(inp)], "priority": priority,
        "sampling": {"max_new_tokens": max_new_tokens, "ignore_eos": True, "seed": 1},
        "output": {"path": str(tmp_path / f"out-{name}")}, "shard_size": 2,
        "reliability": {"max_retries": max_retries}}), broker).job_id



STORAGE = "storage did not answer on w: ReadTimeoutError: Read timeout on endpoint URL"


def _record(broker, job_id, index):
    return json.loads(broker.client.hget(broker.keys.shards(job_id), str(index)))


def _commit(broker, lease):
    assert broker.commit(lease, ShardStats(prompts_done=10, samples=10, parts={"results": (10, "r" * 64)}))


def test_a_store_wide_outage_counts_no_storage_give_back_however_long(broker, make_spec, make_shards, wait_claim):
    broker.storage_grace_ms = 0             # the rule alone (the grace: the test after the next)
    spec = make_spec(max_retries=0)
    job = broker.submit(spec, make_shards(spec, 3)).job_id
    _commit(broker, broker.claim("w"))                   # before the outage: a series starts at its first give-back
    for _ in range(6):                                   # shards 1 and 2 in turn, no commit of the job in between
        lease = wait_claim(broker, "w")
        assert lease.shard.index in (1, 2) and not lease.isolate
        assert broker.give_back(lease, STORAGE, storage=True) == "retry"
    st = broker.status(job, detail=True)
    assert st.retries == 0 and st.dead_shards == 0 and st.shards["pending"] == 2
    assert [e["reason"] for e in st.errors] == ["given back"] * 6 and all(e["message"] == STORAGE for e in st.errors)
    assert _record(broker, job, 1)["storage_commits"] == 1 and not _record(broker, job, 1).get("failures")
    # the store is back for shard 1; shard 2 fails on: its next storage give-back counts (0 retries: dead-lettered)
    lease = wait_claim(broker, "w")
    if lease.shard.index == 2:
        assert broker.give_back(lease, STORAGE, storage=True) == "retry"
        lease = wait_claim(broker, "w")
    assert lease.shard.index == 1
    _commit(broker, lease)
    assert "storage_commits" not in _record(broker, job, 1)         # a commit ends the shard's series
    assert broker.give_back(wait_claim(broker, "w"), STORAGE, storage=True) == "dead"
    st = broker.status(job, detail=True)
    assert st.retries == 1 and st.dead_shards == 1
    assert st.errors[0]["reason"] == "failed" and st.errors[0]["outcome"] == "dead"
    assert st.errors[0]["message"] == (STORAGE + " (counted as a failed try: the job committed other shards since "
                                                 "storage first did not answer for this one)")


def test_storage_give_backs_of_one_shard_count_once_the_job_commits_others(broker, make_spec, make_shards,
                                                                          wait_claim):
    broker.storage_grace_ms = broker.storage_read_back_grace_ms = 0
    spec = make_spec(max_retries=1)
    job = broker.submit(spec, make_shards(spec, 2)).job_id
    assert broker.give_back(broker.claim("w"), STORAGE, storage=True) == "retry"     # shard 0: not counted
    _commit(broker, broker.claim("w"))                                                # shard 1 commits meanwhile
    outcomes = []
    for _ in range(2):          # shard 0 is the only one left: no commit between these, yet both count
        lease = wait_claim(broker, "w")
        assert lease.shard.index == 0 and not lease.dead_letter
        outcomes.append(broker.give_back(lease, STORAGE, storage=True))
    assert outcomes == ["retry", "dead"]
    assert lease.isolate                                 # a counted one is a failed try: the shard runs isolated
    st = broker.status(job, detail=True)
    assert st.retries == 2 and st.dead_shards == 1 and st.shards["dead"] == 1
    assert [e["reason"] for e in st.errors] == ["failed", "failed", "given back"]
    # dead-lettered: its input is read back for the ids once more; storage failing that too is bounded as well
    lease = wait_claim(broker, "w")
    assert lease.dead_letter and lease.read_back
    assert broker.give_back(lease, STORAGE, storage=True) == "dead"
    lease = wait_claim(broker, "w")
    assert lease.dead_letter and not lease.read_back
    # a resubmit of the job (cancelled here) gives the shard fresh retries and a fresh series
    broker.cancel(job, abandon_running=True)
    broker.submit(spec, make_shards(spec, 2))
    rec = _record(broker, job, 0)
    assert rec["state"] == "pending" and "storage_commits" not in rec and "no_read_back" not in rec
    lease = wait_claim(broker, "w")
    assert lease.read_back and broker.give_back(lease, STORAGE, storage=True) == "retry"
    assert broker.status(job).retries == 3


def test_storage_give_backs_stay_free_for_the_grace_while_shards_past_their_reads_commit(
        broker, make_spec, make_shards, wait_claim):
    # only the input's store is down: shards that had read their input before commit meanwhile, and the shard the
    # outage caught must not be dead-lettered for that (max_retries 0: one counted give-back would)
    broker.storage_grace_ms = 400
    spec = make_spec(max_retries=0)
    job = broker.submit(spec, make_shards(spec, 3)).job_id
    in_flight = [broker.claim("w"), broker.claim("w")]                  # shards 0 and 1 have read their input
    caught = broker.claim("w")
    assert caught.shard.index == 2 and broker.give_back(caught, STORAGE, storage=True) == "retry"
    for lease in in_flight:
        _commit(broker, lease)
    assert broker.give_back(wait_claim(broker, "w"), STORAGE, storage=True) == "retry"     # within the grace
    assert broker.status(job).retries == 0
    time.sleep(0.45)                        # past it, the job having committed since: the shard's own failure
    assert broker.give_back(wait_claim(broker, "w"), STORAGE, storage=True) == "dead"


def test_a_shard_record_written_before_storage_give_backs_were_bounded_starts_its_series_at_the_next(
        broker, make_spec, make_shards, wait_claim):
    spec = make_spec(max_retries=0)
    job = broker.submit(spec, make_shards(spec, 2)).job_id
    _commit(broker, broker.claim("w"))
    lease = broker.claim("w")
    assert broker.give_back(lease, STORAGE) == "retry"          # given back by an earlier release: no field
    assert "storage_commits" not in _record(broker, job, 1)
    assert broker.give_back(wait_claim(broker, "w"), STORAGE, storage=True) == "retry"
    assert broker.status(job).retries == 0 and _record(broker, job, 1)["storage_commits"] == 1


def test_a_storage_outage_uses_no_retries_and_loses_no_prompt(tmp_path, demo_model, broker, monkeypatch):
    job = _job(tmp_path, demo_model, broker, "outage", [f"p{i}" for i in range(6)])
    monkeypatch.setattr(failures, "STORAGE_RETRY_S", 0.01)
    monkeypatch.setattr(failures, "STORAGE_RETRY_MAX_S", 0.05)
    reads, stages = [], []
    real_read, real_stage = io.read_shard, io.OutputDir.stage

    def read_shard(ref, *a, **k):
        reads.append(ref.index)
        if len(reads) <= 4:               # more failures in a row than max_retries allows
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_read(ref, *a, **k)

    def stage(self, *a, **k):
        stages.append(a[0])
        if len(stages) <= 3:
            raise type("ReadTimeoutError", (Exception,), {})('Read timeout on endpoint URL: "http://s3/b"')
        return real_stage(self, *a, **k)
    monkeypatch.setattr(io, "read_shard", read_shard)
    monkeypatch.setattr(io.OutputDir, "stage", stage)
    w = Worker(broker, worker_id="w", device="cpu")
    deadline = time.monotonic() + 120
    while broker.status(job).state != JobState.COMPLETED:
        assert time.monotonic() < deadline, broker.status(job, detail=True)
        if not w.run_once():
            time.sleep(0.02)              # the pause after each failure, and the given-back shards' backoff
    st = broker.status(job, detail=True)
    assert st.retries == 0 and st.dead_shards == 0 and st.prompts_failed == 0 and st.prompts_done == 6
    assert len(reads) >= 4 + 3 and len(stages) == 3 + 3
    given = [e for e in st.errors if e["reason"] == "given back"]
    assert given and all("storage did not answer on w: " in e["message"] for e in given)
    assert any("ConnectionResetError" in e["message"] for e in given)
    assert any("ReadTimeoutError" in e["message"] for e in given)
    (info,) = [i for i in broker.worker_infos() if i.worker_id == "w"]
    assert info.cannot_load == {}         # the engine was never the trouble: `ziya-batch run` does not stop
    got = collections.Counter(r["id"] for r in io.read_parts(str(tmp_path / "out-outage"), "results"))
    assert got == collections.Counter(f"p{i}" for i in range(6))
    assert list(io.read_parts(str(tmp_path / "out-outage"), "errors")) == []


def test_a_dead_lettered_shard_whose_input_store_does_not_answer_goes_back_instead_of_losing_its_ids(
        tmp_path, demo_model, broker, monkeypatch):
    """A dead-letter shard reads its input back for its lines' ids (dead_letter_failures). Where the input is gone
    for good it writes made-up ids (file:line); storage that only did not answer is no such case: the shard goes
    back untried, still dead, and its error lines carry the records' own ids once the store answers."""
    job = _job(tmp_path, demo_model, broker, "outage-dead", ["rec-0", "rec-1"], max_retries=0)
    assert broker.fail(broker.claim("doomed-worker"), "worker killed") == "dead"
    monkeypatch.setattr(failures, "STORAGE_RETRY_S", 0.01)
    monkeypatch.setattr(failures, "STORAGE_RETRY_MAX_S", 0.05)
    real_read, reads = io.read_shard, []

    def read_shard(ref, *a, **k):
        reads.append(ref.index)
        if len(reads) == 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_read(ref, *a, **k)
    monkeypatch.setattr(io, "read_shard", read_shard)
    w = Worker(broker, worker_id="w", device="cpu")
    deadline = time.monotonic() + 30
    while not reads:
        assert time.monotonic() < deadline
        w.run_once()
        time.sleep(0.02)
    st = broker.status(job, detail=True)
    assert st.state != JobState.COMPLETED and st.dead_shards == 1, st
    assert any(e["reason"] == "given back" and "ConnectionResetError" in e["message"] for e in st.errors)
    while broker.status(job).state != JobState.COMPLETED:
        assert time.monotonic() < deadline, broker.status(job, detail=True)
        if not w.run_once():
            time.sleep(0.02)
    errs = list(io.read_parts(str(tmp_path / "out-outage-dead"), "errors"))
    assert sorted(r["id"] for r in errs) == ["rec-0", "rec-1"]
    assert all("could not be read back" not in json.dumps(r) for r in errs)


def test_a_job_whose_store_is_away_pauses_alone_and_other_jobs_run_on(tmp_path, demo_model, broker, monkeypatch):
    away = _job(tmp_path, demo_model, broker, "away", [f"away{i}" for i in range(4)], priority=5, max_new_tokens=2)
    fine = _job(tmp_path, demo_model, broker, "fine", [f"fine{i}" for i in range(4)], max_new_tokens=2)
    # the job whose store is away (higher priority) is claimed first
    monkeypatch.setattr(failures, "STORAGE_RETRY_S", 30.0)
    staged = collections.Counter()
    real_stage = io.OutputDir.stage

    def stage(self, *a, **k):
        staged[self.url] += 1
        if "out-away" in self.url:
            raise ConnectionRefusedError(111, "Connection refused")
        return real_stage(self, *a, **k)
    monkeypatch.setattr(io.OutputDir, "stage", stage)
    w = Worker(broker, worker_id="w", device="cpu", max_in_flight=1)
    deadline = time.monotonic() + 120
    while broker.status(fine).state != JobState.COMPLETED:
        assert time.monotonic() < deadline, broker.status(fine, detail=True)
        if not w.run_once():
            time.sleep(0.02)
    # the away job's first shard was generated once and given back; within its pause none of its shards is claimed
    assert sum(n for url, n in staged.items() if "out-away" in url) == 1
    st = broker.status(away, detail=True)
    assert st.state != JobState.COMPLETED and st.retries == 0 and st.dead_shards == 0 and st.prompts_failed == 0
    assert broker.status(fine, detail=True).retries == 0
    got = collections.Counter(r["id"] for r in io.read_parts(str(tmp_path / "out-fine"), "results"))
    assert got == collections.Counter(f"fine{i}" for i in range(4))


def _run_to_completion(broker, job, worker, limit_s=90):
    deadline = time.monotonic() + limit_s
    while broker.status(job).state != JobState.COMPLETED:
        assert time.monotonic() < deadline, broker.status(job, detail=True)
        if not worker.run_once():
            time.sleep(0.02)


def _one_shard_times_out(monkeypatch, broker, job, bad_index, until_dead):
    """Reads of shard `bad_index` raise a time-out (a range too large for a slow server), the others' are answered;
    with `until_dead`, the read of the dead-lettered shard's input for its ids is answered too."""
    real_read, reads = io.read_shard, collections.Counter()

    def read_shard(ref, *a, **k):
        reads[ref.index] += 1
        if ref.index == bad_index and not (until_dead and _record(broker, job, bad_index).get("dead")):
            raise TimeoutError("The read operation timed out")
        return real_read(ref, *a, **k)
    monkeypatch.setattr(io, "read_shard", read_shard)
    monkeypatch.setattr(failures, "STORAGE_RETRY_S", 0.01)
    monkeypatch.setattr(failures, "STORAGE_RETRY_MAX_S", 0.05)
    broker.storage_grace_ms = broker.storage_read_back_grace_ms = 0
    return reads


def test_a_shard_whose_read_keeps_timing_out_while_the_others_commit_ends_as_error_lines(
        tmp_path, demo_model, broker, monkeypatch):
    """The job's last shard (nothing is claimed after it, so no commit comes between its later give-backs): counted
    once the others committed, dead-lettered after max_retries, its lines written as retries_exhausted errors."""
    ids = [f"p{i}" for i in range(6)]
    job = _job(tmp_path, demo_model, broker, "slow-range", ids, max_retries=1)
    reads = _one_shard_times_out(monkeypatch, broker, job, bad_index=2, until_dead=True)
    _run_to_completion(broker, job, Worker(broker, worker_id="w", device="cpu"))
    st = broker.status(job, detail=True)
    assert st.dead_shards == 1 and st.retries == 2 and st.prompts_done == 4 and st.prompts_failed == 2
    storage = [e for e in st.errors if e["shard"] == 2]          # newest first
    # given back until the other shards committed (at least once), then two failed tries: dead-lettered
    assert [e["reason"] for e in storage[:2]] == ["failed", "failed"] and [e["outcome"] for e in storage[:2]] == [
        "dead", "retry"]
    assert len(storage) > 2 and all(e["reason"] == "given back" for e in storage[2:])
    assert all("storage did not answer on w: TimeoutError: The read operation timed out" in e["message"]
               for e in storage)
    assert reads[2] == len(storage) + 1           # and the read for the dead-lettered lines' ids
    out = str(tmp_path / "out-slow-range")
    results = [r["id"] for r in io.read_parts(out, "results")]
    errors = [r["id"] for r in io.read_parts(out, "errors")]
    assert collections.Counter(results + errors) == collections.Counter(ids)
    assert collections.Counter(errors) == collections.Counter(["p4", "p5"])
    assert all(r["error"]["code"] == "retries_exhausted" for r in io.read_parts(out, "errors"))


def test_a_dead_lettered_shard_whose_read_back_keeps_timing_out_is_written_under_file_line_ids(
        tmp_path, demo_model, broker, monkeypatch):
    """Its lines' ids cannot be read: rather than the job waiting for ever, the lines are written numbered FILE:LINE
    (as for an input that is gone), once storage failed the read-back while it answered the job's other shards."""
    ids = [f"p{i}" for i in range(6)]
    job = _job(tmp_path, demo_model, broker, "never", ids, max_retries=0)
    reads = _one_shard_times_out(monkeypatch, broker, job, bad_index=1, until_dead=False)
    _run_to_completion(broker, job, Worker(broker, worker_id="w", device="cpu"))
    st = broker.status(job, detail=True)
    assert st.dead_shards == 1 and st.prompts_done == 4 and st.prompts_failed == 2
    storage = [e for e in st.errors if e["shard"] == 1]          # newest first
    # given back until another shard committed, then counted: dead-lettered; its read-back counted too
    assert [(e["reason"], e["outcome"]) for e in storage[:2]] == [("failed", "dead"), ("failed", "dead")]
    assert len(storage) > 2 and all(e["reason"] == "given back" for e in storage[2:])
    assert reads[1] == len(storage)               # not read after that
    out, inp = str(tmp_path / "out-never"), str(tmp_path / "never.jsonl")
    results = [r["id"] for r in io.read_parts(out, "results")]
    errs = list(io.read_parts(out, "errors"))
    assert collections.Counter(results) == collections.Counter(["p0", "p1", "p4", "p5"])
    assert collections.Counter(r["id"] for r in errs) == collections.Counter([f"{inp}:3", f"{inp}:4"])
    assert all(r["error"]["code"] == "retries_exhausted" and "storage kept failing shard 1" in r["error"]["message"]
               for r in errs)


def test_a_dead_lettered_shard_committed_without_reading_its_input_is_no_sign_that_the_input_answers(
        broker, make_spec, make_shards, wait_claim):
    """Only the input's store is down, for longer than the grace. Shard 1, caught while shard 0 (past its read)
    committed, is dead-lettered by the rule, and its lines are written without reading its input (no_read_back):
    that commit read nothing, so shard 2, whose series began after every commit of a shard that read its input, must
    not be counted for it. Otherwise each such commit counts the give-backs of every other shard the outage caught,
    and the dead-letters cascade over the whole job (every line a retries_exhausted error numbered FILE:LINE)."""
    broker.storage_grace_ms, broker.storage_read_back_grace_ms = 300, 0
    spec = make_spec(max_retries=0)
    job = broker.submit(spec, make_shards(spec, 3)).job_id

    def claim(index):
        while True:
            lease = wait_claim(broker, "w")
            if lease.shard.index == index:
                return lease
            assert broker.give_back(lease, "not this one") == "retry"      # a plain give-back: no series

    in_flight = claim(0)                                   # read its input before the outage
    assert broker.give_back(claim(1), STORAGE, storage=True) == "retry"
    _commit(broker, in_flight)
    time.sleep(0.35)
    # the rule: counted past the grace (no other shard has failed since shard 0's commit, so nothing says outage)
    assert broker.give_back(claim(1), STORAGE, storage=True) == "dead"
    lease = claim(1)
    assert lease.dead_letter and lease.read_back
    assert broker.give_back(lease, STORAGE, storage=True) == "dead"          # its read-back fails the same way
    lease = claim(1)
    assert lease.dead_letter and not lease.read_back
    _commit(broker, lease)                                 # FILE:LINE error lines: no input read
    assert broker.give_back(claim(2), STORAGE, storage=True) == "retry"      # every read commit came before this
    time.sleep(0.35)
    assert broker.give_back(claim(2), STORAGE, storage=True) == "retry"      # shard 1's commit read nothing
    st = broker.status(job, detail=True)
    assert st.dead_shards == 1 and _record(broker, job, 2).get("failures", 0) == 0


def test_a_dead_lettered_shard_reads_its_input_back_for_the_ids_through_an_outage_shorter_than_the_read_back_grace(
        broker, make_spec, make_shards, wait_claim):
    """An input outage longer than the grace dead-letters the shard it caught, but its error lines keep their own
    ids: the read-back that fails within the read-back grace is given back untried, and reads the ids once the
    input answers."""
    broker.storage_grace_ms, broker.storage_read_back_grace_ms = 0, 60_000
    spec = make_spec(max_retries=0)
    job = broker.submit(spec, make_shards(spec, 2)).job_id
    assert broker.give_back(broker.claim("w"), STORAGE, storage=True) == "retry"     # shard 0 caught
    _commit(broker, broker.claim("w"))                                                # shard 1 read before it
    assert broker.give_back(wait_claim(broker, "w"), STORAGE, storage=True) == "dead"
    for _ in range(3):                  # its read-back fails on: given back, the ids still to be read
        lease = wait_claim(broker, "w")
        assert lease.dead_letter and lease.read_back
        assert broker.give_back(lease, STORAGE, storage=True) == "dead"
    rec = _record(broker, job, 0)
    assert "no_read_back" not in rec and broker.status(job).retries == 1
    assert broker.status(job, detail=True).errors[0]["reason"] == "given back"
    broker.storage_read_back_grace_ms = 0      # the read-back grace over: written without the ids
    assert broker.give_back(wait_claim(broker, "w"), STORAGE, storage=True) == "dead"
    assert not wait_claim(broker, "w").read_back


def test_a_failed_try_that_got_past_storage_ends_the_shards_storage_series(broker, make_spec, make_shards,
                                                                          wait_claim):
    """A blip, then a failure of the shard's own (it had read its input), then another blip: the second blip starts
    a new series with its own grace instead of counting at once."""
    broker.storage_grace_ms = 0
    spec = make_spec(max_retries=3)
    job = broker.submit(spec, make_shards(spec, 2)).job_id
    assert broker.give_back(broker.claim("w"), STORAGE, storage=True) == "retry"     # shard 0: a series starts
    _commit(broker, broker.claim("w"))                                                # shard 1 reads and commits
    assert broker.fail(wait_claim(broker, "w"), "RuntimeError: CUDA error") == "retry"
    assert "storage_commits" not in _record(broker, job, 0)
    assert broker.give_back(wait_claim(broker, "w"), STORAGE, storage=True) == "retry"   # a new series: free
    assert broker.status(job).retries == 1 and _record(broker, job, 0)["storage_commits"] == 1


def test_an_input_outage_longer_than_the_grace_costs_nothing_while_it_fails_other_shards_too(
        broker, make_spec, make_shards, wait_claim):
    """Only the input's store is down, far past the grace: shards past their reads commit early in it, and the shards
    it caught keep failing in turn. Each give-back comes after another shard's storage failure that is newer than the
    job's last commit of a shard that read its input: an outage's, none counted (max_retries 0: one would
    dead-letter). Within the grace (the first tries after those commits) the grace alone keeps them free."""
    broker.storage_grace_ms = 300
    spec = make_spec(max_retries=0)
    job = broker.submit(spec, make_shards(spec, 4)).job_id
    in_flight = [broker.claim("w"), broker.claim("w")]                  # shards 0 and 1 have read their input
    assert broker.give_back(broker.claim("w"), STORAGE, storage=True) == "retry"     # shard 2 caught
    assert broker.give_back(broker.claim("w"), STORAGE, storage=True) == "retry"     # shard 3 caught
    for lease in in_flight:
        _commit(broker, lease)
    deadline, tries = time.monotonic() + 1.0, 0
    while time.monotonic() < deadline or tries < 8:     # 2 and 3 in turn, past the grace
        lease = wait_claim(broker, "w")
        assert lease.shard.index in (2, 3)
        assert broker.give_back(lease, STORAGE, storage=True) == "retry"
        tries += 1
    assert broker.status(job).retries == 0
