"""A CDN edge for the lab: TLS for many names, HTTP/1.1 routed by Host header to backends.

This is the piece domain fronting needs. The edge holds one certificate for every name it
fronts; a client's TLS SNI only picks the certificate, and the HTTP ``Host`` header alone decides
which backend gets the request. So a censor that reads the SNI sees ``cdn.front.lab`` while the
request inside goes to ``backend.lab``, as on the real CDNs where fronting worked.

Per client connection the edge parses HTTP/1.1 with h11 (keep-alive included) and, per request:

* looks the Host (lower case, port dropped) up in :attr:`CdnEdge.routes`; unknown hosts get
  ``421 Misdirected Request``, an unreachable backend ``502``;
* opens a fresh plain-TCP connection to the backend and forwards the request head (hop-by-hop
  headers dropped, ``Via`` and ``X-Forwarded-For`` added) and streams the body while the response
  streams back, so long-lived bodies in both directions (the "split HTTP" style of tunnel) work;
* on ``101 Switching Protocols`` (a WebSocket upgrade) or a 2xx answer to ``CONNECT``, stops
  speaking HTTP and copies raw bytes both ways until one side closes.

The SNI of each connection is read from the ClientHello with our own parser, and every request
is recorded in :attr:`CdnEdge.log` (time, client, SNI, Host, method, target, backend, status), so
tests can check that a fronted request really went where it should.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import h11
import trio

from proxy.errors import RemoteProtocolError
from proxy.lab.ca import Issued
from proxy.lab.dnsserver import require_loopback
from proxy.protocols.tls_hello import MAX_RAW_SIZE, parse_client_hello

__all__ = ["CdnEdge", "CdnLogEntry"]

logger = logging.getLogger(__name__)

Address = tuple[str, int]

#: headers that describe one hop and are never passed on (RFC 9110 7.6.1)
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te",
     b"trailer", b"upgrade"}
)  # fmt: skip
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True, slots=True)
class CdnLogEntry:
    """One request as the edge handled it."""

    time: float
    client: Address
    sni: str | None
    host: str
    method: str
    target: str
    #: where it went (None: no route)
    backend: Address | None
    #: the status sent to the client (101 for an upgrade, 421/502 for the edge's own errors)
    status: int


class _HelloTap(trio.abc.Stream):
    """Passes a TCP stream through, reading the SNI from the ClientHello on its way in."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.sni: str | None = None
        self._seen = bytearray()
        self._done = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if not self._done and data:
            self._seen += data
            try:
                hello = parse_client_hello(bytes(self._seen))
            except RemoteProtocolError:
                hello, self._done = None, True
            if hello is not None:
                self.sni, self._done = hello.sni, True
            if self._done or len(self._seen) > MAX_RAW_SIZE:
                self._done = True
                self._seen.clear()
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


def _host_of(request: h11.Request) -> str:
    """The request's Host header, lower case, without port or brackets."""
    host = dict(request.headers).get(b"host", b"").decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _upgrade_of(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The Upgrade header's value when the Connection header asks for an upgrade."""
    values = dict(headers)
    tokens = {t.strip().lower() for t in values.get(b"connection", b"").split(b",")}
    return values.get(b"upgrade") if b"upgrade" in tokens else None


def _pass_on(
    headers: list[tuple[bytes, bytes]], upgrade: bytes | None, extra: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """``headers`` without hop-by-hop ones (and what Connection names), plus ``extra``."""
    named = set()
    for name, value in headers:
        if name == b"connection":
            named |= {t.strip().lower() for t in value.split(b",")}
    kept = [(n, v) for n, v in headers if n not in _HOP_BY_HOP and n not in named]
    if upgrade is not None:
        kept += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    return kept + extra


async def _next_event(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


class CdnEdge:
    """Terminates TLS with ``issued``'s certificate and routes requests by Host.

    ``routes`` maps a host name to the plain-HTTP backend ``(ip, port)`` serving it; it may be
    changed while the edge runs (:meth:`route`). Backends must be loopback addresses.
    """

    def __init__(
        self,
        issued: Issued,
        routes: Mapping[str, Address] | None = None,
        listen: Address = ("127.0.0.1", 0),
        *,
        via: str = "1.1 lab-cdn",
        head_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        now: Callable[[], float] | None = None,
    ) -> None:
        require_loopback(listen[0])
        self.issued = issued
        self.listen = listen
        self.via = via.encode("latin-1")
        self.head_timeout = head_timeout
        self.connect_timeout = connect_timeout
        self._now = now or trio.current_time
        self._tls = issued.server_context(alpn=("http/1.1",))
        self.routes: dict[str, Address] = {}
        for host, backend in (routes or {}).items():
            self.route(host, backend)
        #: every request, in the order the edge answered them
        self.log: list[CdnLogEntry] = []
        #: the bound address, once :meth:`serve` has started
        self.address: Address | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The names the edge's certificate covers."""
        return self.issued.names

    def route(self, host: str, backend: Address) -> None:
        """Send requests for ``host`` to the plain-HTTP server at ``backend``."""
        require_loopback(backend[0])
        self.routes[host.lower().rstrip(".")] = (backend[0], backend[1])

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; reports the bound ``(ip, port)``."""
        host, port = self.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            self.address = (host, listeners[0].socket.getsockname()[1])
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)
        finally:
            for listener in listeners:
                listener.socket.close()

    async def _handle(self, tcp: trio.SocketStream) -> None:
        try:
            peer = tcp.socket.getpeername()
        except OSError:
            tcp.socket.close()
            return
        tap = _HelloTap(tcp)
        stream = trio.SSLStream(tap, self._tls, server_side=True, https_compatible=True)
        try:
            try:
                with trio.fail_after(self.head_timeout):
                    await stream.do_handshake()
                await self._serve_client(stream, (peer[0], peer[1]), tap.sni)
            except* (*_STREAM_ERRORS, trio.TooSlowError, h11.ProtocolError):
                pass  # the client went away, stalled or spoke garbage: nothing to report
        except Exception as exc:  # one broken connection must not stop the edge
            logger.warning("cdn connection from %s failed: %r", peer, exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_client(
        self, stream: trio.abc.Stream, client: Address, sni: str | None
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            with trio.fail_after(self.head_timeout):
                request = await _next_event(conn, stream)
            if not isinstance(request, h11.Request):
                return
            host = _host_of(request)
            backend = self.routes.get(host)
            if backend is None:
                self._record(client, sni, host, request, None, 421)
                await self._refuse(conn, stream, 421, f"no site {host!r} on this edge")
                return
            answered = functools.partial(self._record, client, sni, host, request, backend)
            done = await _Exchange(self, conn, stream, client, request, backend, answered).run()
            if not done.status:
                answered(0)  # the exchange ended before any answer
            if done.close or h11.MUST_CLOSE in (conn.our_state, conn.their_state):
                return
            conn.start_next_cycle()

    async def _refuse(
        self, conn: h11.Connection, stream: trio.abc.Stream, status: int, why: str
    ) -> None:
        """Answer with the edge's own error and close (the request body is not read)."""
        body = (why + "\n").encode()
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"via", self.via),
        ]
        if conn.our_state is h11.SEND_RESPONSE:
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))

    def _record(
        self,
        client: Address,
        sni: str | None,
        host: str,
        request: h11.Request,
        backend: Address | None,
        status: int,
    ) -> None:
        self.log.append(
            CdnLogEntry(
                self._now(),
                client,
                sni,
                host,
                request.method.decode("latin-1"),
                request.target.decode("latin-1"),
                backend,
                status,
            )
        )


@dataclass(slots=True)
class _Done:
    status: int = 0
    close: bool = False


class _Exchange:
    """One request relayed to its backend, and its response (or tunnel) relayed back."""

    def __init__(
        self,
        edge: CdnEdge,
        conn: h11.Connection,
        client: trio.abc.Stream,
        client_addr: Address,
        request: h11.Request,
        backend: Address,
        answered: Callable[[int], None],
    ) -> None:
        self.edge = edge
        self.answered = answered
        self.conn = conn
        self.client = client
        self.client_addr = client_addr
        self.request = request
        self.backend = backend
        self.up = h11.Connection(h11.CLIENT)
        self.done = _Done()

    def _status(self, status: int) -> None:
        """The client is about to get ``status``: recorded before it is sent."""
        self.done.status = status
        self.answered(status)

    async def run(self) -> _Done:
        edge = self.edge
        try:
            with trio.fail_after(edge.connect_timeout):
                upstream = await trio.open_tcp_stream(*self.backend)
        except (OSError, trio.TooSlowError):
            self._status(502)
            await edge._refuse(self.conn, self.client, 502, "the backend is unreachable")
            self.done.close = True
            return self.done
        async with upstream:
            upgrade = _upgrade_of(list(self.request.headers))
            extra = [
                (b"via", edge.via),
                (b"x-forwarded-for", self.client_addr[0].encode()),
                (b"x-forwarded-proto", b"https"),
            ]
            head = h11.Request(
                method=self.request.method,
                target=self.request.target,
                headers=_pass_on(list(self.request.headers), upgrade, extra),
            )
            await upstream.send_all(self.up.send(head))
            if upgrade is not None or self.request.method == b"CONNECT":
                # nothing may race the switch: take the (empty) request body first
                await self._request_body(upstream)
                await self._response(upstream)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._request_body, upstream)
                    await self._response(upstream)
                    if self.conn.their_state is not h11.DONE:
                        self.done.close = True  # answered before the body ended: stop here
                    nursery.cancel_scope.cancel()
        return self.done

    async def _request_body(self, upstream: trio.SocketStream) -> None:
        while True:
            event = await _next_event(self.conn, self.client)
            if isinstance(event, h11.Data):
                await upstream.send_all(self.up.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                await upstream.send_all(self.up.send(h11.EndOfMessage()))
                return
            else:  # the client vanished mid-body
                self.done.close = True
                return

    async def _response(self, upstream: trio.SocketStream) -> None:
        via = [(b"via", self.edge.via)]
        while True:
            try:
                event = await _next_event(self.up, upstream)
            except (h11.RemoteProtocolError, *_STREAM_ERRORS):
                event = None  # the backend hung up or spoke garbage before its answer
            if isinstance(event, h11.InformationalResponse):
                upgrade = _upgrade_of(list(event.headers)) if event.status_code == 101 else None
                headers = _pass_on(list(event.headers), upgrade, via)
                out = h11.InformationalResponse(status_code=event.status_code, headers=headers)
                if event.status_code == 101:
                    self._status(101)
                await self.client.send_all(self.conn.send(out))
                if self.conn.our_state is h11.SWITCHED_PROTOCOL:
                    await self._tunnel(upstream)
                    return
                continue
            if not isinstance(event, h11.Response):
                self._status(502)
                await self.edge._refuse(self.conn, self.client, 502, "the backend hung up")
                self.done.close = True
                return
            self._status(event.status_code)
            headers = _pass_on(list(event.headers), None, via)
            await self.client.send_all(
                self.conn.send(h11.Response(status_code=event.status_code, headers=headers))
            )
            if self.conn.our_state is h11.SWITCHED_PROTOCOL:  # a CONNECT was accepted
                await self._tunnel(upstream)
                return
            break
        while True:
            event = await _next_event(self.up, upstream)
            if isinstance(event, h11.Data):
                await self.client.send_all(self.conn.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                await self.client.send_all(self.conn.send(h11.EndOfMessage()))
                return
            else:  # the backend closed mid-body: the client must see a broken message
                self.done.close = True
                return

    async def _tunnel(self, upstream: trio.SocketStream) -> None:
        """Both sides switched protocols: copy raw bytes until either side is done."""
        self.done.close = True
        from_client, _ = self.conn.trailing_data
        from_backend, _ = self.up.trailing_data
        if from_client:
            await upstream.send_all(from_client)
        if from_backend:
            await self.client.send_all(from_backend)

        async def client_to_backend() -> None:
            while data := await self.client.receive_some(65536):
                await upstream.send_all(data)
            await upstream.send_eof()

        async def backend_to_client() -> None:
            while data := await upstream.receive_some(65536):
                await self.client.send_all(data)
            nursery.cancel_scope.cancel()  # TLS has no half-close: the backend's EOF ends it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_to_backend)
            nursery.start_soon(backend_to_client)
