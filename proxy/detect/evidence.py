"""The evidence log: one JSON line per failed attempt and per recovery (DESIGN.md, "Detection").

This is how users and journalists document a disruption: which site, on which network, from when,
blocked how (the verdict), and what got through. ``sidestep report`` (:mod:`proxy.detect.report`)
summarizes it. A line looks like::

    {"time": "2025-03-01T12:00:00.250Z", "network": "gw-3fa9c1", "site": "example.com",
     "host": "www.example.com", "address": "203.0.113.7:443", "sni": "www.example.com",
     "strategy": "direct", "outcome": "sni-reset", "duration_ms": 312, "worked": null}

``outcome`` is the verdict of a failed or degraded attempt (:class:`proxy.detect.verdict.Verdict`:
``sni-reset``, ``frozen``, ``site-down``, ...), :data:`RECOVERED` for the event that closes a
connection rescued by ``worked``, or :data:`EXHAUSTED` when no strategy got through. A freeze or
throttling found while a connection runs is one line with that verdict and no ``worked``.

The file is rotated by size like logrotate does (``evidence.jsonl.1`` is the newest old file) and
created with mode 0600: it records which sites the user visits. Writes are short synchronous
appends that open the file each time (events are rare: only failures and recoveries), so an
external rotation or deletion is simply followed. A write error is logged once and otherwise
ignored: evidence must never break the connection it describes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger("sidestep.evidence")

#: ``outcome`` of the event written when a strategy got through after failures.
RECOVERED = "recovered"
#: ``outcome`` of the event written when every strategy failed.
EXHAUSTED = "exhausted"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
#: The fields of a line, in the order they are written.
FIELDS = (
    "time",
    "network",
    "site",
    "host",
    "address",
    "sni",
    "strategy",
    "outcome",
    "duration_ms",
    "worked",
)


@dataclass(frozen=True, slots=True)
class EvidenceEvent:
    """One line of the evidence log. ``time`` is Unix time (seconds, UTC)."""

    time: float
    network: str
    site: str
    host: str
    outcome: str
    address: str | None = None
    sni: str | None = None
    strategy: str | None = None
    duration_ms: int | None = None
    worked: str | None = None

    def to_json(self) -> str:
        """The event as one JSON line (without the newline)."""
        doc = asdict(self)
        doc["time"] = format_time(self.time)
        return json.dumps({k: doc[k] for k in FIELDS}, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> EvidenceEvent:
        """Parse one line; raises :class:`ValueError` when it is not a valid event."""
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        required = {"time": str, "network": str, "site": str, "host": str, "outcome": str}
        for key, kind in required.items():
            if not isinstance(doc.get(key), kind):
                raise ValueError(f"missing or bad {key!r}")
        for key in ("address", "sni", "strategy", "worked"):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise ValueError(f"bad {key!r}")
        duration = doc.get("duration_ms")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int)):
            raise ValueError("bad 'duration_ms'")
        try:
            when = parse_time(doc["time"])
            format_time(when)  # a time we can write back out
        except (ValueError, OverflowError, OSError):
            raise ValueError("bad 'time'") from None
        return cls(
            time=when,
            network=doc["network"],
            site=doc["site"],
            host=doc["host"],
            outcome=doc["outcome"],
            address=doc.get("address"),
            sni=doc.get("sni"),
            strategy=doc.get("strategy"),
            duration_ms=duration,
            worked=doc.get("worked"),
        )


def format_time(t: float) -> str:
    """Unix time as ISO 8601 UTC with milliseconds: ``2025-03-01T12:00:00.250Z``."""
    stamp = datetime.fromtimestamp(t, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def parse_time(text: str) -> float:
    """ISO 8601 to Unix time; a time without an offset is taken as UTC. Raises ValueError."""
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    value = stamp.timestamp()
    if not math.isfinite(value):
        raise ValueError("time out of range")
    return value


class EvidenceLog:
    """Appends :class:`EvidenceEvent` lines to ``path``, rotating at ``max_bytes``.

    ``backups`` old files are kept (``path.1`` newest ... ``path.N`` oldest); with 0 the file is
    simply started afresh.
    """

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = 3) -> None:
        if max_bytes <= 0 or backups < 0:
            raise ValueError("max_bytes must be positive and backups not negative")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._failing = False
        self._tail_checked = False

    def write(self, event: EvidenceEvent) -> bool:
        """Append one event. Returns False (after logging once) when the write failed."""
        data = (event.to_json() + "\n").encode()
        try:
            self._write(data)
        except OSError as exc:
            if not self._failing:
                log.warning("cannot write the evidence log %s: %s", self.path, exc)
                self._failing = True
            return False
        self._failing = False
        return True

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            self._rotate()
            size = 0
        # Read-write only so the last byte can be checked; every write still appends.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if size and not self._tail_checked and not _ends_with_newline(fd):
                # A crash cut the last line short: start ours on a fresh line.
                data = b"\n" + data
            self._tail_checked = True
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups - 1, 0, -1):
            older = _numbered(self.path, i)
            if older.exists():
                os.replace(older, _numbered(self.path, i + 1))
        os.replace(self.path, _numbered(self.path, 1))


def _ends_with_newline(fd: int) -> bool:
    return os.pread(fd, 1, os.fstat(fd).st_size - 1) == b"\n"


def _numbered(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def log_files(path: Path) -> list[Path]:
    """The existing files of the log at ``path``, oldest first (``path.N`` ... ``path``)."""
    found: list[Path] = []
    n = 1
    while _numbered(path, n).exists():
        found.append(_numbered(path, n))
        n += 1
    found.reverse()
    if path.exists():
        found.append(path)
    return found


def read_events(path: Path, since: float | None = None) -> Iterator[EvidenceEvent]:
    """Every valid event of the log (rotated files included), in the order written.

    Corrupt lines (a cut-off write, hand edits) are skipped; a file that cannot be read raises
    :class:`OSError`. ``since`` drops events older than that Unix time.
    """
    for file in log_files(path):
        with open(file, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    event = EvidenceEvent.from_json(line)
                except ValueError:
                    continue
                if since is None or event.time >= since:
                    yield event
