"""Sending a first flight as separate TCP segments, and the Linux socket tricks around it.

``send()`` calls on a TCP socket are not segments: the kernel may merge bytes still queued with
the next write. :func:`send_segments` therefore writes one piece, waits until the kernel has
actually transmitted it (the socket's not-yet-sent queue, ``SIOCOUTQNSD``, is empty; bounded by
``drain_timeout`` so a stuck window cannot stall us), optionally pauses, and only then writes the
next piece. With ``TCP_NODELAY`` (which :func:`send_segments` sets) each piece leaves as its own
segment.

Two per-piece tricks (Linux):

* ``ttl``: the piece leaves with this IP TTL (IPv6 hop limit). With a TTL that dies before the
  server, the server first gets the later pieces and the kernel retransmits this one, at the
  normal TTL, once the loss shows ("disorder"). The option is restored as soon as the piece has
  left, before the next piece and before any retransmission.
* ``urgent``: one byte written after the piece with ``MSG_OOB``. It is TCP urgent data: the
  receiving kernel keeps it out of the stream (unless the server set ``SO_OOBINLINE``), while a
  middlebox that does not honour the urgent pointer reads it as part of the stream.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from proxy.net.stream import TcpStream

__all__ = ["Segment", "send_segments", "unsent_bytes"]

log = logging.getLogger("sidestep.net")

#: ioctl: bytes in the send queue not yet transmitted (Linux, include/uapi/linux/sockios.h)
SIOCOUTQNSD = 0x894B
#: polling interval while waiting for the kernel to transmit a piece
_POLL = 0.001


@dataclass(frozen=True, slots=True)
class Segment:
    """One piece to send as its own TCP segment."""

    data: bytes
    #: IP TTL / hop limit for this piece only (None: the socket's own)
    ttl: int | None = None
    #: one byte sent right after ``data`` as TCP urgent data (empty: none)
    urgent: bytes = b""

    def __post_init__(self) -> None:
        if len(self.urgent) > 1:
            raise ValueError("TCP urgent data is a single byte")
        if not self.data:
            raise ValueError("a segment needs at least one byte of data")
        if self.ttl is not None and not 1 <= self.ttl <= 255:
            raise ValueError(f"TTL {self.ttl} is outside 1-255")


def unsent_bytes(sock: trio.socket.SocketType) -> int:
    """Bytes the kernel holds for ``sock`` that it has not transmitted yet (Linux)."""
    buf = fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


async def wait_transmitted(sock: trio.socket.SocketType, timeout: float) -> bool:
    """Wait until the kernel has transmitted everything written to ``sock``.

    Returns False when ``timeout`` passed first (the peer's window or the congestion window is
    closed) or the system cannot tell (no ``SIOCOUTQNSD`` outside Linux); the caller goes on
    anyway, and the pieces may then share a segment.
    """
    with trio.move_on_after(timeout):
        try:
            while unsent_bytes(sock):
                await trio.sleep(_POLL)
        except OSError:
            return False
        return True
    return False


def _ttl_option(sock: trio.socket.SocketType) -> tuple[int, int]:
    if sock.family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS
    return socket.IPPROTO_IP, socket.IP_TTL


async def _send_urgent(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write ``data``, its last byte urgent, in as few calls as the kernel allows."""
    view = memoryview(data)
    while view:
        sent = await sock.send(view, socket.MSG_OOB)
        view = view[sent:]


async def send_segments(
    stream: TcpStream,
    segments: Sequence[Segment],
    *,
    delay: float = 0.0,
    drain_timeout: float = 0.5,
    after_piece: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Send ``segments`` in order, each as its own TCP segment (see the module docstring).

    ``delay`` seconds pass between pieces. ``after_piece(i)``, for tests, is awaited after
    piece ``i`` (all but the last) has left, before the next one is written.
    """
    sock = stream.socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i, segment in enumerate(segments):
        level, option = _ttl_option(sock)
        saved = sock.getsockopt(level, option) if segment.ttl is not None else None
        if segment.ttl is not None:
            sock.setsockopt(level, option, segment.ttl)
        try:
            if segment.urgent:
                await _send_urgent(sock, segment.data + segment.urgent)
            else:
                await stream.send_all(segment.data)
            last = i == len(segments) - 1
            # the last piece needs no wait, unless its TTL must be restored after it left
            if (not last or saved is not None) and not await wait_transmitted(sock, drain_timeout):
                log.debug("piece %d of %d still queued after %g s", i + 1, len(segments),
                          drain_timeout)  # fmt: skip
        finally:
            if saved is not None:
                sock.setsockopt(level, option, saved)
        if last:
            break
        if delay > 0:
            await trio.sleep(delay)
        else:
            # let other tasks of this process (an in-process reader, such as the censor lab)
            # see the piece before the next one follows
            await trio.lowlevel.checkpoint()
        if after_piece is not None:
            await after_piece(i)
