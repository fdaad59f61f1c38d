"""Time limits on socket waits without a cancel scope per wait.

A trio cancel scope with a deadline costs a few hundred bytecodes to create, enter, register
and close. A proxied connection used four of them (handshake, first flight, first answer,
relay idle), about a quarter of all the Python it ran. An :class:`Alarm` is a deadline that
one task per trio run and per :class:`Clock` keeps for every connection: arming it is a
dictionary store, disarming a delete. When the deadline passes, that task marks the alarm rung
and wakes whatever waits on its sockets with :func:`trio.lowlevel.notify_closing`; the waiting
code (:class:`~proxy.net.stream.FastStream`, the relay) sees the ``ClosedResourceError``, finds
its alarm rung and treats it as its time limit. Nothing is closed by the alarm itself: the
socket can be waited on again afterwards.

The clock looks at its alarms once per ``tick``, so an alarm rings up to one tick late, never
early. :data:`FINE` ticks every 50 ms (short waits such as the first flight's); :data:`COARSE`
once a second (handshakes, idle connections). A clock with nothing armed for a while parks
until the next alarm is armed, so an idle proxy does not wake up for it.

Code that arms an alarm disarms it before the sockets it names are closed (a ``finally``), so
the clock never wakes a socket whose descriptor number went to someone else; sockets are held
as objects and one whose ``fileno()`` is -1 is skipped as well.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

#: ticks with nothing armed after which a clock parks until the next arm
_IDLE_TICKS = 40


class Alarm:
    """A deadline for waits on ``handles`` (trio sockets), rung by one of the run's clocks."""

    __slots__ = ("clock", "clocks", "deadline", "handles", "rang")

    def __init__(self, clocks: Clocks, *handles: trio.socket.SocketType) -> None:
        self.clocks = clocks
        #: the clock it is (or was last) armed on
        self.clock: Clock | None = None
        self.handles = handles
        self.deadline = 0.0
        #: the deadline passed (or :meth:`ring` was called) since the last :meth:`arm`
        self.rang = False

    def arm(self, seconds: float) -> None:
        """Ring in ``seconds`` (up to one tick of its clock later) unless disarmed before."""
        clocks = self.clocks
        clock = clocks.fine if seconds < FINE_BELOW else clocks.coarse
        if clock is not self.clock:
            if self.clock is not None:
                self.clock.armed.pop(self, None)
            self.clock = clock
            if not clock.started:
                clock.start()
        self.rang = False
        self.deadline = clocks.now() + seconds
        clock.armed[self] = None
        if clock.parked is not None:
            clock.parked.set()

    def disarm(self) -> None:
        """Do not ring (what it did ring is still in :attr:`rang`)."""
        if self.clock is not None:
            self.clock.armed.pop(self, None)

    def ring(self) -> None:
        """Ring now: mark the alarm rung and wake every wait on its sockets."""
        self.disarm()
        self.rang = True
        for handle in self.handles:
            if handle.fileno() >= 0:
                trio.lowlevel.notify_closing(handle)


class Clock:
    """Rings the alarms of one trio run whose deadlines passed, ``tick`` seconds apart."""

    __slots__ = ("armed", "name", "parked", "started", "tick")

    def __init__(self, tick: float, name: str) -> None:
        self.tick = tick
        self.name = name
        #: armed alarms (a dict: ordered, O(1) delete)
        self.armed: dict[Alarm, None] = {}
        #: set while the task waits for something to be armed
        self.parked: trio.Event | None = None
        self.started = False

    def start(self) -> None:
        """Start the clock's task (a system task of the current run)."""
        self.started = True
        trio.lowlevel.spawn_system_task(self._run, name=self.name)

    async def _run(self) -> None:
        idle = 0
        while True:
            await trio.sleep(self.tick)
            armed = self.armed
            if not armed:
                idle += 1
                if idle >= _IDLE_TICKS:
                    self.parked = parked = trio.Event()
                    await parked.wait()
                    self.parked = None
                    idle = 0
                continue
            idle = 0
            now = trio.current_time()
            for alarm in [a for a in armed if a.deadline <= now]:
                alarm.ring()


class Clocks:
    """The two clocks of one trio run, and its time."""

    __slots__ = ("coarse", "fine", "now")

    def __init__(self) -> None:
        self.fine = Clock(FINE, f"sidestep clock ({FINE:g} s)")
        self.coarse = Clock(COARSE, f"sidestep clock ({COARSE:g} s)")
        #: trio's current time (the run's clock, without the module-level lookups)
        self.now: Callable[[], float] = trio.lowlevel.current_clock().current_time

    def alarm(self, *handles: trio.socket.SocketType) -> Alarm:
        """A new, unarmed alarm for waits on ``handles``."""
        return Alarm(self, *handles)


_CLOCKS: trio.lowlevel.RunVar[Clocks] = trio.lowlevel.RunVar("sidestep_clocks")


def clocks() -> Clocks:
    """The current run's clocks (their tasks start when their first alarm is armed)."""
    try:
        return _CLOCKS.get()
    except LookupError:
        found = Clocks()
        _CLOCKS.set(found)
        return found


#: tick of the clock for waits shorter than :data:`FINE_BELOW` seconds
FINE = 0.05
#: tick of the clock for longer waits (handshakes, idle connections)
COARSE = 1.0
#: limits below this many seconds are kept by the fine clock (a second late would matter)
FINE_BELOW = 5.0
