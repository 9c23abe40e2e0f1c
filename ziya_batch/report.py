"""`ziya-batch report`: one self-contained HTML page about a job, charts drawn as inline SVG.

Computed from what storage holds (the manifest's parts, or, before the manifest exists, the committed
parts their commit markers name) plus the job's Redis status when Redis is reachable. No JavaScript, no
external resource: the file can be mailed, archived or opened offline. Memory: the bytes of at most PART_READERS
parts (a few are read ahead of the one being decoded, which is decoded a record at a time; records are used in
shard order, as a read of one part after another gives them), lengths counted in Counters (one entry per distinct
length), rewards kept in a fixed-size reservoir. A record not of the shape ziya-batch writes is counted and shown,
not used; a part or commit marker that cannot be read at all is one error line. The page is written aside and
moved into place, so a failed run leaves an earlier report as it was.
"""
from __future__ import annotations

import contextlib
import errno
import html
import json
import math
import os
import random
import stat
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from fsspec.implementations.local import LocalFileSystem

from . import io, jobs
from .errors import InputError, ServiceError
from .redact import mask_url
from .spec import show_text
from .io.schema import iter_part, part_format

REWARD_RESERVOIR = 50_000
_UNREAD: Any = object()       # compute_stats reads the manifest itself
# how every report begins (render_html writes it; every release has): a file -o may replace starts so
REPORT_HEAD = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>ziya-batch report:'
# token counts larger than this are not counts (and would not bin as floats)
_MAX_COUNT = 1 << 40


@dataclass
class JobStats:
    job_id: str
    name: str
    state: str
    output_url: str
    source: str                                   # "manifest" or "commit markers"
    shards_committed: int = 0
    prompts_done: int = 0
    prompts_failed: int = 0
    samples: int = 0
    output_tokens: int = 0
    started_at: Optional[float] = None            # unix seconds
    commits: list[tuple[float, int, int]] = field(default_factory=list)   # (time, output_tokens, prompts) per shard
    prompt_tokens: Counter = field(default_factory=Counter)
    response_tokens: Counter = field(default_factory=Counter)
    finish_reasons: Counter = field(default_factory=Counter)
    error_codes: Counter = field(default_factory=Counter)
    rewards: list[float] = field(default_factory=list)
    rewards_seen: int = 0
    skipped: int = 0                              # records not of the shape ziya-batch writes (not counted)
    status: Optional[dict] = None                 # Redis status (JobStatus.to_dict()), when reachable


# -- reading ---------------------------------------------------------------------------------------------

# Parts on a remote store are read ahead of the one being decoded, by this many threads: its latency (a GET, and
# s3fs's HEAD before it) is paid once for every PART_READERS parts, not once a part. What is read ahead is held until
# its turn, so at most PART_READERS parts' bytes exist at once, and fewer where the sizes the manifest or the markers
# give add up to more than READ_AHEAD_BYTES (a part is always read, whatever its size). Records are used in the order
# of a read of one part after another, so the page is the same. A local directory is read one part after another:
# its page cache answers faster than a thread hands a part over (threads made the report slower there, BENCHMARKS).
PART_READERS = 8
LOCAL_PART_READERS = 1
READ_AHEAD_BYTES = 64 << 20


@dataclass(frozen=True)
class _Part:
    kind: str
    path: str                 # relative to the output directory
    size: Optional[int]       # as the manifest or the marker gives it (None: not given); paces the reads
    listed: bool              # named by manifest.json: missing from storage is an error, not a part skipped


def _part_list(manifest: Optional[dict], markers: dict, kinds: Iterable[str]) -> list[_Part]:
    """Every part to read, in the order the report uses their records: kind by kind, shard by shard."""
    if manifest is not None:
        parts = [_Part(kind, row["path"], row.get("size_bytes"), True)
                 for kind in kinds for row in manifest["parts"].get(kind, [])]
    else:
        parts = [_Part(kind, m.parts[kind].path, m.parts[kind].size_bytes, False)
                 for kind in kinds for m in (markers[i] for i in sorted(markers)) if kind in m.parts]
    sized = any(type(p.size) is int and p.size > 0 for p in parts)
    # markers (and manifests) written before parts had their size say 0 for every part: no size is given then
    return [p if sized and type(p.size) is int and p.size >= 0 else _Part(p.kind, p.path, None, p.listed)
            for p in parts]


def _read_ahead(parts: list[_Part], read, readers: int, budget: int) -> Iterator[tuple[_Part, Optional[bytes]]]:
    """(part, read(part)) for each part, in order, with up to `readers` reads running ahead of the consumer in
    threads. At most `readers` parts' bytes are held, the one being consumed included, and parts after the first
    held are read ahead only while their sizes add up to `budget`. An error of a read is raised at that part's
    turn, as a read of one part after another raises it; reads not yet started are then cancelled."""
    if readers <= 1:
        for part in parts:
            yield part, read(part)
        return
    with ThreadPoolExecutor(readers, thread_name_prefix="report-read") as pool:
        pending: deque = deque()
        held, nxt = 0, 0
        try:
            while True:
                while nxt < len(parts) and (not pending or len(pending) < readers and
                                            held + (parts[nxt].size or 0) <= budget):
                    pending.append((parts[nxt], pool.submit(read, parts[nxt])))
                    held += parts[nxt].size or 0
                    nxt += 1
                if not pending:
                    return
                part, future = pending.popleft()
                data = future.result()
                del future              # it holds the bytes too
                yield part, data
                del data
                held -= part.size or 0
        finally:
            for _, future in pending:
                future.cancel()


def _records(output_url: str, manifest: Optional[dict], markers: dict, kinds: Iterable[str],
             readers: Optional[int] = None) -> Iterator[tuple[str, Any]]:
    """(kind, record) of every part of `kinds` (the manifest's parts, or without it, the committed parts the
    markers name), kind by kind in shard order, as a read of one part after another gives them."""
    out = io.OutputDir(output_url)
    parts = _part_list(manifest, markers, kinds)
    if readers is None:
        readers = LOCAL_PART_READERS if isinstance(out.fs, LocalFileSystem) else PART_READERS
    # closed on the way out, an error's included: the reads still running are waited for, the others cancelled
    with contextlib.closing(_read_ahead(parts, lambda p: out.read(p.path, p.size), readers,
                                        READ_AHEAD_BYTES)) as reads:
        for part, data in reads:
            if data is None:
                if part.listed:
                    raise InputError(f"{output_url}: {part.path} is listed in manifest.json but missing")
                continue        # a committed part gone before the manifest names it: nothing of it to count
            for rec in iter_part(data, part_format(part.path), f"{output_url}: {part.path}"):
                yield part.kind, rec
            del data            # before the next part's turn: the parts read ahead are all that is held then


def _count(value: Any) -> Optional[int]:
    """A token count as records hold it (a whole number, 0..2^40), else None."""
    if type(value) is int and 0 <= value <= _MAX_COUNT:
        return value
    if type(value) is float and value.is_integer() and 0 <= value <= _MAX_COUNT:
        return int(value)
    return None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    """A category's name (a finish reason, an error code) as shown: text, at most 200 characters."""
    if isinstance(value, str):
        return value[:200]
    return str(value)[:200] if value is None or type(value) in (int, float, bool) else type(value).__name__


def _add_result(stats: JobStats, rec: Any) -> None:
    """Counts one results record; one of another shape (a field of another type) counts as skipped."""
    if not isinstance(rec, dict):
        stats.skipped += 1
        return
    if isinstance(rec.get("response"), dict) or "custom_id" in rec:       # openai-batch line
        body = _dict(_dict(rec.get("response")).get("body"))
        usage = _dict(body.get("usage"))
        choices = body.get("choices") if isinstance(body.get("choices"), list) else []
        prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens", 0))
        if completion is None or "prompt_tokens" in usage and prompt is None or \
                not all(isinstance(c, dict) for c in choices):
            stats.skipped += 1
            return
        if prompt is not None:
            stats.prompt_tokens[prompt] += 1
        per_choice = completion // max(1, len(choices))
        for c in choices:
            stats.response_tokens[per_choice] += 1
            stats.finish_reasons[_text(c.get("finish_reason"))] += 1
        return
    usage = _dict(rec.get("usage"))
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if "prompt_tokens" in usage and prompt is None or "completion_tokens" in usage and completion is None:
        stats.skipped += 1
        return
    if rec.get("sample_index", 0) == 0 and prompt is not None:
        stats.prompt_tokens[prompt] += 1
    if completion is not None:
        stats.response_tokens[completion] += 1
    stats.finish_reasons[_text(rec.get("finish_reason"))] += 1


def _add_reward(stats: JobStats, value: float, rng: random.Random) -> None:
    stats.rewards_seen += 1
    if len(stats.rewards) < REWARD_RESERVOIR:
        stats.rewards.append(value)
    else:
        j = rng.randrange(stats.rewards_seen)
        if j < REWARD_RESERVOIR:
            stats.rewards[j] = value


def compute_stats(output_url: str, status: Optional[dict] = None, *, manifest: Any = _UNREAD) -> JobStats:
    """Everything the report shows, from storage (and the Redis status, if given). `manifest`, where given, is
    what io.read_manifest just returned for this output (None: it has none), so that it is not read again."""
    if manifest is _UNREAD:
        manifest = io.read_manifest(output_url)
    markers, times = io.OutputDir(output_url).committed_with_times()
    if manifest is None and not markers:
        raise ServiceError(f"{output_url} holds no manifest.json and no committed parts yet: nothing to report "
                           "(is this the job's output.path? has any shard finished?)")
    spec = _dict((manifest or {}).get("spec"))
    status = status or {}
    stats = JobStats(
        job_id=str((manifest or {}).get("job_id") or status.get("job_id") or "?"),
        name=str(spec.get("name") or status.get("name") or "?"),
        state=str(status.get("state") or _dict((manifest or {}).get("summary")).get("state") or "running"),
        output_url=output_url, source="manifest" if manifest is not None else "commit markers",
        status=status or None, started_at=status.get("created_at"),
    )
    for index, m in sorted(markers.items()):
        stats.shards_committed += 1
        stats.prompts_done += m.prompts_done
        stats.prompts_failed += m.prompts_failed
        stats.samples += m.samples
        stats.output_tokens += m.output_tokens
        if index in times:
            stats.commits.append((times[index], m.output_tokens, m.prompts_done))
    stats.commits.sort()
    rng = random.Random(0)
    # one stream of parts, results then errors then experience (the order of one pass a kind): reads run ahead
    for kind, rec in _records(output_url, manifest, markers, ("results", "errors", "experience")):
        if kind == "results":
            _add_result(stats, rec)
        elif kind == "errors":
            if not isinstance(rec, dict):
                stats.skipped += 1
                continue
            stats.error_codes[_text(_dict(rec.get("error")).get("code", "unknown"))] += 1
        else:
            r = rec.get("reward") if isinstance(rec, dict) else None
            if type(r) in (int, float) and -1e300 < r < 1e300:      # finite, and a float whatever its digits
                _add_reward(stats, float(r), rng)
            elif not isinstance(rec, dict):
                stats.skipped += 1
    return stats


# -- SVG ------------------------------------------------------------------------------------------------

W, H, PAD_L, PAD_B, PAD_T, PAD_R = 560, 260, 56, 40, 14, 14
_BAR = "#3b6ea8"
_ACCENT = "#d0602a"


def _fmt(x: float) -> str:
    if abs(x) >= 1e9:
        return f"{x:.3g}"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.1f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.0f}k"
    if abs(x) >= 10 or x == int(x):
        return f"{x:.0f}"
    return f"{x:.2f}"


def _frame(inner: str, xlabel: str, ylabel: str, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
            f'role="img" aria-label="{html.escape(title)}">'
            f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>{inner}'
            f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}" stroke="#333"/>'
            f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}" stroke="#333"/>'
            f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 6}" text-anchor="middle" font-size="12">{html.escape(xlabel)}</text>'
            f'<text x="14" y="{(PAD_T + H - PAD_B) / 2}" text-anchor="middle" font-size="12" '
            f'transform="rotate(-90 14 {(PAD_T + H - PAD_B) / 2})">{html.escape(ylabel)}</text></svg>')


def _empty(msg: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} 80" width="{W}" height="80">'
            f'<rect width="{W}" height="80" fill="#f4f4f4"/><text x="{W / 2}" y="45" text-anchor="middle" '
            f'font-size="13" fill="#666">{html.escape(msg)}</text></svg>')


def _y_axis(ymax: float) -> str:
    out = []
    for i in range(5):
        v = ymax * i / 4
        y = H - PAD_B - (H - PAD_B - PAD_T) * i / 4
        out.append(f'<line x1="{PAD_L - 4}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{_fmt(v)}</text>')
    return "".join(out)


def _bars(values: list[float], vmax: float, titles: list[str], extra: str = "") -> list[str]:
    """One SVG bar per value, side by side across the plot area, scaled to vmax, each with a hover title."""
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_B - PAD_T
    bw = plot_w / len(values)
    return [f'<rect x="{PAD_L + i * bw + 1:.1f}" y="{H - PAD_B - plot_h * v / vmax:.1f}" width="{max(1.0, bw - 2):.1f}" '
            f'height="{plot_h * v / vmax:.1f}" fill="{_BAR}"{extra}><title>{t}</title></rect>'
            for i, (v, t) in enumerate(zip(values, titles))]


def histogram_svg(values: Counter | Iterable[float], xlabel: str, title: str, bins: int = 30) -> str:
    """Bars of counts over equal-width bins of the values (a Counter maps value -> count)."""
    counts = values if isinstance(values, Counter) else Counter(values)
    if not counts:
        return _empty(f"{title}: no data")
    lo, hi = float(min(counts)), float(max(counts))     # finite (the callers' values are)
    if not hi > lo:
        hi = lo + 1 if lo + 1 > lo else hi              # one value: a bin of width one (none past 2^53)
    nb = min(bins, max(1, len(counts))) if all(float(v).is_integer() for v in counts) else bins

    def edge(t: float) -> float:                        # lo..hi at t in 0..1, without overflowing at +-1e308
        return lo * (1 - t) + hi * t

    heights = [0] * nb
    for v, c in counts.items():
        # halves: hi - lo may exceed the largest float where lo and hi do not
        f = (v / 2 - lo / 2) / (hi / 2 - lo / 2) if hi > lo else 0.0
        heights[max(0, min(nb - 1, int(f * nb)))] += c
    ymax = max(heights) or 1
    plot_w = W - PAD_L - PAD_R
    bars = _bars(heights, ymax, [f"{_fmt(edge(i / nb))}..{_fmt(edge((i + 1) / nb))}: {h}"
                                 for i, h in enumerate(heights)])
    ticks = "".join(f'<text x="{PAD_L + plot_w * i / 4:.1f}" y="{H - PAD_B + 14}" text-anchor="middle" font-size="10">'
                    f'{_fmt(edge(i / 4))}</text>' for i in range(5))
    return _frame(_y_axis(ymax) + "".join(bars) + ticks, xlabel, "count", title)


def categories_svg(counts: Counter, title: str) -> str:
    """Horizontal bars, largest first (finish reasons, error codes)."""
    if not counts:
        return _empty(f"{title}: none")
    items = counts.most_common(12)
    row_h, label_w = 26, 170
    height = PAD_T + row_h * len(items) + 10
    vmax = max(c for _, c in items) or 1
    plot_w = W - label_w - 70
    rows = []
    for i, (name, c) in enumerate(items):
        y = PAD_T + i * row_h
        w = plot_w * c / vmax
        rows.append(f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" font-size="12">{html.escape(str(name)[:28])}</text>'
                    f'<rect x="{label_w}" y="{y + 4}" width="{max(1.0, w):.1f}" height="{row_h - 8}" fill="{_ACCENT}"/>'
                    f'<text x="{label_w + w + 6:.1f}" y="{y + 16}" font-size="12">{c}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {height}" width="{W}" height="{height}" '
            f'role="img" aria-label="{html.escape(title)}"><rect width="{W}" height="{height}" fill="#fff"/>'
            + "".join(rows) + "</svg>")


def throughput_svg(commits: list[tuple[float, int, int]], started_at: Optional[float]) -> str:
    """Cumulative output tokens over time (line) and tokens/s per interval (bars), from shard commits."""
    if not commits:
        return _empty("throughput: no committed shard yet")
    t0 = min(started_at or commits[0][0], commits[0][0])
    if started_at is None and len(commits) > 1:
        # without a start time the first shard's duration is unknown: assume it took as long as the median gap
        gaps = sorted(b[0] - a[0] for a, b in zip(commits, commits[1:]))
        t0 = commits[0][0] - (gaps[len(gaps) // 2] or 1.0)
    elif started_at is None:
        t0 = commits[0][0] - 1.0
    span = max(1e-6, commits[-1][0] - t0)
    nb = min(30, max(1, len(commits) // 2))     # about two commits a bin: commits are discrete events
    width = span / nb
    per_bin = [0.0] * nb
    for t, tokens, _ in commits:
        # a shard's tokens were made before its commit: a commit on a bin's right edge belongs to that bin
        per_bin[max(0, min(nb - 1, math.ceil((t - t0) / width - 1e-9) - 1))] += tokens
    rates = [v / width for v in per_bin]
    total = sum(c[1] for c in commits) or 1
    rmax = max(rates) or 1
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_B - PAD_T
    bars = _bars(rates, rmax, [f"{_fmt(r)} tokens/s" for r in rates], ' opacity="0.8"')
    cum, pts = 0, [f"{PAD_L},{H - PAD_B}"]
    for t, tokens, _ in commits:
        cum += tokens
        pts.append(f"{PAD_L + plot_w * (t - t0) / span:.1f},{H - PAD_B - plot_h * cum / total:.1f}")
    line = f'<polyline points="{" ".join(pts)}" fill="none" stroke="{_ACCENT}" stroke-width="2"/>'
    ticks = "".join(f'<text x="{PAD_L + plot_w * i / 4:.1f}" y="{H - PAD_B + 14}" text-anchor="middle" font-size="10">'
                    f'{_fmt(span * i / 4)}</text>' for i in range(5))
    legend = (f'<text x="{PAD_L + 8}" y="{PAD_T + 12}" font-size="11" fill="{_ACCENT}">'
              f'cumulative tokens (0..{_fmt(total)})</text>')
    return _frame(_y_axis(rmax) + "".join(bars) + line + ticks + legend, "seconds since start", "output tokens/s",
                  "throughput")


# -- HTML -----------------------------------------------------------------------------------------------

_CSS = """body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}.sub{color:#666;font-size:13px;margin-bottom:18px}
table{border-collapse:collapse;margin-bottom:18px;background:#fff}td,th{border:1px solid #ddd;padding:5px 10px;font-size:13px;text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(580px,1fr));gap:16px}
.card{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:10px 12px}h2{font-size:15px;margin:2px 0 8px}
.state{display:inline-block;padding:1px 8px;border-radius:10px;background:#e8eef7;font-size:12px}"""


def _summary_rows(s: JobStats) -> list[tuple[str, str]]:
    st = s.status or {}
    duration = (s.commits[-1][0] - s.started_at) if (s.commits and s.started_at) else None
    rows = [("prompts done", f"{s.prompts_done:,}"), ("prompts failed", f"{s.prompts_failed:,}"),
            ("samples", f"{s.samples:,}"), ("output tokens", f"{s.output_tokens:,}"),
            ("shards committed", f"{s.shards_committed:,}" + (f" of {st['shards_total']:,}" if st.get("shards_total") else ""))]
    if duration and duration > 0:
        rows.append(("mean output tokens/s", f"{s.output_tokens / duration:,.1f} over {duration:,.0f} s"))
    if st:
        rows += [("prompts total", f"{st.get('prompts_total', 0):,}"), ("retries", str(st.get("retries", 0))),
                 ("dead-lettered shards", str(st.get("dead_shards", 0)))]
        if st.get("error"):
            rows.append(("error", str(st["error"])))
    if s.rewards:
        mean = sum(s.rewards) / len(s.rewards)
        rows.append(("mean reward", f"{mean:.4f} (of {s.rewards_seen:,} samples)"))
    if s.skipped:
        rows.append(("records not counted", f"{s.skipped:,} (not of the shape ziya-batch writes: a field of another "
                                            "type)"))
    # the page is mailed and archived: a password the command line gave in the URL stays off it
    rows.append(("computed from", f"{s.source} under {mask_url(s.output_url)}"))
    return rows


def render_html(s: JobStats) -> str:
    charts = [("Throughput over time", throughput_svg(s.commits, s.started_at)),
              ("Prompt length (tokens)", histogram_svg(s.prompt_tokens, "prompt tokens", "prompt length")),
              ("Response length (tokens)", histogram_svg(s.response_tokens, "response tokens", "response length")),
              ("Finish reasons", categories_svg(s.finish_reasons, "finish reasons")),
              ("Errors by code", categories_svg(s.error_codes, "errors"))]
    if s.rewards:
        charts.append((f"Reward distribution ({len(s.rewards):,} samples)",
                       histogram_svg(s.rewards, "reward", "reward", bins=40)))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary_rows(s))
    cards = "".join(f'<div class="card"><h2>{html.escape(t)}</h2>{svg}</div>' for t, svg in charts)
    made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f'{REPORT_HEAD} '
            f'{html.escape(s.name)}</title><style>{_CSS}</style></head><body>'
            f'<h1>{html.escape(s.name)} <span class="state">{html.escape(s.state)}</span></h1>'
            f'<div class="sub">job {html.escape(s.job_id)} · report written {made}</div>'
            f'<table>{rows}</table><div class="grid">{cards}</div></body></html>')


# -- entry point ----------------------------------------------------------------------------------------

def _looks_like_location(arg: str) -> bool:
    return "://" in arg or "/" in arg or Path(arg).exists()


def write_report(output_url: str, out_path: str | Path, status: Optional[dict] = None, *,
                 manifest: Any = _UNREAD) -> Path:
    out = Path(out_path)
    stream = _check_report_target(out)
    stats = compute_stats(output_url, status, manifest=manifest)
    # text that is not UTF-8 (a lone surrogate a JSON escape made) is written as its escape, not an error
    page = render_html(stats).encode("utf-8", "backslashreplace")
    try:
        if stream:
            _write_stream(out, page)
        else:
            # beside it, then moved over it: an earlier report stays whole until the new page is
            io.storage.put_atomic(LocalFileSystem(), os.path.abspath(out), page)
    except OSError as err:
        raise InputError(f"cannot write the report to {out}: {err.strerror or type(err).__name__}") from None
    return out


_STD_STREAMS = {"/dev/stdout": 1, "/dev/stderr": 2}


def _write_stream(out: Path, page: bytes) -> None:
    """A device or a pipe (-o /dev/stdout): opened without waiting for a reader (a FIFO nobody reads is an
    error, not a hang), then written. /dev/stdout and /dev/stderr are this process's own (also when the shell sent
    them to a file)."""
    try:
        own = _STD_STREAMS.get(str(out))
        fd = os.dup(own) if own is not None else os.open(out, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ENXIO:
            raise InputError(f"{out} is a named pipe that no process reads; start the reader first, or give a "
                             "file name") from None
        raise
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as fh:
        fh.write(page)


def _check_report_target(out: Path) -> bool:
    """Whether `out` is a stream (a device or a pipe: -o /dev/stdout) rather than a file. The report replaces an
    earlier report only: an existing file that does not begin as every report does (a job's manifest or part, an
    input file, another page, anything typed after -o by mistake) is refused before a byte is written, and so
    is a symbolic link to a file or to nothing (the report would land wherever it points)."""
    if str(out) in _STD_STREAMS:
        return True
    try:
        st = os.stat(out)
    except FileNotFoundError:
        if out.is_symlink():
            raise InputError(f"{out} is a symbolic link to nothing; give the report's own file name") from None
        return False
    except OSError as err:
        raise InputError(f"cannot use {out} for the report ({err.strerror or type(err).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{out} is a directory; give the report's file name, e.g. {out / 'report.html'}")
    if not stat.S_ISREG(st.st_mode):
        return True                 # a device or a pipe: a stream, nothing stored there is replaced
    if out.is_symlink():
        raise InputError(f"{out} is a symbolic link; give the file itself (the report is written aside and moved "
                         "into place, which would replace the link)")
    try:
        with open(out, "rb") as fh:
            head = fh.read(len(REPORT_HEAD.encode()) + 8)
    except OSError as err:
        raise InputError(f"cannot read {out} ({err.strerror or type(err).__name__}); give another file name for "
                         "the report") from None
    if head and not head.startswith(REPORT_HEAD.encode()):
        raise InputError(f"{out} exists and is not a ziya-batch report; the report replaces only an earlier one: "
                         "give a new file name, or remove that file first")
    return False


def report_main(job_id_or_output_url: str, out_path: str | Path, redis_url: Optional[str] = None) -> Path:
    """Write the report of a job (by id, through Redis) or of an output directory (by URL; Redis adds the
    live status when it knows the job). Returns the path written."""
    from .runtime.services import connect_broker

    arg = job_id_or_output_url
    broker, status = None, None
    try:
        broker = connect_broker(redis_url, warn=False)
    except Exception as err:  # noqa: BLE001 - Redis is optional when the output URL is given
        if not _looks_like_location(arg):
            raise ServiceError(f"cannot look up job {arg} without Redis ({err}); pass the job's output path "
                               "instead: ziya-batch report s3://bucket/runs/x/") from None
    if _looks_like_location(arg):
        output_url = arg
    else:
        jobs.job_status(broker, arg, hint=REPORT_HINT)          # JobNotFound, one line, for an unknown id
        output_url = broker.get_spec(arg).output.path
        status = _status_dict(broker, arg)
    # the first read of the output: storage that cannot be reached is one line, not a backend's traceback
    with io.storage.storage_errors(f"output {show_text(output_url)}"):
        manifest = io.read_manifest(output_url)
    if broker is not None and status is None and isinstance(manifest, dict) and manifest.get("job_id"):
        status = _status_dict(broker, manifest["job_id"])
    # the markers and parts after it: storage that stops answering midway is one line too
    with io.storage.storage_away(f"output {show_text(output_url)}"):
        return write_report(output_url, out_path, status, manifest=manifest)


# what follows "no job ID" when `report` is given an id this Redis does not know
REPORT_HINT = " in the queue; list jobs with `ziya-batch status`, or pass the job's output path instead"


def _status_dict(broker, job_id: str) -> Optional[dict[str, Any]]:
    try:
        return json.loads(json.dumps(jobs.job_status(broker, job_id).to_dict()))
    except Exception:  # noqa: BLE001 - the report works without the live status (a job Redis does not know)
        return None
