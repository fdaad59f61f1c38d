"""The resolver chain: order, racing, health per endpoint and back-off.

The logic tests use upstreams answering from a lab :class:`Zone` in-process (after a chosen
delay, or failing) under trio's autojump clock, so timings are exact and nothing sleeps for
real; the last tests run the chain over real loopback DoH servers from the lab.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import dns.message
import dns.rcode
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import DnsEndpointConfig, parse_config
from proxy.errors import ResolveError
from proxy.lab.ca import LabCA
from proxy.lab.dnsserver import QueryContext, Zone
from proxy.lab.dohserver import DohServer
from proxy.resolve.chain import (
    ChainMember,
    EndpointKey,
    HealthBook,
    ResolverChain,
    endpoint_members,
    secure_chain,
)

ZONE = Zone().add("site.lab", "127.60.0.1")
CTX = QueryContext(("127.0.0.1", 1), "udp")


class ZoneUpstream:
    """Answers from ``ZONE`` after ``delay`` seconds, or fails as told."""

    def __init__(self, delay: float = 0.0, *, fail: str | None = None, rcode: int | None = None):
        self.delay = delay
        self.fail = fail
        self.rcode = rcode
        self.asked = 0

    async def forward(self, query: dns.message.Message) -> dns.message.Message:
        self.asked += 1
        await trio.sleep(self.delay)
        if self.fail is not None:
            raise ResolveError(self.fail)
        response = ZONE.answer(query, CTX)
        assert response is not None
        if self.rcode is not None:
            response.set_rcode(self.rcode)
        return response


def member(i: int, upstream: ZoneUpstream) -> ChainMember:
    return ChainMember(f"m{i}", EndpointKey(f"192.0.2.{i}", 443, "doh", "dns.lab"), upstream)


def chain(*upstreams: ZoneUpstream, **kwargs: object) -> ResolverChain:
    return ResolverChain([member(i, u) for i, u in enumerate(upstreams)], **kwargs)  # type: ignore[arg-type]


SITE = [ipaddress.ip_address("127.60.0.1")]


async def test_chain_fallback_skips_a_failing_member(autojump_clock: trio.testing.MockClock):
    bad, good = ZoneUpstream(fail="blocked"), ZoneUpstream()
    c = chain(bad, good, mode="fallback")
    assert await c.resolve("site.lab") == SITE
    status = c.status()
    assert status[0]["state"] == "backing-off" and "blocked" in status[0]["last_error"]
    assert status[1]["state"] == "up"


async def test_chain_backs_off_then_probes_once(autojump_clock: trio.testing.MockClock):
    bad, good = ZoneUpstream(fail="blocked"), ZoneUpstream()
    c = chain(bad, good, mode="fallback")
    await c.query("site.lab", "A")
    assert bad.asked == 1
    await c.query("site.lab", "A")  # within the 1 s back-off: skipped
    assert bad.asked == 1
    await trio.sleep(1.1)
    await c.query("site.lab", "A")  # back-off over: asked once more, fails, waits 2 s now
    assert bad.asked == 2
    await trio.sleep(1.1)
    await c.query("site.lab", "A")
    assert bad.asked == 2
    assert c.health.record(bad_key(c)).failures == 2


def bad_key(c: ResolverChain) -> EndpointKey:
    return c.members[0].key


async def test_chain_nxdomain_is_an_answer_servfail_is_not(autojump_clock: trio.testing.MockClock):
    servfail, good = ZoneUpstream(rcode=dns.rcode.SERVFAIL), ZoneUpstream()
    c = chain(servfail, good, mode="fallback")
    response = await c.query("missing.lab", "A")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert c.status()[0]["failures"] == 1 and "SERVFAIL" in c.status()[0]["last_error"]
    with pytest.raises(ResolveError, match="no such name"):
        await c.resolve("missing.lab")


async def test_chain_all_down_still_asks_the_least_recently_failed(
    autojump_clock: trio.testing.MockClock,
):
    first, second = ZoneUpstream(fail="down"), ZoneUpstream(fail="down")
    c = chain(first, second, mode="fallback")
    with pytest.raises(ResolveError, match="m0: down; m1: down"):
        await c.query("site.lab", "A")
    assert c.all_down
    second.fail = None
    await trio.sleep(0.01)
    # both back off; m0 failed first (earlier), so it is the one asked - and it still fails
    with pytest.raises(ResolveError, match="m0: down"):
        await c.query("site.lab", "A")
    assert (first.asked, second.asked) == (2, 1)
    # now m1 failed least recently: asked, and it works again
    assert (await c.query("site.lab", "A")).rcode() == dns.rcode.NOERROR
    assert second.asked == 2


async def test_chain_race_takes_the_first_answer(autojump_clock: trio.testing.MockClock):
    slow, fast = ZoneUpstream(delay=3.0), ZoneUpstream(delay=0.1)
    c = chain(slow, fast, mode="race", stagger=0.5)
    start = trio.current_time()
    assert await c.resolve("site.lab") == SITE
    # the second starts after the stagger and answers 0.1 s later; the slow one is cancelled
    assert trio.current_time() - start == pytest.approx(0.6, abs=0.01)
    assert c.status()[0]["state"] == "unused" and c.status()[1]["state"] == "up"


async def test_chain_race_moves_on_at_once_when_a_member_fails(
    autojump_clock: trio.testing.MockClock,
):
    bad, good = ZoneUpstream(fail="reset"), ZoneUpstream(delay=0.1)
    c = chain(bad, good, mode="race", stagger=2.0)
    start = trio.current_time()
    await c.query("site.lab", "A")
    assert trio.current_time() - start == pytest.approx(0.1, abs=0.01)


async def test_chain_silent_member_fails_by_timeout(autojump_clock: trio.testing.MockClock):
    silent, good = ZoneUpstream(delay=100.0), ZoneUpstream()
    c = chain(silent, good, mode="fallback", timeout=4.0)
    start = trio.current_time()
    await c.query("site.lab", "A")
    # fallback gives each member an equal share of the timeout
    assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)
    assert "no answer within" in c.status()[0]["last_error"]


async def test_chain_answer_carries_the_query_id(autojump_clock: trio.testing.MockClock):
    c = chain(ZoneUpstream())
    query = dns.message.make_query("site.lab", "A")
    query.id = 4242
    assert (await c.forward(query)).id == 4242


def test_health_backoff_doubles_to_the_cap() -> None:
    now = [0.0]
    book = HealthBook(base=1.0, cap=8.0, clock=lambda: now[0])
    key = EndpointKey("192.0.2.1", 443, "doh", "x")
    waits = []
    for _ in range(6):
        book.failure(key, "x")
        waits.append(book.record(key).retry_at - now[0])
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert not book.claim(key)
    now[0] = 100.0
    assert book.claim(key)  # the probe
    assert not book.claim(key)  # only one at a time
    book.success(key, 0.01)
    assert book.claim(key) and book.claim(key)


@given(st.lists(st.booleans(), max_size=40))
def test_health_never_waits_beyond_the_cap(outcomes: list[bool]) -> None:
    now = [0.0]
    book = HealthBook(base=0.5, cap=30.0, clock=lambda: now[0])
    key = EndpointKey("192.0.2.1", 853, "dot", "")
    for ok in outcomes:
        now[0] += 1
        if ok:
            book.success(key, 0.0)
        else:
            book.failure(key, "x")
        rec = book.record(key)
        assert rec.retry_at - now[0] <= 30.0
        assert (rec.failures == 0) == ok
        assert book.claim(key) == ok  # a fresh failure always waits


def test_endpoint_members_one_per_bootstrap_address() -> None:
    ep = DnsEndpointConfig(url="https://dns.lab/dns-query", bootstrap=("127.54.1.1", "127.54.1.2"))
    members = endpoint_members(ep, timeout=2.0)
    assert [m.key for m, _ in members] == [
        EndpointKey("127.54.1.1", 443, "doh", "dns.lab"),
        EndpointKey("127.54.1.2", 443, "doh", "dns.lab"),
    ]
    dot = DnsEndpointConfig(url="tls://dot.lab:8853", bootstrap=("127.54.3.3",))
    [(m, _)] = endpoint_members(dot, timeout=2.0)
    assert m.key == EndpointKey("127.54.3.3", 8853, "dot", "dot.lab") and m.label == dot.url


# --- over loopback DoH ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


async def test_chain_health_is_per_address_over_real_doh(
    nursery: trio.Nursery, ca: LabCA, tmp_path: Path
) -> None:
    server = DohServer(ZONE, ca.issue("dns.lab"), ("127.53.31.2", 0))
    address = await nursery.start(server.serve)
    port = address[1]
    cafile = ca.write_cert(tmp_path / "ca.pem")
    text = f"""
[dns]
resolver = "secure"
order = "fallback"
timeout = 2.0
[[dns.endpoints]]
url = "https://dns.lab:{port}/dns-query"
bootstrap = ["127.53.31.1", "127.53.31.2"]
cafile = "{cafile}"
"""
    config = parse_config(text, "t")
    c, managed = secure_chain(config.dns)
    async with managed[0], managed[1]:
        assert await c.resolve("site.lab") == SITE  # .1 refuses: nothing listens there
        first, second = c.status()
        assert first["state"] == "backing-off" and first["address"] == "127.53.31.1"
        assert second["state"] == "up" and second["address"] == "127.53.31.2"
        assert await c.resolve("site.lab") == SITE
        assert managed[0].connections_opened == 0  # skipped while backing off
