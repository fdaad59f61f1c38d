"""The plain-HTTP carriers for CDNs that do not pass WebSocket: split HTTP and polling.

Both carry the bridge protocol's bytes in ordinary HTTP/1.1 requests to the secret path, tied
together by a carrier id that only holders of the bridge's secret can make
(:mod:`proxy.protocols.webcarrier`):

* **split HTTP** (after Xray's SplitHTTP/XHTTP): one long streaming ``GET /SECRET/ID`` brings
  the bridge's bytes down as they come; upstream bytes go up in ``POST /SECRET/ID/SEQ``
  requests, several in flight on separate connections, which the bridge puts back in order.
  Needs a CDN that streams responses (nginx with ``proxy_buffering off`` does).
* **polling** (after meek): ``POST /SECRET/ID/SEQ`` carries whatever upstream bytes are
  waiting and its answer whatever downstream bytes are ready. Works through any CDN that
  passes a POST, at the cost of latency. The client polls again at once while data flows and
  backs off (x1.5, up to :data:`POLL_MAX_INTERVAL`) while the line is idle; a poll whose
  connection broke is sent again with the same number, and the bridge answers a repeat with
  its previous answer, so nothing is lost or doubled.

Each side is an ordinary ``trio.abc.Stream`` (:class:`SplitClientStream`,
:class:`PollClientStream`, and on the server :class:`ServerCarrier`), so the bridge protocol
runs over them unchanged. On the server, :class:`WebCarrierHub` owns the carriers: the web
server loop (:func:`proxy.bridge.carriers.accept_websocket`) asks it to :meth:`~WebCarrierHub.
claim` each request; a request it does not claim (wrong shape, forged or stale id, a second GET,
a sequence number out of the window) gets the ordinary 404 page. Memory per carrier is bounded
(:data:`INBOX_LIMIT`, :data:`HELD_LIMIT`, :data:`OUTBOX_LIMIT`) and a carrier nobody uses for
:data:`CARRIER_EXPIRY` seconds breaks, which ends its session and forgets its id.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable

import h11
import trio

from proxy.bridge.carriers import (
    MAX_HEAD,
    USER_AGENT,
    FrontingRefused,
    check_status,
    next_client_event,
)
from proxy.errors import RemoteProtocolError, UpstreamError
from proxy.protocols.webcarrier import (
    CarrierKind,
    ReorderBuffer,
    build_target,
    check_carrier_id,
    make_carrier_id,
    parse_target,
)

__all__ = [
    "FrontingRefused", "PollClientStream", "ServerCarrier", "SplitClientStream",
    "WebCarrierHub", "open_poll", "open_split",
]  # fmt: skip

#: largest upstream body of one split-HTTP POST (nginx in front allows 512 KiB)
POST_MAX = 128 * 1024
#: split-HTTP POSTs in flight at once (each on its own connection)
UPLOADERS = 3
#: sequence numbers the bridge holds ahead of the next one it needs
REORDER_WINDOW = 16
#: largest upstream body of one poll, and largest answer
POLL_UP_MAX = 128 * 1024
POLL_DOWN_MAX = 256 * 1024
#: client: seconds between polls on an idle line, from the first back-off to the longest
POLL_MIN_INTERVAL = 0.05
POLL_MAX_INTERVAL = 2.0
#: server: how long a poll with nothing to answer waits for downstream bytes
POLL_HOLD = 0.1
#: bytes waiting to be read in order (server inbox), held out of order, and waiting to go down
INBOX_LIMIT = 1 << 20
HELD_LIMIT = 1 << 20
OUTBOX_LIMIT = 1 << 20
#: client: upstream bytes a poll carrier queues before ``send_all`` waits
POLL_QUEUE_LIMIT = 1 << 20
#: server: a carrier with no GET attached and no request for this long is dropped
CARRIER_EXPIRY = 60.0
#: server: carriers held at once (each is a session)
MAX_CARRIERS = 4096
#: attempts at one POST or poll (a broken keep-alive connection is retried on a fresh one)
ATTEMPTS = 3

Dial = Callable[[], Awaitable[trio.abc.Stream]]
_LINK_ERRORS = (
    RemoteProtocolError, h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
    OSError, UpstreamError,
)  # fmt: skip


# ---------------------------------------------------------------------------------- client


class HttpLink:
    """One HTTP/1.1 connection to the web server in front of the bridge (kept alive)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    async def request(self, method: str, target: str, host: str, body: bytes | None) -> None:
        headers = [("Host", host), ("User-Agent", USER_AGENT), ("Accept", "*/*")]
        if body is not None:
            headers += [("Content-Type", "application/octet-stream"),
                        ("Content-Length", str(len(body)))]  # fmt: skip
        out = self.conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)

    async def _event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise RemoteProtocolError(f"bad HTTP answer: {exc}") from exc
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(MAX_HEAD))

    async def status(self) -> int:
        """The status of the answer to the request just sent."""
        while True:
            event = await self._event()
            if isinstance(event, h11.Response):
                return event.status_code
            if not isinstance(event, h11.InformationalResponse):
                raise trio.BrokenResourceError("the web server closed the connection")

    async def body_piece(self) -> bytes:
        """The next piece of the answer's body; ``b""`` at its end."""
        event = await self._event()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return b""
        raise trio.BrokenResourceError("the web server closed the connection mid-answer")

    async def body(self, limit: int) -> bytes:
        out = bytearray()
        while piece := await self.body_piece():
            out += piece
            if len(out) > limit:
                raise RemoteProtocolError("the answer is longer than any the bridge sends")
        return bytes(out)

    def reusable(self) -> bool:
        """After a whole exchange: ready for the next request (else close it)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False

    async def aclose(self) -> None:
        """Close at once, even while another task reads it (no TLS goodbye is needed: the
        bridge protocol says its own)."""
        transport = getattr(self.stream, "transport_stream", None)
        with trio.CancelScope(shield=True):  # forceful closing never waits: no cut-off half
            try:
                await trio.aclose_forcefully(self.stream)
            except (trio.BusyResourceError, trio.BrokenResourceError, OSError):
                pass
            finally:
                if isinstance(transport, trio.abc.AsyncResource):
                    await trio.aclose_forcefully(transport)


class _LinkPool:
    """Idle kept-alive links to the front, and how to make a new one."""

    def __init__(self, dial: Dial) -> None:
        self.dial = dial
        self.idle: list[HttpLink] = []
        self.closed = False

    async def take(self) -> HttpLink:
        if self.closed:
            raise trio.ClosedResourceError("the carrier is closed")
        return self.idle.pop() if self.idle else HttpLink(await self.dial())

    async def give_back(self, link: HttpLink) -> None:
        if link.reusable() and not self.closed:
            self.idle.append(link)
        else:
            await link.aclose()

    async def aclose(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        for link in idle:
            await link.aclose()

    async def exchange(self, target: str, host: str, body: bytes, limit: int) -> bytes:
        """POST ``body`` to ``target`` and return the answer's body, retrying on fresh links
        when a link breaks (the bridge drops or replays repeats). Raises ``FrontingRefused``
        or ``trio.BrokenResourceError``."""
        error: BaseException | None = None
        for _ in range(ATTEMPTS):
            try:
                link = await self.take()
            except _LINK_ERRORS as exc:
                raise trio.BrokenResourceError(f"cannot reach the front: {exc}") from exc
            try:
                await link.request("POST", target, host, body)
                status = await link.status()
                check_status(status, "the upload")
                answer = await link.body(limit)
            except FrontingRefused:
                await link.aclose()
                raise
            except RemoteProtocolError as exc:
                await link.aclose()
                raise trio.BrokenResourceError(str(exc)) from exc
            except _LINK_ERRORS as exc:
                await link.aclose()
                error = exc
                continue
            except BaseException:  # cancelled mid-exchange: the link is in an unknown state
                await link.aclose()
                raise
            await self.give_back(link)
            return answer
        raise trio.BrokenResourceError(f"the upload failed: {error}") from error


async def open_split(
    dial: Dial, host: str, path: str, secret: bytes, *, now: float | None = None
) -> SplitClientStream:
    """Open a split-HTTP carrier: the streaming GET first, whose answer's status tells whether
    the path (and the CDN's fronting) works. Raises ``FrontingRefused`` (421/403) or
    ``RemoteProtocolError`` (any other refusal), and the dialler's errors."""
    carrier = make_carrier_id(
        secret, CarrierKind.SPLIT, time.time() if now is None else now, os.urandom(8)
    )
    link = HttpLink(await dial())
    try:
        await link.request("GET", build_target(path, carrier), host, None)
        check_status(await link.status(), "the split-HTTP download")
    except BaseException:
        await link.aclose()
        raise
    return SplitClientStream(_LinkPool(dial), host, path, carrier, link)


class SplitClientStream(trio.abc.Stream):
    """Client end of a split-HTTP carrier (see the module docstring)."""

    def __init__(self, pool: _LinkPool, host: str, path: str, carrier: str, down: HttpLink) -> None:
        self._pool = pool
        self._host = host
        self._path = path
        self.carrier = carrier
        self._down = down
        self._seq = 0
        self._closed = False
        self._eof = False
        self._pending = b""
        self._error: str | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the carrier is closed")
        while not self._pending and not self._eof:
            try:
                piece = await self._down.body_piece()
            except _LINK_ERRORS as exc:
                raise trio.BrokenResourceError(f"the download broke: {exc}") from exc
            self._pending, self._eof = piece, not piece
        size = len(self._pending) if max_bytes is None else max_bytes
        data, self._pending = self._pending[:size], self._pending[size:]
        await trio.lowlevel.checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the carrier is closed")
        if self._error is not None:
            raise trio.BrokenResourceError(self._error)
        view = bytes(data)
        pieces = []
        for start in range(0, len(view), POST_MAX):
            pieces.append((self._seq, view[start : start + POST_MAX]))
            self._seq += 1
        for first in range(0, len(pieces), UPLOADERS):
            async with trio.open_nursery() as nursery:
                for seq, piece in pieces[first : first + UPLOADERS]:
                    nursery.start_soon(self._post, seq, piece)
            if self._error is not None:
                raise trio.BrokenResourceError(self._error)
        await trio.lowlevel.checkpoint()

    async def _post(self, seq: int, piece: bytes) -> None:
        try:
            await self._pool.exchange(build_target(self._path, self.carrier, seq), self._host,
                                      piece, 0)  # fmt: skip
        except (FrontingRefused, trio.BrokenResourceError) as exc:
            self._error = self._error or f"the upload broke: {exc}"

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._closed = True
        try:
            await self._down.aclose()
        finally:
            await self._pool.aclose()


async def open_poll(
    dial: Dial, host: str, path: str, secret: bytes, *, now: float | None = None
) -> PollClientStream:
    """Open a polling carrier: a first, empty poll checks the path (and the fronting).
    Raises like :func:`open_split`."""
    carrier = make_carrier_id(
        secret, CarrierKind.POLL, time.time() if now is None else now, os.urandom(8)
    )
    pool = _LinkPool(dial)
    link = HttpLink(await dial())
    try:
        await link.request("POST", build_target(path, carrier, 0), host, b"")
        check_status(await link.status(), "the first poll")
        first = await link.body(POLL_DOWN_MAX)
        await pool.give_back(link)
    except BaseException:
        await link.aclose()
        raise
    stream = PollClientStream(pool, host, path, carrier)
    stream._down += first
    return stream


class PollClientStream(trio.abc.Stream):
    """Client end of a polling carrier. Polls run inside :meth:`receive_some` (the bridge
    session always has a reader waiting there); :meth:`send_all` only queues, waiting while
    :data:`POLL_QUEUE_LIMIT` bytes are queued."""

    def __init__(self, pool: _LinkPool, host: str, path: str, carrier: str) -> None:
        self._pool = pool
        self._host = host
        self._path = path
        self.carrier = carrier
        self._seq = 1  # the opening poll was 0
        self._up = bytearray()
        self._down = bytearray()
        self._interval = POLL_MIN_INTERVAL
        self._queued = trio.Event()
        self._drained = trio.Event()
        self._closed = False
        self.polls = 1

    async def _poll(self) -> bytes:
        body = bytes(self._up[:POLL_UP_MAX])
        target = build_target(self._path, self.carrier, self._seq)
        try:
            answer = await self._pool.exchange(target, self._host, body, POLL_DOWN_MAX)
        except FrontingRefused as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        self.polls += 1
        self._seq += 1
        del self._up[: len(body)]
        self._drained.set()
        self._drained = trio.Event()
        if answer or body:
            self._interval = POLL_MIN_INTERVAL
        return answer

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._down:
            if self._closed:
                raise trio.ClosedResourceError("the carrier is closed")
            sent = bool(self._up)
            answer = await self._poll()
            self._down += answer
            if answer or sent or self._up:
                continue
            with trio.move_on_after(self._interval):
                await self._queued.wait()
            self._interval = min(self._interval * 1.5, POLL_MAX_INTERVAL)
        size = len(self._down) if max_bytes is None else min(max_bytes, len(self._down))
        data = bytes(self._down[:size])
        del self._down[:size]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        while len(self._up) >= POLL_QUEUE_LIMIT:
            if self._closed:
                raise trio.ClosedResourceError("the carrier is closed")
            await self._drained.wait()
        if self._closed:
            raise trio.ClosedResourceError("the carrier is closed")
        self._up += data
        self._queued.set()
        self._queued = trio.Event()
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._closed = True
        self._drained.set()
        self._queued.set()
        await self._pool.aclose()


# ---------------------------------------------------------------------------------- server


class ServerCarrier(trio.abc.Stream):
    """The bridge's end of one split-HTTP or polling carrier, fed by the hub's requests."""

    def __init__(self, hub: WebCarrierHub, carrier: str, kind: CarrierKind) -> None:
        self.hub = hub
        self.carrier = carrier
        self.kind = kind
        self.inbox = ReorderBuffer(REORDER_WINDOW)
        self.outbox = bytearray()
        self.broken: str | None = None
        self.closed = False
        self.downloading = False
        self.had_download = False
        #: polling: the next sequence number and the last answer (resent for a repeat)
        self.poll_next = 0
        self.poll_last: bytes | None = None
        self.last_seen = trio.current_time()
        self._changed = trio.Event()

    def wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    @property
    def done(self) -> bool:
        return self.closed or self.broken is not None

    def lose(self, why: str) -> None:
        if not self.done:
            self.broken = why
        self.wake()

    def _check(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError("the carrier is closed")
        if self.broken is not None:
            raise trio.BrokenResourceError(self.broken)

    def _idle_left(self) -> float:
        if self.downloading:
            return CARRIER_EXPIRY
        return self.last_seen + CARRIER_EXPIRY - trio.current_time()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self.inbox.ready:
            self._check()
            left = self._idle_left()
            if left <= 0:
                self.lose("the client went away")
                continue
            with trio.move_on_after(left):
                await self._changed.wait()
        data = self.inbox.read(max_bytes)
        self.wake()
        await trio.lowlevel.checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        while len(self.outbox) >= OUTBOX_LIMIT:
            await self._changed.wait()
            self._check()
        self.outbox += data
        self.wake()
        await trio.lowlevel.checkpoint()

    def take(self, limit: int) -> bytes:
        data = bytes(self.outbox[:limit])
        del self.outbox[:limit]
        if data:
            self.wake()
        return data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.closed = True
        self.hub.forget(self)
        self.wake()
        await trio.lowlevel.checkpoint()


Handler = Callable[[h11.Connection, trio.abc.Stream], Awaitable[bool]]
Start = Callable[[ServerCarrier, str], None]


def client_address(peer: str, forwarded: bytes) -> str:
    """The client: the last ``X-Forwarded-For`` address when the peer is a web server on
    loopback in front of us, else the peer."""
    last = forwarded.decode("latin-1").rsplit(",", 1)[-1].strip()
    try:
        if ipaddress.ip_address(peer).is_loopback and last:
            return ipaddress.ip_address(last).compressed
    except ValueError:
        pass
    return peer


class WebCarrierHub:
    """The bridge's split-HTTP and polling carriers, by id. ``start(carrier, client)`` is
    called for each new carrier and must start its session (the bridge server spawns
    :meth:`~proxy.bridge.server.BridgeServer.handle_carrier` in its nursery)."""

    def __init__(
        self,
        secret: bytes,
        path: str,
        start: Start,
        *,
        window: float,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.secret = secret
        self.path = path
        self.start = start
        self.window = window
        self.wall = wall
        self.carriers: dict[str, ServerCarrier] = {}
        self.opened = 0

    def forget(self, carrier: ServerCarrier) -> None:
        if self.carriers.get(carrier.carrier) is carrier:
            del self.carriers[carrier.carrier]

    def claim(self, request: h11.Request, peer: str) -> Handler | None:
        """The handler for ``request`` when it belongs to a carrier (opening the carrier when
        it is a fresh, genuine id), else ``None``: the caller answers 404."""
        target = parse_target(self.path, request.target)
        if target is None or request.method not in (b"GET", b"POST"):
            return None
        get = request.method == b"GET"
        carrier = self.carriers.get(target.carrier)
        if carrier is None:
            cid = check_carrier_id(self.secret, target.carrier)
            if cid is None or not cid.fresh(self.wall(), self.window):
                return None
            if cid.kind is CarrierKind.POLL:
                shaped = not get and target.seq == 0
            else:
                shaped = get == (target.seq is None)
            if not shaped:
                return None
            if len(self.carriers) >= MAX_CARRIERS:
                return None
            carrier = ServerCarrier(self, target.carrier, cid.kind)
            self.carriers[target.carrier] = carrier
            self.opened += 1
            headers = {name.lower(): value for name, value in request.headers}
            self.start(carrier, client_address(peer, headers.get(b"x-forwarded-for", b"")))
        elif carrier.done:
            return None
        seq = target.seq
        if carrier.kind is CarrierKind.POLL:
            if get or seq is None or seq not in (carrier.poll_next, carrier.poll_next - 1):
                return None
            if seq == carrier.poll_next - 1 and carrier.poll_last is None:
                return None
            return functools.partial(self._serve_poll, carrier, seq)
        if get:
            if seq is not None or carrier.had_download:
                return None
            carrier.had_download = carrier.downloading = True
            return functools.partial(self._serve_download, carrier)
        if seq is None or seq >= carrier.inbox.next_seq + REORDER_WINDOW:
            return None
        return functools.partial(self._serve_upload, carrier, seq)

    async def _serve_download(
        self, carrier: ServerCarrier, conn: h11.Connection, stream: trio.abc.Stream
    ) -> bool:
        """The streaming GET: the carrier's downstream bytes as they come, until it ends."""
        try:
            await stream.send_all(conn.send(_response(200, None)) or b"")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_close, stream, carrier, nursery.cancel_scope)
                while True:
                    data = carrier.take(OUTBOX_LIMIT)
                    if data:
                        await stream.send_all(conn.send(h11.Data(data=data)) or b"")
                    elif carrier.done:
                        break
                    else:
                        await carrier.changed()
                nursery.cancel_scope.cancel()
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            carrier.downloading = False
            carrier.lose("the download ended")
        return False

    async def _serve_upload(
        self, carrier: ServerCarrier, seq: int, conn: h11.Connection, stream: trio.abc.Stream
    ) -> bool:
        carrier.last_seen = trio.current_time()
        body = await _read_body(conn, stream, POST_MAX)
        if body is None:
            return False
        inbox = carrier.inbox
        while not carrier.done and (
            inbox.ready >= INBOX_LIMIT or (seq != inbox.next_seq and inbox.held >= HELD_LIMIT)
        ):
            await carrier.changed()
        if carrier.done:
            return False
        try:
            inbox.add(seq, body)
        except RemoteProtocolError:
            carrier.lose("an upload far out of order")
            return False
        carrier.last_seen = trio.current_time()
        carrier.wake()
        return await _answer(conn, stream, b"")

    async def _serve_poll(
        self, carrier: ServerCarrier, seq: int, conn: h11.Connection, stream: trio.abc.Stream
    ) -> bool:
        carrier.last_seen = trio.current_time()
        body = await _read_body(conn, stream, POLL_UP_MAX)
        if body is None:
            return False
        if seq == carrier.poll_next - 1 and carrier.poll_last is not None:
            return await _answer(conn, stream, carrier.poll_last)  # a repeat: same answer
        if seq != carrier.poll_next:
            return False  # overtaken by a concurrent poll: not a client of ours
        carrier.poll_next += 1
        while not carrier.done and carrier.inbox.ready >= INBOX_LIMIT:
            await carrier.changed()
        carrier.inbox.add(seq, body)
        carrier.wake()
        if not carrier.outbox:
            with trio.move_on_after(POLL_HOLD):
                while not carrier.outbox and not carrier.done:
                    await carrier.changed()
        answer = carrier.take(POLL_DOWN_MAX)
        carrier.poll_last = answer
        carrier.last_seen = trio.current_time()
        return await _answer(conn, stream, answer)


def _response(status: int, length: int | None) -> h11.Response:
    headers = [("Server", "nginx"), ("Content-Type", "application/octet-stream"),
               ("Cache-Control", "no-store")]  # fmt: skip
    if length is not None:
        headers.append(("Content-Length", str(length)))
    return h11.Response(status_code=status, headers=headers)


async def _answer(conn: h11.Connection, stream: trio.abc.Stream, body: bytes) -> bool:
    """A 200 with ``body``; whether the connection may carry another request."""
    out = conn.send(_response(200, len(body))) or b""
    if body:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, limit: int) -> bytes | None:
    """The request's body, or ``None`` when it is longer than ``limit``, slow or cut off."""
    body = bytearray()
    while True:
        event = await next_client_event(conn, stream)
        if event is None:
            return None
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                return None
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            return None


async def _watch_close(
    stream: trio.abc.Stream, carrier: ServerCarrier, scope: trio.CancelScope
) -> None:
    """While a download streams: when its connection closes, the carrier is lost."""
    try:
        while await stream.receive_some(MAX_HEAD):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    carrier.lose("the download's connection closed")
    scope.cancel()
