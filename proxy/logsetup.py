"""Log output: one readable line per event, or JSON lines for machines (``--json-logs``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a connection's structured ``fields`` are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class LineFormatter(logging.Formatter):
    """``2026-01-02 03:04:05 INFO    message``: the date is formatted once per second, not
    once per line (a busy proxy logs a line per connection)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        # the common case in one f-string: what the format string above gives, without the
        # dictionary of record attributes it is applied to
        record.message = message = record.getMessage()
        return f"{self.formatTime(record)} {record.levelname:<7} {message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return self._stamp


def setup_logging(level: str, *, json_lines: bool, file: str | None = None) -> None:
    """Configure the root ``sidestep`` logger. Safe to call again on reload.

    Neither format shows where in the code, in which thread or process a line was logged, so
    the logging module is told not to look those up for every record (the "optimization"
    switches of its documentation).
    """
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream: TextIO = sys.stderr
    handler: logging.Handler
    handler = logging.FileHandler(file, encoding="utf-8") if file else logging.StreamHandler(stream)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(LineFormatter())
    root = logging.getLogger("sidestep")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
