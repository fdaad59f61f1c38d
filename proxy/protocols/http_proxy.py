"""Server side of an HTTP/1.1 forward proxy, without I/O.

h11 does the parsing (request line, headers, chunked and Content-Length bodies, keep-alive
rules); this module interprets what a proxy client asks for:

- ``CONNECT host:port`` (authority-form) becomes :class:`ConnectRequested`. Nothing after the
  request head is parsed: those bytes are the tunnel's first flight, in :attr:`trailing_data`.
- ``GET http://host[:port]/path`` (absolute-form) becomes :class:`ForwardRequested`, followed by
  :class:`BodyData` chunks and one :class:`BodyEnded`. The headers in the event are ready to
  send upstream: hop-by-hop fields are gone, ``Host`` names the URL's authority and the body
  framing says what h11 needs to re-frame it.
- ``GET /path`` (origin-form: the client talks to us as a web server) becomes
  :class:`OriginFormRequested`, so the app can serve a PAC file or a status page.

The response to a forwarded request goes out through :meth:`HttpProxyServerConnection.send`
(h11 re-frames it for the client); replies to CONNECT and errors are fixed byte strings from
:func:`connect_established` and :func:`error_response`, after which the connection is closed or
handed over to the tunnel.
"""

from __future__ import annotations

import base64
import binascii
import enum
import http
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import h11

from proxy.errors import (
    ConnectTimeout,
    LocalProtocolError,
    NotAllowed,
    ProtocolError,
    RemoteProtocolError,
    UpstreamError,
)

__all__ = [
    "HOP_BY_HOP",
    "MAX_HEAD_SIZE",
    "BodyData",
    "BodyEnded",
    "ClientDisconnected",
    "ConnectRequested",
    "Event",
    "ForwardRequested",
    "HttpProxyServerConnection",
    "OriginFormRequested",
    "ResponseHead",
    "State",
    "connect_established",
    "error_response",
    "parse_proxy_authorization",
    "request_headers_for_upstream",
    "response_headers_for_client",
    "split_authority",
    "status_for",
]

#: bound on a request head (request line plus headers) and on any incomplete h11 event
MAX_HEAD_SIZE = 64 * 1024

Headers = tuple[tuple[bytes, bytes], ...]


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """``CONNECT host:port``: open a tunnel. ``host`` has no brackets around IPv6."""

    host: str
    port: int
    headers: Headers
    proxy_auth: tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class ForwardRequested:
    """An absolute-form ``http://`` request to forward.

    ``path`` is the origin-form target to send upstream; ``headers`` are cleaned for
    forwarding (lower-case names, as h11 gives them).
    """

    method: str
    host: str
    port: int
    path: str
    headers: Headers
    proxy_auth: tuple[str, str] | None
    #: the client allows another request on this connection after this one
    keep_alive: bool
    #: the client waits for ``100 Continue`` before sending its body
    expects_continue: bool = False
    #: the protocol named in an ``Upgrade`` header (``websocket``), removed from ``headers``
    upgrade: str | None = None


@dataclass(frozen=True, slots=True)
class OriginFormRequested:
    """A request addressed to the proxy itself (``GET /proxy.pac``)."""

    method: str
    path: str
    headers: Headers


@dataclass(frozen=True, slots=True)
class BodyData:
    """A chunk of a message body (request body in, response body out)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BodyEnded:
    """The end of a message body."""


@dataclass(frozen=True, slots=True)
class ClientDisconnected:
    """The client closed its side cleanly between requests."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The status line and headers of a response to send to the client."""

    status_code: int
    headers: Headers
    reason: bytes = b""


Event = (
    ConnectRequested
    | ForwardRequested
    | OriginFormRequested
    | BodyData
    | BodyEnded
    | ClientDisconnected
)


# --- states ------------------------------------------------------------------------------------


class State(enum.Enum):
    IDLE = "idle"  # waiting for a request head
    BODY = "body"  # receiving the body of a forwarded request
    RESPONDING = "responding"  # request complete; our response is (being) sent
    TUNNEL = "tunnel"  # CONNECT seen: the rest of the bytes belong to the tunnel
    CLOSED = "closed"  # EOF or error: nothing more is parsed


#: which state each received event moves us to, per state. Anything else is a protocol error.
_TRANSITIONS: dict[State, dict[type, State]] = {
    State.IDLE: {
        ConnectRequested: State.TUNNEL,
        ForwardRequested: State.BODY,
        OriginFormRequested: State.BODY,
        ClientDisconnected: State.CLOSED,
    },
    State.BODY: {BodyData: State.BODY, BodyEnded: State.RESPONDING},
    State.RESPONDING: {},
    State.TUNNEL: {},
    State.CLOSED: {},
}


# --- header handling ---------------------------------------------------------------------------

#: RFC 9110 7.6.1 and the usual proxy extras: never forwarded
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def _tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    found: set[bytes] = set()
    for key, value in headers:
        if key.lower() == name:
            found.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return found


def _strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers = list(headers)
    drop = HOP_BY_HOP | _tokens(headers, b"connection")
    return [(k.lower(), v) for k, v in headers if k.lower() not in drop]


def _is_chunked(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return bool(_tokens(headers, b"transfer-encoding"))


def request_headers_for_upstream(
    headers: Iterable[tuple[bytes, bytes]], host_header: bytes
) -> Headers:
    """Headers of a forwarded request: hop-by-hop fields removed, ``Host`` replaced.

    A chunked request keeps ``Transfer-Encoding: chunked`` (h11 re-chunks the body upstream);
    ``Content-Length`` is kept only when the body is not chunked. ``Expect: 100-continue`` is
    removed because the proxy answers it itself.
    """
    headers = list(headers)
    chunked = _is_chunked(headers)
    out = [
        (k, v)
        for k, v in _strip_hop_by_hop(headers)
        if k != b"host"
        and not (k == b"content-length" and chunked)
        and not (k == b"expect" and v.strip().lower() == b"100-continue")
    ]
    out.insert(0, (b"host", host_header))
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    return tuple(out)


def response_headers_for_client(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Headers of an upstream response to pass on: hop-by-hop fields removed.

    Framing is left to h11 on the client side: a chunked or EOF-delimited body is sent chunked
    (or close-delimited to HTTP/1.0 clients); ``Content-Length`` survives when the upstream
    body was not chunked.
    """
    headers = list(headers)
    chunked = _is_chunked(headers)
    return tuple(
        (k, v) for k, v in _strip_hop_by_hop(headers) if not (k == b"content-length" and chunked)
    )


def parse_proxy_authorization(value: bytes | str) -> tuple[str, str] | None:
    """``(user, password)`` from a ``Proxy-Authorization: Basic ...`` value, else None."""
    if isinstance(value, str):
        try:
            value = value.encode("latin-1")
        except UnicodeEncodeError:
            return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        text = decoded.decode("latin-1")
    user, sep, password = text.partition(":")
    if not sep:
        return None
    return user, password


# --- targets -----------------------------------------------------------------------------------

_REG_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_\-.]*[A-Za-z0-9_\-])?\.?")
_PORT = re.compile(r"[0-9]{1,5}")


def _bad_request(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reply_code=400)


def _validate_host(host: str) -> str:
    """The host without brackets; raises 400 when it is neither a name nor an IP literal."""
    if host.startswith("["):
        if not host.endswith("]"):
            raise _bad_request(f"bad IPv6 literal {host!r}")
        inner = host[1:-1]
        try:
            ipaddress.IPv6Address(inner.split("%", 1)[0])
        except ValueError:
            raise _bad_request(f"bad IPv6 literal {host!r}") from None
        return inner
    if len(host) > 253 or not _REG_NAME.fullmatch(host):
        raise _bad_request(f"bad host {host!r}")
    return host


def split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """Split ``host[:port]`` (IPv6 in brackets). Without ``default_port`` the port is required."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _bad_request(f"bad authority {authority!r}")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _bad_request(f"bad authority {authority!r}")
        port_text = rest[1:] if rest else None
    elif ":" in authority:
        host, port_text = authority.rsplit(":", 1)
    else:
        host, port_text = authority, None
    if port_text is None or (port_text == "" and default_port is not None):
        if default_port is None:
            raise _bad_request(f"no port in {authority!r}")
        port = default_port
    else:
        if not _PORT.fullmatch(port_text):
            raise _bad_request(f"bad port in {authority!r}")
        port = int(port_text)
        if not 0 < port < 65536:
            raise _bad_request(f"port out of range in {authority!r}")
    return _validate_host(host), port


def _host_header(host: str, port: int) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    if port != 80:
        shown = f"{shown}:{port}"
    return shown.encode("ascii")


# --- the connection ----------------------------------------------------------------------------


class HttpProxyServerConnection:
    """Server side of an HTTP/1.1 proxy connection from one client. No I/O.

    Feed bytes with :meth:`receive_data` / :meth:`receive_eof` and act on the events. For a
    forwarded request, send the response with :meth:`send` and then call :meth:`next_request`
    to read the next one on a keep-alive connection.
    """

    def __init__(self, *, max_head_size: int = MAX_HEAD_SIZE) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_size)
        self.state = State.IDLE
        self._tunnel_data = b""
        self._out = bytearray()
        self._eof = False

    # receiving

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; returns the events they complete (maybe none)."""
        if self.state is State.TUNNEL:
            self._tunnel_data += data
            return []
        if self.state is State.CLOSED or self._eof:
            raise RemoteProtocolError("data after the connection was closed")
        if not data:
            return []
        try:
            self._h11.receive_data(data)
        except h11.RemoteProtocolError as exc:  # pragma: no cover - h11 raises on next_event
            raise self._fail(exc) from None
        return self._drain()

    def receive_eof(self) -> list[Event]:
        """The client closed its sending side."""
        if self.state in (State.TUNNEL, State.CLOSED) or self._eof:
            return []
        self._eof = True
        self._h11.receive_data(b"")
        if self.state is State.RESPONDING:
            # a half-close after a complete request: answer it first, then report the EOF
            return []
        return self._drain()

    @property
    def trailing_data(self) -> bytes:
        """Bytes after a CONNECT head: the start of the tunnelled stream."""
        return self._tunnel_data

    @property
    def expects_continue(self) -> bool:
        """The client waits for ``100 Continue`` before sending the body."""
        return bool(self._h11.they_are_waiting_for_100_continue)

    @property
    def can_keep_alive(self) -> bool:
        """Both sides finished the exchange and the connection may carry another request."""
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    def next_request(self) -> list[Event]:
        """Start the next request/response cycle; returns events of pipelined bytes."""
        if not self.can_keep_alive:
            raise ProtocolError("the connection cannot carry another request")
        self._h11.start_next_cycle()
        self.state = State.IDLE
        return self._drain()

    def _set_state(self, event: Event) -> None:
        new = _TRANSITIONS[self.state].get(type(event))
        if new is None:
            was, self.state = self.state, State.CLOSED
            raise RemoteProtocolError(
                f"{type(event).__name__} not expected while {was.value}", reply_code=400
            )
        self.state = new

    def _fail(self, exc: h11.RemoteProtocolError) -> RemoteProtocolError:
        self.state = State.CLOSED
        return RemoteProtocolError(f"bad HTTP request: {exc}", reply_code=exc.error_status_hint)

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        while self.state not in (State.TUNNEL, State.CLOSED):
            try:
                h11_event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._fail(exc) from None
            if h11_event is h11.NEED_DATA or h11_event is h11.PAUSED:
                break
            try:
                event = self._interpret(h11_event)
            except RemoteProtocolError:
                self.state = State.CLOSED
                raise
            if event is None:
                continue
            self._set_state(event)
            events.append(event)
            if isinstance(event, ConnectRequested):
                self._tunnel_data = self._h11.trailing_data[0]
        return events

    def _interpret(self, event: object) -> Event | None:
        if isinstance(event, h11.Request):
            return self._interpret_request(event)
        if isinstance(event, h11.Data):
            return BodyData(bytes(event.data))
        if isinstance(event, h11.EndOfMessage):
            return BodyEnded()
        if isinstance(event, h11.ConnectionClosed):
            if self.state is not State.IDLE:
                raise RemoteProtocolError("client closed mid-request")
            return ClientDisconnected()
        raise RemoteProtocolError(f"unexpected {type(event).__name__}")  # pragma: no cover

    def _interpret_request(self, request: h11.Request) -> Event:
        headers: Headers = tuple((bytes(k), bytes(v)) for k, v in request.headers)
        method = request.method.decode("ascii")
        target = request.target.decode("ascii", "replace")
        auth = None
        for key, value in headers:
            if key == b"proxy-authorization":
                auth = parse_proxy_authorization(value)
                break
        if method == "CONNECT":
            if target.startswith("/") or "://" in target:
                raise _bad_request("CONNECT needs host:port")
            host, port = split_authority(target, None)
            return ConnectRequested(host, port, headers, auth)
        if target.startswith("/") or target == "*":
            return OriginFormRequested(method, target, headers)
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() != "http":
            if scheme.lower() == "https":
                raise _bad_request("https:// URLs go through CONNECT")
            raise _bad_request(f"unsupported request target {target[:100]!r}")
        cut = len(rest)
        for mark in "/?#":
            found = rest.find(mark)
            if 0 <= found < cut:
                cut = found
        authority, path = rest[:cut], rest[cut:]
        if "@" in authority:
            raise _bad_request("credentials in the URL")
        host, port = split_authority(authority, 80)
        path = path.split("#", 1)[0]
        if not path.startswith("/"):
            path = "/" + path
        forwarded = request_headers_for_upstream(headers, _host_header(host, port))
        keep_alive = request.http_version >= b"1.1" and b"close" not in _tokens(
            headers, b"connection"
        )
        expects = any(k == b"expect" and v.strip().lower() == b"100-continue" for k, v in headers)
        upgrade = next((v for k, v in headers if k == b"upgrade"), None)
        return ForwardRequested(
            method,
            host,
            port,
            path,
            forwarded,
            auth,
            keep_alive,
            expects,
            upgrade.decode("latin-1").strip() if upgrade is not None else None,
        )

    # sending

    def send(self, event: ResponseHead | BodyData | BodyEnded) -> None:
        """Queue part of the response to a forwarded request (h11 frames it)."""
        try:
            if isinstance(event, ResponseHead):
                data = self._h11.send(
                    h11.Response(
                        status_code=event.status_code,
                        headers=list(event.headers),
                        reason=event.reason or _phrase(event.status_code).encode(),
                    )
                )
            elif isinstance(event, BodyData):
                data = self._h11.send(h11.Data(data=event.data))
            else:
                data = self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(f"cannot send {type(event).__name__}: {exc}") from None
        if data:
            self._out += data

    def send_continue(self) -> None:
        """Queue ``100 Continue`` for a client that waits for it."""
        data = self._h11.send(h11.InformationalResponse(status_code=100, headers=[]))
        if data:
            self._out += data

    def data_to_send(self) -> bytes:
        """Bytes queued for the client, emptying the queue."""
        out = bytes(self._out)
        self._out.clear()
        return out


# --- replies -----------------------------------------------------------------------------------


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def connect_established() -> bytes:
    """The reply that opens a CONNECT tunnel."""
    return b"HTTP/1.1 200 Connection established\r\n\r\n"


def error_response(
    status: int,
    reason: str | None = None,
    *,
    extra_headers: Sequence[tuple[str, str]] = (),
    message: str | None = None,
) -> bytes:
    """A complete error response with a short plain-text body; it always closes."""
    if reason is None:
        reason = _phrase(status)
    body = f"{status} {reason}\n"
    if message:
        body += message.replace("\r", " ").replace("\n", " ") + "\n"
    payload = body.encode("utf-8")
    lines = [f"HTTP/1.1 {status} {reason}"]
    if status == 407:
        lines.append('Proxy-Authenticate: Basic realm="sidestep"')
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(payload)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def status_for(error: BaseException) -> int:
    """The HTTP status that tells a client why its request failed."""
    if isinstance(error, RemoteProtocolError) and error.reply_code:
        return error.reply_code
    if isinstance(error, NotAllowed):
        return 403
    if isinstance(error, ConnectTimeout | TimeoutError):
        return 504
    if isinstance(error, UpstreamError):
        return 502
    return 502
