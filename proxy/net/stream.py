"""A TCP stream that does not visit the scheduler when the kernel can answer at once.

``trio.SocketStream.send_all`` and ``receive_some`` end with a checkpoint even when the system
call completed immediately, and every checkpoint is a full pass of trio's run loop (an
``epoll_wait`` included). A proxied connection makes a dozen such calls for its handshakes, and
on a small router the passes add up to most of the latency sidestep adds. :class:`FastStream`
tries the system call first and only waits (with trio) when it would block. To stay fair to
other tasks it still yields every :data:`YIELD_EVERY` calls that did not wait.
"""

from __future__ import annotations

import os

import trio

#: calls completed without waiting before we yield to the scheduler anyway
YIELD_EVERY = 16


class FastStream(trio.abc.HalfCloseableStream):
    """A TCP stream like :class:`trio.SocketStream` (which it wraps for the waiting paths)
    whose I/O skips the scheduler when it need not wait.

    Cancellation is still honoured: it is checked whenever a call waits and at least every
    :data:`YIELD_EVERY` calls.
    """

    __slots__ = ("_quick", "inner", "socket")

    def __init__(self, socket: trio.socket.SocketType) -> None:
        self.inner = trio.SocketStream(socket)
        self.socket = socket
        self._quick = 0

    async def _fair(self) -> None:
        self._quick += 1
        if self._quick >= YIELD_EVERY:
            self._quick = 0
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = 65536 if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        fd = self.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("this stream was closed")
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            self._quick = 0
            return await self.inner.receive_some(size)
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc
        await self._fair()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        fd = self.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("this stream was closed")
        view = memoryview(data)
        try:
            sent = os.write(fd, view) if view.nbytes else 0
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc
        if sent < view.nbytes:
            self._quick = 0
            await self.inner.send_all(view[sent:])
            return
        await self._fair()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self.socket.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> int | bytes:
        if buffersize:
            return self.socket.getsockopt(level, option, buffersize)
        return self.socket.getsockopt(level, option)


#: what sidestep's TCP code accepts: the fast stream or trio's own
TcpStream = FastStream | trio.SocketStream
