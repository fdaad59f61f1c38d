"""The ``fragment`` family: the client's own first flight, re-framed so a censor misreads it.

Every variant connects like ``direct`` and then sends the first flight cut as its
:class:`~proxy.protocols.splits.FragmentPolicy` says (:func:`~proxy.protocols.splits.plan_fragments`:
TLS records and/or TCP segments at points relative to the SNI or the HTTP Host, never a changed
handshake byte). The methods differ in how the pieces travel (:mod:`proxy.net.segments`):

* ``split``: one TCP segment per piece, in order (``type = "fragment"``);
* ``disorder``: the first piece leaves with a small IP TTL that dies before the server, so the
  server gets the rest first and the kernel retransmits the first piece afterwards
  (``type = "disorder"``, Linux);
* ``oob``: one TCP urgent byte follows the first piece; the server's kernel drops it from the
  stream, a censor that ignores the urgent pointer reads a corrupted name (``type = "oob"``,
  Linux).

A flight the policy cannot change (no point resolves, e.g. an HTTP-only variant given a TLS
hello, or an empty flight) raises :class:`NotApplicable` before any connection is made: sending
it unchanged would only repeat ``direct``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import trio

from proxy.errors import UpstreamError
from proxy.inbound.base import IPAddress, Target
from proxy.net.dial import open_tcp
from proxy.net.segments import Segment, send_segments
from proxy.net.stream import TcpStream
from proxy.protocols.splits import FragmentPlan, FragmentPolicy, plan_fragments
from proxy.protocols.tls_hello import looks_like_tls

__all__ = ["FragmentStrategy", "Method", "NotApplicable"]

Method = Literal["split", "disorder", "oob"]

#: the urgent byte of the ``oob`` method; a zero byte is never valid inside a host name
URGENT_BYTE = b"\x00"


class NotApplicable(UpstreamError):
    """The strategy has nothing to change in this first flight; it did not connect."""


def reframable(first_flight: bytes) -> bool:
    """Whether some fragment variant might re-frame ``first_flight``: only a ClientHello or an
    HTTP/1.x request (upper-case method) can be; a glance at the first bytes spares planning
    the cuts for every other protocol. True is a maybe, False is certain."""
    return first_flight[:1].isupper() or looks_like_tls(first_flight[:3])


@dataclass(frozen=True, slots=True)
class FragmentStrategy:
    """Connect directly and send the first flight re-framed by ``policy`` via ``method``."""

    name: str
    policy: FragmentPolicy
    method: Method = "split"
    #: seconds between pieces
    delay: float = 0.0
    #: ``disorder``: the TTL / hop limit of the first piece
    ttl: int = 1
    connect_timeout: float = 10.0
    happy_eyeballs_delay: float = 0.25
    #: longest wait for the kernel to transmit one piece before writing the next
    drain_timeout: float = 0.5
    remote_dns: bool = False
    #: tests and the lab only: ``after_piece(stream, i)`` is awaited once piece ``i`` has left,
    #: before the next one (see :func:`proxy.net.segments.send_segments`)
    after_piece: Callable[[TcpStream, int], Awaitable[None]] | None = field(
        default=None, compare=False, repr=False
    )

    def applies_to(self, first_flight: bytes) -> bool:
        """Whether this strategy has something to change in ``first_flight`` (cheap: no
        exception is built when it has not)."""
        if not reframable(first_flight):
            return False
        return self._usable(plan_fragments(first_flight, self.policy))

    def _usable(self, plan: FragmentPlan) -> bool:
        return plan.changed and len(plan.pieces) >= (2 if self.method != "split" else 1)

    def segments_for(self, first_flight: bytes) -> list[Segment]:
        """The pieces this strategy sends for ``first_flight``; raises :class:`NotApplicable`."""
        plan = plan_fragments(first_flight, self.policy)
        pieces = list(plan.pieces)
        if not self._usable(plan):
            raise NotApplicable(
                f"strategy {self.name!r} has nothing to re-frame in this first flight "
                f"({plan.protocol}, {len(first_flight)} bytes)"
            )
        segments = [Segment(p) for p in pieces]
        if self.method == "disorder":
            segments[0] = Segment(pieces[0], ttl=self.ttl)
        elif self.method == "oob":
            segments[0] = Segment(pieces[0], urgent=URGENT_BYTE)
        return segments

    async def connect(
        self, target: Target, addresses: Sequence[IPAddress], first_flight: bytes
    ) -> trio.abc.HalfCloseableStream:
        segments = self.segments_for(first_flight)
        stream = await open_tcp(
            addresses,
            target.port,
            attempt_delay=self.happy_eyeballs_delay,
            timeout=self.connect_timeout,
        )
        await self._send(stream, segments)
        return stream

    async def send_over(self, stream: TcpStream, first_flight: bytes) -> None:
        """Send ``first_flight`` re-framed over ``stream``, a connection to the target opened
        beforehand (:class:`~proxy.route.policy.EarlyDial`); closes it when that fails. Raises
        :class:`NotApplicable` (leaving the stream open) when there is nothing to re-frame."""
        await self._send(stream, self.segments_for(first_flight))

    async def _send(self, stream: TcpStream, segments: list[Segment]) -> None:
        hook = self.after_piece
        try:
            await send_segments(
                stream,
                segments,
                delay=self.delay,
                drain_timeout=self.drain_timeout,
                after_piece=None if hook is None else functools.partial(hook, stream),
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
