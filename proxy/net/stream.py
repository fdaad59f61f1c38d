"""A TCP stream that does not visit the scheduler when the kernel can answer at once.

``trio.SocketStream.send_all`` and ``receive_some`` end with a checkpoint even when the system
call completed immediately, and every checkpoint is a full pass of trio's run loop (an
``epoll_wait`` included). A proxied connection makes a dozen such calls for its handshakes, and
on a small router the passes add up to most of the latency sidestep adds. :class:`FastStream`
tries the system call first and only waits (with trio) when it would block. To stay fair to
other tasks it still yields every :data:`YIELD_EVERY` calls that did not wait.

Time limits on a :class:`FastStream` are :class:`~proxy.net.alarm.Alarm`\\s rather than cancel
scopes (:func:`limited`): a wait that outlives one raises ``trio.TooSlowError``.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from proxy.net.alarm import Alarm, clocks

T = TypeVar("T")

#: calls completed without waiting before we yield to the scheduler anyway
YIELD_EVERY = 16


class FastStream(trio.abc.HalfCloseableStream):
    """A TCP stream with the interface of :class:`trio.SocketStream`, whose I/O skips the
    scheduler when it need not wait.

    Cancellation is still honoured: it is checked whenever a call waits and at least every
    :data:`YIELD_EVERY` calls. Concurrent calls of the same direction are the caller's bug (as
    with any trio stream) and are not detected here.
    """

    __slots__ = ("_alarm", "_armed", "_limit", "_quick", "socket", "tcp")

    def __init__(
        self, sock: trio.socket.SocketType, *, tcp: bool | None = None, nodelay: bool = True
    ) -> None:
        """``tcp=True`` is the word of a caller that made or accepted ``sock`` as an IPv4 or
        IPv6 stream socket: its type and family are then not looked up again. ``nodelay=False``
        is its word that TCP_NODELAY is on already (accepted from a listener that has it)."""
        if tcp is None:
            if sock.type != socket.SOCK_STREAM:
                raise ValueError("FastStream needs a SOCK_STREAM socket")
            tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.socket = sock
        self._quick = 0
        self._alarm: Alarm | None = None
        #: seconds of a limit that no wait has started yet (see :meth:`time_limit`)
        self._limit: float | None = None
        #: the alarm is armed for the current limit
        self._armed = False
        #: a TCP socket (IPv4 or IPv6), not a Unix one
        self.tcp = tcp
        if tcp and nodelay:
            # handshake replies and first flights are small: never hold them for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def time_limit(self, seconds: float) -> None:
        """From now on, waits of this stream that end later than ``seconds`` after the first
        of them began (up to one clock tick later) raise ``trio.TooSlowError``, until
        :meth:`no_time_limit`.

        The alarm is only armed when a call has to wait: work that never waits (the bytes
        were there, the kernel took the send) costs a store, not an alarm; and time spent
        without waiting is the proxy's own, not the peer's.
        """
        self._limit = seconds

    def no_time_limit(self) -> None:
        """Lift the limit :meth:`time_limit` set."""
        self._limit = None
        if self._armed:
            self._armed = False
            alarm = self._alarm
            assert alarm is not None
            alarm.disarm()
            alarm.rang = False

    async def _wait(self, wait: Callable[[trio.socket.SocketType], Awaitable[None]]) -> None:
        """``trio.lowlevel.wait_readable``/``wait_writable`` under the stream's time limit."""
        if self._limit is not None:  # the first wait under a limit: arm it now
            alarm = self._alarm
            if alarm is None:
                alarm = self._alarm = clocks().alarm(self.socket)
            alarm.arm(self._limit)
            self._limit = None
            self._armed = True
        elif not self._armed:
            await wait(self.socket)
            return
        else:
            alarm = self._alarm
            assert alarm is not None
            if alarm.rang:
                raise trio.TooSlowError
        try:
            await wait(self.socket)
        except trio.ClosedResourceError:
            if alarm.rang:
                raise trio.TooSlowError from None
            raise

    def _fd(self) -> int:
        fd = self.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("this stream was closed")
        return fd

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = 65536 if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        fd = self.socket.fileno()  # _fd(), inline: the hot path of every handshake
        if fd < 0:
            raise trio.ClosedResourceError("this stream was closed")
        while True:
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                data = None  # wait outside the handler, which would keep the exception alive
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            if data is None:
                self._quick = 0
                await self._wait(trio.lowlevel.wait_readable)
                fd = self._fd()
                continue
            quick = self._quick + 1  # every YIELD_EVERY calls that did not wait, let others run
            if quick >= YIELD_EVERY:
                quick = 0
                await trio.lowlevel.checkpoint()
            self._quick = quick
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        fd = self.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("this stream was closed")
        try:  # usually the kernel takes it all at once
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc
        if sent != (data.nbytes if isinstance(data, memoryview) else len(data)):
            await self._send_rest(fd, data, sent)
        quick = self._quick + 1
        if quick >= YIELD_EVERY:
            quick = 0
            await trio.lowlevel.checkpoint()
        self._quick = quick

    async def _send_rest(self, fd: int, data: bytes | bytearray | memoryview, sent: int) -> None:
        with memoryview(data) as whole, whole.cast("B") as view:
            total = view.nbytes
            while sent < total:
                self._quick = 0
                await self._wait(trio.lowlevel.wait_writable)
                fd = self._fd()
                try:
                    sent += os.write(fd, view[sent:])
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise trio.BrokenResourceError(exc) from exc

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the kernel takes of ``data`` at once, without waiting or yielding;
        returns how many bytes that was (0 when the send buffer is full)."""
        fd = self._fd()
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        self._fd()
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        self._fd()
        await trio.lowlevel.checkpoint()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise trio.BrokenResourceError(exc) from exc

    async def aclose(self) -> None:
        self.socket.close()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """Close at once, for an owner whose tasks are done with the stream: nothing waits on
        it any more. trio's own close first has its I/O manager wake the waiters and drop the
        descriptor from its epoll set; with no waiter that is a failing ``epoll_ctl`` and a
        caught ``OSError``, twice per proxied connection. The kernel drops a closed
        descriptor from epoll sets by itself, and trio keeps no state for a descriptor that
        nothing waits on."""
        sock = self.socket
        if sock.fileno() >= 0:
            os.close(sock.detach())

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self.socket.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> int | bytes:
        if buffersize:
            return self.socket.getsockopt(level, option, buffersize)
        return self.socket.getsockopt(level, option)


async def limited(stream: trio.abc.Stream, seconds: float, work: Awaitable[T]) -> T:
    """Await ``work``, whose waits are on ``stream``, for at most ``seconds``; raises
    ``trio.TooSlowError`` when that passes.

    A :class:`FastStream` keeps the limit with an alarm (its waits end up to one clock tick
    late, and only waits on that stream are limited); any other stream gets a cancel scope.
    """
    if isinstance(stream, FastStream):
        stream.time_limit(seconds)
        try:
            return await work
        finally:
            stream.no_time_limit()
    with trio.fail_after(seconds):
        return await work


#: what sidestep's TCP code accepts: the fast stream or trio's own
TcpStream = FastStream | trio.SocketStream
