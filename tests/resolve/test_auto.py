"""The auto resolver's own machinery: DoH carried by another strategy, checks on network
change, secure mode kept per network, the cache flush on the switch. (Detection against the
censor profiles is in tests/lab/test_dns_tampering.py.)"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import trio
import trio.testing

from proxy.config import parse_config
from proxy.detect.dnscheck import AnswerPolicy
from proxy.detect.dnsplan import CheckPlan
from proxy.inbound.base import InboundSettings, IPAddress
from proxy.inbound.listener import InboundServer, open_listeners
from proxy.lab.ca import LabCA
from proxy.lab.dnsserver import DnsServer, Zone
from proxy.lab.dohserver import DohServer
from proxy.resolve.auto import NETWORK_POLL, AutoResolver, ViaDohResolver, build_auto, via_chain
from proxy.resolve.chain import ChainMember, EndpointKey, ResolverChain
from proxy.resolve.plain import PlainResolver
from proxy.route.dispatcher import Dispatcher, DispatchSettings
from proxy.strategies.upstream import Socks5Strategy

ZONE = Zone().add("site.lab", "127.60.0.1")
SITE = [ipaddress.ip_address("127.60.0.1")]


class FarSideResolver:
    """The upstream proxy's own DNS: it knows where the DoH server really is."""

    def __init__(self, where: str) -> None:
        self.where = ipaddress.ip_address(where)
        self.asked: list[str] = []

    async def resolve(self, host: str) -> list[IPAddress]:
        await trio.lowlevel.checkpoint()
        self.asked.append(host)
        return [self.where]


async def start_socks_upstream(nursery: trio.Nursery, resolver: FarSideResolver) -> tuple[str, int]:
    dispatcher = Dispatcher(DispatchSettings(first_flight_wait=0.05), resolver)
    server = InboundServer(
        name="far",
        protocol="socks5",
        ctx=dispatcher.context(InboundSettings(name="far")),
        allow=(ipaddress.ip_network("127.0.0.0/8"),),
    )
    listeners = await open_listeners("127.0.0.1", 0)
    server.bind_info(listeners)
    nursery.start_soon(server.serve, listeners)
    return server.bound


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


async def test_doh_through_an_upstream_proxy_when_the_direct_way_is_dead(
    nursery: trio.Nursery, ca: LabCA, tmp_path: Path
) -> None:
    doh = DohServer(ZONE, ca.issue("dns.lab"), ("127.53.51.2", 0))
    _, port = await nursery.start(doh.serve)
    far = FarSideResolver("127.53.51.2")
    socks = await start_socks_upstream(nursery, far)
    cafile = ca.write_cert(tmp_path / "ca.pem")
    text = f"""
[[strategy]]
name = "far"
type = "socks5"
server = "{socks[0]}:{socks[1]}"
[dns]
resolver = "secure"
order = "fallback"
timeout = 2.0
via = ["far"]
[[dns.endpoints]]
url = "https://dns.lab:{port}/dns-query"
bootstrap = ["127.53.51.1"]
cafile = "{cafile}"
"""
    config = parse_config(text, "t").dns
    strategy = Socks5Strategy("far", socks)
    via, managed = via_chain(config, {"far": strategy})
    assert via is not None and len(managed) == 1
    direct_doh = [m for m in managed if isinstance(m, ViaDohResolver)]
    assert direct_doh and via.members[0].key.transport == "doh-via-far"
    auto, parts = build_auto(parse_config(text.replace('"secure"', '"auto"'), "t").dns,
                             strategies={"far": strategy})  # fmt: skip
    async with managed[0]:
        assert await via.resolve("site.lab") == SITE
    assert far.asked == ["dns.lab"]  # the far side found the server by name, not bootstrap
    # the auto resolver uses the via chain only once every direct endpoint is down
    async with trio.open_nursery() as inner:
        for part in parts[:-1]:  # the resolvers, without the checker
            await inner.start(_hold, part)
        assert auto.secure_upstream() is auto.chain
        auto.chain.health.failure(auto.chain.members[0].key, "ip-blocked", hold=60)
        assert auto.secure_upstream() is auto.via
        assert await auto.secure_upstream().resolve("site.lab") == SITE
        inner.cancel_scope.cancel()


async def _hold(manager: object, *, task_status: trio.TaskStatus[None]) -> None:
    async with manager:  # type: ignore[attr-defined]
        task_status.started()
        await trio.sleep_forever()


def empty_plan() -> CheckPlan:
    async def verify(name: str, addresses: object) -> list[IPAddress]:
        await trio.lowlevel.checkpoint()
        return []

    local = AnswerPolicy((ipaddress.ip_network("127.0.0.0/8"),))
    return CheckPlan([], (), "lab", None, local, verify)


class NoUpstream:
    async def forward(self, query: object) -> object:
        raise AssertionError("not asked in this test")


def offline_auto(network: list[str]) -> AutoResolver:
    chain = ResolverChain([ChainMember("x", EndpointKey("192.0.2.1", 443, "doh", "x"),
                                       NoUpstream())])  # type: ignore[arg-type]  # fmt: skip
    plain = PlainResolver([("127.0.0.1", 9)])
    return AutoResolver(plain, chain, empty_plan(), interval=3600, network=lambda: network[0])


async def test_checks_run_again_when_the_network_changes(autojump_clock: trio.testing.MockClock):
    network = ["home"]
    auto = offline_auto(network)
    async with auto:
        await auto.checked.wait()
        assert auto.checks == 1
        auto.secure_networks.add("home")  # as if home's DNS had been caught lying
        assert auto.secure
        network[0] = "cafe"
        await trio.sleep(NETWORK_POLL + 1)
        assert auto.current_network == "cafe" and auto.checks == 2
        assert not auto.secure  # a new network starts on its own DNS and is checked
        network[0] = "home"
        await trio.sleep(NETWORK_POLL + 1)
        assert auto.secure and auto.checks == 3  # back home: secure at once
        await trio.sleep(3600)
        assert auto.checks >= 4  # and the periodic check


async def test_plain_path_is_used_while_nothing_was_found(nursery: trio.Nursery) -> None:
    address = await nursery.start(DnsServer(ZONE, ("127.53.51.5", 0)).serve)
    chain = ResolverChain([ChainMember("x", EndpointKey("192.0.2.1", 443, "doh", "x"),
                                       NoUpstream())])  # type: ignore[arg-type]  # fmt: skip
    plain = PlainResolver([address], timeout=2.0)
    auto = AutoResolver(plain, chain, empty_plan())
    assert await auto.resolve("site.lab") == SITE
    assert await auto.resolve("127.0.0.9") == [ipaddress.ip_address("127.0.0.9")]


async def test_one_address_for_many_sites_is_suspect_and_compared(nursery: trio.Nursery) -> None:
    zone = Zone().add("news.org", "127.60.7.7").add("video.net", "127.60.7.7")
    zone.add("chat.com", "127.60.7.7").add("www.chat.com", "127.60.7.7").add(
        "own.lab", "127.60.7.8"
    )
    address = await nursery.start(DnsServer(zone, ("127.53.51.6", 0)).serve)
    chain = ResolverChain([ChainMember("x", EndpointKey("192.0.2.1", 443, "doh", "x"),
                                       NoUpstream())])  # type: ignore[arg-type]  # fmt: skip
    auto = AutoResolver(PlainResolver([address], timeout=2.0), chain, empty_plan())
    for name in ("news.org", "video.net", "chat.com", "www.chat.com", "own.lab"):
        await auto.resolve(name)
    verdicts = await auto.check_now()
    [shared] = [v for v in verdicts if v.check == "shared-address"]
    assert (
        shared.status == "suspect" and "127.60.7.7 is the only answer for 3" in shared.evidence[0]
    )
    assert not auto.secure  # a suspicion alone switches nothing
