"""The clocks the censor lab reads time from.

The censor core (:mod:`proxy.lab.rules`) never asks the operating system for the time: it calls
``clock.now()`` on the :class:`LabClock` it was given. Two implementations:

* :class:`SystemClock` reads :func:`trio.current_time`, the clock of the running trio loop. Under
  pytest-trio's ``autojump_clock`` (a :class:`trio.testing.MockClock`) time is virtual, so a
  90-second residual block or a slow throttle passes in no real time, and the middlebox's
  ``trio.sleep`` calls jump with it.
* :class:`ManualClock` only moves when told to (``advance``): for pure engine tests without an
  event loop.

Both are deterministic under test control, which is what makes residual blocking and token-bucket
throttling reproducible.
"""

from __future__ import annotations

from typing import Protocol

import trio

__all__ = ["LabClock", "ManualClock", "SystemClock"]


class LabClock(Protocol):
    """Anything that tells the lab what time it is, in seconds (monotonic, arbitrary origin)."""

    def now(self) -> float: ...


class SystemClock:
    """The running trio loop's clock; only valid inside ``trio.run``."""

    def now(self) -> float:
        return trio.current_time()

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """A clock that stands still until :meth:`advance` or :meth:`set` moves it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds`` (never backwards)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self._now += seconds

    def set(self, when: float) -> None:
        """Jump to the absolute time ``when`` (not earlier than now)."""
        if when < self._now:
            raise ValueError(f"a clock cannot go back (from {self._now} to {when})")
        self._now = float(when)

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now})"
