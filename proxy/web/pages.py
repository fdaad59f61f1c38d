"""The status page: server-rendered HTML with inline CSS and an inline SVG timeline.

Everything is rendered from the status document (:mod:`proxy.web.api`), and every value taken
from it goes through :func:`text`: site names, SNI and error messages come from the network, so
they are HTML-escaped, and characters XML does not allow (control bytes a hostile ClientHello
could carry) are replaced, which keeps the inline SVG well-formed XML too. The page loads
nothing else (no scripts, fonts or images) and refreshes itself every few seconds with a meta
refresh, so it works offline and under a Content-Security-Policy of ``default-src 'none'``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

#: seconds between automatic reloads of the page
REFRESH_SECONDS = 5
#: evidence events listed under the timeline
EVENTS_LISTED = 50

_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

#: colours of well-known verdicts in the timeline; others get one from ``_PALETTE``
_COLOURS = {
    "recovered": "#2e7d32",
    "exhausted": "#6a1b9a",
    "sni-reset": "#c62828",
    "sni-timeout": "#ef6c00",
    "ip-blocked": "#ad1457",
    "blockpage": "#4527a0",
    "dns-tampering": "#1565c0",
    "frozen": "#00838f",
    "throttled": "#9e9d24",
    "site-down": "#757575",
}
_PALETTE = ("#5d4037", "#283593", "#00695c", "#827717", "#bf360c", "#37474f")


def text(value: object) -> str:
    """``value`` as HTML/XML text: escaped (quotes included) and free of characters XML
    forbids."""
    return html.escape(_NOT_XML.sub("\ufffd", str(value)), quote=True)


def human_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB"):
        value /= 1024
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} GiB"


def human_age(seconds: float) -> str:
    """``75`` -> ``"1 m 15 s"``."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} m {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} m"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def colour_of(verdict: str, known: Sequence[str]) -> str:
    """The timeline colour of ``verdict``; ``known`` is every verdict shown (for the others)."""
    if verdict in _COLOURS:
        return _COLOURS[verdict]
    others = [v for v in known if v not in _COLOURS]
    index = others.index(verdict) if verdict in others else len(others)
    return _PALETTE[index % len(_PALETTE)]


# --- the timeline ------------------------------------------------------------------------------

_WIDTH = 900
_LEFT = 130
_RIGHT = 20
_TOP = 10
_LANE = 26
_AXIS = 34


def render_timeline(events: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """An SVG chart of ``events`` (status-document evidence events, with ``ts`` and
    ``outcome``): one lane per verdict, one dot per event at its time, a time axis below that
    ends at ``now`` (or the last event) and spans at least a minute."""
    if not events:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="40" '
            'role="img" aria-label="no blocking events">'
            '<text x="10" y="25" class="muted">No blocking events recorded yet.</text></svg>'
        )
    verdicts = sorted({str(e["outcome"]) for e in events})
    lanes = {v: i for i, v in enumerate(verdicts)}
    end = max(float(e["ts"]) for e in events)
    if now is not None:
        end = max(end, now)
    start = min(min(float(e["ts"]) for e in events), end - 60.0)
    span = end - start
    plot = _WIDTH - _LEFT - _RIGHT
    height = _TOP + _LANE * len(verdicts) + _AXIS

    def x_of(ts: float) -> float:
        return round(_LEFT + (ts - start) / span * plot, 2)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" role="img" '
        f'aria-label="blocking events over time, {len(events)} events">'
    ]
    for verdict, i in lanes.items():
        y = _TOP + _LANE * i + _LANE // 2
        parts.append(
            f'<text x="{_LEFT - 8}" y="{y + 4}" text-anchor="end" class="lane">{text(verdict)}'
            "</text>"
            f'<line x1="{_LEFT}" y1="{y}" x2="{_WIDTH - _RIGHT}" y2="{y}" class="grid"/>'
        )
    axis_y = _TOP + _LANE * len(verdicts) + 4
    parts.append(f'<line x1="{_LEFT}" y1="{axis_y}" x2="{_WIDTH - _RIGHT}" y2="{axis_y}" '
                 'class="axis"/>')  # fmt: skip
    for k in range(5):
        ts = start + span * k / 4
        x = x_of(ts)
        anchor = {0: "start", 4: "end"}.get(k, "middle")
        parts.append(
            f'<line x1="{x}" y1="{axis_y}" x2="{x}" y2="{axis_y + 5}" class="axis"/>'
            f'<text x="{x}" y="{axis_y + 20}" text-anchor="{anchor}" class="tick">'
            f"{text(_tick_label(ts, span))}</text>"
        )
    for event in sorted(events, key=lambda e: float(e["ts"])):
        verdict = str(event["outcome"])
        y = _TOP + _LANE * lanes[verdict] + _LANE // 2
        tip = f"{event.get('time', '')} {event.get('site', '')} {verdict}"
        if event.get("strategy"):
            tip += f" ({event['strategy']})"
        parts.append(
            f'<circle class="event" cx="{x_of(float(event["ts"]))}" cy="{y}" r="5" '
            f'fill="{colour_of(verdict, verdicts)}" data-verdict="{text(verdict)}">'
            f"<title>{text(tip)}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _tick_label(ts: float, span: float) -> str:
    when = datetime.fromtimestamp(ts, UTC)
    if span > 86400:
        return when.strftime("%m-%d %H:%M")
    if span > 600:
        return when.strftime("%H:%M")
    return when.strftime("%H:%M:%S")


# --- the page ----------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232a}
header{background:#1d3b53;color:#fff;padding:12px 20px}
header h1{margin:0;font-size:20px}header a{color:#cfe3ff;margin-right:12px}
main{padding:8px 20px 30px}section{background:#fff;border:1px solid #dde2e8;border-radius:6px;
padding:10px 14px;margin:12px 0}h2{font-size:16px;margin:4px 0 8px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:3px 8px;
border-bottom:1px solid #eef0f3;vertical-align:top}th{font-weight:600;color:#4a5561}
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#7a8591;fill:#7a8591}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #dde2e8;
border-radius:6px;padding:8px 14px;min-width:130px}.card b{display:block;font-size:20px}
.ok{color:#2e7d32}.bad{color:#c62828}.lane{font-size:12px;fill:#1d232a}.tick{font-size:11px;
fill:#4a5561}.grid{stroke:#eef0f3}.axis{stroke:#9aa4ae}code{font-size:12px}
"""


def render_status_page(status: Mapping[str, Any]) -> str:
    """The whole page for a status document."""
    totals = status["totals"]
    dns = status["dns"]
    cache = dns.get("cache")
    hit_rate = "-" if not cache or cache["hit_rate"] is None else f"{cache['hit_rate']:.0%}"
    cards = [
        ("open connections", totals["active"]),
        ("connections since start", totals["opened"]),
        ("sent", human_bytes(totals["bytes_up"])),
        ("received", human_bytes(totals["bytes_down"])),
        ("DNS cache hits", hit_rate),
        ("uptime", human_age(status["uptime"])),
    ]
    body = [
        '<div class="cards">',
        *(f'<div class="card"><b>{text(v)}</b>{text(k)}</div>' for k, v in cards),
        "</div>",
        _connections(status["connections"]),
        _sites(status["learned"], status["network"]),
        _evidence(status["evidence"], status["timestamp"]),
        _resolver(dns),
        _outcomes(totals),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>sidestep status</title><style>{_CSS}</style></head><body>"
        "<header><h1>sidestep status</h1>"
        f'<span>version {text(status["version"])} · network <b id="network">'
        f"{text(status['network'])}</b> · {text(status['time'])}</span><br>"
        '<a href="/api/status">JSON</a><a href="/metrics">metrics</a>'
        '<a href="/proxy.pac">proxy.pac</a></header>'
        f"<main>{''.join(body)}</main></body></html>\n"
    )


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], *, numeric: set[int]) -> str:
    head = "".join(f"<th>{text(h)}</th>" for h in headers)
    out = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for row in rows:
        cells = "".join(
            f'<td class="n">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _section(ident: str, title: str, inner: str) -> str:
    return f'<section id="{ident}"><h2>{text(title)}</h2>{inner}</section>'


def _connections(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return _section("connections", "Open connections", '<p class="muted">None right now.</p>')
    table = _table(
        ("client", "target", "SNI", "policy", "strategy", "sent", "received", "age"),
        (
            (
                text(c["client"]),
                text(c["target"]),
                text(c["sni"] or "-"),
                text(c["policy"]),
                text(c["strategy"]),
                text(human_bytes(c["up"])),
                text(human_bytes(c["down"])),
                text(human_age(c["age"])),
            )
            for c in rows
        ),
        numeric={5, 6, 7},
    )
    return _section("connections", f"Open connections ({len(rows)})", table)


def _sites(learned: Sequence[Mapping[str, Any]], network: str) -> str:
    if not learned:
        return _section(
            "sites",
            "Sites",
            '<p class="muted">Nothing learned yet: sites appear here once a strategy failed '
            "or got through where another did not.</p>",
        )
    ordered = sorted(learned, key=lambda e: e["network"] != network)  # this network first
    rows = []
    for entry in ordered:
        failed = "<br>".join(
            f'{text(f["strategy"])}: <span class="bad">{text(f["verdict"])}</span>'
            + (f" x{text(f['count'])}" if f["count"] > 1 else "")
            for f in entry["failures"]
        )
        works = entry["works"]
        rows.append(
            (
                text(entry["network"]),
                text(entry["site"]),
                f'<span class="ok">{text(works)}</span>'
                if works
                else '<span class="bad">none</span>',
                failed or "-",
                text(entry["updated"]),
            )
        )
    table = _table(
        ("network", "site", "what works", "what failed (verdict)", "updated"), rows, numeric=set()
    )
    return _section("sites", "Sites: verdicts and the strategy that works", table)


def _evidence(evidence: Mapping[str, Any], now: float) -> str:
    events = evidence["events"]
    parts = [f'<div class="timeline">{render_timeline(events, now)}</div>']
    if evidence.get("error"):
        parts.append(f'<p class="bad">{text(evidence["error"])}</p>')
    if events:
        newest = list(reversed(events))[:EVENTS_LISTED]
        parts.append(
            _table(
                ("time", "site", "host", "verdict", "strategy", "what worked"),
                (
                    (
                        text(e["time"]),
                        text(e["site"]),
                        text(e["host"]),
                        text(e["outcome"]),
                        text(e.get("strategy") or "-"),
                        text(e.get("worked") or "-"),
                    )
                    for e in newest
                ),
                numeric=set(),
            )
        )
    if evidence.get("path"):
        parts.append(f'<p class="muted">From <code>{text(evidence["path"])}</code>.</p>')
    return _section("evidence", f"Recent blocking events ({len(events)})", "".join(parts))


def _resolver(dns: Mapping[str, Any]) -> str:
    mode = str(dns["mode"])
    lines = [f"<p>Mode: <b>{text(mode)}</b>"]
    if "secure_now" in dns:
        now = "secure DNS (plain DNS was caught lying)" if dns["secure_now"] else "plain DNS"
        lines.append(f" · now using {text(now)} · checks run: {text(dns['checks'])}")
    if dns.get("chain_mode"):
        lines.append(f" · endpoints asked in {text(dns['chain_mode'])} mode")
    lines.append("</p>")
    if dns.get("servers"):
        lines.append(f"<p>Servers: {text(', '.join(dns['servers']))}</p>")
    for reason in dns.get("reasons") or []:
        lines.append(
            f'<p class="bad">{text(reason["check"])}: {text(reason["subject"])} '
            f"{text(reason['status'])}</p>"
        )
    endpoints = dns.get("endpoints") or []
    if endpoints:
        lines.append(
            _table(
                ("endpoint", "transport", "address", "state", "ok", "failed", "latency", "error"),
                (
                    (
                        text(ep["endpoint"]),
                        text(ep["transport"]),
                        text(f"{ep['address']}:{ep['port']}"),
                        f'<span class="{"bad" if ep["failures"] else "ok"}">'
                        f"{text(ep['state'])}</span>",
                        text(ep["successes"]),
                        text(ep["failures"]),
                        text("-" if ep["latency_ms"] is None else f"{ep['latency_ms']} ms"),
                        text(ep["last_error"] or "-"),
                    )
                    for ep in endpoints
                ),
                numeric={4, 5, 6},
            )
        )
    cache = dns.get("cache")
    if cache:
        rate = "-" if cache["hit_rate"] is None else f"{cache['hit_rate']:.1%}"
        lines.append(
            f"<p>Cache: {text(cache['size'])} of {text(cache['capacity'])} answers · "
            f"hits {text(cache['hits'])} (stale {text(cache['stale_hits'])}) · misses "
            f"{text(cache['misses'])} · hit rate {text(rate)}</p>"
        )
    if "upstream_queries" in dns:
        lines.append(
            f"<p>Queries sent upstream: {text(dns['upstream_queries'])} · failed "
            f"{text(dns['failures'])}</p>"
        )
    return _section("dns", "Name resolution", "".join(lines))


def _outcomes(totals: Mapping[str, Any]) -> str:
    rows = [(text(r["outcome"]), text(r["strategy"]), text(r["count"])) for r in totals["closed"]]
    verdicts = ", ".join(f"{k}: {v}" for k, v in totals["verdicts"].items()) or "none yet"
    inner = f"<p>Verdicts: {text(verdicts)}</p>"
    if rows:
        inner += _table(("outcome", "strategy", "connections"), rows, numeric={2})
    return _section("outcomes", "Ended connections", inner)
