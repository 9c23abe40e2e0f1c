"""`ziya-batch status`: a table of jobs (or one job in detail), live with --watch, or JSON."""
from __future__ import annotations

import json
import re
import time
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .. import jobs
from ..errors import TERMINAL_CONTROL, escape_controls
from ..queue import JobState


def _plain(value: object, style: str = "") -> Text:
    """Users' text (job names, workers' hosts, error messages, notes naming them) as a cell or a line: never
    parsed as rich markup, and its control characters written as escapes, so a name sent over HTTP cannot move,
    recolour or clear the operator's terminal (rich keeps ESC)."""
    return Text(escape_controls(str(value)), style=style)


def _json_escape(m: re.Match) -> str:
    return f"\\u{ord(m.group()):04x}"


def _eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _jobs_table(statuses) -> Table:
    t = Table(title="ziya-batch jobs", expand=False)
    for col in ("job", "name", "state", "done", "failed", "total", "samples", "tok/s", "ETA", "workers", "retries", "dead"):
        # ids and states never wrap: people copy them into `status JOB_ID` and `cancel JOB_ID`
        t.add_column(col, justify="right" if col not in ("job", "name", "state") else "left",
                     no_wrap=col in ("job", "state"))
    for st in statuses:
        d = st.to_dict()
        # job names, errors and notes are users' text (and a job id can be one, adopted from an output directory's
        # manifest): cells of plain Text, never parsed as rich markup
        t.add_row(_plain(d["job_id"]), _plain(d.get("name", "")), _plain(d["state"]), str(d["prompts_done"]), str(d["prompts_failed"]),
                  str(d["prompts_total"]), str(d["samples"]), f"{d['tokens_per_s']:,.0f}", _eta(d.get("eta_s")),
                  str(len(d.get("workers", []))), str(d.get("retries", 0)), str(d.get("dead_shards", 0)))
    return t


def _job_detail(st, note: Optional[str] = None):
    d = st.to_dict()
    parts = [_jobs_table([st])]
    if d.get("prefix_cache_hit_rate") is not None:
        parts.append(f"prefix cache: {d['prefix_cache_hit_rate']:.0%} of {d['prefix_cache_query_tokens']:,} prompt "
                     "tokens reused")
    if note:
        parts.append(_plain(note, "yellow"))
    shards = Table(title="shards by state")
    for k in d.get("shards", {}):
        shards.add_column(k, justify="right")
    shards.add_row(*(str(v) for v in d.get("shards", {}).values()))
    parts.append(shards)
    if d.get("workers"):
        w = Table(title="active workers")
        w.add_column("worker")
        w.add_column("host")
        for wk in d["workers"]:
            w.add_row(_plain(wk.get("worker_id", wk) if isinstance(wk, dict) else wk),
                      _plain(wk.get("host", "") if isinstance(wk, dict) else ""))
        parts.append(w)
    if d.get("errors"):
        e = Table(title="latest errors")
        e.add_column("shard")
        e.add_column("error")
        for err in d["errors"][-10:]:
            e.add_row(_plain(err.get("shard", "")), _plain(err.get("message", err)))
        parts.append(e)
    return Group(*parts)


def _render(broker, job_id: Optional[str]):
    if job_id is None:
        statuses = jobs.list_jobs(broker)
        # a queued or running job's note says why nothing runs (no live worker: a running one's may all have
        # died); a finalizing one's, why it is not finished (storage away)
        shown = [st for st in statuses if st.state in (JobState.QUEUED, JobState.RUNNING, JobState.FINALIZING)]
        # the live workers read once for all of them (jobs.waiting_notes), not once a job
        notes = [_plain(f"{st.job_id}: {note}", "yellow")
                 for st, note in zip(shown, jobs.waiting_notes(broker, shown)) if note]
        return Group(_jobs_table(statuses), *notes) if notes else _jobs_table(statuses)
    st = jobs.job_status(broker, job_id, detail=True)
    return _job_detail(st, jobs.waiting_note(broker, st))


def show_status(broker, job_id: Optional[str], watch: bool = False, as_json: bool = False,
                interval_s: float = 2.0) -> None:
    import sys

    # piped output is not cut at 80 columns: a line per job stays a line per job
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if as_json:
        while True:
            if job_id is None:
                # each job with the note `status JOB --json` gives it: a script reading the list learns why one waits
                statuses = jobs.list_jobs(broker)
                data = [{**st.to_dict(), "note": note} for st, note in zip(statuses, jobs.waiting_notes(broker, statuses))]
            else:
                st = jobs.job_status(broker, job_id, detail=True)
                data = {**st.to_dict(), "note": jobs.waiting_note(broker, st)}
            # JSON escapes C0 itself; the other characters escape_controls escapes are \u escapes too (JSON holds
            # them only inside strings, where that is the same document), so a terminal shows it as written
            print(TERMINAL_CONTROL.sub(_json_escape, json.dumps(data, ensure_ascii=False)), flush=True)
            if not watch:
                return
            time.sleep(interval_s)
    if not watch:
        console.print(_render(broker, job_id))
        return
    try:
        with Live(_render(broker, job_id), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(interval_s)
                live.update(_render(broker, job_id))
    except KeyboardInterrupt:
        pass
