"""The whole lab against real clients: curl (with --resolve and the lab CA) and dnspython show
that each censor behaviour really happens on the wire, and the lab keeps to loopback and cleans
up after itself.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import ssl
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import trio
import trio.testing

from proxy.lab import world
from proxy.lab.ca import LabCA
from proxy.lab.dnsserver import DnsMode, DnsPolicy
from proxy.lab.origin import OriginServer, pattern_bytes
from proxy.lab.profiles import FREEZE_LIMIT, RESIDUAL_SECONDS, THROTTLE_RATE, get_profile
from proxy.lab.world import HIGH_PORTS, Lab, open_lab

if TYPE_CHECKING:
    from conftest import Curl  # tests/lab/conftest.py

profile = partial(pytest.mark.parametrize, "lab_profile")

# curl's exit codes
CONNECT_FAILED, TIMED_OUT, TLS_FAILED, RECV_FAILED = 7, 28, 35, 56

has_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _decode(hex_address: str) -> str:
    host = bytes.fromhex(hex_address.split(":")[0])
    if len(host) == 4:
        return str(ipaddress.IPv4Address(host[::-1]))
    words = b"".join(host[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def bound_addresses() -> list[str]:
    """The local address of every socket this process holds (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/self/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    found.append(_decode(fields[1]))
    return found


def body(lab: Lab, name: str, scheme: str = "https") -> bytes:
    return f"hello from {name} (host {lab.host_header(name, scheme)})\n".encode()


def actions(lab: Lab, name: str) -> list[str]:
    return [e.action for e in lab.events(name)]


# --- the lab itself ----------------------------------------------------------------------------


@has_proc
async def test_lab_binds_only_loopback_and_leaks_nothing(lab_ca: LabCA) -> None:
    ssl.create_default_context()  # anything ssl opens lazily, opened before counting
    before = open_fds()
    for name in ("none", "cn"):  # cn adds the injectors and the resolvers behind them
        async with open_lab(name, ca=lab_ca, extra_names=["extra.lab"]) as lab:
            workdir = lab.ca_file.parent
            assert oct(workdir.stat().st_mode & 0o777) == "0o700"
            addresses = bound_addresses()
            assert len(addresses) > 40
            assert all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses
            assert lab.addresses("extra.lab") == ("127.60.1.1",)
        assert not workdir.exists()
        assert open_fds() == before


@has_proc
async def test_lab_stops_everything_when_its_body_fails(lab_ca: LabCA) -> None:
    ssl.create_default_context()
    before = open_fds()
    with pytest.raises(RuntimeError, match="test failed"):
        async with open_lab("ru-tspu", ca=lab_ca) as lab:
            workdir = lab.ca_file.parent
            raise RuntimeError("test failed")
    assert not workdir.exists()
    assert open_fds() == before


async def test_lab_on_high_ports(lab_ca: LabCA, curl: Curl) -> None:
    async with open_lab("none", ca=lab_ca, ports=HIGH_PORTS) as lab:
        assert lab.url(world.OPEN) == "https://open.lab:10443/"
        assert lab.isp_resolver == ("127.53.0.1", 10053)
        r = await curl(*curl.to(lab, world.OPEN), lab.url(world.OPEN))
        assert r.stdout == body(lab, world.OPEN)


async def test_two_labs_at_once_take_different_ports(lab_ca: LabCA) -> None:
    async with open_lab("none", ca=lab_ca) as first, open_lab("cn", ca=lab_ca) as second:
        assert first.ports != second.ports
        for lab in (first, second):
            tcp = await trio.open_tcp_stream(*lab.address(world.OPEN))
            stream = trio.SSLStream(tcp, lab.ca.client_context(), server_hostname=world.OPEN)
            async with stream:
                await stream.do_handshake()


# --- TCP censorship, seen by curl --------------------------------------------------------------


async def test_curl_gets_open_lab_intact(lab: Lab, curl: Curl) -> None:
    r = await curl(*curl.to(lab, world.OPEN), lab.url(world.OPEN))
    assert r.returncode == 0 and r.stdout == body(lab, world.OPEN)
    r = await curl(*curl.to(lab, world.OPEN, "http"), lab.url(world.OPEN, scheme="http"))
    assert r.stdout == body(lab, world.OPEN, "http")
    r = await curl(*curl.to(lab, world.OPEN), lab.url(world.OPEN, "/bytes/300000"))
    assert r.stdout == pattern_bytes(300_000)
    assert lab.events() == []


@profile(["ru-tspu"])
async def test_curl_sni_reset(lab: Lab, curl: Curl) -> None:
    r = await curl(*curl.to(lab, world.BLOCKED), lab.url(world.BLOCKED))
    assert r.returncode in (TLS_FAILED, RECV_FAILED), r.stderr
    assert actions(lab, world.BLOCKED) == ["reset"]
    r = await curl(*curl.to(lab, world.OPEN), lab.url(world.OPEN))
    assert r.stdout == body(lab, world.OPEN)


@profile(["ru-tspu"])
async def test_curl_sni_blackhole_is_silence(lab: Lab, curl: Curl) -> None:
    start = trio.current_time()
    r = await curl(*curl.to(lab, world.TWITTER), lab.url(world.TWITTER), max_time=2)
    assert r.returncode == TIMED_OUT, r.stderr
    assert trio.current_time() - start >= 1.9
    assert actions(lab, world.TWITTER) == ["blackhole"]


@profile(["ru-tspu"])
async def test_curl_ip_block_is_a_real_refusal(lab: Lab, curl: Curl) -> None:
    start = trio.current_time()
    r = await curl(*curl.to(lab, world.IP_BLOCKED), lab.url(world.IP_BLOCKED))
    assert r.returncode == CONNECT_FAILED, r.stderr
    assert trio.current_time() - start < 1  # an RST to the SYN, not a timeout
    assert "refuse" in actions(lab, world.IP_BLOCKED)


@profile(["ru-2021"])
async def test_curl_throttle_is_far_slower_than_the_control(lab: Lab, curl: Curl) -> None:
    path = "/bytes/65536"
    start = trio.current_time()
    r = await curl(*curl.to(lab, world.OPEN), lab.url(world.OPEN, path))
    control = trio.current_time() - start
    assert r.stdout == pattern_bytes(65536)
    budget = max(2.0, 10 * control)
    start = trio.current_time()
    r = await curl(*curl.to(lab, world.MICROSOFT), lab.url(world.MICROSOFT, path), max_time=budget)
    took = trio.current_time() - start
    # the *t.co* glob throttles microsoft.com.lab: 64 KiB does not arrive in 10x the control
    assert r.returncode == TIMED_OUT and took >= 5 * control
    flow = lab.middleboxes[lab.address(world.MICROSOFT)].flows[-1]
    assert flow.s2c_forwarded <= 4096 + THROTTLE_RATE * (took + 0.5)
    assert actions(lab, world.MICROSOFT) == ["throttle"]
    assert actions(lab, world.OPEN) == []


@profile(["ru-2025"])
async def test_curl_freeze_stops_the_download_at_16k(lab: Lab, curl: Curl, tmp_path: Path) -> None:
    out = tmp_path / "frozen.bin"
    args = [*curl.to(lab, world.FROZEN, "http"), "-o", str(out)]
    r = await curl(*args, lab.url(world.FROZEN, "/bytes/65536", "http"), max_time=2)
    assert r.returncode == TIMED_OUT, r.stderr
    size = out.stat().st_size
    assert FREEZE_LIMIT - 400 < size < FREEZE_LIMIT  # the response head took the rest
    assert out.read_bytes() == pattern_bytes(size)
    assert actions(lab, world.FROZEN) == ["freeze_after"]
    r = await curl(*curl.to(lab, world.OPEN, "http"), lab.url(world.OPEN, "/bytes/65536", "http"))
    assert len(r.stdout) == 65536


@pytest.mark.parametrize(
    ("lab_profile", "status", "sign"),
    [("ir", 403, b"10.10.34.36"), ("ru-tspu", 302, b"blockpage.lab")],
)
async def test_curl_plain_http_block_page(lab: Lab, curl: Curl, status: int, sign: bytes) -> None:
    url = lab.url(world.HTTP_BLOCKED, scheme="http")
    r = await curl(*curl.to(lab, world.HTTP_BLOCKED, "http"), "-i", url)
    head, _, page = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode())
    assert sign in head + page
    assert not page.startswith(b"hello from")


@profile(["cn"])
async def test_curl_fronting_passes_and_residual_blocking_follows_a_hit(
    lab: Lab, curl: Curl
) -> None:
    front = [*curl.to(lab, world.CDN_FRONT), "-H", f"Host: {lab.host_header(world.CDN_BACKEND)}"]
    r = await curl(*front, lab.url(world.CDN_FRONT))
    assert r.stdout == body(lab, world.CDN_BACKEND)  # SNI says front, Host says backend
    assert lab.cdn is not None
    last = lab.cdn.log[-1]
    assert (last.sni, last.host, last.status) == (world.CDN_FRONT, world.CDN_BACKEND, 200)
    r = await curl(*curl.to(lab, world.CDN_BACKEND), lab.url(world.CDN_BACKEND))
    assert r.returncode in (TLS_FAILED, RECV_FAILED)
    # the GFW now holds the client/edge pair: even the fronted request meets silence
    r = await curl(*front, lab.url(world.CDN_FRONT), max_time=1.5)
    assert r.returncode == TIMED_OUT
    residual = [e for e in lab.events(world.CDN_FRONT) if "residual" in e.detail]
    assert residual and residual[0].action == "blackhole"


async def test_residual_block_expires(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    unchecked = ssl.create_default_context()
    unchecked.check_hostname, unchecked.verify_mode = False, ssl.CERT_NONE

    async def handshake(lab: Lab, sni: str, context: ssl.SSLContext) -> None:
        tcp = await trio.open_tcp_stream(*lab.address(world.BLOCKED))
        stream = trio.SSLStream(tcp, context, server_hostname=sni)
        try:
            await stream.do_handshake()
        finally:
            await trio.aclose_forcefully(stream)

    async with open_lab("cn", ca=lab_ca) as lab:
        with pytest.raises(trio.BrokenResourceError):
            await handshake(lab, world.BLOCKED, lab.ca.client_context())
        with trio.move_on_after(30) as waited:
            await handshake(lab, world.OPEN, unchecked)  # innocent SNI, same address: boxed
        assert waited.cancelled_caught
        await trio.sleep(RESIDUAL_SECONDS)
        await handshake(lab, world.OPEN, unchecked)  # the box has expired
        kinds = [(e.action, "residual" in e.detail) for e in lab.events(world.BLOCKED)]
        assert kinds == [("reset", False), ("blackhole", True)]


@profile(["none"])
async def test_bridge_slots_take_a_server_directly_and_behind_the_cdn(lab: Lab, curl: Curl) -> None:
    slot = lab.bridge_slots[0]
    direct = OriginServer(slot.name, tls=lab.ca.issue(slot.name).server_context())
    await lab.start_service(direct.serve, *slot.direct)
    await lab.start_service(OriginServer(slot.name).serve, *slot.behind_cdn)
    r = await curl(*curl.to(lab, slot.name), lab.url(slot.name))
    assert r.stdout == body(lab, slot.name)
    front = [*curl.to(lab, world.CDN_FRONT), "-H", f"Host: {lab.host_header(slot.name)}"]
    r = await curl(*front, lab.url(world.CDN_FRONT))
    assert r.stdout == body(lab, slot.name)


# --- DNS censorship, seen by dnspython ---------------------------------------------------------


async def udp_query(
    server: tuple[str, int], name: str, timeout: float = 2.0
) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    ask = partial(dns.query.udp, query, server[0], port=server[1], timeout=timeout)
    return await trio.to_thread.run_sync(ask)


async def tcp_query(server: tuple[str, int], name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    ask = partial(dns.query.tcp, query, server[0], port=server[1], timeout=2)
    return await trio.to_thread.run_sync(ask)


def a_records(message: dns.message.Message) -> list[str]:
    return sorted(r.address for rrset in message.answer if rrset.rdtype == 1 for r in rrset)


@pytest.mark.parametrize(
    ("lab_profile", "name", "answer", "mode"),
    [
        ("none", world.POISONED, "127.60.0.6", None),
        ("ru-tspu", world.POISONED, world.BLOCKPAGE_IP, DnsMode.BLOCKPAGE_IP),
        ("ir", world.POISONED, world.BOGON_IP, DnsMode.BOGON),
        ("ir", "no-such-site.lab", world.HIJACK_IP, DnsMode.NXDOMAIN_HIJACK),
    ],
)
async def test_isp_resolver_answers(lab: Lab, name: str, answer: str, mode: DnsMode | None) -> None:
    for ask in (udp_query, tcp_query):
        assert a_records(await ask(lab.isp_resolver, name)) == [answer]
    assert a_records(await udp_query(lab.authoritative, world.POISONED)) == ["127.60.0.6"]
    assert {e.mode for e in lab.dns_log()} == ({mode} if mode else set())


async def test_isp_resolver_servfail_and_timeout(lab_ca: LabCA) -> None:
    policy = DnsPolicy({world.BLOCKED: DnsMode.SERVFAIL, world.TWITTER: DnsMode.TIMEOUT})
    async with open_lab(get_profile("none").with_isp(policy), ca=lab_ca) as lab:
        assert (await udp_query(lab.isp_resolver, world.BLOCKED)).rcode() == dns.rcode.SERVFAIL
        with pytest.raises(dns.exception.Timeout):
            await udp_query(lab.isp_resolver, world.TWITTER, timeout=0.5)
        assert a_records(await udp_query(lab.isp_resolver, world.OPEN)) == ["127.60.0.1"]


async def datagrams(server: tuple[str, int], name: str, wait: float) -> list[dns.message.Message]:
    """Every answer to one query that arrives within ``wait`` seconds, in order."""
    query = dns.message.make_query(name, "A")
    got = []
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(server)
        await sock.send(query.to_wire())
        with trio.move_on_after(wait):
            while True:
                got.append(dns.message.from_wire(await sock.recv(65535)))
    return got


@profile(["cn"])
async def test_injected_answers_arrive_first_at_any_address(lab: Lab) -> None:
    for server in (lab.public_resolver, lab.isp_resolver):
        answers = await datagrams(server, world.BLOCKED, 0.3)
        assert a_records(answers[0])[0] in world.FORGED_IPS
        assert a_records(answers[-1]) == ["127.60.0.2"]  # the real answer, later
    answers = await datagrams(lab.silent_resolver, world.BLOCKED, 0.3)
    assert answers and all(a_records(a)[0] in world.FORGED_IPS for a in answers)
    assert await datagrams(lab.silent_resolver, world.OPEN, 0.2) == []  # nobody home
    assert a_records(await tcp_query(lab.public_resolver, world.BLOCKED)) == ["127.60.0.2"]
    assert {e.mode for e in lab.dns_log()} == {DnsMode.INJECT_RACE}


@profile(["cn"])
async def test_famous_doh_is_blocked_the_small_one_answers(lab: Lab, curl: Curl) -> None:
    query = dns.message.make_query(world.BLOCKED, "A")
    query.id = 0
    param = base64.urlsafe_b64encode(query.to_wire()).decode().rstrip("=")
    results = {}

    async def ask(name: str, ip: str) -> None:
        url = lab.url(name, f"/dns-query?dns={param}")
        args = [*curl.to(lab, name, ip=ip), "--http2", "-H", "accept: application/dns-message"]
        results[ip] = await curl(*args, url, max_time=2)

    async with trio.open_nursery() as nursery:
        for endpoint in lab.doh_endpoints:
            for ip in endpoint.bootstrap:
                nursery.start_soon(ask, endpoint.name, ip)
    famous_ip, famous_alt = world.FAMOUS_DOH_IPS
    assert results[famous_ip].returncode == TIMED_OUT  # SYNs dropped
    assert results[famous_alt].returncode in (TLS_FAILED, RECV_FAILED)  # SNI reset
    small = results[world.SMALL_DOH_IPS[0]]
    assert small.returncode == 0, small.stderr
    assert a_records(dns.message.from_wire(small.stdout)) == ["127.60.0.2"]  # DoH is honest
    assert "drop_syn" in actions(lab, world.FAMOUS_DOH)
    assert "reset" in actions(lab, world.FAMOUS_DOH)
