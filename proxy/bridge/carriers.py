"""The WebSocket carrier: the bridge's bytes in binary WebSocket frames on a secret path.

In the documented deployment nginx terminates TLS, serves the cover site and forwards only the
secret path to the bridge on loopback (packaging/nginx). The bridge answers a request that is
not a WebSocket upgrade of exactly that path with a 404 page like nginx's own (and nginx, with
``proxy_intercept_errors``, replaces it with the very page it gives every other wrong path), so
knowing the address and speaking HTTP teaches a probe nothing. Standalone (no nginx) the bridge
can terminate TLS itself and serves a small static page at ``/``.

:class:`WebSocketStream` turns a WebSocket connection into an ordinary trio stream of bytes; the
bridge protocol runs over it unchanged.
"""

from __future__ import annotations

import base64
import email.utils
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import h11
import trio

from proxy.errors import RemoteProtocolError
from proxy.protocols.websocket import (
    Frame,
    FrameDecoder,
    Opcode,
    accept_key,
    encode_frame,
    valid_client_key,
)

#: bound on the request or response head
MAX_HEAD = 16 * 1024
#: the largest payload of a frame we send: a whole write of the session usually fits in one
#: (the receiving decoder accepts up to :data:`proxy.protocols.websocket.MAX_PAYLOAD`)
FRAME_PAYLOAD = 512 * 1024
#: bytes asked of the transport per read
TRANSPORT_READ = 256 * 1024
#: seconds the server waits for each read of a request (head, body, the next request)
READ_TIMEOUT = 30.0
#: what every web carrier's requests say they are
USER_AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"
#: the statuses a CDN answers a fronted request with when it will not front: 421 Misdirected
#: Request (SNI and Host name different sites) and 403 Forbidden
FRONTING_REFUSED = (403, 421)


#: what a web server answers for a path it passes to a backend that is not there (502 Bad
#: Gateway: refused or closed; 503: none available): the bridge behind it is down
BACKEND_DOWN = (502, 503)


class CarrierAnswered(RemoteProtocolError):
    """The web server in front of the bridge (or a CDN) answered a carrier's request with an
    HTTP status other than the expected one (``status``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, reply_code=status)
        self.status = status


class FrontingRefused(CarrierAnswered):
    """The CDN refused a request whose Host differs from the TLS name (domain fronting)."""


def check_status(status: int, what: str) -> None:
    """Raise for a web carrier's answer other than 200 (``FrontingRefused`` for 421/403)."""
    if status in FRONTING_REFUSED:
        raise FrontingRefused(f"{what} was refused with {status}: CDN refuses fronting", status)
    if status != 200:
        raise CarrierAnswered(f"{what} was answered with {status}", status)


NOT_FOUND_BODY = (
    b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
    b"<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n"
    b"</html>\r\n"
)
INDEX_BODY = (
    b"<!DOCTYPE html>\n<html>\n<head><title>Welcome</title></head>\n<body>\n"
    b"<h1>Welcome</h1>\n<p>This site is under construction.</p>\n</body>\n</html>\n"
)


class WebSocketStream(trio.abc.HalfCloseableStream):
    """Bytes over binary WebSocket frames on ``transport`` (``client_side`` masks its frames)."""

    def __init__(
        self, transport: trio.abc.Stream, *, client_side: bool, trailing: bytes = b""
    ) -> None:
        self.transport = transport
        self.client_side = client_side
        self._decoder = FrameDecoder(client_side=client_side)
        # received payloads not yet read, as they arrived (handed out without copying)
        self._pending: deque[bytes] = deque()
        self._closed_by_peer = False
        self._sent_close = False
        self._send_lock = trio.Lock()
        self._trailing = trailing
        #: (server side) the last address of ``X-Forwarded-For``, set by nginx in front
        self.forwarded_for: str | None = None

    async def _send_frame(self, frame: Frame) -> None:
        mask = os.urandom(4) if self.client_side else None
        await self.transport.send_all(
            encode_frame(frame.opcode, frame.payload, mask=mask, fin=frame.fin)
        )

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        pending = self._pending
        while not pending:
            if self._closed_by_peer:
                await trio.lowlevel.checkpoint()
                return b""
            if self._trailing:
                data, self._trailing = self._trailing, b""
            else:
                data = await self.transport.receive_some(TRANSPORT_READ)
            if not data:
                self._closed_by_peer = True
                continue
            try:
                frames = self._decoder.receive_data(data)
            except RemoteProtocolError as exc:
                raise trio.BrokenResourceError(f"WebSocket peer broke the protocol: {exc}") from exc
            for frame in frames:
                await self._on_frame(frame)
        data = pending.popleft()
        if max_bytes is not None and len(data) > max_bytes:
            pending.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        return data

    async def _on_frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.BINARY, Opcode.CONTINUATION, Opcode.TEXT):
            if frame.payload:
                self._pending.append(frame.payload)
        elif frame.opcode is Opcode.PING:
            async with self._send_lock:
                await self._send_frame(Frame(Opcode.PONG, frame.payload))
        elif frame.opcode is Opcode.CLOSE:
            self._closed_by_peer = True
            await self.send_eof()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        async with self._send_lock:
            if self._sent_close:
                raise trio.ClosedResourceError("the WebSocket is closing")
            mask = None
            for start in range(0, len(view), FRAME_PAYLOAD):
                if self.client_side:
                    mask = os.urandom(4)
                chunk = view[start : start + FRAME_PAYLOAD]  # copied once, into the frame
                await self.transport.send_all(encode_frame(Opcode.BINARY, chunk, mask=mask))
            if not view:
                await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        async with self._send_lock:
            if self._sent_close:
                await trio.lowlevel.checkpoint()
                return
            self._sent_close = True
            try:
                await self._send_frame(Frame(Opcode.CLOSE, b"\x03\xe8"))  # 1000: normal closure
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def aclose(self) -> None:
        await self.transport.aclose()


# --------------------------------------------------------------------------------- server side


def _headers(request: h11.Request) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in request.headers}


def is_upgrade_for(request: h11.Request, path: str) -> bool:
    """A WebSocket upgrade (version 13, a valid key) of exactly ``path`` (or below it)."""
    target = request.target.decode("latin-1").split("?", 1)[0]
    if request.method != b"GET" or not (target == path or target.startswith(path + "/")):
        return False
    headers = _headers(request)
    tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
    return (
        headers.get(b"upgrade", b"").lower() == b"websocket"
        and b"upgrade" in tokens
        and headers.get(b"sec-websocket-version") == b"13"
        and valid_client_key(headers.get(b"sec-websocket-key", b"").decode("latin-1"))
    )


def _response(status: int, body: bytes, content_type: bytes, keep: bool) -> bytes:
    reason = {200: b"OK", 404: b"Not Found"}[status]
    date = email.utils.formatdate(usegmt=True).encode()
    return (
        b"HTTP/1.1 %d %s\r\nServer: nginx\r\nDate: %s\r\nContent-Type: %s\r\n"
        b"Content-Length: %d\r\nConnection: %s\r\n\r\n%s"
        % (status, reason, date, content_type, len(body), b"keep-alive" if keep else b"close",
           body)
    )  # fmt: skip


class RequestClaimer(Protocol):
    """Takes the requests of the plain-HTTP carriers (split HTTP, polling): see
    :class:`proxy.bridge.httpcarriers.WebCarrierHub`."""

    def claim(
        self, request: h11.Request, peer: str
    ) -> Callable[[h11.Connection, trio.abc.Stream], Awaitable[bool]] | None: ...


async def accept_websocket(
    stream: trio.abc.Stream,
    path: str,
    *,
    cover_page: bool,
    web: RequestClaimer | None = None,
    peer: str = "-",
) -> WebSocketStream | None:
    """Serve HTTP on ``stream`` until a valid upgrade of ``path`` arrives; ``None`` when the
    peer went away. Requests ``web`` claims are its own (split HTTP, polling; ``peer`` is the
    connection's address); others get the cover page (``/``, when ``cover_page``) or a 404."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        return await _serve_http(stream, conn, path, cover_page, web, peer)
    except h11.ProtocolError:
        return None  # not HTTP, or HTTP too broken to answer: close


async def next_client_event(conn: h11.Connection, stream: trio.abc.Stream) -> object | None:
    """(server) The next h11 event of a client's request, reading ``stream`` as needed; None
    when one read takes longer than :data:`READ_TIMEOUT` (no client of ours is that slow)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_after(READ_TIMEOUT):
            conn.receive_data(await stream.receive_some(MAX_HEAD))
            continue
        return None


async def _serve_http(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    path: str,
    cover_page: bool,
    web: RequestClaimer | None,
    peer: str,
) -> WebSocketStream | None:
    while True:
        event = await next_client_event(conn, stream)
        if event is None:
            return None  # a request head this slow is no client of ours
        if not isinstance(event, h11.Request):
            return None  # the peer closed
        if is_upgrade_for(event, path):
            key = _headers(event)[b"sec-websocket-key"].decode("latin-1")
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept_key(key).encode()
                + b"\r\n\r\n"
            )
            trailing, _ = conn.trailing_data
            ws = WebSocketStream(stream, client_side=False, trailing=bytes(trailing))
            forwarded = _headers(event).get(b"x-forwarded-for", b"").decode("latin-1")
            ws.forwarded_for = forwarded.rsplit(",", 1)[-1].strip() or None
            return ws
        handler = web.claim(event, peer) if web is not None else None
        if handler is not None:
            if not await handler(conn, stream):
                return None
            conn = _fresh(conn)
            continue
        target = event.target.split(b"?", 1)[0]
        keep = _headers(event).get(b"connection", b"").lower() != b"close"
        if cover_page and event.method in (b"GET", b"HEAD") and target in (b"/", b"/index.html"):
            reply = _response(200, INDEX_BODY, b"text/html", keep)
        else:
            reply = _response(404, NOT_FOUND_BODY, b"text/html", keep)
        if event.method == b"HEAD":
            reply = reply[: reply.index(b"\r\n\r\n") + 4]
        await stream.send_all(reply)
        if not keep:
            return None
        # read (and drop) the request body so the next request parses
        while True:
            nxt = conn.next_event()
            if nxt is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(MAX_HEAD))
            elif isinstance(nxt, h11.EndOfMessage):
                break
            elif isinstance(nxt, h11.ConnectionClosed):
                return None
        conn = _fresh(conn)  # our answer was written by hand: h11 starts over


def _fresh(conn: h11.Connection) -> h11.Connection:
    """A new parser holding what the old one had read past the request (keep-alive)."""
    trailing, closed = conn.trailing_data
    fresh = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    if trailing:
        fresh.receive_data(bytes(trailing))
    if closed:
        fresh.receive_data(b"")
    return fresh


# --------------------------------------------------------------------------------- client side


async def open_websocket(stream: trio.abc.Stream, host: str, path: str) -> WebSocketStream:
    """Upgrade ``stream`` to a WebSocket on ``path``; raises ``RemoteProtocolError`` if refused."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    headers = [
        ("Host", host),
        ("User-Agent", USER_AGENT),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]  # fmt: skip
    await stream.send_all(conn.send(h11.Request(method="GET", target=path, headers=headers)) or b"")
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise RemoteProtocolError(f"bad HTTP answer to the WebSocket upgrade: {exc}") from exc
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_HEAD))
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            headers = {n.lower(): v for n, v in event.headers}
            if headers.get(b"sec-websocket-accept", b"").decode("latin-1") != accept_key(key):
                raise RemoteProtocolError("the WebSocket upgrade answer has a wrong accept key")
            trailing, _ = conn.trailing_data
            return WebSocketStream(stream, client_side=True, trailing=bytes(trailing))
        if isinstance(event, h11.Response | h11.InformationalResponse):
            check_status(event.status_code, "the WebSocket upgrade")
            raise CarrierAnswered(
                f"the bridge's web server answered {event.status_code}", event.status_code
            )
        raise RemoteProtocolError("the bridge's web server closed the connection")
