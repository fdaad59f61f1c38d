"""Watching a relayed connection for the two in-line degradations: a freeze and throttling.

Neither is visible when the tunnel opens: the handshake passes, and only later does the data
stop (Russia since 2025 cuts TCP flows to foreign hosting after 14-22 KB and then drops
everything, leaving the connection open) or crawl (the 2021 Twitter slowdown, the 2024 YouTube
one). :class:`LinkMonitor` looks at the relay's byte counters a few times a second and says when
one of them is happening; it is pure (time comes in as arguments) so tests drive it directly.

* **frozen**: the server-to-client count sits inside the window (``freeze_min`` to
  ``freeze_max`` bytes), has not moved for ``freeze_stall`` seconds, neither side has closed,
  and the server's last TLS record is incomplete (:class:`RecordTracker`). The last condition
  separates a freeze from a keep-alive connection that simply has nothing more to say: a server
  that finished its answer stops at a record boundary, a cut in the middle of the stream almost
  never does. Connections that are not TLS are not judged frozen.
* **throttled**: the server has been sending for ``throttle_window`` seconds with no pause of
  ``throttle_pause`` (such a pause, or a client that is not reading, starts the measurement
  afresh) and at a rate more than
  ``throttle_factor`` times below the network's :class:`Baseline`, what the same network achieved
  for bulk transfers to other sites. Without a baseline (a fresh start) nothing is judged.

The relay (:func:`proxy.net.relay.relay`) keeps the counters live on its copy and splice paths
alike (one addition per read) and feeds the record tracker only while it copies in user space;
once a direction splices, more than 64 KiB have passed and the freeze window is behind it.
One task per trio run, :class:`MonitorTicker`, shows every relay's monitor its counters on time.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Protocol

import trio

#: the TLS record header: type, version (2 bytes), length (2 bytes)
_HEADER = 5


class Degradation(enum.StrEnum):
    """What :class:`LinkMonitor` can find (the values are the matching verdicts' names)."""

    FROZEN = "frozen"
    THROTTLED = "throttled"


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """The knobs of :class:`LinkMonitor` (``[router]`` in the config)."""

    #: the freeze window: server-to-client bytes between these two counts
    freeze_min: int = 14 * 1024
    freeze_max: int = 22 * 1024
    #: seconds without a server byte, inside the window, before the flow counts as frozen;
    #: 0 turns freeze detection off
    freeze_stall: float = 3.0
    #: a busy flow this many times slower than the baseline is throttled; 0 turns it off
    throttle_factor: float = 8.0
    #: seconds of uninterrupted sending measured before throttling is judged
    throttle_window: float = 5.0
    #: a pause at least this long ends a stretch of sending (a throttled flow arrives in bursts
    #: with short gaps; an application that goes quiet makes long ones)
    throttle_pause: float = 3.0
    #: bytes a measured stretch must carry before throttling is judged
    throttle_min_bytes: int = 8 * 1024
    #: a transfer teaches the baseline once it carried this many bytes
    baseline_min_bytes: int = 64 * 1024
    #: seconds between two looks at the counters
    interval: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.freeze_stall > 0 or self.throttle_factor > 0


class RecordTracker:
    """Follows the TLS record framing of one direction, knowing only where records end.

    Only headers are read: a chunk that ends before the next header costs one comparison.
    """

    __slots__ = ("_header", "_skip", "blind", "broken")

    def __init__(self) -> None:
        #: bytes of the current record still to come
        self._skip = 0
        #: a header split across reads
        self._header = b""
        #: the bytes stopped passing through us (splice): nothing more can be said
        self.blind = False
        #: the stream is not TLS records after all
        self.broken = False

    def feed(self, data: bytes | memoryview) -> None:
        n = len(data)
        if n <= self._skip:
            self._skip -= n
            return
        pos = self._skip
        self._skip = 0
        while pos < n:
            need = _HEADER - len(self._header)
            self._header += bytes(data[pos : pos + need])
            pos += need
            if len(self._header) < _HEADER:
                return
            header, self._header = self._header, b""
            if not 20 <= header[0] <= 24 or header[1] != 3:
                self.broken = True
                return
            length = int.from_bytes(header[3:5], "big")
            if pos + length > n:
                self._skip = pos + length - n
                return
            pos += length

    @property
    def at_boundary(self) -> bool:
        """Whether what was fed so far ends exactly where a record ends."""
        return self._skip == 0 and not self._header


class Baseline:
    """What bulk transfers achieved on one network (bytes per second), as a moving average."""

    __slots__ = ("rate", "samples")

    #: weight of a new sample
    ALPHA = 0.25

    def __init__(self) -> None:
        self.rate: float | None = None
        self.samples = 0

    def learn(self, rate: float) -> None:
        if rate <= 0:
            return
        self.rate = rate if self.rate is None else self.rate + self.ALPHA * (rate - self.rate)
        self.samples += 1


class LinkMonitor:
    """Judges one relayed connection from its counters; call :meth:`tick` every ``interval``.

    ``down_before`` are server bytes the client got before the relay started (the first
    response): the freeze window counts them. ``records`` follows the server's TLS framing
    (None for connections that are not TLS).
    """

    def __init__(
        self,
        settings: MonitorSettings,
        now: float,
        *,
        baseline: Baseline | None = None,
        records: RecordTracker | None = None,
        down_before: int = 0,
    ) -> None:
        self.settings = settings
        self.baseline = baseline
        self.records = records
        self.down_before = down_before
        #: what was found (reported once)
        self.found: Degradation | None = None
        self._last_tick = now
        self._last_down = 0
        self._moved_at = now
        # the current stretch of uninterrupted sending
        self._streak_time = 0.0
        self._streak_bytes = 0
        # every busy stretch together: what the baseline learns
        self._busy_time = 0.0
        self._busy_bytes = 0

    def tick(
        self, down: int, now: float, *, open_both: bool = True, client_blocked: bool = False
    ) -> Degradation | None:
        """Look at the counter ``down`` (server-to-client bytes relayed so far) at ``now``.

        ``open_both``: neither side has closed or half-closed. ``client_blocked``: the relay
        is waiting for the client to take data (the client, not the path, sets the pace).
        Returns a degradation the first time one is found.
        """
        s = self.settings
        dt = max(0.0, now - self._last_tick)
        delta = down - self._last_down
        self._last_tick, self._last_down = now, down
        if delta > 0:
            self._moved_at = now
            self._busy_time += dt
            self._busy_bytes += delta
        if client_blocked or now - self._moved_at >= s.throttle_pause:
            self._streak_time, self._streak_bytes = 0.0, 0
        else:
            self._streak_time += dt
            self._streak_bytes += delta
        if self.found is not None or not open_both:
            return None
        total = down + self.down_before
        if (
            s.freeze_stall > 0
            and self.records is not None
            and not (self.records.blind or self.records.broken)
            and s.freeze_min <= total <= s.freeze_max
            and now - self._moved_at >= s.freeze_stall
            and not self.records.at_boundary
        ):
            self.found = Degradation.FROZEN
        elif (
            s.throttle_factor > 0
            and self.baseline is not None
            and self.baseline.rate is not None
            and self._streak_time >= s.throttle_window
            and self._streak_bytes >= s.throttle_min_bytes
            and self._streak_bytes / self._streak_time * s.throttle_factor < self.baseline.rate
        ):
            self.found = Degradation.THROTTLED
        return self.found

    def finish(self, down: int, now: float) -> float | None:
        """The relay ended: the transfer's rate for the baseline, or None when it is not one
        to learn from (too small, or degraded)."""
        delta = down - self._last_down
        if delta > 0:
            # the last stretch lasted at most until now, and at least one interval: a transfer
            # that ends between two looks is credited with a rate no higher than the truth
            self._busy_time += max(now - self._last_tick, self.settings.interval)
            self._busy_bytes += delta
        if self.found is not None or self._busy_bytes < self.settings.baseline_min_bytes:
            return None
        return self._busy_bytes / max(self._busy_time, self.settings.interval)


class Watched(Protocol):
    """What :class:`MonitorTicker` ticks: a relay's view of its monitor."""

    #: the relay ended, or the monitor already found something: no more ticks
    over: bool
    monitor: LinkMonitor

    def tick(self, now: float) -> bool:
        """Show the monitor the counters; False: stop watching."""
        ...


class MonitorTicker:
    """The task that shows every monitored relay's counters to its monitor on time
    (:func:`monitor_ticker`).

    One per trio run (a system task, started by the first monitored relay): each relay's due
    time sits in a heap, and the task sleeps until the earliest. A task and a sleeping timer per
    connection would cost each one a spawn, a cancel scope and a cancellation at its end.
    """

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Watched]] = []
        self._order = itertools.count()
        self._sleep: trio.CancelScope | None = None
        #: watches not over yet; when none is left the heap is emptied and the task sleeps
        self._live = 0

    def add(self, watch: Watched) -> None:
        """Tick ``watch`` every ``monitor.settings.interval`` seconds until it is over."""
        due = trio.current_time() + watch.monitor.settings.interval
        heapq.heappush(self._due, (due, next(self._order), watch))
        self._live += 1
        if self._sleep is None:
            self._sleep = trio.CancelScope(deadline=due)
            trio.lowlevel.spawn_system_task(self._run, name="sidestep relay monitors")
        elif due < self._sleep.deadline:
            self._sleep.deadline = due

    def drop(self, watch: Watched) -> None:
        """No more ticks for ``watch`` (its relay ended, or its monitor found something)."""
        if watch.over:
            return
        watch.over = True
        self._live -= 1
        if self._live == 0:
            # nothing left to watch: forget the finished ones (the task still wakes up once at
            # the deadline already set, finds nothing due and sleeps until the next watch)
            self._due.clear()

    async def _run(self) -> None:
        while True:
            assert self._sleep is not None
            with self._sleep:
                await trio.sleep_forever()
            now = trio.current_time()
            due = self._due
            while due and (due[0][2].over or due[0][0] <= now):
                _, _, watch = heapq.heappop(due)
                if watch.over:
                    continue
                if watch.tick(now):
                    interval = watch.monitor.settings.interval
                    heapq.heappush(due, (now + interval, next(self._order), watch))
                else:
                    self.drop(watch)
            self._sleep = trio.CancelScope(deadline=due[0][0] if due else math.inf)


_TICKER: trio.lowlevel.RunVar[MonitorTicker] = trio.lowlevel.RunVar("sidestep_relay_ticker")


def monitor_ticker() -> MonitorTicker:
    """The current trio run's ticker (its task starts with the first watch)."""
    try:
        return _TICKER.get()
    except LookupError:
        ticker = MonitorTicker()
        _TICKER.set(ticker)
        return ticker
