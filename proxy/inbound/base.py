"""What every inbound hands to the rest of sidestep.

An inbound (SOCKS5, SOCKS4/4a, HTTP, later transparent) speaks its handshake with the client and
then produces a :class:`Request`: where the client wants to go, plus the client stream and any
bytes the client already sent after the handshake. It hands the request to
:meth:`InboundContext.tunnel` together with a :class:`Replier`, the inbound-specific way to tell
the client "connected" or "failed" in its own protocol. The pipeline decides when to call it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from proxy.net.stream import TcpStream

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# Parsing an address costs more than the rest of a SOCKS handshake; clients repeat a few targets.
@functools.lru_cache(maxsize=4096)
def _ip_of(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _normal_host(host: str) -> str:
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    ip = _ip_of(h)
    return str(ip) if ip is not None else h.rstrip(".").lower()


@dataclass(frozen=True, slots=True)
class Target:
    """A destination: a domain name or an IP literal, and a port.

    ``host`` is normalised: domains lower-case without a trailing dot, IPv6 without brackets.
    """

    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        """The host as an address when it is an IP literal, else ``None``."""
        return _ip_of(self.host)

    @classmethod
    def parse(cls, host: str, port: int) -> Target:
        """Normalise ``host`` (strip brackets/trailing dot, lower-case, canonical IP form)."""
        return cls(_normal_host(host), port)

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class Request:
    """One client's wish to reach ``target``, as produced by an inbound."""

    inbound: str
    client: tuple[str, int]
    target: Target
    stream: trio.abc.Stream
    #: bytes the client sent after its handshake, already read by the inbound
    prefix: bytes = b""
    #: the protocol that produced the request ("socks5", "socks4", "http-connect", ...)
    protocol: str = ""
    #: filled by the pipeline for the log line
    notes: dict[str, object] = field(default_factory=dict)


class Replier(Protocol):
    """The inbound's way to answer the client once the pipeline knows the outcome."""

    async def succeed(self, bound: tuple[str, int] | None) -> None:
        """Tell the client the tunnel is open. ``bound`` is our local end of the upstream."""

    async def fail(self, error: BaseException) -> None:
        """Tell the client in its protocol why the tunnel could not be opened."""


@dataclass(frozen=True, slots=True)
class InboundSettings:
    """Per-inbound knobs an inbound handler needs (built from the config by the app)."""

    name: str
    #: username -> password; empty means no authentication is required
    users: dict[str, str] = field(default_factory=dict)
    #: time allowed for a client to finish its handshake (slowloris guard)
    handshake_timeout: float = 10.0
    #: allow SOCKS5 UDP ASSOCIATE
    udp: bool = True
    #: seconds a UDP association may stay silent before it is dropped
    udp_idle_timeout: float = 120.0
    #: time an idle keep-alive HTTP client connection is kept open
    idle_timeout: float = 300.0
    #: the PAC script served at ``/proxy.pac`` by HTTP-speaking inbounds: a function from the
    #: address clients reach this inbound at (``"127.0.0.1:1080"``) to the script; None: no PAC
    pac: Callable[[str], bytes] | None = None
    #: this inbound's own address, for the PAC when a request names no usable Host
    listen: str = ""

    def check_password(self, username: str, password: str) -> bool:
        """Constant-time check of a username/password pair."""
        import hmac

        expected = self.users.get(username)
        if expected is None:
            # compare anyway so timing does not reveal which usernames exist
            hmac.compare_digest(password.encode(), password.encode())
            return False
        return hmac.compare_digest(expected.encode(), password.encode())

    @property
    def auth_required(self) -> bool:
        return bool(self.users)


class InboundContext(Protocol):
    """What the rest of sidestep offers an inbound handler."""

    settings: InboundSettings

    async def tunnel(self, request: Request, replier: Replier) -> None:
        """Run the connection pipeline for a tunnel (SOCKS CONNECT, HTTP CONNECT).

        Returns when the tunnel is over; the caller then closes the client stream.
        """

    async def connect(self, target: Target, *, client: tuple[str, int]) -> TcpStream:
        """Open an upstream connection for an inbound that talks to the origin itself
        (HTTP absolute-form forwarding). Raises an ``UpstreamError`` subclass on failure."""

    async def resolve(self, host: str) -> Sequence[IPAddress]:
        """Resolve a name with the configured resolver (used by the SOCKS5 UDP relay)."""


#: signature of an inbound handler: (client stream, already-read bytes, client address, ctx)
Handler = Callable[[trio.abc.Stream, bytes, tuple[str, int], InboundContext], Awaitable[None]]
