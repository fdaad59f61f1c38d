"""Strategies that leave through another proxy: SOCKS5 (Tor is a preset of it) and HTTP CONNECT.

Each strategy opens TCP to its configured upstream proxy, asks it for a tunnel to the target,
sends the client's first flight through the tunnel and hands the stream back to the dispatcher.
The wire protocols are the sans-IO ones (:class:`~proxy.protocols.socks5.Socks5ClientConnection`
and h11's client); this module only drives them and translates what goes wrong.

Names and remote resolution
    With ``remote_dns`` (the default) a target given as a name is sent to the upstream as that
    name, and the upstream resolves it: the dispatcher then does no lookup of its own, so no DNS
    query for the name leaves this machine (SOCKS5 with ATYP 3, what curl calls ``socks5h``).
    Without it the first of the dispatcher's resolved addresses is sent instead.

Errors
    Whose fault a failure is matters to the router, so the errors say it:

    - the upstream itself failed (cannot be reached, broke its protocol, hung up mid-handshake):
      :class:`UpstreamProxyError`, whose message starts with the upstream's kind and address;
    - the upstream refused *us* (wrong credentials, its rules forbid the target):
      :class:`UpstreamNotAllowed`, both a :class:`~proxy.errors.NotAllowed` and an
      :class:`~proxy.errors.UpstreamError`;
    - the upstream tried and the *target* failed: the matching ``UpstreamError`` subclass
      (``ConnectRefused``, ``Unreachable``, ``ConnectTimeout``), worded
      ``"via socks5 upstream 127.0.0.1:9050: connection refused"``.

Bytes that the upstream sent right behind its reply (a server-speaks-first banner, or an early
TLS answer) already sit in the parser's buffer; they come back first from the returned stream
through :class:`PrefixedStream`, never dropped.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import h11
import trio

from proxy.errors import (
    ConfigError,
    ConnectRefused,
    ConnectTimeout,
    NotAllowed,
    RemoteProtocolError,
    ResolveError,
    Unreachable,
    UpstreamError,
)
from proxy.errors import LocalProtocolError as OurLocalProtocolError
from proxy.inbound.base import IPAddress, Target
from proxy.net.dial import format_address, open_tcp
from proxy.protocols.socks5 import (
    AuthResult,
    ClientState,
    Command,
    CommandRequested,
    ConnectionClosed,
    Method,
    MethodSelected,
    Reply,
    ReplyCode,
    Socks5ClientConnection,
    address_type_of,
)

__all__ = [
    "HttpConnectStrategy",
    "PrefixedStream",
    "Socks5Strategy",
    "UpstreamNotAllowed",
    "UpstreamProxyError",
    "tor_strategy",
]

#: bytes asked for per read during a handshake
RECEIVE_SIZE = 16384
#: bound on the upstream's HTTP response head
MAX_RESPONSE_HEAD = 16 * 1024


class UpstreamProxyError(UpstreamError):
    """The upstream proxy itself failed: unreachable, broke its protocol, or hung up early."""


class UpstreamNotAllowed(NotAllowed, UpstreamError):
    """The upstream proxy refused us: bad or missing credentials, or its rules deny the target."""


# ------------------------------------------------------------------------------ prefixed stream


class PrefixedStream(trio.abc.HalfCloseableStream):
    """``stream`` with ``prefix`` delivered before anything ``stream`` itself receives.

    Used when a handshake parser read past the end of the handshake: those bytes belong to the
    tunnel. Sending, ``send_eof`` and closing go straight to ``stream``.
    """

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = memoryview(bytes(prefix))
        self._closed = False
        self._receiving = False
        self._busy_sending = False

    @property
    def pending(self) -> bytes:
        """Prefix bytes not yet received."""
        return bytes(self._prefix)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("this stream was closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if not self._prefix:
                return await self.stream.receive_some(max_bytes)
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            size = len(self._prefix) if max_bytes is None else min(max_bytes, len(self._prefix))
            chunk = bytes(self._prefix[:size])
            self._prefix = self._prefix[size:]
            return chunk
        finally:
            self._receiving = False

    @contextmanager
    def _sending(self) -> Iterator[None]:
        # send_all, send_eof and wait_send_all_might_not_block exclude each other; checked here
        # too because not every inner stream checks it across all three
        if self._busy_sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._busy_sending = True
        try:
            yield
        finally:
            self._busy_sending = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._sending():
            await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending():
            await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        with self._sending():
            await self.stream.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        self._prefix = memoryview(b"")
        await self.stream.aclose()


# -------------------------------------------------------------------------------------- shared


def _server_address(kind: str, server: tuple[str, int]) -> IPAddress:
    host, port = server
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ConfigError(
            f"{kind} upstream host must be an IP address, not {host!r} "
            "(a name would need a DNS lookup that could leak or be poisoned)"
        ) from None
    if not 0 < port < 65536:
        raise ConfigError(f"{kind} upstream port {port} is out of range")
    return address


def _request_host(target: Target, addresses: Sequence[IPAddress], remote_dns: bool) -> str:
    """What to ask the upstream to connect to: the name, an IP literal, or a resolved address."""
    if target.ip is not None or remote_dns:
        return target.host
    if addresses:
        return str(addresses[0]).split("%", 1)[0]
    raise ResolveError(f"{target.host}: no resolved address to send upstream (remote_dns is off)")


async def _open_upstream(
    kind: str, address: IPAddress, port: int, timeout: float
) -> trio.abc.HalfCloseableStream:
    where = format_address(address, port)
    try:
        return await open_tcp([address], port, timeout=timeout)
    except UpstreamError as exc:
        reason = str(exc).removeprefix(f"{where}: ") or type(exc).__name__
        raise UpstreamProxyError(f"{kind} upstream {where} cannot be reached: {reason}") from exc


@contextmanager
def _io_errors(via: str) -> Iterator[None]:
    """Map a broken upstream connection during the handshake to :class:`UpstreamProxyError`."""
    try:
        yield
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamProxyError(f"{via}: connection broke during the handshake ({exc})") from exc


async def _finish(
    stream: trio.abc.HalfCloseableStream, via: str, trailing: bytes, first_flight: bytes
) -> trio.abc.HalfCloseableStream:
    """Send the first flight; wrap the stream only when the upstream sent bytes ahead."""
    if first_flight:
        try:
            await stream.send_all(first_flight)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamError(f"{via}: connection broke sending the first flight") from exc
    if trailing:
        return PrefixedStream(stream, trailing)
    return stream


# --------------------------------------------------------------------------------------- socks5

#: what a failed SOCKS5 reply says about the target (or about us), RFC 1928 section 6.
#: 4 "host unreachable" is what Tor answers when the exit cannot resolve the name, and what
#: sidestep's own inbound sends for timeouts and resolve errors alike, so it stays Unreachable;
#: 6 "TTL expired" is Tor's answer to a stream that timed out.
_REPLY_ERRORS: dict[ReplyCode, tuple[type[UpstreamError], str]] = {
    ReplyCode.GENERAL_FAILURE: (UpstreamError, "general failure"),
    ReplyCode.NOT_ALLOWED: (UpstreamNotAllowed, "connection not allowed by its rules"),
    ReplyCode.NETWORK_UNREACHABLE: (Unreachable, "network unreachable"),
    ReplyCode.HOST_UNREACHABLE: (Unreachable, "host unreachable"),
    ReplyCode.CONNECTION_REFUSED: (ConnectRefused, "connection refused"),
    ReplyCode.TTL_EXPIRED: (ConnectTimeout, "TTL expired (timed out)"),
    ReplyCode.COMMAND_NOT_SUPPORTED: (UpstreamProxyError, "CONNECT not supported"),
    ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED: (UpstreamProxyError, "address type not supported"),
}


def socks5_reply_error(code: ReplyCode, via: str) -> UpstreamError:
    """The error a failed SOCKS5 reply ``code`` stands for, its message starting with ``via``."""
    kind, text = _REPLY_ERRORS.get(code, (UpstreamError, "general failure"))
    return kind(f"{via}: {text} (reply {int(code)})")


@dataclass(frozen=True, slots=True)
class _UpstreamProxy:
    """What SOCKS5 and HTTP CONNECT upstreams share: the server, credentials, timeouts, and
    connect = reach the upstream, run the protocol's handshake, send the first flight.

    ``server`` is ``(ip, port)``; a name is refused so that reaching the upstream needs no
    lookup. ``connect_timeout`` bounds the TCP connect to the upstream, ``handshake_timeout``
    the whole exchange (which includes the upstream's own connect to the target).
    """

    name: str
    server: tuple[str, int]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    remote_dns: bool = True
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    _address: IPAddress = field(init=False, repr=False, compare=False)

    kind: ClassVar[str] = "upstream"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_address", _server_address(self.kind, self.server))
        if self.password is not None and self.username is None:
            raise ConfigError(f"{self.kind} upstream: a password needs a username")

    @property
    def via(self) -> str:
        """``"via socks5 upstream 127.0.0.1:9050"``: how errors name this upstream."""
        return f"via {self.kind} upstream {format_address(self._address, self.server[1])}"

    async def connect(
        self, target: Target, addresses: Sequence[IPAddress], first_flight: bytes
    ) -> trio.abc.HalfCloseableStream:
        host = _request_host(target, addresses, self.remote_dns)
        stream = await _open_upstream(
            self.kind, self._address, self.server[1], self.connect_timeout
        )
        try:
            with trio.move_on_after(self.handshake_timeout):
                trailing = await self._handshake(stream, host, target.port)
                return await _finish(stream, self.via, trailing, first_flight)
            raise ConnectTimeout(f"{self.via}: no answer within {self.handshake_timeout:g} s")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def _handshake(self, stream: trio.abc.Stream, host: str, port: int) -> bytes:
        """The protocol's exchange up to the open tunnel; returns bytes that followed it."""
        raise TypeError(f"{type(self).__name__} must implement _handshake")


@dataclass(frozen=True, slots=True)
class Socks5Strategy(_UpstreamProxy):
    """Tunnel through a SOCKS5 proxy (RFC 1928), with username/password auth (RFC 1929)
    when ``username`` is set. Fields and timeouts as in :class:`_UpstreamProxy`."""

    kind: ClassVar[str] = "socks5"

    def __post_init__(self) -> None:
        _UpstreamProxy.__post_init__(self)
        for value in (self.username, self.password):
            if value is not None and len(value.encode()) > 255:
                raise ConfigError(f"{self.kind} upstream: username and password are 1-255 bytes")

    async def _handshake(self, stream: trio.abc.Stream, host: str, port: int) -> bytes:
        """Greeting, authentication, CONNECT; returns bytes that followed the reply."""
        try:
            conn = Socks5ClientConnection(username=self.username, password=self.password)
            request = CommandRequested(Command.CONNECT, host, port, address_type_of(host))
        except OurLocalProtocolError as exc:
            await trio.lowlevel.checkpoint()
            raise UpstreamError(f"{self.via}: cannot ask for {host}: {exc}") from exc
        with _io_errors(self.via):
            await stream.send_all(conn.data_to_send())
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                try:
                    events = conn.receive_data(data) if data else conn.receive_eof()
                except RemoteProtocolError as exc:
                    raise UpstreamProxyError(f"{self.via}: {exc}") from exc
                for event in events:
                    reply = self._check(event)
                    if reply is not None:
                        return conn.trailing_data
                if conn.state is ClientState.READY:
                    try:
                        conn.send(request)
                    except OurLocalProtocolError as exc:
                        raise UpstreamError(f"{self.via}: cannot ask for {host}: {exc}") from exc
                out = conn.data_to_send()
                if out:
                    await stream.send_all(out)

    def _check(self, event: object) -> Reply | None:
        """Raise for a refusal; return the reply once the tunnel is open."""
        if isinstance(event, MethodSelected) and event.method == Method.NO_ACCEPTABLE:
            if self.username is None:
                raise UpstreamNotAllowed(f"{self.via}: the upstream requires authentication")
            raise UpstreamNotAllowed(f"{self.via}: no acceptable authentication method")
        if isinstance(event, AuthResult) and not event.ok:
            raise UpstreamNotAllowed(f"{self.via}: username/password rejected")
        if isinstance(event, Reply):
            if event.code != ReplyCode.SUCCEEDED:
                raise socks5_reply_error(event.code, self.via)
            return event
        if isinstance(event, ConnectionClosed):  # pragma: no cover - receive_eof raises first
            raise UpstreamProxyError(f"{self.via}: closed during the handshake")
        return None


def tor_strategy(
    name: str = "tor",
    server: tuple[str, int] = ("127.0.0.1", 9050),
    *,
    username: str | None = None,
    password: str | None = None,
    connect_timeout: float = 10.0,
    handshake_timeout: float = 30.0,
) -> Socks5Strategy:
    """A SOCKS5 upstream preset for a local Tor client.

    ``remote_dns`` is always on: Tor resolves names at the exit relay, and a local lookup would
    hand the very name we are trying to hide to the local (often censored, always watched)
    resolver. Tor needs a while to build circuits, hence the longer ``handshake_timeout``.
    Credentials are optional: Tor accepts any, and with ``IsolateSOCKSAuth`` (its default)
    different credentials get different circuits.
    """
    return Socks5Strategy(
        name=name,
        server=server,
        username=username,
        password=password,
        remote_dns=True,
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
    )


# ---------------------------------------------------------------------------------- http connect


def connect_authority(host: str) -> str:
    """``host`` as written in a CONNECT request target: IPv6 in brackets, IDNs as punycode."""
    if ":" in host:
        return f"[{host}]"
    if not host.isascii():
        try:
            return host.encode("idna").decode("ascii")
        except UnicodeError:
            return host
    return host


def basic_credentials(username: str, password: str) -> str:
    """A ``Proxy-Authorization`` value for HTTP Basic (UTF-8, RFC 7617)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


@dataclass(frozen=True, slots=True)
class HttpConnectStrategy(_UpstreamProxy):
    """Tunnel through an HTTP/1.1 proxy with ``CONNECT host:port``.

    ``username``/``password`` go in a ``Proxy-Authorization: Basic`` header (sent in clear to
    the upstream: fine for a proxy on a trusted network, not across the censor's). Fields and
    timeouts as in :class:`_UpstreamProxy`.
    """

    kind: ClassVar[str] = "http"

    def request(self, host: str, port: int) -> h11.Request:
        """The CONNECT request this strategy sends for ``host:port``."""
        authority = f"{connect_authority(host)}:{port}"
        headers = [("Host", authority)]
        if self.username is not None:
            headers.append(
                ("Proxy-Authorization", basic_credentials(self.username, self.password or ""))
            )
        return h11.Request(method="CONNECT", target=authority, headers=headers)

    async def _handshake(self, stream: trio.abc.Stream, host: str, port: int) -> bytes:
        try:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
            head = conn.send(self.request(host, port))
            conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            await trio.lowlevel.checkpoint()
            raise UpstreamError(f"{self.via}: cannot ask for {host}: {exc}") from exc
        with _io_errors(self.via):
            await stream.send_all(head or b"")
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise UpstreamProxyError(f"{self.via}: bad HTTP response: {exc}") from exc
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    if 200 <= event.status_code < 300:
                        return bytes(conn.trailing_data[0])
                    raise self._status_error(event)
                # ConnectionClosed is reported by h11 as a RemoteProtocolError above
                raise UpstreamProxyError(  # pragma: no cover - h11 allows nothing else here
                    f"{self.via}: unexpected {type(event).__name__}"
                )

    def _status_error(self, response: h11.Response) -> UpstreamError:
        status = response.status_code
        reason = response.reason.decode("latin-1", "replace").strip()
        shown = f"{status} {reason}".strip()
        if status == 407:
            if self.username is None:
                return UpstreamNotAllowed(f"{self.via}: the upstream requires authentication (407)")
            return UpstreamNotAllowed(f"{self.via}: username/password rejected (407)")
        if status == 403:
            return UpstreamNotAllowed(f"{self.via}: forbidden by its rules ({shown})")
        if status == 504:
            return ConnectTimeout(f"{self.via}: target timed out ({shown})")
        return UpstreamError(f"{self.via}: CONNECT answered {shown}")
