"""A small HTTP/1.1 origin server (plain or TLS) for the lab and for tests.

Paths it serves:

* ``/`` - ``hello from <name> (host <Host header>)``: tells which origin answered,
* ``/bytes/N`` - N bytes of a repeating pattern, streamed in chunks (large downloads),
* ``/echo`` - the request body back (POST/PUT, any framing),
* ``/status/N`` - an empty response with status N.

Keep-alive, HEAD and chunked request bodies are handled by h11.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import h11
import trio

PATTERN = bytes(range(256)) * 256  # 64 KiB, repeated for /bytes/N


def pattern_bytes(n: int) -> bytes:
    """The exact body ``/bytes/n`` returns (for comparisons in tests)."""
    reps, rest = divmod(n, len(PATTERN))
    return PATTERN * reps + PATTERN[:rest]


@dataclass(slots=True)
class OriginServer:
    """An origin named ``name``; ``tls`` makes it HTTPS."""

    name: str
    tls: ssl.SSLContext | None = None
    #: requests served, for tests that check what reached the origin
    requests: list[tuple[str, str, str]] = field(default_factory=list)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled; reports the bound address."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        sockname = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:
            task_status.started((sockname[0], sockname[1]))
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        s: trio.abc.Stream = stream
        try:
            if self.tls is not None:
                s = trio.SSLStream(stream, self.tls, server_side=True)
                with trio.fail_after(10):
                    await s.do_handshake()
            await self._serve_http(s)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except h11.RemoteProtocolError:
            pass
        finally:
            await trio.aclose_forcefully(s)

    async def _serve_http(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request = await _next_event(conn, stream)
            if not isinstance(request, h11.Request):
                return
            body = bytearray()
            while True:
                ev = await _next_event(conn, stream)
                if isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    return
            host = dict(request.headers).get(b"host", b"").decode("latin-1")
            target = request.target.decode("latin-1")
            self.requests.append((request.method.decode(), host, target))
            await self._respond(conn, stream, request, target, host, bytes(body))
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _respond(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        request: h11.Request,
        target: str,
        host: str,
        body: bytes,
    ) -> None:
        status = 200
        chunks: list[bytes] = []
        length = 0
        kind = "application/octet-stream"
        if target == "/" or target.startswith("/?"):
            chunks = [f"hello from {self.name} (host {host})\n".encode()]
            kind = "text/plain; charset=utf-8"  # a browser shows it instead of downloading it
        elif target.startswith("/bytes/") and target[7:].isdigit():
            length = min(int(target[7:]), 1 << 34)
        elif target == "/echo":
            chunks = [body]
        elif target.startswith("/status/") and target[8:].isdigit():
            status = int(target[8:])
            if not 200 <= status <= 599:
                status = 400
        else:
            status = 404
            chunks = [b"not found\n"]
        if not length:
            length = sum(len(c) for c in chunks)
        headers = [("Content-Length", str(length)), ("Content-Type", kind)]
        headers.append(("X-Origin", self.name))
        no_body = request.method == b"HEAD" or status in (204, 304)
        if status in (204, 304):
            headers = [("X-Origin", self.name)]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if not no_body:
            if chunks:
                for c in chunks:
                    await stream.send_all(conn.send(h11.Data(data=c)))
            else:
                left = length
                while left:
                    piece = PATTERN[: min(left, len(PATTERN))]
                    await stream.send_all(conn.send(h11.Data(data=piece)))
                    left -= len(piece)
        await stream.send_all(conn.send(h11.EndOfMessage()))


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        return ev
