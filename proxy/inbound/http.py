"""The HTTP proxy inbound: CONNECT tunnels and plain-HTTP forwarding.

The protocol work is done by :class:`proxy.protocols.http_proxy.HttpProxyServerConnection`;
this module only moves bytes and keeps time.

- ``CONNECT host:port`` becomes a :class:`Request` for the pipeline (``ctx.tunnel``); the reply
  (``200 Connection established`` or an error status) is sent when the pipeline decides.
- Absolute-form ``http://`` requests are forwarded by us: one upstream HTTP/1.1 connection
  (driven by an ``h11`` client) per target, reused while the same client keeps asking the same
  host:port. Bodies stream through in both directions chunk by chunk; h11 re-frames them.
- Requests to the proxy itself (origin-form): ``GET /proxy.pac`` (and ``/wpad.dat``) returns
  the PAC script generated from the router's rules (:mod:`proxy.pac`), pointing back at the
  address the client used in its Host header; anything else gets a 400.
- ``Upgrade`` requests (plain ``ws://`` through the forwarder) are refused with 501. Browsers
  send WebSockets through an HTTP proxy with CONNECT, so they are unaffected.

Timeouts: the first request head must arrive within ``handshake_timeout``; between requests an
idle client may wait ``idle_timeout`` before its next request starts, and then has
``handshake_timeout`` to finish the head. A body or response that makes no progress for
``idle_timeout`` ends the connection.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import h11
import trio

from proxy.errors import NotAllowed, ProtocolError, RemoteProtocolError, UpstreamError
from proxy.inbound.base import InboundContext, Request, Target
from proxy.pac import PAC_CONTENT_TYPE, parse_host_header
from proxy.protocols.http_proxy import (
    BodyData,
    BodyEnded,
    ClientDisconnected,
    ConnectRequested,
    Event,
    ForwardRequested,
    HttpProxyServerConnection,
    OriginFormRequested,
    ResponseHead,
    connect_established,
    error_response,
    response_headers_for_client,
    status_for,
)

__all__ = ["handle_http"]

log = logging.getLogger("sidestep.inbound.http")
conn_log = logging.getLogger("sidestep.conn")

RECEIVE_SIZE = 64 * 1024


class _UpstreamTimeout(UpstreamError, TimeoutError):
    """The origin stopped answering mid-exchange (mapped to 504)."""


class _ClientTimeout(Exception):
    """The client was too slow; the connection is dropped without a reply."""


class _ClientGone(Exception):
    """The client closed its side while we still needed bytes from it."""


@contextmanager
def _upstream_errors() -> Iterator[None]:
    """Turn what can go wrong on the upstream socket into our ``UpstreamError``."""
    try:
        yield
    except h11.ProtocolError as exc:
        raise UpstreamError(f"origin broke HTTP/1.1: {exc}") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError(f"origin connection failed: {exc}") from exc


class _ConnectReplier:
    """Answers a CONNECT once the pipeline knows whether the tunnel is open."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self.answered = False

    async def succeed(self, bound: tuple[str, int] | None) -> None:
        if not self.answered:
            self.answered = True
            await self._stream.send_all(connect_established())

    async def fail(self, error: BaseException) -> None:
        if not self.answered:
            self.answered = True
            await self._stream.send_all(error_response(status_for(error)))


class _Upstream:
    """One HTTP/1.1 connection to an origin, driven by an h11 client."""

    def __init__(self, target: Target, stream: trio.abc.Stream, idle_timeout: float) -> None:
        self.target = target
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.idle_timeout = idle_timeout

    async def send(self, event: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        with _upstream_errors():
            data = self.conn.send(event)
            if data:
                await self.stream.send_all(data)

    async def next_event(self) -> object:
        with _upstream_errors():
            while True:
                event = self.conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                with trio.move_on_after(self.idle_timeout):
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    self.conn.receive_data(data)
                    continue
                raise _UpstreamTimeout(f"{self.target} sent nothing for {self.idle_timeout:g} s")

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class _HttpSession:
    """State of one client connection to the HTTP inbound."""

    def __init__(
        self, stream: trio.abc.Stream, client: tuple[str, int], ctx: InboundContext
    ) -> None:
        self.stream = stream
        self.client = client
        self.ctx = ctx
        self.settings = ctx.settings
        self.server = HttpProxyServerConnection()
        self.pending: deque[Event] = deque()
        self.upstream: _Upstream | None = None
        #: a response head went to the client and its body is not complete yet
        self.responded = False
        #: status and body bytes of the response being forwarded (for the log line)
        self.status = 0
        self.down = 0

    # reading from the client

    async def _fill(self, deadline: float) -> None:
        """One read from the client into the parser; raises on timeout or EOF."""
        with trio.move_on_at(deadline):
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if data:
                self.pending.extend(self.server.receive_data(data))
                return
            events = self.server.receive_eof()
            if not events:
                raise _ClientGone
            self.pending.extend(events)
            return
        raise _ClientTimeout

    async def _next_head(self, first: bool) -> Event:
        if not first and not self.pending:
            # between requests: the client may stay quiet for the idle timeout
            await self._fill(trio.current_time() + self.settings.idle_timeout)
        deadline = trio.current_time() + self.settings.handshake_timeout
        while not self.pending:
            await self._fill(deadline)
        return self.pending.popleft()

    async def _next_body_event(self) -> Event:
        while not self.pending:
            await self._fill(trio.current_time() + self.settings.idle_timeout)
        return self.pending.popleft()

    async def _flush(self) -> None:
        data = self.server.data_to_send()
        if data:
            await self.stream.send_all(data)

    # the conversation

    async def run(self, prefix: bytes) -> None:
        if prefix:
            self.pending.extend(self.server.receive_data(prefix))
        first = True
        while True:
            event = await self._next_head(first)
            first = False
            if isinstance(event, ClientDisconnected):
                return
            if isinstance(event, OriginFormRequested):
                await self._serve_local(event)
                return
            if isinstance(event, ConnectRequested | ForwardRequested) and not self._authorized(
                event.proxy_auth
            ):
                await self._refuse(407, "proxy authentication required")
                return
            if isinstance(event, ConnectRequested):
                await self._tunnel(event)
                return
            if not isinstance(event, ForwardRequested):  # pragma: no cover - state table
                raise RemoteProtocolError(f"unexpected {type(event).__name__}")
            if event.upgrade is not None:
                await self._refuse(501, f"upgrade to {event.upgrade!r} is not supported")
                return
            if not await self._forward(event) or not self.server.can_keep_alive:
                return
            self.pending.extend(self.server.next_request())

    def _authorized(self, credentials: tuple[str, str] | None) -> bool:
        if not self.settings.auth_required:
            return True
        return credentials is not None and self.settings.check_password(*credentials)

    async def _serve_local(self, event: OriginFormRequested) -> None:
        """A request to the proxy itself: the PAC file, or a 400 explaining what we are."""
        path = event.path.partition("?")[0]
        pac = self.settings.pac
        if pac is None or path not in ("/proxy.pac", "/wpad.dat"):
            await self._refuse(400, "this is a proxy: ask for an absolute http:// URL")
            return
        if event.method not in ("GET", "HEAD"):
            await self._refuse(405, "the PAC file is fetched with GET")
            return
        host = next((v for k, v in event.headers if k.lower() == b"host"), b"")
        address = parse_host_header(host.decode("latin-1")) or self.settings.listen
        body = pac(address)
        head = (
            "HTTP/1.1 200 OK\r\n"
            f"Content-Type: {PAC_CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-cache\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        await self.stream.send_all(head if event.method == "HEAD" else head + body)

    async def _refuse(self, status: int, message: str) -> None:
        await self.stream.send_all(error_response(status, message=message))

    async def _tunnel(self, event: ConnectRequested) -> None:
        request = Request(
            inbound=self.settings.name,
            client=self.client,
            target=Target.parse(event.host, event.port),
            stream=self.stream,
            prefix=self.server.trailing_data,
            protocol="http-connect",
        )
        replier = _ConnectReplier(self.stream)
        try:
            await self.ctx.tunnel(request, replier)
        except (UpstreamError, NotAllowed) as exc:
            # the pipeline normally answers through the replier; make sure the client hears
            log.info("%s: CONNECT %s: %s", self.settings.name, request.target, exc)
            if not replier.answered:
                await replier.fail(exc)

    async def _forward(self, request: ForwardRequested) -> bool:
        """Forward one request and its response. True when the client may send another."""
        target = Target.parse(request.host, request.port)
        if self.server.expects_continue:
            self.server.send_continue()
            await self._flush()
        first_body = await self._next_body_event()
        reused = self.upstream is not None and self.upstream.target == target
        self.responded = False
        self.status = 0
        self.down = 0
        started = trio.current_time()
        outcome = "ok"
        try:
            return await self._forward_once(target, request, first_body, reused)
        except UpstreamError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            # one line per forwarded request, like the tunnels' (no path: it may be private)
            conn_log.info(
                "%s:%d -> %s via %s/http-forward %s status=%s strategy=direct down=%d "
                "time=%.3fs %s",
                self.client[0],
                self.client[1],
                target,
                self.settings.name,
                request.method.decode("ascii", "replace")
                if isinstance(request.method, bytes)
                else request.method,
                self.status or "-",
                self.down,
                trio.current_time() - started,
                outcome,
            )

    async def _forward_once(
        self, target: Target, request: ForwardRequested, first_body: Event, reused: bool
    ) -> bool:
        try:
            try:
                await self._exchange(target, request, first_body)
            except UpstreamError:
                # a kept-alive origin connection may have been closed under us; retrying is
                # safe only when nothing was answered and no body bytes were consumed
                if not (reused and not self.responded and isinstance(first_body, BodyEnded)):
                    raise
                await self._drop_upstream()
                await self._exchange(target, request, first_body)
        except UpstreamError as exc:
            await self._drop_upstream()
            if self.responded:
                log.info("%s: %s failed mid-response: %s", self.settings.name, target, exc)
                return False
            log.info("%s: %s %s: %s", self.settings.name, request.method, target, exc)
            await self.stream.send_all(error_response(status_for(exc), message=str(exc)))
            return False
        return True

    async def _open_upstream(self, target: Target) -> _Upstream:
        if self.upstream is not None and self.upstream.target == target:
            return self.upstream
        await self._drop_upstream()
        with _upstream_errors():
            stream = await self.ctx.connect(target, client=self.client)
        self.upstream = _Upstream(target, stream, self.settings.idle_timeout)
        return self.upstream

    async def _drop_upstream(self) -> None:
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            await upstream.aclose()

    async def _exchange(self, target: Target, request: ForwardRequested, body: Event) -> None:
        up = await self._open_upstream(target)
        await up.send(
            h11.Request(method=request.method, target=request.path, headers=list(request.headers))
        )
        while not isinstance(body, BodyEnded):
            if isinstance(body, BodyData):
                await up.send(h11.Data(data=body.data))
            body = await self._next_body_event()
        await up.send(h11.EndOfMessage())

        while True:
            event = await up.next_event()
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends: the client already had ours
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.server.send(
                    ResponseHead(
                        event.status_code,
                        response_headers_for_client(event.headers),
                        bytes(event.reason),
                    )
                )
                self.responded = True
            elif isinstance(event, h11.Data):
                self.down += len(event.data)
                self.server.send(BodyData(bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                self.server.send(BodyEnded())
                await self._flush()
                self.responded = False
                break
            else:
                raise UpstreamError(f"{target} closed before its response was complete")
            await self._flush()

        if up.reusable:
            up.conn.start_next_cycle()
        else:
            await self._drop_upstream()

    async def aclose(self) -> None:
        await self._drop_upstream()


async def handle_http(
    stream: trio.abc.Stream, prefix: bytes, client: tuple[str, int], ctx: InboundContext
) -> None:
    """Serve one HTTP proxy client. ``prefix`` holds bytes already read from it.

    Returns when the client connection is done; the caller closes ``stream``.
    """
    session = _HttpSession(stream, client, ctx)
    try:
        await session.run(prefix)
    except ProtocolError as exc:
        log.info("%s: %s:%d: %s", ctx.settings.name, client[0], client[1], exc)
        code = exc.reply_code if isinstance(exc, RemoteProtocolError) else None
        if code is not None and not session.responded:
            try:
                await stream.send_all(error_response(code, message=str(exc)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    except _ClientTimeout:
        log.info("%s: %s:%d: too slow; closed", ctx.settings.name, client[0], client[1])
    except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await session.aclose()
