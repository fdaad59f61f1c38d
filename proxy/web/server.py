"""A small HTTP/1.1 server (h11 on trio) for the status page, ``/metrics``, the JSON API and
the PAC file.

Routes (GET and HEAD only; anything else is 405)::

    /             the status page (HTML)           /api/status  the status document (JSON)
    /metrics      Prometheus text format           /proxy.pac   the proxy auto-config script

Guards, because the port is reachable by every program on the machine and by every web page
the user's browser opens:

* the listener admits only the ``allow`` networks (loopback unless configured);
* the ``Host`` header must be an IP literal or ``localhost``: a web page that points a name of
  its own at 127.0.0.1 (DNS rebinding) cannot read the page, which lists the sites the user
  visits. Other requests get 403;
* no CORS headers, a ``Content-Security-Policy`` that forbids loading anything, ``no-store``;
* each request must arrive, and its response be taken, within ``timeout`` seconds (slow
  clients are cut), heads are bounded (h11's ``max_incomplete_event_size``) and so are the
  connections served at once. Malformed requests get 400, never a traceback; an error while
  rendering is one log line and a 500.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import trio

from proxy.config import WebConfig
from proxy.inbound.listener import client_allowed
from proxy.pac import PAC_CONTENT_TYPE
from proxy.web.api import status_json
from proxy.web.metrics import CONTENT_TYPE as METRICS_TYPE
from proxy.web.metrics import render, status_metrics
from proxy.web.pages import render_status_page

log = logging.getLogger("sidestep.web")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: headers every response carries
_COMMON_HEADERS = (
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'"),
)
_HTML = "text/html; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_PAC = PAC_CONTENT_TYPE
#: the longest request head accepted
MAX_HEAD = 16 * 1024
_READ_SIZE = 16 * 1024


@dataclass(frozen=True, slots=True)
class WebSources:
    """Where the server's content comes from (the app provides these)."""

    #: the status document (:func:`proxy.web.api.build_status`)
    status: Callable[[], dict[str, Any]]
    #: the PAC script for a client that reached us at ``host`` (None: no inbound can serve it)
    pac: Callable[[str], bytes | None]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def host_allowed(host_header: bytes | None) -> bool:
    """Is the ``Host`` header an IP literal or ``localhost`` (with or without a port)?"""
    if not host_header:
        return False
    try:
        host = host_header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return False
    if host.startswith("["):
        inner, sep, rest = host[1:].partition("]")
        if not sep or (rest and not _is_port(rest)):
            return False
        host = inner
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
        if not _is_port(":" + port):
            return False
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_port(text: str) -> bool:
    digits = text[1:]
    return text.startswith(":") and digits.isascii() and digits.isdigit() and len(digits) <= 5


def host_name(host_header: bytes) -> str:
    """The host part of an (already allowed) ``Host`` header, without port or brackets."""
    host = host_header.decode("ascii").strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0] if host.count(":") == 1 else host


def _plain(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, _TEXT, (message + "\n").encode(), headers)


class WebServer:
    """Serves :class:`WebSources` on listeners; ``allow`` and ``sources`` may be swapped."""

    def __init__(
        self,
        sources: WebSources,
        *,
        allow: Sequence[Network],
        timeout: float = 10.0,
        max_clients: int = 64,
    ) -> None:
        self.sources = sources
        self.allow = tuple(allow)
        self.timeout = timeout
        self.max_clients = max_clients
        #: clients connected now
        self.active = 0
        #: requests answered so far
        self.requests = 0
        self._scopes: list[trio.CancelScope] = []

    def stop_accepting(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    async def serve(self, listeners: Iterable[trio.SocketListener]) -> None:
        """Accept on ``listeners`` until :meth:`stop_accepting` (clients get to finish)."""
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        scope = trio.CancelScope()
        self._scopes.append(scope)
        async with trio.open_nursery() as clients:
            with scope:
                async with listener:
                    while True:
                        stream = await listener.accept()
                        clients.start_soon(self._admit, stream)

    async def _admit(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        if not client_allowed(peer[0], self.allow):
            log.warning("status page: refused client %s: not in the allow list", peer[0])
            await trio.aclose_forcefully(stream)
            return
        if self.active >= self.max_clients:
            await trio.aclose_forcefully(stream)
            return
        await self.handle(stream, f"{peer[0]}:{peer[1]}")

    async def handle(self, stream: trio.abc.Stream, client: str = "-") -> None:
        """Serve one client connection (keep-alive included) and close it."""
        self.active += 1
        try:
            await self._serve_connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as exc:  # the per-connection top level: one line, never a traceback
            log.error("status page: error serving %s: %r", client, exc)
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            request, response = await self._next_request(conn, stream)
            if response is None:
                return
            keep = request is not None and conn.their_state is h11.DONE and response.status < 400
            with trio.move_on_after(self.timeout):
                await self._send(conn, stream, response, head_only=_is_head(request), keep=keep)
                self.requests += 1
                if keep and conn.our_state is h11.DONE:
                    conn.start_next_cycle()
                    continue
            return

    async def _next_request(
        self, conn: h11.Connection, stream: trio.abc.Stream
    ) -> tuple[h11.Request | None, Response | None]:
        """The next request and the response to it; no response: hang up without one."""
        with trio.move_on_after(self.timeout):
            try:
                request = await self._read_request(conn, stream)
            except h11.RemoteProtocolError as exc:
                return None, _plain(exc.error_status_hint, "bad request")
            if request is None:
                return None, None
            try:
                return request, self.respond(request)
            except Exception as exc:  # a bug in rendering: one log line and a 500, no traceback
                log.error("status page: cannot answer %s: %r", request.target.decode(), exc)
                return request, _plain(500, "internal error: see the sidestep log")
        # too slow: say so when a request had begun, else just hang up
        if conn.their_state is h11.SEND_BODY or _partial(conn):
            return None, _plain(408, "request timeout")
        return None, None

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.Stream
    ) -> h11.Request | None:
        """The next request head (its body, if any, is read and dropped); None at EOF."""
        request: h11.Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(_READ_SIZE))
                continue
            if isinstance(event, h11.Request):
                request = event
                if event.method not in (b"GET", b"HEAD"):
                    return request  # answered 405 without reading a body we do not want
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    def respond(self, request: h11.Request) -> Response:
        """The response to a request head (no I/O)."""
        if request.method not in (b"GET", b"HEAD"):
            return _plain(405, "only GET and HEAD", (("allow", "GET, HEAD"),))
        host = dict(request.headers).get(b"host")
        if host is None or not host_allowed(host):
            return _plain(
                403, "use http://127.0.0.1:PORT/ or http://localhost:PORT/ (IP or localhost only)"
            )
        path = request.target.split(b"?", 1)[0].split(b"#", 1)[0]
        if path == b"/":
            return Response(200, _HTML, render_status_page(self.sources.status()).encode())
        if path == b"/api/status":
            return Response(200, _JSON, status_json(self.sources.status()))
        if path == b"/metrics":
            text = render(status_metrics(self.sources.status()))
            return Response(200, METRICS_TYPE, text.encode())
        if path == b"/proxy.pac":
            script = self.sources.pac(host_name(host))
            if script is None:
                return _plain(404, "no inbound speaks a protocol a PAC file can name")
            return Response(200, _PAC, script)
        return _plain(404, "not found")

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        response: Response,
        *,
        head_only: bool,
        keep: bool,
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *_COMMON_HEADERS,
            *response.headers,
        ]
        if not keep:
            headers.append(("connection", "close"))
        reason = HTTPStatus(response.status).phrase.encode()
        data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        if not head_only and response.body:
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)


def _is_head(request: h11.Request | None) -> bool:
    return request is not None and request.method == b"HEAD"


def _partial(conn: h11.Connection) -> bool:
    """Bytes of a request arrived but not the whole head."""
    return bool(conn.trailing_data[0])


class WebRunner:
    """The web port of a running app: started, moved or stopped as the config says.

    The status page is not worth refusing to run for: when its port cannot be bound (another
    sidestep has it, say), sidestep goes on without it, or keeps it where it was on a reload,
    and says so in the log.
    """

    def __init__(self) -> None:
        self.server: WebServer | None = None
        #: the ``listen`` of the running server
        self.listen: str | None = None
        #: the address actually bound (port 0 in the config gets a real one)
        self.address: tuple[str, int] | None = None

    async def apply(self, web: WebConfig, sources: WebSources, nursery: trio.Nursery) -> None:
        """Make the running server match ``web``; new clients are served from ``sources``."""
        wanted = web.listen if web.enabled else None
        if self.server is not None and self.listen == wanted:
            self.server.sources = sources
            self.server.allow = web.effective_allow
            self.server.timeout = web.timeout
            return
        listeners: list[trio.SocketListener] = []
        if wanted is not None:
            host, port = web.address
            try:
                listeners = await trio.open_tcp_listeners(
                    port, host="127.0.0.1" if host == "localhost" else host
                )
            except OSError as exc:
                why = exc.strerror or str(exc)
                log.warning(
                    "status page: cannot listen on %s (%s): running without it", wanted, why
                )
                return
        self.stop_accepting()
        self.server = self.listen = self.address = None
        if not listeners:
            return
        server = WebServer(sources, allow=web.effective_allow, timeout=web.timeout)
        name = listeners[0].socket.getsockname()
        self.server, self.listen, self.address = server, wanted, (name[0], name[1])
        nursery.start_soon(server.serve, listeners)
        shown = f"[{name[0]}]" if ":" in name[0] else name[0]
        log.info("status page: http://%s:%d/", shown, name[1])

    def stop_accepting(self) -> None:
        """Close the listener; requests in progress finish."""
        if self.server is not None:
            self.server.stop_accepting()
