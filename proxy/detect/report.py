"""``sidestep report``: the evidence log summarized per site.

For every site: since when it has been seen blocked, how (verdicts with counts), what got through
(strategies with counts), and its status judged by the latest event: ``recovered`` (a strategy got
through), ``down`` (the control failed too: an outage, not censorship) or ``blocked``. Rendered
as a text table for people, JSON for scripts and CSV for spreadsheets. All times are UTC.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy.detect.evidence import EXHAUSTED, RECOVERED, EvidenceEvent, format_time, parse_time
from proxy.detect.verdict import Verdict

#: Verdict meaning the site was down for everyone (see DESIGN.md, "Detection").
SITE_DOWN = Verdict.SITE_DOWN.value
#: failures that are not blocking: an outage, a strategy that broke by itself
_NOT_BLOCKING = (SITE_DOWN, Verdict.PATH_FAILED.value, EXHAUSTED)
FORMATS = ("text", "json", "csv")

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True, slots=True)
class SiteSummary:
    """What the evidence says about one site."""

    site: str
    status: str
    first_blocked: float | None
    last_blocked: float | None
    last_seen: float
    failures: int
    outcomes: tuple[tuple[str, int], ...]
    worked: tuple[tuple[str, int], ...]
    last_worked: str | None
    networks: tuple[str, ...]
    hosts: tuple[str, ...]


def parse_since(text: str, *, now: float) -> float:
    """``--since`` as Unix time: relative (``90m``, ``24h``, ``7d``, ``2w``) or ISO 8601.

    A date or a time without an offset is UTC. Raises :class:`ValueError` with a short reason.
    """
    text = text.strip()
    match = _RELATIVE.fullmatch(text.lower())
    try:
        if match:
            value = now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        else:
            value = parse_time(text)
        format_time(value)  # within the range we can print
    except (ValueError, OverflowError, OSError):
        raise ValueError(
            f"{text!r} is neither a duration like 24h or 7d nor a date like 2025-03-01"
        ) from None
    return value


def summarize(events: Iterable[EvidenceEvent]) -> list[SiteSummary]:
    """One summary per site, ordered by when the site was first seen in the log."""
    by_site: dict[str, list[EvidenceEvent]] = {}
    for event in events:
        by_site.setdefault(event.site, []).append(event)
    out: list[tuple[float, SiteSummary]] = []
    for site, evs in by_site.items():
        evs.sort(key=lambda e: e.time)
        failed = [e for e in evs if e.outcome != RECOVERED]
        blocked = [e for e in failed if e.outcome not in _NOT_BLOCKING]
        rescued = [e for e in evs if e.outcome == RECOVERED and e.worked]
        last = evs[-1]
        if last.outcome == EXHAUSTED and len(evs) > 1:
            last = evs[-2]  # what the last failed attempt of that connection was judged
        if last.outcome == RECOVERED:
            status = "recovered"
        elif last.outcome == SITE_DOWN:
            status = "down"
        else:
            status = "blocked"
        summary = SiteSummary(
            site=site,
            status=status,
            first_blocked=blocked[0].time if blocked else None,
            last_blocked=blocked[-1].time if blocked else None,
            last_seen=last.time,
            failures=len(failed),
            outcomes=tuple(Counter(e.outcome for e in failed).most_common()),
            worked=tuple(Counter(e.worked for e in rescued if e.worked).most_common()),
            last_worked=rescued[-1].worked if rescued else None,
            networks=tuple(sorted({e.network for e in evs})),
            hosts=tuple(sorted({e.host for e in evs})),
        )
        out.append((evs[0].time, summary))
    out.sort(key=lambda pair: (pair[0], pair[1].site))
    return [summary for _, summary in out]


def render(summaries: list[SiteSummary], fmt: str, *, since: float | None = None) -> str:
    """The report in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "json":
        return render_json(summaries, since=since)
    if fmt == "csv":
        return render_csv(summaries)
    if fmt == "text":
        return render_text(summaries, since=since)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def render_text(summaries: list[SiteSummary], *, since: float | None = None) -> str:
    """A table for people: one row per site."""
    scope = f" since {_short_time(since)} UTC" if since is not None else ""
    if not summaries:
        return f"No blocking recorded{scope}.\n"
    rows = [("SITE", "STATUS", "BLOCKED SINCE", "LAST SEEN", "FAILS", "BLOCKED BY", "WORKED")]
    for s in summaries:
        rows.append(
            (
                s.site,
                s.status,
                _short_time(s.first_blocked) if s.first_blocked is not None else "-",
                _short_time(s.last_seen),
                str(s.failures),
                _counts(s.outcomes, ", ", " x") or "-",
                _counts(s.worked, ", ", " x") or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    blocked = sum(1 for s in summaries if s.status == "blocked")
    recovered = sum(1 for s in summaries if s.status == "recovered")
    lines.append("")
    lines.append(
        f"{len(summaries)} site{'' if len(summaries) == 1 else 's'}{scope}: {recovered} recovered, {blocked} still blocked"
        " (times in UTC)"
    )
    return "\n".join(lines) + "\n"


def render_json(summaries: list[SiteSummary], *, since: float | None = None) -> str:
    """A JSON document for scripts: ``{"since": ..., "sites": [...]}``."""
    doc = {
        "since": format_time(since) if since is not None else None,
        "sites": [
            {
                "site": s.site,
                "status": s.status,
                "first_blocked": _iso(s.first_blocked),
                "last_blocked": _iso(s.last_blocked),
                "last_seen": format_time(s.last_seen),
                "failures": s.failures,
                "outcomes": dict(s.outcomes),
                "worked": dict(s.worked),
                "last_worked": s.last_worked,
                "networks": list(s.networks),
                "hosts": list(s.hosts),
            }
            for s in summaries
        ],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


CSV_COLUMNS = (
    "site",
    "status",
    "first_blocked",
    "last_blocked",
    "last_seen",
    "failures",
    "outcomes",
    "worked",
    "last_worked",
    "networks",
    "hosts",
)


def render_csv(summaries: list[SiteSummary]) -> str:
    """CSV for spreadsheets; counts are written ``name=count`` separated by ``;``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in summaries:
        writer.writerow(
            (
                s.site,
                s.status,
                _iso(s.first_blocked) or "",
                _iso(s.last_blocked) or "",
                format_time(s.last_seen),
                s.failures,
                _counts(s.outcomes, ";", "="),
                _counts(s.worked, ";", "="),
                s.last_worked or "",
                ";".join(s.networks),
                ";".join(s.hosts),
            )
        )
    return buf.getvalue()


def _counts(pairs: tuple[tuple[str, int], ...], sep: str, mark: str) -> str:
    return sep.join(f"{name}{mark}{count}" for name, count in pairs)


def _iso(t: float | None) -> str | None:
    return format_time(t) if t is not None else None


def _short_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")
