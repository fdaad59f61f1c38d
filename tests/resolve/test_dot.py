"""The DoT resolver against a tiny DoT server written here (lab zone, lab CA, loopback)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import dns.edns
import dns.message
import pytest
import trio

from proxy.errors import ResolveError
from proxy.lab.ca import LabCA
from proxy.lab.dnsserver import QueryContext, Zone
from proxy.resolve.doh import QUERY_BLOCK
from proxy.resolve.dot import DotResolver

NAME = "dot.famous.lab"
BOOT = "127.53.4.1"
V4 = ipaddress.ip_address("127.60.0.1")
V6 = ipaddress.ip_address("::1")


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


@dataclass
class DotServer:
    """RFC 7858 framing over TLS; answers from a Zone, each in its own task (out of order)."""

    ca: LabCA
    close_after: int | None = None  # drop the connection after N answers
    delays: dict[str, float] = field(default_factory=dict)  # qname -> seconds
    zone: Zone = field(
        default_factory=lambda: (
            Zone().add("www.site.lab", "127.60.0.1", "::1").add("slow.site.lab", "127.60.0.3")
        )
    )
    connections: int = 0
    queries: list[dns.message.Message] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    port: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        tls = self.ca.issue(NAME).server_context()
        listeners = await trio.open_tcp_listeners(0, host=BOOT)
        self.port = listeners[0].socket.getsockname()[1]
        ssl_listeners = [trio.SSLListener(lst, tls, https_compatible=False) for lst in listeners]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self.handle, ssl_listeners, handler_nursery=nursery)

    async def handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.connections += 1
        answers = 0
        lock = trio.Lock()
        try:
            async with trio.open_nursery() as nursery:

                async def reply(query: dns.message.Message) -> None:
                    nonlocal answers
                    await trio.sleep(self.delays.get(query.question[0].name.to_text(True), 0))
                    wire = self.zone.answer(query, QueryContext(("127.0.0.1", 0), "tcp")).to_wire()
                    async with lock:
                        await stream.send_all(len(wire).to_bytes(2, "big") + wire)
                    self.answered.append(query.question[0].name.to_text(True))
                    answers += 1
                    if self.close_after is not None and answers >= self.close_after:
                        nursery.cancel_scope.cancel()

                buf = bytearray()
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    buf += data
                    while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                        size = int.from_bytes(buf[:2], "big")
                        query = dns.message.from_wire(bytes(buf[2 : 2 + size]))
                        del buf[: 2 + size]
                        self.queries.append(query)
                        nursery.start_soon(reply, query)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a client that failed the handshake or went away
        finally:
            await trio.aclose_forcefully(stream)


async def start(nursery: trio.Nursery, ca: LabCA, **kwargs: object) -> DotServer:
    server = DotServer(ca, **kwargs)  # type: ignore[arg-type]
    await nursery.start(server.serve)
    return server


async def test_dot_resolves_padded_queries(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start(nursery, ca)
    async with DotResolver(NAME, [BOOT], server.port, cadata=ca.cert_pem) as dot:
        assert await dot.resolve("www.site.lab") == [V4, V6]
        client_query = dns.message.make_query("www.site.lab", "A")
        client_query.id = 777
        assert (await dot.forward(client_query)).id == 777
    for query in server.queries:
        assert any(o.otype == dns.edns.OptionType.PADDING for o in query.options)
        assert len(query.to_wire()) % QUERY_BLOCK == 0


async def test_dot_reuses_one_connection_with_out_of_order_answers(
    nursery: trio.Nursery, ca: LabCA
) -> None:
    server = await start(nursery, ca, delays={"slow.site.lab": 0.1})
    async with DotResolver(NAME, [BOOT], server.port, cadata=ca.cert_pem) as dot:
        results: dict[str, list[object]] = {}

        async def one(host: str) -> None:
            results[host] = list(await dot.resolve(host))

        async with trio.open_nursery() as inner:
            inner.start_soon(one, "slow.site.lab")
            await trio.sleep(0.01)
            inner.start_soon(one, "www.site.lab")
        for _ in range(3):
            await dot.resolve("www.site.lab")
        assert dot.connections_opened == 1
    assert results == {
        "slow.site.lab": [ipaddress.ip_address("127.60.0.3")],
        "www.site.lab": [V4, V6],
    }
    assert server.answered.index("www.site.lab") < server.answered.index("slow.site.lab")
    assert server.connections == 1
    assert len({q.id for q in server.queries[:4]}) == 4  # random, distinct IDs in flight


async def test_dot_reconnects_after_the_server_closes(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start(nursery, ca, close_after=2)
    async with DotResolver(NAME, [BOOT], server.port, cadata=ca.cert_pem) as dot:
        for _ in range(3):
            assert await dot.resolve("www.site.lab") == [V4, V6]
        assert dot.connections_opened >= 3
    assert server.connections >= 3


async def test_dot_rejects_wrong_ca_and_wrong_pin(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start(nursery, ca)
    stranger = LabCA.create("another CA")
    async with DotResolver(NAME, [BOOT], server.port, cadata=stranger.cert_pem) as dot:
        with pytest.raises(ResolveError, match="certificate"):
            await dot.resolve("www.site.lab")
    pin = "B" * 43 + "="
    async with DotResolver(NAME, [BOOT], server.port, cadata=ca.cert_pem, pin_sha256=pin) as dot:
        with pytest.raises(ResolveError, match="pin"):
            await dot.resolve("www.site.lab")
    assert server.queries == []
