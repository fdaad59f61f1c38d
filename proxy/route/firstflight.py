"""Reading the client's first flight.

The first flight is what the client sends right after the tunnel opens: for TLS the whole
ClientHello (about 2 KB for browsers with post-quantum key shares, often in two TCP segments),
for plain HTTP a request head. sidestep keeps it so a failed attempt can be replayed on another
way out without the client noticing, and parses it to learn the SNI.

Some protocols (SMTP, FTP, many game servers) wait for the server to speak first: for those we
give up after a short wait and the first flight is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from proxy.errors import RemoteProtocolError
from proxy.net.stream import limited
from proxy.protocols.tls_hello import ClientHello, looks_like_tls, parse_client_hello


@dataclass(frozen=True, slots=True)
class FirstFlight:
    """The bytes the client sent first, and what we understood of them."""

    data: bytes
    #: the parsed ClientHello when the flight is TLS and complete
    hello: ClientHello | None = None
    #: the flight started like TLS but could not be parsed (kept verbatim anyway)
    tls_error: str | None = None

    @property
    def sni(self) -> str | None:
        return self.hello.sni if self.hello is not None else None


#: no first flight (yet): shared, as a flight is immutable
NO_FLIGHT = FirstFlight(b"")


async def read_first_flight(
    stream: trio.abc.Stream,
    prefix: bytes,
    *,
    max_bytes: int,
    wait: float,
    timeout: float,
) -> FirstFlight:
    """Collect the client's first flight from ``stream``, starting with ``prefix``.

    Waits up to ``wait`` seconds for a first byte when ``prefix`` is empty (server-speaks-first
    protocols send nothing). When the bytes look like TLS, keeps reading until the ClientHello
    is complete, ``max_bytes`` are buffered, or ``timeout`` passes; whatever was read is
    returned, never dropped.
    """
    buf = bytearray(prefix)
    if not buf:
        try:
            buf += await limited(stream, wait, stream.receive_some(max_bytes))
        except trio.TooSlowError:
            pass
        if not buf:
            return NO_FLIGHT
    if not looks_like_tls(bytes(buf[:3])):
        return FirstFlight(bytes(buf))
    try:
        return await limited(stream, timeout, _read_hello(stream, buf, max_bytes))
    except trio.TooSlowError:
        return FirstFlight(
            bytes(buf), tls_error="timed out waiting for the rest of the ClientHello"
        )


async def _read_hello(stream: trio.abc.Stream, buf: bytearray, max_bytes: int) -> FirstFlight:
    """Read into ``buf`` until it holds a whole ClientHello (or cannot become one)."""
    while True:
        try:
            hello = parse_client_hello(bytes(buf))
        except RemoteProtocolError as exc:
            return FirstFlight(bytes(buf), tls_error=str(exc))
        if hello is not None:
            return FirstFlight(bytes(buf), hello=hello)
        if len(buf) >= max_bytes:
            return FirstFlight(bytes(buf), tls_error="ClientHello larger than first_flight_max")
        chunk = await stream.receive_some(max_bytes - len(buf))
        if not chunk:
            return FirstFlight(bytes(buf), tls_error="client closed inside its ClientHello")
        buf += chunk
