"""The log line formats (proxy/logsetup.py)."""

from __future__ import annotations

import logging

from proxy.logsetup import LineFormatter


def _record(created: float, message: str) -> logging.LogRecord:
    record = logging.LogRecord("sidestep.conn", logging.INFO, __file__, 1, message, None, None)
    record.created = created
    record.msecs = 0.0
    return record


def test_line_formatter_writes_what_the_standard_formatter_writes() -> None:
    # the date is formatted once per second and reused: the lines stay exactly the same
    plain = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
    ours = LineFormatter()
    for created in (1_700_000_000.1, 1_700_000_000.9, 1_700_000_001.0, 1_700_000_000.5):
        record = _record(created, "a -> b via bench/socks5")
        assert ours.format(record) == plain.format(record)
