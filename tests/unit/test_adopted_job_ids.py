"""A spec resumes the job its output directory records only under an id this tool gives (16 hex digits): anyone
can write a manifest, and an id taken from one is shown by `status` and typed into `cancel`."""
from __future__ import annotations

import json

import pytest

from ziya_batch.errors import SpecError
from ziya_batch.jobs.submit import check_output_owner, job_id_for
from ziya_batch.spec import parse_spec


def _spec(tmp_path):
    return parse_spec({"name": "t", "model": {"path": "/m"}, "input": ["/in.jsonl"],
                       "output": {"path": str(tmp_path / "out")}})


def _manifest(tmp_path, spec, job_id):
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(
        {"job_id": job_id, "spec": spec.model_dump(mode="json"), "parts": {}}))


@pytest.mark.parametrize("job_id", ["[/][bold red]PWNED[/bold red]", "797bc669d6f6886A", "797bc669d6f6886",
                                    "797bc669d6f6886a0", "797bc669d6f6886a\n", ""])
def test_an_id_this_tool_never_gives_is_not_adopted(tmp_path, job_id):
    spec = _spec(tmp_path)
    _manifest(tmp_path, spec, job_id)
    assert job_id_for(spec) == spec.identity()
    if job_id:
        with pytest.raises(SpecError, match="already holds the output of another job"):
            check_output_owner(spec)


def test_the_same_job_under_an_id_of_ours_is_still_adopted(tmp_path):
    spec = _spec(tmp_path)
    _manifest(tmp_path, spec, "0123456789abcdef")
    assert job_id_for(spec) == "0123456789abcdef"
