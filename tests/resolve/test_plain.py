"""The plain DNS resolver against real lab DNS servers on loopback."""

from __future__ import annotations

import ipaddress
import socket

import dns.message
import dns.rrset
import pytest
import trio

from proxy.config import parse_config
from proxy.errors import ConfigError, ResolveError
from proxy.lab.dnsserver import DnsMode, DnsPolicy, DnsServer, Zone
from proxy.resolve.plain import PlainResolver


def zone() -> Zone:
    z = Zone("lab")
    z.add("www.lab", "127.60.0.1", "::1")
    z.add("v4only.lab", "127.60.0.2")
    z.add("big.lab", *[f"127.61.{i // 250}.{i % 250 + 1}" for i in range(300)])
    return z


async def start(nursery: trio.Nursery, **kw: object) -> tuple[str, int]:
    server = DnsServer(zone(), ("127.53.0.1", 0), **kw)  # type: ignore[arg-type]
    return await nursery.start(server.serve)


async def test_plain_resolves_a_and_aaaa(nursery: trio.Nursery) -> None:
    addr = await start(nursery)
    r = PlainResolver([addr], timeout=2)
    got = await r.resolve("www.lab")
    assert set(got) == {ipaddress.ip_address("127.60.0.1"), ipaddress.ip_address("::1")}
    assert await r.resolve("v4only.lab.") == [ipaddress.ip_address("127.60.0.2")]
    assert await r.resolve("127.0.0.9") == [ipaddress.ip_address("127.0.0.9")]


async def test_plain_nxdomain_is_a_resolve_error(nursery: trio.Nursery) -> None:
    addr = await start(nursery)
    with pytest.raises(ResolveError, match="NXDOMAIN"):
        await PlainResolver([addr], timeout=2).resolve("missing.lab")


async def test_plain_falls_back_to_tcp_on_truncation(nursery: trio.Nursery) -> None:
    addr = await start(nursery)
    got = await PlainResolver([addr], timeout=2).resolve("big.lab")
    assert len(got) == 300  # 300 A records do not fit a 4096-byte UDP answer


async def test_plain_skips_dead_and_silent_servers(nursery: trio.Nursery) -> None:
    good = await start(nursery)
    silent = await start(nursery, policy=DnsPolicy({".": DnsMode.TIMEOUT}))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.53.0.2", 0))
        dead = s.getsockname()  # bound but closed below: nothing listens there
    r = PlainResolver([dead, silent, good], timeout=1.5)
    assert await r.resolve("v4only.lab") == [ipaddress.ip_address("127.60.0.2")]


async def test_plain_ignores_forged_answers_with_the_wrong_id(nursery: trio.Nursery) -> None:
    """A hostile server first sends garbage and an answer with a wrong ID, then the real one."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.53.0.3", 0))

    async def hostile() -> None:
        with sock:
            data, client = await sock.recvfrom(4096)
            query = dns.message.from_wire(data)
            forged = dns.message.make_response(query)
            forged.id = (query.id + 1) % 65536
            forged.answer.append(
                dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "10.10.34.35")
            )
            await sock.sendto(b"\x00garbage", client)
            await sock.sendto(forged.to_wire(), client)
            real = dns.message.make_response(query)
            if query.question[0].rdtype == 1:
                real.answer.append(
                    dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "127.60.0.7")
                )
            await sock.sendto(real.to_wire(), client)
            # the AAAA query
            data, client = await sock.recvfrom(4096)
            query = dns.message.from_wire(data)
            await sock.sendto(dns.message.make_response(query).to_wire(), client)

    nursery.start_soon(hostile)
    got = await PlainResolver([sock.getsockname()], timeout=2).resolve("x.lab")
    assert got == [ipaddress.ip_address("127.60.0.7")]


async def test_plain_all_silent_times_out(nursery: trio.Nursery) -> None:
    silent = await start(nursery, policy=DnsPolicy({".": DnsMode.TIMEOUT}))
    with trio.fail_after(3), pytest.raises(ResolveError):
        await PlainResolver([silent], timeout=0.5).resolve("www.lab")


def test_config_udp_resolver_needs_servers() -> None:
    with pytest.raises(ConfigError, match="servers"):
        parse_config('[dns]\nresolver = "udp"\n', "t.toml")
    with pytest.raises(ConfigError, match=r"dns\.servers"):
        parse_config('[dns]\nresolver = "udp"\nservers = ["dns.google"]\n', "t.toml")
    cfg = parse_config('[dns]\nresolver = "udp"\nservers = ["127.0.0.53", "[::1]:5353"]\n', "t")
    assert cfg.dns.server_addresses == (("127.0.0.53", 53), ("::1", 5353))
