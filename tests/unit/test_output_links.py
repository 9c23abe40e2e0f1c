"""An output directory's folders and files as a hostile writer of the data prefixes may leave them: a folder that
is a symbolic link out of the directory is never written or read through, and a FIFO, a device or an oversized
file where a JSON file of ours belongs is refused at once (a FIFO blocked the reader for good, /dev/zero ate the
memory)."""
import json
import os
import time

import pytest

from ziya_batch import io
from ziya_batch.errors import InputError
from ziya_batch.io import parts as parts_mod

PARTS = {"results": [{"id": "a", "response": "x"}], "errors": []}


def _roundtrip(out: str) -> None:
    io.stage_shard(out, 0, 1, PARTS)
    marker = io.promote_shard(out, 0, 1, stats={"prompts_done": 1})
    io.write_manifest(out, '{"name": "links"}', {"job_id": "j", "state": "completed"}, {0: marker})
    assert [r["id"] for r in io.read_parts(out, "results")] == ["a"]


def test_a_folder_linked_out_of_the_directory_is_neither_written_nor_read(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for folder in ("results", "_committed", "_staging"):
        out = tmp_path / f"out-{folder}"
        out.mkdir()
        (out / folder).symlink_to(outside)
        with pytest.raises(InputError, match="symbolic link out of the output directory"):
            io.OutputDir(str(out)).check_folders()
        with pytest.raises(InputError, match="symbolic link"):
            io.stage_shard(str(out), 0, 1, PARTS)
            io.promote_shard(str(out), 0, 1)
    out = tmp_path / "out"
    (out / "_staging").mkdir(parents=True)
    (out / "_staging" / "results").symlink_to(outside)
    with pytest.raises(InputError, match="_staging/results/ is a symbolic link"):
        io.OutputDir(str(out)).check_folders()
    (out / "_staging" / "results").unlink()
    assert list(outside.iterdir()) == []
    # a marker naming a part out of the directory is not followed either
    with pytest.raises(InputError):
        io.OutputDir(str(out)).read("../outside/secret")


def test_links_inside_the_directory_and_a_linked_directory_itself_are_fine(tmp_path):
    real = tmp_path / "real"
    (real / "elsewhere").mkdir(parents=True)
    (real / "results").symlink_to(real / "elsewhere")
    root = tmp_path / "root"
    root.symlink_to(real)
    _roundtrip(str(root))
    assert (real / "elsewhere" / "part-00000.jsonl").exists()


@pytest.mark.parametrize("name", ["manifest.json", "_owner.json", "_committed/part-00000.json"])
def test_a_fifo_where_our_json_belongs_is_refused_at_once(tmp_path, name):
    out = tmp_path / "o"
    (out / "_committed").mkdir(parents=True)
    os.mkfifo(out / name)
    t0 = time.monotonic()
    d = io.OutputDir(str(out))
    with pytest.raises(InputError, match="not a regular file"):
        if name == "manifest.json":
            io.read_manifest(d)
        elif name == "_owner.json":
            d.owner()
        else:
            d.committed_shards()
    with pytest.raises(InputError, match="not a regular file"):
        if name.startswith("_committed"):
            d.read_marker(0)
        else:
            d.read_json(name)
    assert time.monotonic() - t0 < 5


def test_a_device_or_an_oversized_file_is_not_read(tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(InputError, match="symbolic link out of the output directory"):
        io.read_manifest(str(out))
    (out / "manifest.json").unlink()
    from fsspec.implementations.local import LocalFileSystem

    from ziya_batch.io.storage import read_bytes
    for limit in (None, 10):          # the read itself: a device is never read, capped or not
        with pytest.raises(InputError, match="not a regular file"):
            read_bytes(LocalFileSystem(), "/dev/zero", limit)
    with open(out / "manifest.json", "wb") as f:        # sparse: no disk used
        f.truncate(parts_mod.MAX_TOP_JSON_BYTES + 1)
    with pytest.raises(InputError, match="larger than"):
        io.read_manifest(str(out))
    monkeypatch.setattr(parts_mod, "MAX_MARKER_BYTES", 64)
    io.stage_shard(str(out), 3, 1, PARTS)
    (out / "_committed").mkdir()
    (out / "_committed" / "part-00003.json").write_text(json.dumps({"pad": "x" * 100}))
    with pytest.raises(InputError, match="larger than 64 bytes"):
        io.OutputDir(str(out)).read_marker(3)


def test_a_submit_into_a_directory_with_a_linked_folder_is_refused(tmp_path):
    from ziya_batch.jobs.submit import open_output
    from ziya_batch.spec import parse_spec

    out = tmp_path / "o"
    out.mkdir()
    (out / "sft").symlink_to(tmp_path)
    spec = parse_spec({"name": "links", "model": {"path": str(tmp_path)}, "input": [str(tmp_path / "in.jsonl")],
                       "output": {"path": str(out)}})
    with pytest.raises(InputError, match="sft/ is a symbolic link"):
        open_output(spec)


def test_a_linked_marker_folder_or_file_is_not_listed_or_read_either(tmp_path):
    outside = tmp_path / "outside"
    io.stage_shard(str(outside), 0, 1, PARTS)
    marker = io.promote_shard(str(outside), 0, 1)
    io.write_manifest(str(outside), '{"name": "x"}', {"job_id": "j", "state": "completed"}, {0: marker})
    out = tmp_path / "o"
    out.mkdir()
    (out / "_committed").symlink_to(outside / "_committed")
    d = io.OutputDir(str(out))
    for read in (d.committed_shards, d.commit_times, lambda: d.read_marker(0)):
        with pytest.raises(InputError, match="_committed/? is a symbolic link"):
            read()
    (out / "manifest.json").symlink_to(outside / "manifest.json")
    with pytest.raises(InputError, match="manifest.json is a symbolic link"):
        io.read_manifest(str(out))


def test_a_job_stored_with_a_deeper_path_stays_readable():
    from ziya_batch.errors import SpecError
    from ziya_batch.spec import parse_spec

    spec = {"name": "x", "model": {"path": "/m"}, "input": ["/d" + "/x" * 300], "output": {"path": "/o"}}
    with pytest.raises(SpecError, match="more than 256 folders deep"):
        parse_spec(spec)
    assert parse_spec(spec, stored=True).input[0].count("/") == 301
