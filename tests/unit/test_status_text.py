"""`status` shows users' text as written: a job id taken from an output directory's manifest, a job name or a
state is never read as rich markup, and characters that would drive or reorder the terminal are escapes."""
from __future__ import annotations

from rich.console import Console

from ziya_batch.runtime.status_view import _jobs_table, _plain


class _Status:
    def __init__(self, **d):
        self.d = {"name": "", "state": "running", "prompts_done": 0, "prompts_failed": 0, "prompts_total": 1,
                  "samples": 0, "tokens_per_s": 0.0, **d}

    def to_dict(self) -> dict:
        return dict(self.d)


def _shown(table) -> str:
    console = Console(record=True, width=400, color_system=None)
    console.print(table)
    return console.export_text()


def test_a_job_id_and_state_that_look_like_markup_print_as_written():
    for job_id in ("[/][bold red]PWNED[/bold red]", "[link=https://evil.example/x]797bc669d6f6886a[/link]"):
        out = _shown(_jobs_table([_Status(job_id=job_id, state="[blink]done")]))
        assert job_id in out and "[blink]done" in out


def test_bidirectional_overrides_are_escapes_not_reordering():
    out = _shown(_jobs_table([_Status(job_id="ab12", name="report\u202egnp.exe \u2066x\u2069 \u200f")]))
    assert "\u202e" not in out and "\u2066" not in out and "\u200f" not in out
    assert "report\\u202egnp.exe \\u2066x\\u2069 \\u200f" in out
    assert _plain("\x1b[2J\x9b").plain == "\\x1b[2J\\x9b"


def test_a_shard_committed_between_the_lease_read_and_its_record_is_no_lease_and_no_worker():
    # status reads a job's leased set, then the shards' records: a shard committed in between has no owner left,
    # and was listed as a lease held by a worker named ''
    from ziya_batch.queue.status import _assemble

    h = {"state": "running", "name": "j", "created_ms": "1000", "total_shards": "2", "n_leased": "1",
         "n_committed": "1", "total_prompts": "4", "sealed": "1"}
    recs = [(0, 90_000.0, {"owner": "w-1", "attempts": 1, "token": 3}), (1, 90_000.0, {"attempts": 1, "token": 2})]
    st = _assemble("0123456789abcdef", [h, [], [], 0], recs, {"w-1": "host-a"}, 60_000, None)
    assert [w["worker_id"] for w in st.workers] == ["w-1"] and [w["shards"] for w in st.workers] == [[0]]
