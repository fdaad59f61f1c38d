"""What a way out looks like to the router.

A :class:`Strategy` opens a path to a target and sends the client's first flight through it in
whatever form the strategy needs (plain, fragmented, inside a tunnel). The dispatcher then
waits for the first response bytes, judges them, and either relays or tries the next strategy
with the same first flight: the client never sees a failed attempt.

Time limits come from the caller's cancel scope (``trio.fail_after``), as is usual in trio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

from proxy.inbound.base import IPAddress, Target


class Strategy(Protocol):
    """One named way to reach destinations (an ``[[strategy]]`` in the config)."""

    #: the configured name ("direct", "tor", "my-vps", ...)
    name: str
    #: the strategy resolves the target name itself (SOCKS5 with a domain, Tor): the dispatcher
    #: must not look the name up locally, so no DNS query leaves for it
    remote_dns: bool

    async def connect(
        self, target: Target, addresses: Sequence[IPAddress], first_flight: bytes
    ) -> trio.abc.HalfCloseableStream:
        """Open a path to ``target`` and send ``first_flight`` (possibly empty) through it.

        ``addresses`` are the target's resolved addresses, empty when ``remote_dns`` is true and
        the target is a name. Raises an :class:`~proxy.errors.UpstreamError` subclass when the
        path cannot be opened; the caller closes the returned stream.
        """
        ...
