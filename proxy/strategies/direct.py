"""The ``direct`` strategy: TCP straight to the target with Happy Eyeballs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import trio

from proxy.inbound.base import IPAddress, Target
from proxy.net.dial import open_tcp


@dataclass(frozen=True, slots=True)
class DirectStrategy:
    """Connect to the resolved addresses, first flight unchanged."""

    name: str = "direct"
    connect_timeout: float = 10.0
    happy_eyeballs_delay: float = 0.25
    remote_dns: bool = False

    async def connect(
        self, target: Target, addresses: Sequence[IPAddress], first_flight: bytes
    ) -> trio.abc.HalfCloseableStream:
        stream = await open_tcp(
            addresses,
            target.port,
            attempt_delay=self.happy_eyeballs_delay,
            timeout=self.connect_timeout,
        )
        if first_flight:
            try:
                await stream.send_all(first_flight)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return stream
