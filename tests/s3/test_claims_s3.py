"""Claiming an output directory on S3: the owner file is a conditional put (If-None-Match), so a second job's claim
of the same prefix is refused, and nesting is seen through the objects above and below."""
from __future__ import annotations

import pytest

from ziya_batch.errors import SpecError
from ziya_batch.io import OutputDir
from ziya_batch.io.claims import claim_output


def test_s3_claim_is_create_if_absent(bucket):
    url = f"s3://{bucket}/runs/a"
    claim_output(url, "job1")
    claim_output(url, "job1")
    assert OutputDir(url).claim_owner("job2") == "job1"
    with pytest.raises(SpecError, match="belongs to another job"):
        claim_output(url, "job2")
    with pytest.raises(SpecError, match="lies inside another job's output"):
        claim_output(f"s3://{bucket}/runs/a/_staging", "job3")
    with pytest.raises(SpecError, match="contains another job's output"):
        claim_output(f"s3://{bucket}/runs", "job3")
    claim_output(f"s3://{bucket}/runs/a2", "job3")
    assert OutputDir(url).owner() == "job1"


def test_s3_folder_keys_are_no_obstacle_but_parts_no_job_owns_are(bucket):
    """A zero-byte "folder" key (an S3 console's "Create folder", rclone) under results/ is not a file a job would
    overwrite; a part of the job's naming that no job owns is."""
    from ziya_batch.io.storage import url_to_fs

    fs, _ = url_to_fs(f"s3://{bucket}")           # with the endpoint the fixture set
    fs.pipe(f"{bucket}/runs/f/results/", b"")
    fs.pipe(f"{bucket}/runs/f/_committed/", b"")
    claim_output(f"s3://{bucket}/runs/f", "job1")
    assert OutputDir(f"s3://{bucket}/runs/f").owner() == "job1"
    fs.pipe(f"{bucket}/runs/g/sft/part-00002.jsonl", b"PRECIOUS\n")
    with pytest.raises(SpecError, match="already holds sft/part-00002.jsonl"):
        claim_output(f"s3://{bucket}/runs/g", "job1")
    assert fs.cat(f"{bucket}/runs/g/sft/part-00002.jsonl") == b"PRECIOUS\n"
