"""Committing parts: staging, fenced promotion, crash-safe retries, the manifest, and the two file formats."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid

import pytest

from ziya_batch.io import (CommitError, clear_staging, committed_shards, discard_staged, expand_inputs, index_inputs,
                           part_path, promote_shard, read_manifest, read_parts, read_shard, stage_shard,
                           verify_output, write_manifest)
from ziya_batch.io import parts as parts_mod
from ziya_batch.io.storage import join_url, normalize_url
from ziya_batch.records import ShardRef
from ziya_batch.spec import parse_spec


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_stage_then_promote_writes_final_parts_and_marker_last(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    staged = stage_shard(out, 5, 11, shard_parts(), "jsonl")
    assert set(staged) == {"results", "sft", "experience", "errors"}
    assert staged["results"].lines == 6 and staged["errors"].lines == 1
    assert not os.path.exists(part_path(out, "results", 5, "jsonl"))      # nothing final before promote
    assert committed_shards(out) == {}
    marker = promote_shard(out, 5, 11, {k: (p.lines, p.sha256) for k, p in staged.items()},
                           stats={"prompts_done": 3, "samples": 6})
    assert marker.token == 11 and marker.prompts_done == 3
    for kind, part in staged.items():
        final = part_path(out, kind, 5, "jsonl")
        assert final.endswith(f"{kind}/part-00005.jsonl")
        assert _sha(final) == part.sha256 == marker.parts[kind].sha256
        assert marker.parts[kind].lines == part.lines
    assert _files(out) == sorted(["_committed/part-00005.json"] + [f"{k}/part-00005.jsonl" for k in staged])
    assert committed_shards(out) == {5: marker}


def test_a_commit_marker_that_cannot_be_read_is_an_error_not_a_shard_left_out(tmp_path, monkeypatch, shard_parts):
    from ziya_batch.io import storage

    out = str(tmp_path / "out")
    for index in (0, 1):
        staged = stage_shard(out, index, 3, shard_parts(), "jsonl")
        promote_shard(out, index, 3, {k: (p.lines, p.sha256) for k, p in staged.items()})
    assert sorted(committed_shards(out)) == [0, 1]
    read_local = storage._read_local

    def flaky(path, *a, **kw):
        if str(path).endswith("part-00001.json"):
            raise OSError("read failed")
        return read_local(path, *a, **kw)
    monkeypatch.setattr(storage, "_read_local", flaky)
    with pytest.raises(OSError, match="read failed"):
        committed_shards(out)


def test_errors_part_is_always_written_even_empty(tmp_path):
    out = str(tmp_path / "out")
    staged = stage_shard(out, 0, 1, {"results": []}, "jsonl")
    assert set(staged) == {"results", "errors"} and staged["errors"].lines == 0
    marker = promote_shard(out, 0, 1)
    assert os.path.getsize(part_path(out, "errors", 0, "jsonl")) == 0
    assert marker.parts["errors"].lines == 0


def test_stale_token_never_reaches_final_names(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    winner, loser = shard_parts(2), {"results": [{"id": "stale"}]}
    stage_shard(out, 3, 7, loser, "jsonl")             # lease lost later: token 7
    stage_shard(out, 3, 8, winner, "jsonl")            # the re-leased attempt: token 8
    promote_shard(out, 3, 8)
    discard_staged(out, 3, 7)                          # what the stale worker does when Redis refuses it
    stage_shard(out, 3, 7, loser, "jsonl")             # ... and a confused one that stages again and promotes
    assert promote_shard(out, 3, 7).token == 8         # gets the winner's marker; nothing is replaced
    got = [json.loads(x) for x in open(part_path(out, "results", 3, "jsonl"))]
    assert [r["id"] for r in got] == [r["id"] for r in winner["results"]]
    assert committed_shards(out)[3].token == 8
    assert not any("stale" in open(os.path.join(out, f), errors="replace").read()
                   for f in _files(out))
    assert not any(".7." in f for f in _files(out))


def test_stale_promote_after_discard_finds_nothing(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    stage_shard(out, 0, 2, shard_parts(1), "jsonl")
    discard_staged(out, 0, 2)
    with pytest.raises(CommitError, match="nothing staged"):
        promote_shard(out, 0, 2)
    assert _files(out) == []


def test_promote_is_idempotent_after_crash_between_moves_and_marker(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    staged = stage_shard(out, 1, 4, shard_parts(), "jsonl")
    # simulate a crash after moving two of the four parts, before the marker
    for kind in ("results", "sft"):
        os.makedirs(os.path.join(out, kind), exist_ok=True)
        os.replace(staged[kind].path, part_path(out, kind, 1, "jsonl"))
    assert committed_shards(out) == {}
    marker = promote_shard(out, 1, 4)
    assert set(marker.parts) == set(staged)
    assert all(_sha(part_path(out, k, 1, "jsonl")) == p.sha256 for k, p in staged.items())
    # crash after the marker, before the intent was removed: calling again returns the same marker
    again = promote_shard(out, 1, 4)
    assert again == marker
    assert not any(f.startswith("_staging/part-") for f in _files(out))


def test_concurrent_promotes_of_one_token_agree(tmp_path, shard_parts):
    """The worker's promote and a finalizer's recovery promote may race; both must succeed, same marker."""
    for round_ in range(15):
        out = str(tmp_path / f"out{round_}")
        staged = stage_shard(out, 0, 3, shard_parts(1), "jsonl")
        barrier = threading.Barrier(3)
        got, failed = [], []

        def promote():
            barrier.wait()
            try:
                got.append(promote_shard(out, 0, 3))
            except Exception as err:  # noqa: BLE001 - the assertion below names it
                failed.append(err)

        threads = [threading.Thread(target=promote) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failed == [] and len(got) == 3 and got[0] == got[1] == got[2]
        assert all(_sha(part_path(out, k, 0, "jsonl")) == p.sha256 for k, p in staged.items())
        assert committed_shards(out) == {0: got[0]}


def test_promote_refuses_when_a_moved_part_was_lost(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    staged = stage_shard(out, 2, 9, shard_parts(1), "jsonl")
    os.makedirs(os.path.join(out, "results"), exist_ok=True)
    os.replace(staged["results"].path, part_path(out, "results", 2, "jsonl"))
    with open(part_path(out, "results", 2, "jsonl"), "ab") as f:
        f.write(b'{"id": "tampered"}\n')
    with pytest.raises(CommitError, match="does not hold it"):
        promote_shard(out, 2, 9)
    assert committed_shards(out) == {}


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_rerun_overwrites_the_parts_a_lost_attempt_moved(tmp_path, shard_parts, where):
    """Storage lost an attempt's staged sft part after its results part was moved into place: that promote
    fails with no marker written, the shard runs again (its finalizer takes the commit back), and the new attempt's
    promote replaces the final part the lost one left."""
    from ziya_batch.io import OutputDir

    out = OutputDir(str(tmp_path / "out") if where == "local" else f"memory://zb-{uuid.uuid4().hex[:8]}/out")
    lost = out.stage(4, 1, "a1", shard_parts(2))
    out.fs.rm_file(lost["sft"].path)          # promote moves kinds in name order: results first, sft last
    with pytest.raises(CommitError, match="staged sft part is gone"):
        out.promote(4, 1, "a1")
    assert out.read_marker(4) is None
    assert hashlib.sha256(out.read("results/part-00004.jsonl")).hexdigest() == lost["results"].sha256
    rerun = out.stage(4, 2, "a2", shard_parts(3))
    assert rerun["results"].sha256 != lost["results"].sha256
    marker = out.promote(4, 2, "a2", {k: (p.lines, p.sha256) for k, p in rerun.items()})
    assert marker.token == 2
    for kind, part in rerun.items():
        assert hashlib.sha256(out.read(f"{kind}/part-00004.jsonl")).hexdigest() == part.sha256


@pytest.mark.parametrize("where", ["local", "memory"])
def test_staged_loss_says_what_storage_says_is_gone_and_nothing_else(tmp_path, shard_parts, monkeypatch, where):
    from ziya_batch.io import OutputDir

    out = OutputDir(str(tmp_path / "out") if where == "local" else f"memory://zb-{uuid.uuid4().hex[:8]}/out")
    staged = out.stage(4, 1, "a1", shard_parts(2))
    assert out.staged_loss(4, 1, "a1") is None
    out.fs.makedirs(out.path("results"), exist_ok=True)
    out.fs.mv(staged["results"].path, out.path("results", "part-00004.jsonl"))   # a promote moved it
    assert out.staged_loss(4, 1, "a1") is None
    out.fs.rm_file(staged["sft"].path)
    assert out.staged_loss(4, 1, "a1") == "its staged sft part is gone and sft/part-00004.jsonl does not hold it"
    real_info = type(out.fs).info

    def denied(fs, path, **kw):
        raise PermissionError(13, "Access Denied", path)
    monkeypatch.setattr(type(out.fs), "info", denied)
    with pytest.raises(PermissionError):             # not "gone": fsspec's exists() would have said False
        out.staged_loss(4, 1, "a1")
    monkeypatch.setattr(type(out.fs), "info", real_info)
    out.fs.rm_file(out.path("_staging", "part-00004.1-a1.json"))
    assert out.staged_loss(4, 1, "a1") == "its intent _staging/part-00004.1-a1.json is gone"
    assert out.staged_loss(4, 2, "never") == "its intent _staging/part-00004.2-never.json is gone"


def test_promote_writes_no_marker_once_the_attempt_is_discarded(tmp_path, shard_parts, monkeypatch):
    """A finalizer taking the commit back discards the attempt (its intent first) while a promote of it is between
    its last move and its marker: the promote raises instead of writing a marker that a re-run would contradict."""
    from ziya_batch.io import OutputDir

    out = OutputDir(str(tmp_path / "out"))
    out.stage(4, 1, "a1", shard_parts(2))
    intent, real_absent = out.path("_staging", "part-00004.1-a1.json"), parts_mod.absent_fresh

    def discarded_first(fs, path):
        if path == intent:
            out.discard(4, 1, "a1")
        return real_absent(fs, path)
    monkeypatch.setattr(parts_mod, "absent_fresh", discarded_first)
    with pytest.raises(CommitError, match="intent was removed before its commit marker was written"):
        out.promote(4, 1, "a1")
    assert out.read_marker(4) is None


def test_promote_returns_the_marker_a_concurrent_promote_of_the_attempt_wrote_meanwhile(tmp_path, shard_parts,
                                                                                        monkeypatch):
    from ziya_batch.io import OutputDir

    out = OutputDir(str(tmp_path / "out"))
    out.stage(4, 1, "a1", shard_parts(2))
    intent, real_absent, other = out.path("_staging", "part-00004.1-a1.json"), parts_mod.absent_fresh, []

    def other_finishes_first(fs, path):
        if path == intent and not other:
            other.append(None)
            other[0] = out.promote(4, 1, "a1", stats={"prompts_done": 3})    # writes the marker, removes the intent
        return real_absent(fs, path)
    monkeypatch.setattr(parts_mod, "absent_fresh", other_finishes_first)
    assert out.promote(4, 1, "a1", stats={"prompts_done": 3}) == other[0] == out.read_marker(4)


def test_promote_checks_reported_staged_info(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    stage_shard(out, 0, 1, shard_parts(1), "jsonl")
    with pytest.raises(CommitError, match="differ"):
        promote_shard(out, 0, 1, {"results": (999, "0" * 64)})
    assert committed_shards(out) == {}


def test_retried_shard_rewrites_the_same_part_name(tmp_path, shard_parts):
    """Attempts 1 and 2 failed after staging (nothing promoted); attempt 3 commits under the same name."""
    out = str(tmp_path / "out")
    stage_shard(out, 0, 1, shard_parts(1), "jsonl")
    stage_shard(out, 0, 2, shard_parts(3), "jsonl")
    staged = stage_shard(out, 0, 3, shard_parts(2), "jsonl")
    marker = promote_shard(out, 0, 3)
    assert marker.token == 3 and marker.parts["results"].lines == 4
    assert _sha(part_path(out, "results", 0, "jsonl")) == staged["results"].sha256
    assert [f for f in _files(out) if f.startswith("results/")] == ["results/part-00000.jsonl"]


def test_a_committed_shard_keeps_its_first_output(tmp_path, shard_parts):
    """Redis lost a commit and the shard ran again under a new token: the committed part is not replaced,
    the duplicate's staged parts are removed, and both callers get the same marker."""
    out = str(tmp_path / "out")
    stage_shard(out, 0, 5, shard_parts(1), "jsonl")
    first = promote_shard(out, 0, 5)
    stage_shard(out, 0, 1, shard_parts(2), "parquet")      # a lower token after a Redis reset, other format
    again = promote_shard(out, 0, 1)
    assert again == first
    assert _files(out) == sorted(["_committed/part-00000.json"] +
                                 [f"{k}/part-00000.jsonl" for k in ("results", "sft", "experience", "errors")])


def test_manifest_lists_exactly_the_committed_parts(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    for index in (0, 1, 2):
        stage_shard(out, index, 10 + index, shard_parts(2, start=index * 2), "jsonl")
        if index != 1:
            promote_shard(out, index, 10 + index, stats={"prompts_done": 2})
    # a stray file that no marker names, and shard 1 only staged: neither may appear
    os.makedirs(os.path.join(out, "results"), exist_ok=True)
    with open(part_path(out, "results", 7, "jsonl"), "w") as f:
        f.write('{"id": "stray"}\n')
    markers = committed_shards(out)
    manifest = write_manifest(out, json.dumps({"name": "t"}), {"prompts": 4, "state": "completed",
                                                              "job_id": "abc"}, markers)
    assert read_manifest(out) == manifest
    assert manifest["spec"] == {"name": "t"} and manifest["job_id"] == "abc"
    assert manifest["num_shards"] == 2
    for kind in ("results", "sft", "experience", "errors"):
        entries = manifest["parts"][kind]
        assert [e["shard"] for e in entries] == [0, 2]
        for e in entries:
            path = os.path.join(out, e["path"])
            assert _sha(path) == e["sha256"]
            assert sum(1 for line in open(path, encoding="utf-8") if line.strip()) == e["lines"]
    assert manifest["records"]["results"] == 8 and manifest["records"]["errors"] == 2
    ids = [r["id"] for r in read_parts(out, "results", verify=True)]
    assert "stray" not in ids and len(ids) == 8
    assert ids == [r["id"] for i in (0, 2) for r in shard_parts(2, start=i * 2)["results"]]


def test_manifest_counts_add_up_to_the_parts_and_the_summary(tmp_path, shard_parts):
    """DESIGN names the manifest's contents "spec, counts, and every committed part": `counts` is a key of its own,
    the job's totals beside the records each kind's parts hold (0 for a kind the job does not write)."""
    out = str(tmp_path / "out")
    parts = shard_parts(3)
    del parts["sft"]
    stage_shard(out, 0, 1, parts, "jsonl")
    promote_shard(out, 0, 1)
    summary = {"job_id": "abc", "state": "completed", "shards": 1, "prompts": 3, "prompts_failed": 1, "samples": 6,
               "output_tokens": 18, "prefix_cache_hit_tokens": 0}
    manifest = write_manifest(out, json.dumps({"name": "t"}), summary, committed_shards(out))
    assert read_manifest(out)["counts"] == manifest["counts"] == {
        "prompts": 3, "prompts_failed": 1, "samples": 6, "output_tokens": 18,
        "results": 6, "sft": 0, "experience": 6, "errors": 1}
    assert all(type(v) is int for v in manifest["counts"].values())
    assert manifest["counts"]["results"] == sum(1 for _ in read_parts(out, "results", verify=True))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_manifest_of_a_job_of_no_lines_names_its_format(tmp_path, fmt):
    # a job whose input holds no line commits no part: its manifest's format was [] (the formats of no parts), where
    # a reader expects "jsonl" or "parquet"
    spec = parse_spec({"name": "t", "model": {"path": "/m"}, "input": ["/in.jsonl"],
                       "output": {"path": str(tmp_path / "out"), "format": fmt}})
    manifest = write_manifest(str(tmp_path / "out"), spec.to_json(), {"job_id": "abc", "prompts": 0}, {})
    assert manifest["format"] == read_manifest(str(tmp_path / "out"))["format"] == fmt
    assert manifest["num_shards"] == 0 and manifest["parts"] == {} and manifest["counts"]["results"] == 0


def test_read_parts_without_manifest_refuses(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    stage_shard(out, 0, 1, shard_parts(1), "jsonl")
    promote_shard(out, 0, 1)
    assert read_manifest(out) is None
    with pytest.raises(Exception, match="no manifest.json"):
        list(read_parts(out, "results"))


def test_read_parts_verify_detects_a_changed_part(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    stage_shard(out, 0, 1, shard_parts(1), "jsonl")
    write_manifest(out, "{}", {}, {0: promote_shard(out, 0, 1)})
    assert verify_output(out) == []
    os.unlink(part_path(out, "sft", 0, "jsonl"))
    assert verify_output(out) == ["sft/part-00000.jsonl is listed in manifest.json but missing"]
    with open(part_path(out, "results", 0, "jsonl"), "a") as f:
        f.write('{"id": "extra"}\n')
    with pytest.raises(Exception, match="sha256"):
        list(read_parts(out, "results", verify=True))


def test_discard_and_clear_staging_leave_committed_output_alone(tmp_path, shard_parts):
    out = str(tmp_path / "out")
    stage_shard(out, 0, 1, shard_parts(1), "parquet")
    promote_shard(out, 0, 1)
    stage_shard(out, 0, 5, shard_parts(1), "parquet")
    stage_shard(out, 1, 6, shard_parts(1), "jsonl")
    discard_staged(out, 0, 5)
    assert not any(".5." in f for f in _files(out))
    assert any(".6." in f for f in _files(out))
    clear_staging(out)
    assert _files(out) == sorted(["_committed/part-00000.json"] +
                                 [f"{k}/part-00000.parquet" for k in ("results", "sft", "experience", "errors")])


def test_jsonl_writes_non_finite_floats_as_null(tmp_path):
    out = str(tmp_path / "out")
    stage_shard(out, 0, 1, {"experience": [{"id": "x", "logprobs": [-1.0, float("-inf")],
                                            "reward": float("nan")}]}, "jsonl")
    promote_shard(out, 0, 1)
    rec = json.loads(open(part_path(out, "experience", 0, "jsonl")).read())
    assert rec == {"id": "x", "logprobs": [-1.0, None], "reward": None}


def test_any_fsspec_url_works_memory_filesystem(shard_parts):
    """Nothing assumes a local disk or S3: the in-memory filesystem runs the whole cycle."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"memory://zb-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(f"{root}/in/a.jsonl", b'{"prompt": "x"}\n\n{"prompt": "y"}\n')
    files = expand_inputs([f"{root}/in/*.jsonl"])
    assert len(files) == 1 and files[0].startswith("memory://") and files[0].endswith(f"{root[9:]}/in/a.jsonl")
    row, = index_inputs(files, 10)
    assert row[5] is None                # object storage: no inode to keep
    assert [no for no, _ in read_shard(ShardRef("j", 0, *row))] == [1, 3]
    out = f"{root}/out/"
    stage_shard(out, 0, 1, shard_parts(1), "parquet")
    stage_shard(out, 0, 2, {"results": [{"id": "stale"}]}, "jsonl")
    write_manifest(out, "{}", {}, {0: promote_shard(out, 0, 1)})
    discard_staged(out, 0, 2)
    assert [r["id"] for r in read_parts(out, "results", verify=True)] == ["s0", "s0"]
    assert not fs.exists(f"{root}/out/_staging/results/part-00000.2.jsonl")
    fs.rm(root, recursive=True)


def test_url_helpers():
    assert join_url("s3://b/run/", "results", "part-00000.jsonl") == "s3://b/run/results/part-00000.jsonl"
    assert join_url("/data/out", "/x/") == "/data/out/x"
    assert part_path("s3://b/run", "sft", 12, "parquet") == "s3://b/run/sft/part-00012.parquet"
    assert normalize_url("file:///tmp/x/") == "/tmp/x"
    assert normalize_url("s3://b/p/") == "s3://b/p"


def test_output_dir_holds_the_filesystem_names_and_owner_once(tmp_path, monkeypatch, shard_parts):
    """One OutputDir opens the directory once and serves the whole commit protocol, the owner file and the names;
    the URL functions are its methods."""
    from ziya_batch.io import OutputDir, new_attempt
    from ziya_batch.io import storage

    opened = []
    real = storage.url_to_fs
    monkeypatch.setattr(storage, "url_to_fs", lambda url: opened.append(url) or real(url))
    out = OutputDir(str(tmp_path / "out"), "parquet")
    attempt = new_attempt()
    staged = out.stage(7, 3, attempt, shard_parts())
    assert sorted(os.path.basename(p.path) for p in staged.values()) == [f"part-00007.3-{attempt}.parquet"] * 4
    marker = out.promote(7, 3, attempt, {k: (p.lines, p.sha256) for k, p in staged.items()}, {"prompts_done": 3})
    assert marker.parts["results"].path == "results/part-00007.parquet" == out.part_rel("results", 7, "parquet")
    assert out.part_url("sft", 7) == str(tmp_path / "out" / "sft" / "part-00007.parquet")
    assert out.committed_shards() == {7: marker} and out.read_marker(7) == marker
    assert list(out.commit_times()) == [7]
    assert out.owner() is None
    out.set_owner("job-1")
    assert out.owner() == "job-1" and out.read_json("_owner.json") == {"job_id": "job-1"}
    out.discard(7, 3, attempt)                # a discard after the commit leaves the committed output alone
    assert out.read(marker.parts["errors"].path) is not None
    assert opened == [str(tmp_path / "out")]
