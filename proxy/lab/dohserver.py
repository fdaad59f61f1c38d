"""DNS-over-HTTPS (RFC 8484) for the lab: HTTP/2 over TLS, driven by h2 on trio.

A :class:`DohServer` answers ``GET /dns-query?dns=<base64url>`` and ``POST /dns-query``
(``content-type: application/dns-message``) from an :data:`~proxy.lab.dnsserver.Answerer` (for
instance the lab's honest :class:`~proxy.lab.dnsserver.Zone`). Its certificate, minted by the
lab CA, decides who it pretends to be: the well-known ``dns.famous.lab`` a censor blocks, or a
lesser-known ``doh.small.lab``.

Per connection: one task reads and feeds h2; each request that ends spawns a task that builds
the answer and writes it, waiting for WINDOW_UPDATEs when the peer's flow-control window is
spent. Writes go through one lock so h2's output stays in order. :class:`DohFaults` makes the
server misbehave for client tests: GOAWAY after N requests, RST_STREAM on chosen requests,
abrupt close after N answers, slow answers.
"""

from __future__ import annotations

import base64
import binascii
import logging
import urllib.parse
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.rdatatype
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from proxy.lab.ca import Issued
from proxy.lab.dnsserver import (
    Address,
    Answerer,
    Clock,
    QueryContext,
    Zone,
    name_text,
    require_loopback,
)

logger = logging.getLogger(__name__)

DNS_MESSAGE = "application/dns-message"
MAX_BODY = 65535  # a DNS message cannot be larger


@dataclass(frozen=True, slots=True)
class DohFaults:
    """Misbehaviour to simulate. Request numbers count from 1 per connection."""

    goaway_after: int | None = None  # GOAWAY (NO_ERROR) once N requests are answered, then close
    reset_requests: frozenset[int] = frozenset()  # answer these requests with RST_STREAM
    reset_code: int = h2.errors.ErrorCodes.INTERNAL_ERROR
    close_after: int | None = None  # drop the TCP connection, no GOAWAY, after N requests
    answer_delay: float = 0.0  # seconds before each answer


@dataclass(frozen=True, slots=True)
class DohLogEntry:
    """One request as the server saw it."""

    time: float
    client: Address
    method: str
    qname: str | None  # None when the request carried no parseable query
    qtype: str | None
    status: int  # HTTP status sent; 0 = reset or never answered


def min_ttl(message: dns.message.Message) -> int:
    """The HTTP freshness an answer allows (RFC 8484 5.1): its smallest TTL, 0 if none.

    An SOA in the authority section counts with its negative-caching TTL (RFC 2308).
    """
    ttls = []
    for rrset in (*message.answer, *message.authority):
        ttls.append(rrset.ttl)
        if rrset.rdtype == dns.rdatatype.SOA:
            ttls.extend(rdata.minimum for rdata in rrset)
    return min(ttls, default=0)


def decode_get_param(query_string: str) -> bytes | None:
    """The DNS message in a GET's ``dns`` parameter (base64url, padding optional), or None."""
    values = urllib.parse.parse_qs(query_string, keep_blank_values=True).get("dns")
    if not values or len(values) != 1:
        return None
    text = values[0].rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(slots=True)
class _Request:
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    too_big: bool = False
    number: int = 0


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


class DohServer:
    """An RFC 8484 server over HTTP/2 for the names in ``issued``'s certificate."""

    def __init__(
        self,
        answer: Zone | Answerer,
        issued: Issued,
        listen: Address = ("127.0.0.1", 0),
        *,
        path: str = "/dns-query",
        faults: DohFaults = DohFaults(),
        now: Clock | None = None,
    ) -> None:
        require_loopback(listen[0])
        self._answer: Answerer = answer.answer if isinstance(answer, Zone) else answer
        self.issued = issued
        self.listen = listen
        self.path = path
        self.faults = faults
        self._now = now or trio.current_time
        self._tls = issued.server_context(alpn=("h2",))
        #: every request, in order of arrival
        self.log: list[DohLogEntry] = []
        #: the bound address, once :meth:`serve` has started
        self.address: Address | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The names the server's certificate is valid for."""
        return self.issued.names

    @property
    def url(self) -> str:
        """``https://<first name>:<port><path>``, once serving."""
        port = self.address[1] if self.address else self.listen[1]
        return f"https://{self.names[0]}:{port}{self.path}"

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
        peer = tcp.socket.getpeername()
        stream = trio.SSLStream(tcp, self._tls, server_side=True, https_compatible=True)
        try:
            try:
                with trio.fail_after(10):
                    await stream.do_handshake()
                if stream.selected_alpn_protocol() != "h2":
                    return  # HTTP/2 only: DoH clients negotiate it with ALPN
                await _Session(self, stream, (peer[0], peer[1])).run()
            except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                pass  # the client went away or stalled: nothing to report
        except Exception as exc:
            logger.warning("doh connection from %s failed: %r", peer, exc)
        finally:
            await trio.aclose_forcefully(stream)

    def _reply_to(self, method: str, req: _Request, client: Address) -> _Reply:
        """Map one complete HTTP request to its reply, and log it."""
        found = self._query_of(method, req)
        qname = qtype = None
        if isinstance(found, _Reply):
            reply = found
        else:
            question = found.question[0]
            qname, qtype = name_text(question.name), dns.rdatatype.to_text(question.rdtype)
            response = self._answer(found, QueryContext(client, "doh"))
            if response is None:
                reply = _Reply(0)  # the answerer drops it: leave the stream hanging
            else:
                headers = (
                    ("content-type", DNS_MESSAGE),
                    ("cache-control", f"max-age={min_ttl(response)}"),
                )
                reply = _Reply(200, response.to_wire(max_size=65535), headers)
        self._record(client, method, qname, qtype, reply.status)
        return reply

    def _query_of(self, method: str, req: _Request) -> dns.message.Message | _Reply:
        """The DNS query a request carries, or the error reply it deserves."""
        target = urllib.parse.urlsplit(req.headers.get(":path", ""))
        if target.path != self.path:
            return _text(404, "not found")
        if method == "GET":
            wire = decode_get_param(target.query)
            if wire is None:
                return _text(400, "missing or malformed dns parameter")
        elif method == "POST":
            ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != DNS_MESSAGE:
                return _text(415, f"content-type must be {DNS_MESSAGE}")
            if req.too_big:
                return _text(413, "body too large")
            wire = bytes(req.body)
        else:
            return _Reply(405, b"", (("allow", "GET, POST"),))
        query = _parse_query(wire)
        return _text(400, "not a DNS query") if query is None else query

    def _record(
        self, client: Address, method: str, qname: str | None, qtype: str | None, status: int
    ) -> None:
        self.log.append(DohLogEntry(self._now(), client, method, qname, qtype, status))


def _text(status: int, message: str) -> _Reply:
    return _Reply(status, (message + "\n").encode(), (("content-type", "text/plain"),))


def _parse_query(wire: bytes) -> dns.message.Message | None:
    try:
        query = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None
    if query.flags & dns.flags.QR or len(query.question) != 1:
        return None
    return query


class _Session:
    """One HTTP/2 connection."""

    def __init__(
        self, server: DohServer, stream: trio.SSLStream[trio.SocketStream], client: Address
    ) -> None:
        self.server = server
        self.stream = stream
        self.client = client
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.requests: dict[int, _Request] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.send_lock = trio.Lock()
        self.window_changed = trio.Event()
        self.received = 0  # requests started on this connection
        self.handled = 0  # requests finished: answered, reset or left hanging
        self.started = 0  # answers begun (counted before the first await of each)
        self.goaway_last: int | None = None  # last stream id served before GOAWAY
        self.pending: set[int] = set()  # streams still to answer, up to goaway_last
        self.goaway_sent = False
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        self.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
        self.conn.initiate_connection()
        await self.flush()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    logger.debug("doh h2 error from %s: %r", self.client, exc)
                    await self.flush()  # h2 queued a GOAWAY
                    break
                for event in events:
                    self.on_event(event)
                await self.flush()
                if self._closed():
                    break  # the client sent GOAWAY or h2 gave up on the connection
            nursery.cancel_scope.cancel()

    def _closed(self) -> bool:
        return self.conn.state_machine.state == h2.connection.ConnectionState.CLOSED

    def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            if self.goaway_last is not None and event.stream_id > self.goaway_last:
                return  # past the GOAWAY cut: never processed, the client retries elsewhere
            self.received += 1
            self.requests[event.stream_id] = _Request(dict(event.headers), number=self.received)
            self.pending.add(event.stream_id)
            goaway = self.server.faults.goaway_after
            if self.goaway_last is None and goaway is not None and self.received >= goaway:
                self.goaway_last = event.stream_id
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            req = self.requests.get(event.stream_id)
            if req is not None:
                if len(req.body) + len(event.data) > MAX_BODY:
                    req.too_big = True
                else:
                    req.body += event.data
        elif isinstance(event, h2.events.StreamEnded):
            req = self.requests.pop(event.stream_id, None)
            if req is None:
                return
            assert self.nursery is not None
            scope = trio.CancelScope()
            self.scopes[event.stream_id] = scope
            self.nursery.start_soon(self.respond, event.stream_id, req, scope)
        elif isinstance(event, h2.events.StreamReset):
            self.requests.pop(event.stream_id, None)
            scope = self.scopes.pop(event.stream_id, None)
            if scope is not None:
                scope.cancel()  # its task finishes the bookkeeping
            elif event.stream_id in self.pending:
                self.pending.discard(event.stream_id)
                assert self.nursery is not None
                self.nursery.start_soon(self.after_answer)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window_changed.set()
            self.window_changed = trio.Event()

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def respond(self, stream_id: int, req: _Request, scope: trio.CancelScope) -> None:
        faults = self.server.faults
        method = req.headers.get(":method", "")
        with scope:
            try:
                if req.number in faults.reset_requests:
                    self.server._record(self.client, method, None, None, 0)
                    self.conn.reset_stream(stream_id, faults.reset_code)
                    await self.flush()
                else:
                    reply = self.server._reply_to(method, req, self.client)
                    if faults.answer_delay:
                        await trio.sleep(faults.answer_delay)
                    if faults.close_after is not None and self.started >= faults.close_after:
                        # answers that woke together must not slip out before the close
                        self.nursery.cancel_scope.cancel()  # type: ignore[union-attr]
                        return
                    self.started += 1
                    if reply.status:
                        await self.send_reply(stream_id, reply)
            except h2.exceptions.StreamClosedError:
                pass
        self.scopes.pop(stream_id, None)
        self.pending.discard(stream_id)
        self.handled += 1
        await self.after_answer()

    async def send_reply(self, stream_id: int, reply: _Reply) -> None:
        headers = [
            (":status", str(reply.status)),
            *reply.headers,
            ("content-length", str(len(reply.body))),
        ]
        self.conn.send_headers(stream_id, headers, end_stream=not reply.body)
        await self.flush()
        body = memoryview(reply.body)
        while body:
            waiter = self.window_changed
            window = self.conn.local_flow_control_window(stream_id)
            if window <= 0:
                await waiter.wait()
                continue
            size = min(window, self.conn.max_outbound_frame_size, len(body))
            self.conn.send_data(stream_id, bytes(body[:size]), end_stream=size == len(body))
            body = body[size:]
            await self.flush()

    async def after_answer(self) -> None:
        faults = self.server.faults
        assert self.nursery is not None
        if faults.close_after is not None and self.handled >= faults.close_after:
            self.nursery.cancel_scope.cancel()  # abrupt: the handler closes the socket
            return
        if (
            self.goaway_last is not None
            and not self.goaway_sent
            and not any(sid <= self.goaway_last for sid in self.pending)
        ):
            self.goaway_sent = True
            self.conn.close_connection(last_stream_id=self.goaway_last)
            await self.flush()
            self.nursery.cancel_scope.cancel()
