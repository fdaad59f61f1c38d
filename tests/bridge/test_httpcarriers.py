"""The bridge's split-HTTP and polling carriers on the server: the hub behind the web loop.

Requests are written by hand over trio's memory streams into the same web server loop the
bridge runs (:func:`proxy.bridge.carriers.accept_websocket`), so each test says exactly which
bytes a client or a probe sends.
"""

from __future__ import annotations

import re
import time

import pytest
import trio
import trio.testing

from proxy.bridge.carriers import accept_websocket
from proxy.bridge.httpcarriers import (
    CARRIER_EXPIRY,
    POST_MAX,
    REORDER_WINDOW,
    ServerCarrier,
    WebCarrierHub,
    client_address,
)
from proxy.protocols.webcarrier import CarrierKind, build_target, make_carrier_id

SECRET = b"s" * 32
PATH = "/hidden-path"


class Hub:
    """A hub whose new carriers are only collected (no bridge session runs on them)."""

    def __init__(self) -> None:
        self.started: list[tuple[ServerCarrier, str]] = []
        self.hub = WebCarrierHub(SECRET, PATH, self._start, window=120.0)

    def _start(self, carrier: ServerCarrier, client: str) -> None:
        self.started.append((carrier, client))

    def new_id(self, kind: CarrierKind, now: float | None = None) -> str:
        return make_carrier_id(SECRET, kind, time.time() if now is None else now, b"12345678")


async def connect(nursery: trio.Nursery, hub: WebCarrierHub) -> trio.abc.Stream:
    """A client connection to the bridge's web loop."""
    client, server = trio.testing.memory_stream_pair()

    async def serve() -> None:
        async with server:
            await accept_websocket(server, PATH, cover_page=False, web=hub, peer="127.0.0.1")

    nursery.start_soon(serve)
    return client


def request(method: str, target: str, body: bytes = b"", *, close: bool = True) -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if method == "POST" else ""
    connection = "Connection: close\r\n" if close else ""
    head = f"{method} {target} HTTP/1.1\r\nHost: bridge.example\r\n{length}{connection}"
    return f"{head}X-Forwarded-For: 198.51.100.7\r\n\r\n".encode() + body


async def ask(nursery: trio.Nursery, hub: WebCarrierHub, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; everything the server says until it closes,
    without the Date header."""
    stream = await connect(nursery, hub)
    await stream.send_all(data)
    answer = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some():
            answer += chunk
    return re.sub(rb"\r\nDate: [^\r]*", b"", answer)


async def test_uploads_out_of_order_are_read_in_order() -> None:
    hub = Hub()
    carrier_id = hub.new_id(CarrierKind.SPLIT)
    async with trio.open_nursery() as nursery:
        later = await ask(
            nursery, hub.hub, request("POST", build_target(PATH, carrier_id, 1), b"world")
        )
        assert later.startswith(b"HTTP/1.1 200 ")
        first = await ask(
            nursery, hub.hub, request("POST", build_target(PATH, carrier_id, 0), b"hello ")
        )
        assert first.startswith(b"HTTP/1.1 200 ")
        # a repeat of a piece already delivered is accepted and dropped
        again = await ask(
            nursery, hub.hub, request("POST", build_target(PATH, carrier_id, 0), b"hello ")
        )
        assert again == first
        [(carrier, client)] = hub.started
        assert client == "198.51.100.7"  # from X-Forwarded-For: the peer is loopback
        assert await carrier.receive_some() == b"hello world"
        nursery.cancel_scope.cancel()


async def test_download_streams_what_the_bridge_sends_until_the_carrier_ends() -> None:
    hub = Hub()
    carrier_id = hub.new_id(CarrierKind.SPLIT)
    async with trio.open_nursery() as nursery:
        stream = await connect(nursery, hub.hub)
        await stream.send_all(request("GET", build_target(PATH, carrier_id), close=False))
        head = await stream.receive_some()
        assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
        [(carrier, _)] = hub.started
        await carrier.send_all(b"downstream bytes")
        assert await stream.receive_some() == b"10\r\ndownstream bytes\r\n"
        # a second download of the same carrier is a probe: 404
        second = await ask(nursery, hub.hub, request("GET", build_target(PATH, carrier_id)))
        assert second.startswith(b"HTTP/1.1 404 ")
        await carrier.aclose()
        rest = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                rest += chunk
        assert rest == b"0\r\n\r\n"
        assert carrier_id not in hub.hub.carriers
        nursery.cancel_scope.cancel()


async def test_a_lost_download_breaks_the_carrier() -> None:
    hub = Hub()
    carrier_id = hub.new_id(CarrierKind.SPLIT)
    async with trio.open_nursery() as nursery:
        stream = await connect(nursery, hub.hub)
        await stream.send_all(request("GET", build_target(PATH, carrier_id), close=False))
        await stream.receive_some()
        [(carrier, _)] = hub.started
        await stream.aclose()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await carrier.receive_some()
        nursery.cancel_scope.cancel()


async def test_polls_carry_both_ways_and_a_repeated_poll_gets_the_same_answer() -> None:
    hub = Hub()
    carrier_id = hub.new_id(CarrierKind.POLL)
    async with trio.open_nursery() as nursery:
        first = await ask(
            nursery, hub.hub, request("POST", build_target(PATH, carrier_id, 0), b"up")
        )
        assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"\r\n\r\n")
        [(carrier, _)] = hub.started
        assert await carrier.receive_some() == b"up"
        await carrier.send_all(b"down")
        second = await ask(nursery, hub.hub, request("POST", build_target(PATH, carrier_id, 1)))
        assert second.endswith(b"\r\n\r\ndown")
        repeat = await ask(
            nursery, hub.hub, request("POST", build_target(PATH, carrier_id, 1), b"x")
        )
        assert repeat == second
        assert carrier.inbox.ready == 0  # the repeat's body was not taken again
        for seq in (0, 3):  # too old, and skipping ahead: 404
            wrong = await ask(
                nursery, hub.hub, request("POST", build_target(PATH, carrier_id, seq))
            )
            assert wrong.startswith(b"HTTP/1.1 404 ")
        nursery.cancel_scope.cancel()


async def test_malformed_and_unauthenticated_requests_get_the_ordinary_404() -> None:
    hub = Hub()
    stale = hub.new_id(CarrierKind.SPLIT, time.time() - 3600)
    forged = make_carrier_id(b"x" * 32, CarrierKind.SPLIT, time.time(), b"12345678")
    poll = hub.new_id(CarrierKind.POLL)
    split = hub.new_id(CarrierKind.SPLIT)
    async with trio.open_nursery() as nursery:
        control = await ask(nursery, hub.hub, request("GET", "/nothing-here"))
        assert control.startswith(b"HTTP/1.1 404 ")
        probes = [
            request("GET", PATH),
            request("POST", PATH, b"data"),
            request("GET", build_target(PATH, stale)),
            request("POST", build_target(PATH, forged, 0), b"data"),
            request("GET", build_target(PATH, poll)),  # polls are POSTs
            request("POST", build_target(PATH, poll, 5), b"x"),  # a new poll starts at 0
            request("POST", build_target(PATH, split)),  # an upload needs its number
            request("GET", build_target(PATH, split, 0)),  # a download has none
            request("PUT", build_target(PATH, split, 0), b"x"),
            request("GET", build_target(PATH, split) + "?x=1"),
        ]
        for probe in probes:
            answer = await ask(nursery, hub.hub, probe)
            assert answer.replace(b"Connection: close", b"") == control.replace(
                b"Connection: close", b""
            ), probe
        assert hub.started == [] and hub.hub.carriers == {}
        nursery.cancel_scope.cancel()


async def test_memory_per_carrier_is_bounded() -> None:
    hub = Hub()
    carrier_id = hub.new_id(CarrierKind.SPLIT)
    async with trio.open_nursery() as nursery:
        ahead = build_target(PATH, carrier_id, REORDER_WINDOW)
        opened = await ask(
            nursery, hub.hub, request("POST", build_target(PATH, carrier_id, 1), b"x")
        )
        assert opened.startswith(b"HTTP/1.1 200 ")
        # beyond the reorder window: not ours (404), nothing held
        assert (await ask(nursery, hub.hub, request("POST", ahead, b"y"))).startswith(
            b"HTTP/1.1 404"
        )
        # a body over the limit: the connection is closed without an answer
        too_big = request("POST", build_target(PATH, carrier_id, 2), bytes(POST_MAX + 1))
        assert await ask(nursery, hub.hub, too_big) == b""
        [(carrier, _)] = hub.started
        assert carrier.inbox.held == 1
        nursery.cancel_scope.cancel()


async def test_an_abandoned_carrier_expires(autojump_clock: trio.testing.MockClock) -> None:
    hub = Hub()
    carrier_id = hub.new_id(CarrierKind.POLL)
    async with trio.open_nursery() as nursery:
        await ask(nursery, hub.hub, request("POST", build_target(PATH, carrier_id, 0), b"hi"))
        [(carrier, _)] = hub.started
        assert await carrier.receive_some() == b"hi"
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError, match="went away"):
            await carrier.receive_some()
        assert trio.current_time() - start >= CARRIER_EXPIRY - 1
        await carrier.aclose()
        late = await ask(nursery, hub.hub, request("POST", build_target(PATH, carrier_id, 1)))
        assert late.startswith(b"HTTP/1.1 404 ")
        nursery.cancel_scope.cancel()


def test_client_address_trusts_forwarded_for_only_from_loopback() -> None:
    assert client_address("127.0.0.1", b"10.0.0.1, 198.51.100.7") == "198.51.100.7"
    assert client_address("203.0.113.9", b"198.51.100.7") == "203.0.113.9"
    assert client_address("127.0.0.1", b"not-an-address") == "127.0.0.1"
    assert client_address("-", b"198.51.100.7") == "-"
