"""The lab's DoH server (RFC 8484 over HTTP/2), checked with a tiny h2 client and with curl."""

from __future__ import annotations

import base64
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio

from proxy.lab.ca import LabCA
from proxy.lab.dnsserver import Address, DnsServer, QueryContext, Zone
from proxy.lab.dohserver import DohFaults, DohServer, decode_get_param, min_ttl
from proxy.lab.origin import OriginServer

FAMOUS = "dns.famous.lab"
SMALL = "doh.small.lab"
BIG_COUNT = 1500  # about 24 KB of A records: needs many DATA frames and window updates


def lab_zone() -> Zone:
    zone = Zone(ttl=300, negative_ttl=45)
    zone.add("www.site.lab", "127.60.0.1", "::1")
    zone.add("short.site.lab", "127.60.0.2", ttl=17)
    zone.add("big.site.lab", *(f"127.70.{i // 256}.{i % 256}" for i in range(BIG_COUNT)))
    return zone


# --- a tiny HTTP/2 client -------------------------------------------------------------------


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    reset_code: int | None = None  # set when the server reset the stream
    refused: bool = False  # the connection went away before an answer
    done: trio.Event = field(default_factory=trio.Event)

    def message(self) -> dns.message.Message:
        return dns.message.from_wire(bytes(self.body))


class H2Client:
    """Just enough HTTP/2 to talk to the DoH server: concurrent requests, flow control."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], conn: h2.connection.H2Connection):
        self.stream = stream
        self.conn = conn
        self.responses: dict[int, Response] = {}
        self.goaway: tuple[int, int | None] | None = None  # (error code, last stream id)
        self.eof = False
        self.lock = trio.Lock()

    async def flush(self) -> None:
        async with self.lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def request(
        self, method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> Response:
        response = await self.send_request(method, path, headers, body)
        with trio.fail_after(5):
            await response.done.wait()
        return response

    async def send_request(
        self, method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> Response:
        """Send a request; its :class:`Response` completes later."""
        sid = self.conn.get_next_available_stream_id()
        response = self.responses[sid] = Response()
        request_headers = [
            (":method", method),
            (":scheme", "https"),
            (":authority", "doh"),
            (":path", path),
            *headers,
        ]
        self.conn.send_headers(sid, request_headers, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        await self.flush()
        return response

    async def get(self, query: dns.message.Message) -> Response:
        encoded = base64.urlsafe_b64encode(query.to_wire()).rstrip(b"=").decode()
        return await self.request(
            "GET", f"/dns-query?dns={encoded}", [("accept", "application/dns-message")]
        )

    async def post(
        self, query: dns.message.Message, ctype: str = "application/dns-message"
    ) -> Response:
        return await self.request("POST", "/dns-query", [("content-type", ctype)], query.to_wire())

    async def read_loop(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                for event in self.conn.receive_data(data):
                    self.on_event(event)
                await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.eof = True
        for response in self.responses.values():
            if not response.done.is_set():
                response.refused = True
                response.done.set()

    def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            headers = dict(event.headers)
            self.responses[event.stream_id].status = int(headers.pop(":status"))
            self.responses[event.stream_id].headers = headers
        elif isinstance(event, h2.events.DataReceived):
            self.responses[event.stream_id].body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.responses[event.stream_id].done.set()
        elif isinstance(event, h2.events.StreamReset):
            self.responses[event.stream_id].reset_code = event.error_code
            self.responses[event.stream_id].done.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = (event.error_code, event.last_stream_id)
            for sid, response in self.responses.items():
                if event.last_stream_id is not None and sid > event.last_stream_id:
                    response.refused = True
                    response.done.set()


@asynccontextmanager
async def h2_client(
    addr: Address, ca: LabCA, server_name: str, *, window: int | None = None
) -> AsyncIterator[H2Client]:
    tcp = await trio.open_tcp_stream(*addr)
    ctx = ca.client_context()
    ctx.set_alpn_protocols(["h2"])
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_name)
    try:
        await stream.do_handshake()
        assert stream.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        if window is not None:
            conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        conn.initiate_connection()
        client = H2Client(stream, conn)
        await client.flush()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.read_loop)
            yield client
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


async def start_doh(
    nursery: trio.Nursery, ca: LabCA, *, name: str = SMALL, faults: DohFaults | None = None
) -> DohServer:
    server = DohServer(lab_zone(), ca.issue(name), ("127.53.1.1", 0), faults=faults or DohFaults())
    await nursery.start(server.serve)
    return server


def addr_of(server: DohServer | DnsServer) -> Address:
    assert server.address is not None
    return server.address


def rrsets(message: dns.message.Message) -> list[str]:
    return sorted(rrset.to_text() for rrset in message.answer)


# --- tests ----------------------------------------------------------------------------------


async def test_dohserver_get_and_post_match_the_plain_server(
    nursery: trio.Nursery, ca: LabCA
) -> None:
    doh = await start_doh(nursery, ca)
    plain = DnsServer(lab_zone(), ("127.53.0.1", 0))
    plain_addr = await nursery.start(plain.serve)
    for name, rdtype in [("www.site.lab", "A"), ("www.site.lab", "AAAA"), ("nope.lab", "A")]:
        query = dns.message.make_query(name, rdtype)
        query.id = 0  # RFC 8484 4.1: DoH clients use ID 0
        expected = await trio.to_thread.run_sync(
            partial(dns.query.udp, query, plain_addr[0], port=plain_addr[1], timeout=3)
        )
        async with h2_client(addr_of(doh), ca, SMALL) as client:
            got = [await client.get(query), await client.post(query)]
        for response in got:
            assert response.status == 200
            assert response.headers["content-type"] == "application/dns-message"
            message = response.message()
            assert message.id == 0
            assert message.rcode() == expected.rcode()
            assert rrsets(message) == rrsets(expected)
    assert [(e.method, e.qname, e.status) for e in doh.log[:2]] == [
        ("GET", "www.site.lab", 200),
        ("POST", "www.site.lab", 200),
    ]


async def test_dohserver_cache_control_is_the_smallest_ttl(
    nursery: trio.Nursery, ca: LabCA
) -> None:
    doh = await start_doh(nursery, ca)
    async with h2_client(addr_of(doh), ca, SMALL) as client:
        short = await client.post(dns.message.make_query("short.site.lab", "A"))
        normal = await client.post(dns.message.make_query("www.site.lab", "A"))
        negative = await client.post(dns.message.make_query("nope.lab", "A"))
    assert short.headers["cache-control"] == "max-age=17"
    assert normal.headers["cache-control"] == "max-age=300"
    assert negative.headers["cache-control"] == "max-age=45"  # SOA minimum


async def test_dohserver_serves_concurrent_streams_on_one_connection(
    nursery: trio.Nursery, ca: LabCA
) -> None:
    doh = await start_doh(nursery, ca, faults=DohFaults(answer_delay=0.05))
    results: dict[int, Response] = {}
    async with h2_client(addr_of(doh), ca, SMALL) as client:

        async def ask(i: int) -> None:
            name = "www.site.lab" if i % 2 else "short.site.lab"
            query = dns.message.make_query(name, "A")
            results[i] = await (client.get(query) if i % 3 else client.post(query))

        with trio.fail_after(2):  # 12 answers delayed 50 ms each: only in parallel is it fast
            async with trio.open_nursery() as inner:
                for i in range(12):
                    inner.start_soon(ask, i)
    assert all(r.status == 200 for r in results.values())
    assert {r.message().answer[0].name.to_text() for r in results.values()} == {
        "www.site.lab.",
        "short.site.lab.",
    }
    assert len(doh.log) == 12
    assert len({e.client for e in doh.log}) == 1  # one connection


async def test_dohserver_flow_control_for_large_answers(nursery: trio.Nursery, ca: LabCA) -> None:
    doh = await start_doh(nursery, ca)
    async with h2_client(addr_of(doh), ca, SMALL, window=1024) as client:
        get = await client.get(dns.message.make_query("big.site.lab", "A"))
        post = await client.post(dns.message.make_query("big.site.lab", "A"))
    for response in (get, post):
        assert response.status == 200
        assert len(response.body) > 20000
        assert int(response.headers["content-length"]) == len(response.body)
        assert len(response.message().answer[0]) == BIG_COUNT


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        ("POST", "/dns-query", [("content-type", "text/plain")], "query", 415),
        ("POST", "/dns-query", [], "query", 415),
        ("POST", "/dns-query", [("content-type", "application/dns-message")], "garbage", 400),
        ("POST", "/dns-query", [("content-type", "application/dns-message")], "", 400),
        ("GET", "/dns-query?dns=***not*base64***", [], "", 400),
        ("GET", "/dns-query", [], "", 400),
        ("GET", "/dns-query?dns=AAAA", [], "", 400),  # valid base64, not DNS
        ("GET", "/other", [], "", 404),
        ("GET", "/", [], "", 404),
        ("PUT", "/dns-query", [], "", 405),
    ],
)
async def test_dohserver_rejects_bad_requests(
    nursery: trio.Nursery,
    ca: LabCA,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: str,
    status: int,
) -> None:
    doh = await start_doh(nursery, ca)
    wire = dns.message.make_query("www.site.lab", "A").to_wire()
    payload = {"query": wire, "garbage": b"\xff" * 7, "": b""}[body]
    async with h2_client(addr_of(doh), ca, SMALL) as client:
        response = await client.request(method, path, headers, payload)
        ok = await client.post(dns.message.make_query("www.site.lab", "A"))  # still serving
    assert response.status == status
    assert ok.status == 200
    assert doh.log[0].status == status and doh.log[0].qname is None


async def test_dohserver_goaway_after_n_requests(nursery: trio.Nursery, ca: LabCA) -> None:
    doh = await start_doh(nursery, ca, faults=DohFaults(goaway_after=2))
    query = dns.message.make_query("www.site.lab", "A")
    async with h2_client(addr_of(doh), ca, SMALL) as client:
        first = await client.post(query)
        second = await client.post(query)
        with trio.fail_after(3):
            while not client.eof:
                await trio.sleep(0.01)
    assert (first.status, second.status) == (200, 200)
    assert client.goaway == (h2.errors.ErrorCodes.NO_ERROR, 3)  # streams 1 and 3 were served


async def test_dohserver_goaway_cuts_streams_after_the_nth(
    nursery: trio.Nursery, ca: LabCA
) -> None:
    doh = await start_doh(nursery, ca, faults=DohFaults(goaway_after=1, answer_delay=0.05))
    query = dns.message.make_query("www.site.lab", "A")
    results: list[Response] = []
    async with h2_client(addr_of(doh), ca, SMALL) as client:

        async def ask() -> None:
            results.append(await client.post(query))

        async with trio.open_nursery() as inner:
            for _ in range(3):
                inner.start_soon(ask)
    assert sorted(r.status for r in results) == [0, 0, 200]
    assert sum(r.refused for r in results) == 2
    assert client.goaway is not None and client.goaway[1] == 1
    assert len(doh.log) == 1


async def test_dohserver_resets_chosen_requests(nursery: trio.Nursery, ca: LabCA) -> None:
    faults = DohFaults(
        reset_requests=frozenset({1}), reset_code=h2.errors.ErrorCodes.REFUSED_STREAM
    )
    doh = await start_doh(nursery, ca, faults=faults)
    query = dns.message.make_query("www.site.lab", "A")
    async with h2_client(addr_of(doh), ca, SMALL) as client:
        reset = await client.post(query)
        ok = await client.post(query)
    assert reset.reset_code == h2.errors.ErrorCodes.REFUSED_STREAM and reset.status == 0
    assert ok.status == 200
    assert [e.status for e in doh.log] == [0, 200]


async def test_dohserver_closes_abruptly_after_n_answers(nursery: trio.Nursery, ca: LabCA) -> None:
    doh = await start_doh(nursery, ca, faults=DohFaults(close_after=1))
    query = dns.message.make_query("www.site.lab", "A")
    async with h2_client(addr_of(doh), ca, SMALL) as client:
        ok = await client.post(query)
        with trio.fail_after(3):
            while not client.eof:
                await trio.sleep(0.01)
    assert ok.status == 200
    assert client.goaway is None  # no GOAWAY: the TCP connection just ends


async def test_dohserver_identity_comes_from_its_certificate(
    nursery: trio.Nursery, ca: LabCA
) -> None:
    famous = await start_doh(nursery, ca, name=FAMOUS)
    assert famous.names == (FAMOUS,)
    assert famous.url == f"https://{FAMOUS}:{addr_of(famous)[1]}/dns-query"
    async with h2_client(addr_of(famous), ca, FAMOUS) as client:
        assert (await client.get(dns.message.make_query("www.site.lab", "A"))).status == 200
    with pytest.raises(trio.BrokenResourceError):
        async with h2_client(addr_of(famous), ca, SMALL):
            pass  # pragma: no cover


def test_doh_decode_get_param() -> None:
    wire = dns.message.make_query("www.site.lab", "A").to_wire()
    encoded = base64.urlsafe_b64encode(wire).decode()
    assert decode_get_param("dns=" + encoded.rstrip("=")) == wire
    assert decode_get_param("dns=" + encoded) == wire  # padding tolerated
    assert decode_get_param("ct=x&dns=" + encoded.rstrip("=")) == wire
    assert decode_get_param("dns=a+b/") is None  # standard alphabet is not base64url
    assert decode_get_param("dns=x&dns=y") is None
    assert decode_get_param("") is None


def test_doh_min_ttl() -> None:
    zone = lab_zone()
    assert min_ttl(zone.answer(dns.message.make_query("short.site.lab", "A"))) == 17
    assert min_ttl(zone.answer(dns.message.make_query("nope.lab", "A"))) == 45
    empty = dns.message.make_response(dns.message.make_query("x.lab", "A"))
    empty.set_rcode(dns.rcode.SERVFAIL)
    assert min_ttl(empty) == 0


CURL = shutil.which("curl")


async def _curl_has_doh() -> bool:
    assert CURL is not None
    result = await trio.run_process([CURL, "--help", "all"], capture_stdout=True, check=False)
    return b"--doh-url" in result.stdout


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_curl_resolves_through_the_doh_server(
    nursery: trio.Nursery, ca: LabCA, tmp_path: Path
) -> None:
    if not await _curl_has_doh():
        pytest.skip("this curl has no --doh-url")
    origin = OriginServer("www.site.lab")
    origin_addr = await nursery.start(partial(origin.serve, "127.60.0.1", 0))
    doh = await start_doh(nursery, ca)
    cafile = ca.write_cert(tmp_path / "ca.pem")
    assert CURL is not None
    args = [
        CURL,
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        "--ipv4",
        "--cacert",
        str(cafile),
        "--resolve",
        f"{SMALL}:{addr_of(doh)[1]}:{addr_of(doh)[0]}",
        "--doh-url",
        doh.url,
        f"http://www.site.lab:{origin_addr[1]}/",
    ]
    result = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(b"hello from www.site.lab")
    assert ("POST", "www.site.lab", "A", 200) in [
        (e.method, e.qname, e.qtype, e.status) for e in doh.log
    ]


async def test_dohserver_leaves_dropped_queries_hanging(nursery: trio.Nursery, ca: LabCA) -> None:
    zone = lab_zone()

    def drop_some(query: dns.message.Message, ctx: QueryContext) -> dns.message.Message | None:
        return None if query.question[0].name.to_text() == "drop.lab." else zone.answer(query)

    doh = DohServer(drop_some, ca.issue(SMALL), ("127.53.1.2", 0))
    addr = await nursery.start(doh.serve)
    async with h2_client(addr, ca, SMALL) as client:
        wire = dns.message.make_query("drop.lab", "A").to_wire()
        dropped = await client.send_request(
            "POST", "/dns-query", [("content-type", "application/dns-message")], wire
        )
        ok = await client.post(dns.message.make_query("www.site.lab", "A"))
        assert ok.status == 200
        assert not dropped.done.is_set()  # answered later streams, never this one
    assert [(e.qname, e.status) for e in doh.log] == [("drop.lab", 0), ("www.site.lab", 200)]
