"""The transparent inbound: connections redirected to sidestep by the firewall (router mode).

On a home router, ``sidestep router-rules --apply`` makes nftables redirect the LAN's TCP
connections to ports 80 and 443 to this inbound. The clients never configured a proxy: each
connection arrives here as if sidestep were the server, and the destination the client wanted
is read back from the kernel with ``SO_ORIGINAL_DST`` (``IP6T_SO_ORIGINAL_DST`` for IPv6).

The target is named by the client's own first bytes when they carry a name: the ClientHello's
SNI for TLS, the Host header for plain HTTP. The router then decides by name (rules, learned
strategies), and the name is resolved by sidestep's resolver, so a client that was handed a
poisoned address by some other resolver still reaches the real site. Without a name (other
protocols, servers that speak first) the original address and port are used as they are.

A connection that was not redirected (someone connecting to the port directly) has no original
destination different from this listener: it is closed, so the port can never be used to make
sidestep connect to itself or act as an open relay.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import struct

from proxy.inbound.base import InboundContext, Request, Target
from proxy.net.stream import FastStream
from proxy.route.firstflight import read_first_flight

__all__ = ["handle_transparent", "original_destination"]

log = logging.getLogger("sidestep.inbound.transparent")

#: from linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

#: how long a client may take to start talking before we connect by address alone
FIRST_BYTES_WAIT = 0.25
FIRST_FLIGHT_TIMEOUT = 5.0
FIRST_FLIGHT_MAX = 16384

_HOST_HEADER = re.compile(rb"\r\nhost:[ \t]*([^\r\n]*)", re.IGNORECASE)
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client meant to connect before the firewall redirected it, or None."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            address = ipaddress.IPv6Address(raw[8:24])
            mapped = address.ipv4_mapped
            return (str(mapped) if mapped else str(address)), port
        raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def http_host(data: bytes) -> str | None:
    """The host name of a plain HTTP request head's Host header, if it is a name."""
    head = data.partition(b"\r\n\r\n")[0]
    found = _HOST_HEADER.search(head)
    if found is None:
        return None
    value = found.group(1).strip().decode("latin-1").lower()
    if value.startswith("["):
        return None  # an IPv6 literal: the original address says the same
    host = value.rpartition(":")[0] if value.count(":") == 1 else value
    return host.rstrip(".") if _NAME.fullmatch(host.rstrip(".")) else None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class _QuietReplier:
    """A transparent client asked nothing: there is nobody to answer but the connection."""

    def __init__(self, stream: FastStream) -> None:
        self.stream = stream

    async def succeed(self, bound: tuple[str, int] | None) -> None:
        return None

    async def fail(self, error: BaseException) -> None:
        # a reset tells the client at once, where a plain close could look like an empty reply
        try:
            self.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except OSError:
            pass


async def handle_transparent(
    stream: FastStream, client: tuple[str, int], ctx: InboundContext
) -> None:
    """Serve one redirected connection."""
    settings = ctx.settings
    sock = stream.socket
    original = original_destination(sock)  # type: ignore[arg-type]
    local = sock.getsockname()
    if original is None or (original[0], original[1]) == (local[0], local[1]):
        log.info(
            "%s: %s:%d connected directly, not through a firewall redirect; closed",
            settings.name,
            client[0],
            client[1],
        )
        return
    flight = await read_first_flight(
        stream,
        b"",
        max_bytes=FIRST_FLIGHT_MAX,
        wait=FIRST_BYTES_WAIT,
        timeout=FIRST_FLIGHT_TIMEOUT,
    )
    name = flight.sni if flight.hello is not None else http_host(flight.data)
    if name is not None and _is_ip(name):
        name = None
    target = Target.parse(name or original[0], original[1])
    request = Request(
        inbound=settings.name,
        client=client,
        target=target,
        stream=stream,
        prefix=flight.data,
        protocol="transparent",
    )
    request.notes["original"] = f"{original[0]}:{original[1]}"
    await ctx.tunnel(request, _QuietReplier(stream))
