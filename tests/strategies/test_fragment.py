"""The fragment strategies against the censor lab, on real loopback sockets.

For every built-in variant, every reassembly mode of an SNI-reset censor and several hellos
(Chromium-like ~1.8 KB with the name early or late, curl's 517 bytes, one the client already cut
into two records): which variants get through. Full reassembly defeats them all (the negative
control) and a plain connection is blocked everywhere. Real TLS handshakes complete through each
variant, the server's TCP receives exactly the planned bytes, and curl through the real app
recovers a blocked site with the built-in ``fragment`` policy, also for a 1.8 KB hello that
arrives in two reads.
"""

from __future__ import annotations

import functools
import ipaddress
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import hypothesis
import pytest
import trio
from hypothesis import strategies as st

from proxy.config import parse_config
from proxy.errors import UpstreamError
from proxy.inbound.base import Target
from proxy.lab.ca import LabCA
from proxy.lab.clock import SystemClock
from proxy.lab.middlebox import Middlebox
from proxy.lab.origin import OriginServer
from proxy.lab.rules import Action, CensorEngine, HttpHost, Reassembly, Rule, Sni
from proxy.lab.scenarios import RunningSidestep, open_sidestep
from proxy.lab.world import BLOCKED, Lab, open_lab
from proxy.net.stream import TcpStream
from proxy.protocols.splits import plan_fragments
from proxy.protocols.tls_hello import build_client_hello, hello_layout, parse_client_hello
from proxy.route.router import build_strategy
from proxy.routerconfig import BUILTIN_POLICIES, BUILTIN_STRATEGIES
from proxy.strategies.base import Strategy
from proxy.strategies.direct import DirectStrategy
from proxy.strategies.fragment import FragmentStrategy, NotApplicable

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux tricks")

NAMES = ("blocked.test", "fine.test")
ORIGIN_IP, PUBLIC_IP = "127.0.32.1", "127.0.32.2"
TLS_VARIANTS = ("tls-record-split", "tcp-segment-split", "tls-record-and-segment", "oob",
                "disorder")  # fmt: skip
NONE, FIRST, FULL = Reassembly.NONE, Reassembly.FIRST_RECORD, Reassembly.FULL

#: which variants an SNI-reset censor lets through, per reassembly mode
GETS_THROUGH: dict[str, set[Reassembly]] = {
    "direct": set(),
    # records travel in one segment: per-segment inspection still joins them
    "tls-record-split": {FIRST},
    # cut inside the name only: a censor that joins the first record's segments reads it
    "tcp-segment-split": {NONE},
    "tls-record-and-segment": {NONE, FIRST},
    # the censor honours the urgent pointer, so it reads the real hello once it gathers records
    "oob": {NONE},
    # on loopback the low-TTL piece is delivered: this is a split after byte 1
    "disorder": {NONE, FIRST},
}


def hellos() -> dict[str, bytes]:
    chromium = {"key_share_size": 1216, "grease": True, "ech": True, "shuffle_seed": 7}
    return {
        "chromium-sni-early": build_client_hello("blocked.test", sni_index=0, **chromium),
        "chromium-sni-late": build_client_hello("blocked.test", sni_index=-1, **chromium),
        "curl-517": build_client_hello("blocked.test", pad_to=512),
        "two-records": build_client_hello("blocked.test", record_sizes=(700,), **chromium),
    }


HELLOS = hellos()


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


def strategy(name: str, **changes: object) -> FragmentStrategy:
    cfg = next(c for c in BUILTIN_STRATEGIES if c.name == name)
    built = build_strategy(cfg, DirectStrategy())
    assert isinstance(built, FragmentStrategy)
    return replace(built, **changes)  # type: ignore[arg-type]


def any_strategy(name: str) -> Strategy:
    return DirectStrategy() if name == "direct" else strategy(name)


@asynccontextmanager
async def censored(
    ca: LabCA, *rules: Rule, urgent_inline: bool = False, tls: bool = True
) -> AsyncIterator[Middlebox]:
    """An origin for NAMES behind a middlebox running ``rules``."""
    origin = OriginServer("origin", tls=ca.issue(*NAMES).server_context() if tls else None)
    engine = CensorEngine(list(rules), clock=SystemClock())
    async with trio.open_nursery() as nursery:
        upstream = await nursery.start(origin.serve, ORIGIN_IP, 0)
        box = Middlebox(engine, listen=(PUBLIC_IP, 0), upstream=upstream,
                        urgent_inline=urgent_inline)  # fmt: skip
        await nursery.start(box.serve)
        yield box
        nursery.cancel_scope.cancel()


def sni_reset(mode: Reassembly) -> Rule:
    return Rule("sni", Sni("blocked.test"), Action.reset(), reassembly=mode)


def paced(s: Strategy, box: Middlebox) -> Strategy:
    """``s`` waiting, between pieces, until the middlebox has read the piece on its own.

    The strategy already waits until the kernel has sent each piece; on loopback the lab, in
    this same process, must also have had its turn to read it before the next one arrives.
    """
    if not isinstance(s, FragmentStrategy):
        return s
    index = len(box.flows)

    async def read_by_box(_stream: TcpStream, i: int) -> None:
        flow = await box.wait_flow(index)
        await flow.wait_segments(i + 1)

    return replace(s, after_piece=read_by_box)


async def first_answer(s: Strategy, box: Middlebox, flight: bytes) -> bytes | None:
    """The first bytes the server answers ``flight`` with, or None when the censor cut in."""
    assert box.address is not None
    target = Target("blocked.test", box.address[1])
    with trio.fail_after(10):
        try:
            stream = await paced(s, box).connect(target, [ipaddress.ip_address(PUBLIC_IP)], flight)
        except (UpstreamError, OSError, trio.BrokenResourceError):
            return None
        async with stream:
            try:
                return await stream.receive_some(4096) or None
            except (OSError, trio.BrokenResourceError):
                return None


def is_server_hello(data: bytes | None) -> bool:
    return data is not None and data[0] == 0x16 and data[5] == 0x02


# --- the matrix ----------------------------------------------------------------------------------


@linux_only
@pytest.mark.parametrize("hello", list(HELLOS))
@pytest.mark.parametrize("mode", [NONE, FIRST, FULL], ids=lambda m: m.value)
@pytest.mark.parametrize("variant", ["direct", *TLS_VARIANTS])
async def test_fragment_variant_against_sni_reset(
    ca: LabCA, variant: str, mode: Reassembly, hello: str
) -> None:
    async with censored(ca, sni_reset(mode)) as box:
        answer = await first_answer(any_strategy(variant), box, HELLOS[hello])
        through = mode in GETS_THROUGH[variant]
        assert is_server_hello(answer) == through, (variant, mode, hello, answer)
        assert len(box.engine.hits(name="sni")) == int(not through)
        # the censor read the pieces one by one (records-only sends them in one write)
        one_write = variant in ("direct", "tls-record-split")
        assert (box.flows[0].segments >= 2) == (not one_write) or not through


@linux_only
@pytest.mark.parametrize("mode", [NONE, FIRST, FULL], ids=lambda m: m.value)
async def test_fragment_oob_fools_a_censor_that_reads_urgent_bytes_inline(
    ca: LabCA, mode: Reassembly
) -> None:
    async with censored(ca, sni_reset(mode), urgent_inline=True) as box:
        for name, hello in HELLOS.items():
            answer = await first_answer(strategy("oob"), box, hello)
            assert is_server_hello(answer), name  # the origin still got the exact hello
        assert box.engine.hits() == []
        assert all(f.c2s_dropped == 1 for f in box.flows)  # one urgent byte per flow
        # the control: a plain hello is still reset by the same censor
        assert await first_answer(DirectStrategy(), box, HELLOS["curl-517"]) is None


# --- real TLS through each variant -----------------------------------------------------------


class Deferred(trio.abc.Stream):
    """Opens the strategy's connection with the TLS client's first write, its ClientHello (as
    the dispatcher does with a client's first flight)."""

    def __init__(self, opener: Callable[[bytes], Awaitable[trio.abc.HalfCloseableStream]]) -> None:
        self.opener = opener
        self.inner: trio.abc.HalfCloseableStream | None = None
        self.hello = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.inner is None:
            self.hello = bytes(data)
            self.inner = await self.opener(self.hello)
            return
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        if self.inner is not None:
            await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        assert self.inner is not None
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()


async def https_get(ca: LabCA, s: Strategy, box: Middlebox, name: str) -> tuple[bytes, bytes]:
    """A real TLS client (Python's ssl) fetching / from ``name`` through ``s``: (body, hello)."""
    assert box.address is not None
    target = Target(name, box.address[1])
    raw = Deferred(lambda hello: paced(s, box).connect(
        target, [ipaddress.ip_address(PUBLIC_IP)], hello))  # fmt: skip
    tls = trio.SSLStream(raw, ca.client_context(), server_hostname=name, https_compatible=True)
    with trio.fail_after(10):
        async with tls:
            await tls.send_all(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                               .encode())  # fmt: skip
            out = bytearray()
            while data := await tls.receive_some(65536):
                out += data
    return bytes(out).split(b"\r\n\r\n", 1)[1], raw.hello


@linux_only
@pytest.mark.parametrize("variant", TLS_VARIANTS)
async def test_fragment_real_tls_handshake_through_each_variant(ca: LabCA, variant: str) -> None:
    mode = next(iter(GETS_THROUGH[variant]))
    async with censored(ca, sni_reset(mode)) as box:
        body, hello = await https_get(ca, strategy(variant), box, "blocked.test")
        assert body == b"hello from origin (host blocked.test)\n"
        parsed = parse_client_hello(hello)
        assert parsed is not None and parsed.sni == "blocked.test"
        assert box.engine.hits() == []
        # the twin: an uncensored name through the same variant works just the same
        body, _ = await https_get(ca, strategy(variant), box, "fine.test")
        assert body == b"hello from origin (host fine.test)\n"


async def capture(flight: bytes, s: FragmentStrategy) -> bytes:
    """What the server's TCP hands its application when ``s`` sends ``flight``."""
    received = bytearray()
    done = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(65536):
            received.extend(data)
        done.set()

    async with trio.open_nursery() as nursery:
        serve_tcp = functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1")
        [listener] = await nursery.start(serve_tcp)
        port = listener.socket.getsockname()[1]
        stream = await s.connect(Target("x.test", port), [ipaddress.ip_address("127.0.0.1")],
                                 flight)  # fmt: skip
        await stream.send_eof()  # type: ignore[attr-defined]
        with trio.fail_after(10):
            await done.wait()
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return bytes(received)


@linux_only
@pytest.mark.parametrize("variant", TLS_VARIANTS)
async def test_fragment_server_receives_the_planned_bytes(variant: str) -> None:
    s = strategy(variant)
    for name, hello in HELLOS.items():
        got = await capture(hello + b"\x17\x03\x03\x00\x01Z", s)  # early data rides along
        assert got == plan_fragments(hello + b"\x17\x03\x03\x00\x01Z", s.policy).data, name
        layout_in, layout_out = hello_layout(hello), hello_layout(got)
        assert layout_in is not None and layout_out is not None
        message = b"".join(hello[h + 5 : h + 5 + n] for h, n in layout_in.records)
        assert b"".join(got[h + 5 : h + 5 + n] for h, n in layout_out.records) == message
        assert got.endswith(b"\x17\x03\x03\x00\x01Z")
        assert (got == hello + b"\x17\x03\x03\x00\x01Z") == (not s.policy.records), name


# --- HTTP ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [NONE, FIRST, FULL], ids=lambda m: m.value)
async def test_fragment_http_host_mix_against_a_host_filter(ca: LabCA, mode: Reassembly) -> None:
    rule = Rule("host", HttpHost("blocked.test"), Action.blockpage(), reassembly=mode)
    request = b"GET / HTTP/1.1\r\nHost: blocked.test\r\nConnection: close\r\n\r\n"
    async with censored(ca, rule, tls=False) as box:
        for name, expect_through in (("direct", False), ("http-host-mix", mode is NONE),
                                     ("tcp-segment-split", mode is NONE)):  # fmt: skip
            answer = await first_answer(any_strategy(name), box, request)
            assert answer is not None
            assert answer.startswith(b"HTTP/1.1 200") == expect_through, (name, answer[:40])
    # the origin (h11) served the mixed-case, tab-spaced Host like any other request


def test_fragment_is_not_applicable_to_what_it_cannot_change() -> None:
    request = b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n"
    with pytest.raises(NotApplicable, match=r"tls-record-split.*http"):
        strategy("tls-record-split").segments_for(request)
    with pytest.raises(NotApplicable, match=r"http-host-mix.*tls"):
        strategy("http-host-mix").segments_for(build_client_hello(None))
    with pytest.raises(NotApplicable):
        strategy("tcp-segment-split").segments_for(b"")
    # disorder and oob need two pieces at least
    with pytest.raises(NotApplicable):
        strategy("oob").segments_for(build_client_hello(None))
    [first, *_] = strategy("disorder").segments_for(HELLOS["curl-517"])
    assert first.ttl == 1 and first.data == b"\x16"
    [first, *_] = strategy("oob").segments_for(HELLOS["curl-517"])
    assert first.urgent == b"\x00"


def test_fragment_builtin_policy_order() -> None:
    [policy] = BUILTIN_POLICIES
    assert policy.name == "fragment"
    expected = ["direct", "tls-record-split", "tcp-segment-split", "tls-record-and-segment",
                "http-host-mix"]  # fmt: skip
    if sys.platform.startswith("linux"):
        expected += ["oob", "disorder"]
    assert list(policy.strategies) == expected


# --- the real app ----------------------------------------------------------------------------


FRAGMENT_CONFIG = """
[router]
default_policy = "fragment"
"""


@asynccontextmanager
async def sidestep_in_tspu(ca: LabCA) -> AsyncIterator[tuple[Lab, RunningSidestep]]:
    """The ru-tspu lab (first-record SNI reset) and sidestep using the built-in policy."""
    config = parse_config(FRAGMENT_CONFIG, "<test>")
    async with open_lab("ru-tspu", ca=ca) as lab, open_sidestep(lab, config) as side:
        yield lab, side


@linux_only
async def test_fragment_policy_recovers_a_first_record_censored_site_with_curl(
    ca: LabCA,
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    async with sidestep_in_tspu(ca) as (lab, side):
        ip, port = lab.address(BLOCKED)
        with trio.fail_after(30):
            result = await trio.run_process(
                [curl, "--silent", "--show-error", "--max-time", "20",
                 "--proxy", f"socks5://{side.address[0]}:{side.address[1]}",
                 "--resolve", f"{BLOCKED}:{port}:{ip}", "--cacert", str(lab.ca_file),
                 lab.url(BLOCKED)],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert b"hello from" in result.stdout
        with trio.fail_after(5):
            while not side.connections.lines:
                await trio.sleep(0.01)
        [line] = side.connections.lines.values()
        # the first plain attempt was reset; the first trick on the list got through
        assert line["strategy"].startswith("tls-record-split (after direct: ")
        assert line["policy"] == "fragment"


async def socks5_connect(address: tuple[str, int], ip: str, port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"\x05\x01\x00")
    assert await stream.receive_some(2) == b"\x05\x00"
    await stream.send_all(b"\x05\x01\x00\x01" + ipaddress.ip_address(ip).packed
                          + port.to_bytes(2, "big"))  # fmt: skip
    reply = await stream.receive_some(10)
    assert reply[:2] == b"\x05\x00", reply
    return stream


@linux_only
async def test_fragment_policy_gathers_a_hello_sent_in_two_reads(ca: LabCA) -> None:
    hello = build_client_hello(BLOCKED, key_share_size=1216, grease=True, ech=True,
                               shuffle_seed=11, sni_index=-1)  # fmt: skip
    async with sidestep_in_tspu(ca) as (lab, side):
        with trio.fail_after(20):
            stream = await socks5_connect(side.address, *lab.address(BLOCKED))
            async with stream:
                await stream.send_all(hello[:1200])
                await trio.sleep(0.05)  # a browser's second segment comes a moment later
                await stream.send_all(hello[1200:])
                answer = await stream.receive_some(4096)
    assert is_server_hello(answer)


@hypothesis.given(
    st.one_of(
        st.binary(max_size=64),
        st.builds(lambda tail: HELLO_FOR_GLANCE[:40] + tail, st.binary(max_size=16)),
        st.builds(
            lambda m, t: m + b" / HTTP/1.1\r\n" + t,
            st.sampled_from([b"GET", b"POST", b"get"]),
            st.binary(max_size=16),
        ),
    )
)
def test_fragment_glance_never_rules_out_a_flight_a_variant_would_change(flight: bytes) -> None:
    # reframable() is a cheap pre-check: False must mean no built-in variant applies
    from proxy.strategies.fragment import reframable

    if reframable(flight):
        return
    for cfg in BUILTIN_STRATEGIES:
        strategy = build_strategy(cfg, DirectStrategy())
        if isinstance(strategy, FragmentStrategy):
            assert plan_fragments(flight, strategy.policy).protocol == "other"
            assert not strategy.applies_to(flight)


HELLO_FOR_GLANCE = build_client_hello(sni="glance.lab")
