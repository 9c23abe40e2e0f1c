"""Claiming output directories without Redis: the owner file is created only if absent (locally by a hard link, on
other filesystems by open(mode="xb")), and an output may not lie inside or contain another's."""
from __future__ import annotations

import json
import uuid

import fsspec
import pytest

from ziya_batch.errors import InputError, SpecError
from ziya_batch.io import OutputDir
from ziya_batch.io.claims import MAX_WALK_DEPTH, claim_output, output_conflict


@pytest.fixture(params=["local", "memory"])
def base(request, tmp_path) -> str:
    return str(tmp_path) if request.param == "local" else f"memory://claims-{uuid.uuid4().hex[:8]}"


def test_one_owner_per_directory(base):
    claim_output(f"{base}/a", "job1")
    claim_output(f"{base}/a", "job1")                                  # the same job resumes
    with pytest.raises(SpecError, match="belongs to another job \\(job1\\)"):
        claim_output(f"{base}/a", "job2")
    assert OutputDir(f"{base}/a").owner() == "job1"
    assert OutputDir(f"{base}/a").claim_owner("job3") == "job1"       # create-if-absent, never overwrite


def test_nested_outputs_are_refused_both_ways(base):
    claim_output(f"{base}/runs/a", "job1")
    for inner in ("runs/a/_staging", "runs/a/results/deeper"):
        with pytest.raises(SpecError, match="lies inside another job's output"):
            claim_output(f"{base}/{inner}", "job2")
    for outer in ("runs", ""):
        with pytest.raises(SpecError, match="contains another job's output"):
            claim_output(f"{base}/{outer}".rstrip("/"), "job2")
    claim_output(f"{base}/runs/a2", "job2")                            # a sibling with a shared name prefix
    assert OutputDir(f"{base}/runs").owner() is None


def test_a_manifest_marks_an_output_too(base):
    fs, root = fsspec.core.url_to_fs(f"{base}/done")
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/manifest.json", json.dumps({"job_id": "old"}).encode())
    assert "lies inside" in output_conflict(f"{base}/done/x", "new")


def test_jobs_known_to_the_caller_count_even_without_files(tmp_path):
    known = [("j1", f"file://{tmp_path}/a/")]
    inside = output_conflict(str(tmp_path / "a" / "b"), "j2", known)
    assert inside == f"lies inside the output of job j1 ({known[0][1]})"
    assert "contains the output of job j1" in output_conflict(str(tmp_path), "j2", known)
    assert output_conflict(str(tmp_path / "a-b"), "j2", known) is None
    assert output_conflict(str(tmp_path / "a"), "j1", known) is None


def test_the_walk_below_is_bounded(tmp_path):
    deep = tmp_path.joinpath(*["d"] * (MAX_WALK_DEPTH + 1))
    deep.mkdir(parents=True)
    (deep / "_owner.json").write_text('{"job_id": "far"}')
    assert output_conflict(str(tmp_path), "x") is None                  # beyond the walk: not looked for
    near = tmp_path.joinpath(*["d"] * (MAX_WALK_DEPTH - 1))
    (near / "_owner.json").write_text('{"job_id": "near"}')
    assert "contains another job's output" in output_conflict(str(tmp_path), "x")


def test_corrupt_bookkeeping_is_one_line(tmp_path):
    (tmp_path / "o").mkdir()
    for content in (b"{", b"\xff", b"[]", b'{"job_id": 3}'):
        (tmp_path / "o" / "_owner.json").write_bytes(content)
        with pytest.raises(InputError, match="_owner.json is corrupt") as err:
            claim_output(str(tmp_path / "o"), "j")
        assert "\n" not in str(err.value)


def test_without_hard_links_the_claim_is_still_exclusive(tmp_path, monkeypatch):
    import errno
    import os

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = OutputDir(str(tmp_path / "o"))
    assert out.claim_owner("first") is None
    assert out.claim_owner("second") == "first"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["_owner.json"]      # no temp file left


@pytest.mark.parametrize("manifest", ['"str"', "[]", '{"parts": 5}', '{"parts": {"results": [5]}}',
                                      '{"parts": {"results": [{"path": 7}]}}', '{"job_id": 5, "parts": {}}'])
def test_a_manifest_of_the_wrong_shape_is_one_input_error(tmp_path, manifest):
    """Valid JSON that is not the manifest ziya-batch writes is never trusted, nor taken for no manifest."""
    from ziya_batch.io import read_manifest

    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(InputError, match="manifest.json is corrupt") as err:
        read_manifest(str(tmp_path))
    assert "\n" not in str(err.value)


def test_a_long_owner_id_is_quoted_short(tmp_path):
    from ziya_batch.jobs.submit import check_output_owner
    from ziya_batch.spec import parse_spec

    (tmp_path / "_owner.json").write_text(json.dumps({"job_id": "x" * 200_000}))
    spec = parse_spec({"name": "t", "model": {"path": "/m"}, "input": ["/in.jsonl"], "output": {"path": str(tmp_path)}})
    with pytest.raises(SpecError) as err:
        check_output_owner(spec, "mine")
    assert len(str(err.value)) < 1_000


def test_a_memory_output_is_refused_at_submit():
    from ziya_batch.jobs import submit_job
    from ziya_batch.spec import parse_spec

    spec = parse_spec({"name": "t", "model": {"path": "/m"}, "input": ["/in.jsonl"], "output": {"path": "memory://x/o"}})
    with pytest.raises(SpecError, match="memory://"):
        submit_job(spec, broker=None)


def _put(fs, path: str, data: bytes) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe(path, data)


@pytest.mark.parametrize("name", ["results/part-00000.jsonl", "sft/part-00003.parquet", "errors/part-00001.jsonl",
                                  "_committed/part-00000.json", "experience/part-123456.jsonl"])
def test_files_no_job_owns_are_never_taken_over(base, name):
    """A directory holding parts (or commit markers) but no owner file was not written by a job of ours (one
    records itself as the owner before it writes a part): a job would overwrite them, so it is refused and they
    stay as they were."""
    fs, _ = fsspec.core.url_to_fs(base)
    _put(fs, f"{base}/u/{name}", b"PRECIOUS")
    _put(fs, f"{base}/u/notes.txt", b"mine")
    with pytest.raises(SpecError, match=f"already holds {name.split('/')[0]}/.* no job recorded as its own"):
        claim_output(f"{base}/u", "job1")
    assert fs.cat(f"{base}/u/{name}") == b"PRECIOUS" and OutputDir(f"{base}/u").owner() is None
    # other files beside the job's directories are no obstacle: the job writes none of their names
    claim_output(f"{base}/v", "job1")
    _put(fs, f"{base}/w/notes.txt", b"mine")
    claim_output(f"{base}/w", "job2")
    assert OutputDir(f"{base}/w").owner() == "job2"
    # nor are files of names no job writes where it writes, or empty folders (an object store's folder keys)
    for other in ("results/.gitkeep", "errors/x.txt", "sft/part-1.jsonl", "results/sub/part-00000.jsonl",
                  "_committed/notes.json"):
        _put(fs, f"{base}/z/{other}", b"x")
    fs.makedirs(f"{base}/z/experience", exist_ok=True)
    claim_output(f"{base}/z", "job3")
    assert OutputDir(f"{base}/z").owner() == "job3"


def test_a_finished_jobs_parts_are_its_own_by_its_manifest(base):
    fs, _ = fsspec.core.url_to_fs(base)
    _put(fs, f"{base}/done/results/part-00000.jsonl", b"{}\n")
    _put(fs, f"{base}/done/manifest.json", json.dumps({"job_id": "job1", "parts": {}}).encode())
    with pytest.raises(SpecError, match="no job recorded as its own"):
        claim_output(f"{base}/done", "job2")
    claim_output(f"{base}/done", "job1")
    assert OutputDir(f"{base}/done").owner() == "job1"
