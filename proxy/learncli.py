"""``sidestep learned`` and ``sidestep report``: look at what the proxy learned and recorded.

``learned`` lists the learned memory (which strategy works for which site on which network, and
what failed) and ``--forget SITE`` removes a site. ``report`` summarizes the evidence log.

Both read the files the running proxy writes, by default in :func:`default_state_dir`. A running
proxy notices that the file changed under it when it next saves and keeps a forgotten site
forgotten (unless it has learned about that site again in the meantime).

User mistakes end in one line on stderr and exit status 1 (a file problem, nothing to forget) or
2 (a bad argument), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from proxy.detect.evidence import log_files, read_events
from proxy.detect.report import FORMATS, parse_since, render, summarize
from proxy.route.learn import LearnedEntry, LearnedMemory

LEARNED_FILE = "learned.json"
EVIDENCE_FILE = "evidence.jsonl"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/sidestep``, or ``~/.local/state/sidestep`` (XDG Base Directory spec).

    A relative ``XDG_STATE_HOME`` is ignored, as the specification asks.
    """
    base = os.environ.get("XDG_STATE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "sidestep"


def add_learned_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``learned`` on an ``add_subparsers()`` object; sets ``handler=learned_main``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "learned",
        help="show or edit which strategy was learned per site",
        description="Show which strategy works for which site on which network, and what failed.",
    )
    p.add_argument(
        "--state", metavar="FILE", help=f"state file (default: STATE_DIR/{LEARNED_FILE})"
    )
    p.add_argument("--forget", metavar="SITE", help="forget what was learned about SITE")
    p.add_argument("--network", metavar="NET", help="only this network (for listing or forgetting)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=learned_main)
    return p


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on an ``add_subparsers()`` object; sets ``handler=report_main``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="summarize the evidence log per site",
        description="Per site: what blocked it, since when, and what worked. Times are UTC.",
    )
    p.add_argument(
        "--evidence", metavar="FILE", help=f"evidence log (default: STATE_DIR/{EVIDENCE_FILE})"
    )
    p.add_argument(
        "--since", metavar="WHEN", help="only events since WHEN: 24h, 7d, 2025-03-01, ..."
    )
    p.add_argument("--format", choices=FORMATS, default="text", help="output format")
    p.set_defaults(handler=report_main)
    return p


def learned_main(args: argparse.Namespace) -> int:
    path = Path(args.state) if args.state else default_state_dir() / LEARNED_FILE
    if path.is_dir():
        return _fail(f"learned: {path} is a directory, not a state file")
    # A corrupt file is moved aside by LearnedMemory with a warning, as the proxy would do.
    memory = LearnedMemory(path)
    if args.forget:
        dropped = memory.forget(args.forget, args.network)
        if not dropped:
            return _fail(f"learned: nothing learned about {args.forget}")
        try:
            memory.save()
        except OSError as exc:
            return _fail(f"learned: cannot write {path}: {exc.strerror or exc}")
        print(f"forgot {args.forget} ({dropped} {'entry' if dropped == 1 else 'entries'})")
        return 0
    entries = [e for e in memory.entries() if args.network in (None, e.network)]
    now = time.time()
    if args.json:
        print(json.dumps([_entry_json(e) for e in entries], indent=2, ensure_ascii=False))
    elif not entries:
        print(f"nothing learned yet ({path})")
    else:
        sys.stdout.write(_entries_table(entries, now))
    return 0


def report_main(args: argparse.Namespace) -> int:
    path = Path(args.evidence) if args.evidence else default_state_dir() / EVIDENCE_FILE
    since: float | None = None
    if args.since:
        try:
            since = parse_since(args.since, now=time.time())
        except ValueError as exc:
            return _fail(f"report: --since: {exc}", status=2)
    if not log_files(path):
        return _fail(f"report: no evidence log at {path}")
    try:
        summaries = summarize(read_events(path, since))
    except OSError as exc:
        return _fail(f"report: cannot read {path}: {exc.strerror or exc}")
    sys.stdout.write(render(summaries, args.format, since=since))
    return 0


def _fail(message: str, *, status: int = 1) -> int:
    print(f"sidestep {message}", file=sys.stderr)
    return status


def _entry_json(e: LearnedEntry) -> dict[str, object]:
    return {
        "network": e.network,
        "site": e.site,
        "works": e.works,
        "works_at": e.works_at,
        "failures": [
            {"strategy": f.strategy, "outcome": f.outcome, "at": f.at, "count": f.count}
            for f in e.failures
        ],
        "updated_at": e.updated_at,
    }


def _entries_table(entries: list[LearnedEntry], now: float) -> str:
    rows = [("SITE", "NETWORK", "WORKS", "FAILED", "AGE")]
    for e in entries:
        failed = ", ".join(
            f"{f.strategy}: {f.outcome}" + (f" x{f.count}" if f.count > 1 else "")
            for f in e.failures
        )
        rows.append((e.site, e.network, e.works or "-", failed or "-", _age(now - e.updated_at)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in rows
    )


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
