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

import trio

#: ticks with nothing armed after which a clock parks until the next arm
_IDLE_TICKS = 40


class Alarm:
    """A deadline for waits on ``handles`` (trio sockets), rung by ``clock``."""

    __slots__ = ("clock", "deadline", "handles", "rang")

    def __init__(self, clock: Clock, *handles: trio.socket.SocketType) -> None:
        self.clock = clock
        self.handles = handles
        self.deadline = 0.0
        #: the deadline passed (or :meth:`ring` was called) since the last :meth:`arm`
        self.rang = False

    def arm(self, seconds: float) -> None:
        """Ring in ``seconds`` (up to one tick later) unless disarmed before."""
        self.rang = False
        self.deadline = trio.current_time() + seconds
        clock = self.clock
        clock.armed[self] = None
        if clock.parked is not None:
            clock.parked.set()

    def move(self, seconds: float) -> None:
        """Push an armed alarm's deadline to ``seconds`` from now (a no-op once it rang)."""
        self.deadline = trio.current_time() + seconds

    def disarm(self) -> None:
        """Do not ring (what it did ring is still in :attr:`rang`)."""
        self.clock.armed.pop(self, None)

    def ring(self) -> None:
        """Ring now: mark the alarm rung and wake every wait on its sockets."""
        self.clock.armed.pop(self, None)
        self.rang = True
        for handle in self.handles:
            if handle.fileno() >= 0:
                trio.lowlevel.notify_closing(handle)


class Clock:
    """Rings the alarms of one trio run whose deadlines passed, ``tick`` seconds apart."""

    __slots__ = ("armed", "name", "parked", "tick")

    def __init__(self, tick: float, name: str) -> None:
        self.tick = tick
        self.name = name
        #: armed alarms (a dict: ordered, O(1) delete)
        self.armed: dict[Alarm, None] = {}
        #: set while the task waits for something to be armed
        self.parked: trio.Event | None = None

    def alarm(self, *handles: trio.socket.SocketType) -> Alarm:
        """A new, unarmed alarm for waits on ``handles``."""
        return Alarm(self, *handles)

    async def run(self) -> None:
        """The clock's task (a system task, started by :func:`clock`)."""
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


_CLOCKS: dict[float, trio.lowlevel.RunVar[Clock]] = {}


def clock(tick: float) -> Clock:
    """The run's clock that ticks every ``tick`` seconds (started on first use)."""
    var = _CLOCKS.get(tick)
    if var is None:
        var = _CLOCKS[tick] = trio.lowlevel.RunVar(f"sidestep_clock_{tick}")
    try:
        return var.get()
    except LookupError:
        found = Clock(tick, f"sidestep clock ({tick:g} s)")
        var.set(found)
        trio.lowlevel.spawn_system_task(found.run, name=found.name)
        return found


#: tick of the clock for waits shorter than a few seconds
FINE = 0.05
#: tick of the clock for handshakes and idle connections
COARSE = 1.0


def clock_for(seconds: float) -> Clock:
    """The clock for a limit of ``seconds``: :data:`FINE` below five seconds (where a second
    late would matter), else :data:`COARSE`."""
    return clock(FINE if seconds < 5 else COARSE)
