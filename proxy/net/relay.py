"""Moving bytes both ways between two streams once a tunnel is up.

:func:`relay` copies ``a -> b`` in the calling task and ``b -> a`` in one child task, so a
relayed connection costs one extra task. Between TCP sockets, a direction that is over when the
relay starts (the server answered and closed) is finished first and the other one is copied in
the calling task, without the extra task; when both are over, nothing is copied. Monitors are
shown their counters by one task shared by every relay of the run
(:class:`~proxy.net.monitor.MonitorTicker`), not a task and a timer per connection. Its rules:

* **Half-close.** When one side sends EOF, the other side gets ``send_eof()`` (TCP ``FIN``) and
  the opposite direction keeps flowing until it ends too. A stream that cannot half-close is left
  alone and the other direction continues.
* **Resets end both.** A broken stream (``ECONNRESET``, ``EPIPE``) ends the relay at once. TCP
  sockets are then set to reset on close (``SO_LINGER`` 0) so the peer on the other side learns
  that the data was cut short instead of seeing a clean end.
* **Idle timeout** is shared: the relay ends when no byte has moved either way for
  ``idle_timeout`` seconds. The deadline is refreshed at most once per ``slack`` (a twentieth of
  the timeout, at most one second), so it may fire up to ``slack`` late but never early. Between
  TCP sockets it is an :class:`~proxy.net.alarm.Alarm` (up to one more clock tick late, armed
  when a direction first has to wait) instead of a cancel scope.
* **Bounded memory**: at most one ``buffer_size`` read in flight per direction, and no buffer is
  kept while a direction waits.

When both ends are plain TCP streams (``FastStream`` or ``trio.SocketStream``) the copy runs on
the file descriptors with non-blocking system calls, waiting through
``trio.lowlevel.wait_readable``/``wait_writable`` only when a call would block: that saves the
scheduler pass trio's stream methods take per call. On
Linux a direction whose read fills the whole buffer is a bulk flow; it switches to ``splice(2)``
through a pipe created then, so the bytes never enter Python. Short flows (requests, handshakes,
interactive traffic) never create a pipe. The caller owns both streams and closes them afterwards.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import sys
import termios
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import trio

from proxy.net.alarm import Alarm, clocks
from proxy.net.monitor import (
    Degradation,
    LinkMonitor,
    MonitorTicker,
    RecordTracker,
    monitor_ticker,
)
from proxy.net.stream import FastStream, TcpStream

_CAN_SPLICE = sys.platform == "linux" and hasattr(os, "splice")
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if _CAN_SPLICE else 0
#: pipe capacity asked for once a direction switches to splice (the kernel may refuse: then 64 KiB)
_PIPE_SIZE = 1 << 20
#: loop turns without blocking after which a direction lets other tasks run
_TURNS_BEFORE_YIELD = 16
_LINGER_RESET = struct.pack("ii", 1, 0)
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
#: the first byte of ``struct tcp_info`` (the state) for a socket whose peer sent its FIN
_CLOSE_WAIT = bytes([8])
_ZERO = struct.pack("i", 0)
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(slots=True)
class RelayStats:
    """What happened during one :func:`relay`."""

    #: bytes read from ``a`` and written to ``b``
    a_to_b: int = 0
    #: bytes read from ``b`` and written to ``a``
    b_to_a: int = 0
    #: ``"a"`` or ``"b"``: the side whose EOF or failure came first (``None``: neither, idle end)
    first_closed: str | None = None
    #: the relay ended because nothing moved for ``idle_timeout`` seconds
    idle_timeout: bool = False
    #: the relay ended because a stream broke (reset, broken pipe) rather than by EOF both ways
    reset: bool = False
    #: directions that switched to splice (each created one pipe)
    spliced: int = 0
    #: what the monitor found, if one was watching
    degraded: Degradation | None = None
    #: the relay cut the connection (with a reset both ways) because of ``degraded``
    cut: bool = False


class _Shared:
    """State both directions of one relay touch: statistics, the idle deadline, the end.

    The idle deadline is an :class:`~proxy.net.alarm.Alarm` on both sockets when the relay
    copies between TCP sockets, else the deadline of the cancel scope of the relay's nursery.
    """

    __slots__ = (
        "alarm",
        "armed",
        "b_waits_on_a",
        "closing",
        "error",
        "halted",
        "idle",
        "pumping",
        "refresh_at",
        "scope",
        "slack",
        "stats",
        "streams",
        "tap",
    )

    def __init__(
        self,
        stats: RelayStats,
        idle: float,
        streams: tuple[object, ...],
        *,
        scope: trio.CancelScope | None = None,
        alarm: Alarm | None = None,
    ) -> None:
        self.stats = stats
        self.closing = False
        #: follows the TLS records of the ``b -> a`` direction while it copies (monitor)
        self.tap: RecordTracker | None = None
        #: the ``b -> a`` direction is waiting until ``a`` (the client) takes more data
        self.b_waits_on_a = False
        self.scope = scope
        self.alarm = alarm
        self.idle = idle
        self.slack = min(idle / 20, 1.0)
        self.streams = streams
        #: directions still copying
        self.pumping = 2
        #: what the monitor's ``on_degraded`` raised (the relay ends and raises it)
        self.error: Exception | None = None
        #: the relay was told to end (a broken stream, the monitor): the pumps stop
        self.halted = False
        #: the alarm is armed (only once a pump had to wait: a relay that never waits needs none)
        self.armed = False
        now = trio.current_time()
        self.refresh_at = now + self.slack
        if scope is not None:
            scope.deadline = now + idle + self.slack

    def before_wait(self) -> None:
        """A pump is about to wait: from now on the idle deadline applies."""
        if not self.armed and self.alarm is not None:
            self.armed = True
            self.alarm.arm(self.idle + self.slack)

    def touch(self) -> None:
        """Bytes moved: push the idle deadline (cheaply, at most once per ``slack``)."""
        now = trio.current_time()
        if now >= self.refresh_at:
            self.refresh_at = now + self.slack
            if self.alarm is not None:
                self.alarm.deadline = now + self.idle + self.slack
            elif self.scope is not None:
                self.scope.deadline = now + self.idle + self.slack

    def pump_done(self) -> None:
        """One direction ended by itself (EOF or a broken stream)."""
        self.pumping -= 1

    @property
    def done(self) -> bool:
        """Both directions ended by themselves (not by the idle deadline)."""
        return self.pumping == 0

    @property
    def ended_elsewhere(self) -> bool:
        """The relay is ending for a reason outside the pump that asks (idle, halted)."""
        return self.halted or (self.alarm is not None and self.alarm.rang)

    @property
    def idled_out(self) -> bool:
        """The idle deadline ended the relay."""
        if self.alarm is not None:
            idle = self.alarm.rang
        else:
            idle = self.scope is not None and self.scope.cancelled_caught
        return idle and not self.stats.reset and not self.done

    def closed(self, side: str) -> None:
        if self.stats.first_closed is None:
            self.stats.first_closed = side

    def abort(self, side: str) -> None:
        """``side`` broke: end both directions and make the other peer see a reset."""
        self.closed(side)
        if not self.stats.reset:
            self.stats.reset = True
            for stream in self.streams:
                if isinstance(stream, trio.SocketStream | FastStream):
                    try:
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    except OSError:
                        pass
        self.halt()

    def halt(self) -> None:
        """End both directions now: cancel the nursery, or wake the pumps' waits."""
        self.halted = True
        if self.scope is not None:
            self.scope.cancel()
            return
        for stream in self.streams:
            sock = cast(TcpStream, stream).socket
            if sock.fileno() >= 0:
                trio.lowlevel.notify_closing(sock)


async def relay(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    idle_timeout: float,
    buffer_size: int = 65536,
    splice: bool = True,
    closing: bool = False,
    monitor: LinkMonitor | Callable[[], LinkMonitor | None] | None = None,
    on_degraded: Callable[[Degradation], bool] | None = None,
) -> RelayStats:
    """Copy bytes between ``a`` and ``b`` in both directions until both are done.

    Returns when both directions reached EOF, when a stream broke, or when nothing moved for
    ``idle_timeout`` seconds. Does not close the streams. ``closing=True`` promises that the
    caller closes both streams as soon as this returns: the last FIN is then left to that close
    instead of costing a ``shutdown()`` of its own. ``splice=False`` keeps every byte in
    user space (the zero-copy path is only used for TCP socket pairs on Linux anyway).

    With a ``monitor`` (``a`` is the client, ``b`` the server), a shared task shows it the
    counters every ``monitor.settings.interval`` seconds and calls ``on_degraded`` once when the
    monitor finds a freeze or throttling; when that returns True the relay ends at once with a
    reset both ways (``stats.cut``), so a client stuck on a frozen connection retries at once.
    ``monitor.records``, if any, is fed the ``b -> a`` bytes while they are copied.
    ``monitor`` may be a function that makes one: it is only called when there is a
    ``b -> a`` flow to watch (not when the server had already closed when the relay began).
    """
    if idle_timeout <= 0:
        raise ValueError("idle_timeout must be positive")
    if buffer_size <= 0:
        raise ValueError("buffer_size must be positive")
    stats = RelayStats()
    watch: _Watch | None = None
    ticker: MonitorTicker | None = None
    if _is_tcp_socket(a) and _is_tcp_socket(b):
        sa, sb = cast(TcpStream, a), cast(TcpStream, b)
        alarm = clocks().alarm(sa.socket, sb.socket)
        shared = _Shared(stats, idle_timeout, (a, b), alarm=alarm)
        shared.closing = closing
        # a server that already sent everything has nothing left to be frozen or throttled
        b_over = _eof_waiting(sb.socket)
        if monitor is not None and not b_over:
            if callable(monitor):
                monitor = monitor()
            if monitor is not None:
                watch, ticker = _watch(shared, monitor, on_degraded)
        try:
            await _relay_sockets(shared, sa, sb, b_over, buffer_size, splice and _CAN_SPLICE)
        finally:
            alarm.disarm()
            if ticker is not None and watch is not None:
                ticker.drop(watch)
    else:
        # One nursery: its scope carries the idle deadline.
        try:
            async with trio.open_nursery() as nursery:
                shared = _Shared(stats, idle_timeout, (a, b), scope=nursery.cancel_scope)
                shared.closing = closing
                if callable(monitor):
                    monitor = monitor()
                if monitor is not None:
                    watch, ticker = _watch(shared, monitor, on_degraded)
                nursery.start_soon(_direction, shared, _pump_streams, b, a, False, buffer_size)
                await _direction(shared, _pump_streams, a, b, True, buffer_size)
        finally:
            if ticker is not None and watch is not None:
                ticker.drop(watch)
    if shared.error is not None:
        raise shared.error
    if shared.idled_out:
        stats.idle_timeout = True
    return stats


def _watch(
    shared: _Shared, monitor: LinkMonitor, on_degraded: Callable[[Degradation], bool] | None
) -> tuple[_Watch, MonitorTicker]:
    shared.tap = monitor.records
    watch = _Watch(shared, monitor, on_degraded)
    ticker = monitor_ticker()
    ticker.add(watch)
    return watch, ticker


async def _relay_sockets(
    shared: _Shared, a: TcpStream, b: TcpStream, b_over: bool, size: int, use_splice: bool
) -> None:
    """Both directions between two TCP sockets, in as few tasks as the flow allows.

    A short exchange is often half over when the relay starts: the server answered and closed.
    A direction whose socket has nothing but its EOF waiting is finished on the spot, and the
    other one is then copied in this task; only when both directions may have to wait does
    ``b -> a`` get a task of its own (a spawn, a nursery and a scheduler pass saved per
    connection otherwise). ``b_over``: :func:`_eof_waiting` is true of ``b``.
    """
    if b_over:
        if shared.closing and _eof_waiting(a.socket):
            # both peers are done, and the caller's close sends both FINs: nothing to copy
            shared.closed("b")
            shared.pumping = 0
            return
        await _direction(shared, _pump_fds, b, a, False, size, use_splice)
        if not shared.ended_elsewhere:
            await _direction(shared, _pump_fds, a, b, True, size, use_splice)
        return
    if _eof_waiting(a.socket):
        await _direction(shared, _pump_fds, a, b, True, size, use_splice)
        if not shared.ended_elsewhere:
            await _direction(shared, _pump_fds, b, a, False, size, use_splice)
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_direction, shared, _pump_fds, b, a, False, size, use_splice)
        await _direction(shared, _pump_fds, a, b, True, size, use_splice)


def _eof_waiting(sock: trio.socket.SocketType) -> bool:
    """Whether the peer of ``sock`` sent its FIN and nothing is left to read before it (the
    next read returns EOF), found without reading: the TCP state is CLOSE_WAIT and the
    receive queue is empty. False where TCP_INFO is not available."""
    if _TCP_INFO is None:
        return False
    try:
        if sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1) != _CLOSE_WAIT:
            return False
        return fcntl.ioctl(sock.fileno(), termios.FIONREAD, _ZERO) == _ZERO
    except OSError:  # an error the pump will meet and report
        return False


async def _direction(shared: _Shared, pump: Callable[..., Awaitable[None]], *args: object) -> None:
    """Run one direction's pump and tell ``shared`` when it ended by itself (EOF or a broken
    stream; not when the idle deadline or the other direction ended the relay)."""
    await pump(shared, *args)
    if not shared.ended_elsewhere:
        shared.pump_done()


class _Watch:
    """One monitored relay, as :class:`~proxy.net.monitor.MonitorTicker` keeps it."""

    __slots__ = ("monitor", "on_degraded", "over", "shared")

    def __init__(
        self,
        shared: _Shared,
        monitor: LinkMonitor,
        on_degraded: Callable[[Degradation], bool] | None,
    ) -> None:
        self.shared = shared
        self.monitor = monitor
        self.on_degraded = on_degraded
        #: the relay ended, or the monitor already found something: no more ticks
        self.over = False

    def tick(self, now: float) -> bool:
        """Show the monitor the counters; act once on what it finds. False: stop watching."""
        shared = self.shared
        stats = shared.stats
        try:
            found = self.monitor.tick(
                stats.b_to_a,
                now,
                open_both=stats.first_closed is None,
                client_blocked=shared.b_waits_on_a,
            )
            if found is None:
                return True
            stats.degraded = found
            if self.on_degraded is not None and self.on_degraded(found):
                stats.cut = True
                shared.abort("b")
        except Exception as exc:  # the relay raises it: the ticker serves every other relay
            shared.error = exc
            shared.halt()
        return False


def _is_tcp_socket(stream: trio.abc.Stream) -> bool:
    if isinstance(stream, FastStream):
        return stream.tcp
    if not isinstance(stream, trio.SocketStream):
        return False
    sock = stream.socket
    return sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)


async def _pump_streams(
    shared: _Shared, src: trio.abc.Stream, dst: trio.abc.Stream, forward: bool, size: int
) -> None:
    """One direction over the generic stream interface (memory streams, TLS, tunnels)."""
    src_side, dst_side = ("a", "b") if forward else ("b", "a")
    stats = shared.stats
    tap = None if forward else shared.tap
    while True:
        try:
            data = await src.receive_some(size)
        except _STREAM_ERRORS:
            shared.abort(src_side)
            return
        if not data:
            break
        if tap is not None:
            tap.feed(data)
        try:
            if not forward:
                shared.b_waits_on_a = True
            await dst.send_all(data)
        except _STREAM_ERRORS:
            shared.abort(dst_side)
            return
        finally:
            shared.b_waits_on_a = False
        if forward:
            stats.a_to_b += len(data)
        else:
            stats.b_to_a += len(data)
        shared.touch()
    shared.closed(src_side)
    if isinstance(dst, trio.abc.HalfCloseableStream):
        try:
            await dst.send_eof()
        except _STREAM_ERRORS:
            shared.abort(dst_side)


class _Closed(Exception):
    """A socket of the relay was closed by someone else while we waited."""


async def _pump_fds(
    shared: _Shared,
    src: TcpStream,
    dst: TcpStream,
    forward: bool,
    size: int,
    use_splice: bool,
) -> None:
    """One direction between two TCP sockets: non-blocking copy, then splice for bulk flows.

    Waits happen outside the ``except BlockingIOError`` clauses: a coroutine suspended inside
    a handler keeps the exception (and its traceback) alive, about 1.5 KiB per idle
    connection.
    """
    src_side, dst_side = ("a", "b") if forward else ("b", "a")
    src_sock, dst_sock = src.socket, dst.socket
    sfd, dfd = src_sock.fileno(), dst_sock.fileno()
    wait_readable = trio.lowlevel.wait_readable
    stats = shared.stats
    tap = None if forward else shared.tap
    turns = 0
    pipe: tuple[int, int] | None = None
    failed_side = src_side
    try:
        # copy phase: short flows live and die here
        while True:
            failed_side = src_side
            try:
                data = os.read(sfd, size)
            except BlockingIOError:
                data = None
            if data is None:
                shared.before_wait()
                await wait_readable(sfd)
                _check_open(shared, src_sock, sfd, dst_sock, dfd)
                turns = 0
                continue
            if not data:
                break
            n = len(data)
            if tap is not None:
                tap.feed(data)
            failed_side = dst_side
            try:
                sent = os.write(dfd, data)
            except BlockingIOError:
                sent = 0
            if sent < n:
                view = memoryview(data)
                while sent < n:
                    await _wait_writable(shared, dfd, forward)
                    _check_open(shared, src_sock, sfd, dst_sock, dfd)
                    turns = 0
                    try:
                        sent += os.write(dfd, view[sent:])
                    except BlockingIOError:
                        pass
                view.release()
            if forward:
                stats.a_to_b += n
            else:
                stats.b_to_a += n
            shared.touch()
            if n == size and use_splice:
                pipe = _make_pipe()
                if pipe is not None:
                    stats.spliced += 1
                    if tap is not None:
                        tap.blind = True
                    break
                use_splice = False  # out of descriptors: keep copying
            turns += 1
            if turns >= _TURNS_BEFORE_YIELD:
                await trio.lowlevel.checkpoint()
                _check_open(shared, src_sock, sfd, dst_sock, dfd)
                turns = 0
        if pipe is not None:
            # splice phase: bytes go socket -> pipe -> socket inside the kernel
            pipe_r, pipe_w = pipe
            splice = os.splice
            flags = _SPLICE_FLAGS
            while True:
                failed_side = src_side
                try:
                    n = splice(sfd, pipe_w, _PIPE_SIZE, flags=flags)
                except BlockingIOError:
                    n = -1
                if n < 0:
                    shared.before_wait()
                    await wait_readable(sfd)
                    _check_open(shared, src_sock, sfd, dst_sock, dfd)
                    turns = 0
                    continue
                if n == 0:
                    break
                failed_side = dst_side
                left = n
                while left:
                    try:
                        left -= splice(pipe_r, dfd, left, flags=flags)
                        continue
                    except BlockingIOError:
                        pass
                    await _wait_writable(shared, dfd, forward)
                    _check_open(shared, src_sock, sfd, dst_sock, dfd)
                    turns = 0
                if forward:
                    stats.a_to_b += n
                else:
                    stats.b_to_a += n
                shared.touch()
                turns += 1
                if turns >= _TURNS_BEFORE_YIELD:
                    await trio.lowlevel.checkpoint()
                    _check_open(shared, src_sock, sfd, dst_sock, dfd)
                    turns = 0
    except (OSError, _Closed, trio.ClosedResourceError):
        if not shared.ended_elsewhere:
            shared.abort(failed_side)
        return
    finally:
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])
    # EOF from src: pass it on as a FIN and let the other direction finish
    last = shared.stats.first_closed == dst_side
    shared.closed(src_side)
    if last and shared.closing:
        return  # the caller's close() sends this FIN
    try:
        dst_sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.EBADF):
            shared.abort(dst_side)


def _check_open(
    shared: _Shared,
    src: trio.socket.SocketType,
    sfd: int,
    dst: trio.socket.SocketType,
    dfd: int,
) -> None:
    """After a wait: another task may have closed a socket (and its descriptor number been
    reused), or the relay may be ending (idle, the other direction broke)."""
    if src.fileno() != sfd or dst.fileno() != dfd or shared.ended_elsewhere:
        raise _Closed


async def _wait_writable(shared: _Shared, fd: int, forward: bool) -> None:
    """Wait until ``fd`` takes more; the monitor learns when the client sets the pace."""
    shared.before_wait()
    if forward:
        await trio.lowlevel.wait_writable(fd)
        return
    shared.b_waits_on_a = True
    try:
        await trio.lowlevel.wait_writable(fd)
    finally:
        shared.b_waits_on_a = False


def _make_pipe() -> tuple[int, int] | None:
    try:
        pipe_r, pipe_w = os.pipe()
    except OSError:
        return None
    try:
        fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except (OSError, AttributeError):
        pass  # a smaller pipe only means more system calls
    return pipe_r, pipe_w
