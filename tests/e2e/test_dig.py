"""sidestep's DNS server, asked by the real dig and kdig, in front of a lab DNS server.

A real ``sidestep run`` process with ``[dns.server]`` on a loopback port and ``resolver =
"udp"`` pointing at a lab DnsServer, whose query counter shows what reached the upstream.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import trio

from proxy.inbound.dnsserver import open_dns_sockets
from proxy.lab.dnsserver import DnsServer, Zone

from .conftest import ProxyProcess, run_proxy

DIG = shutil.which("dig")
KDIG = shutil.which("kdig")
pytestmark = pytest.mark.skipif(DIG is None or KDIG is None, reason="dig/kdig not installed")


def zone() -> Zone:
    z = Zone("lab")
    z.add("www.lab", "127.60.0.1", "::1")
    z.add("big.lab", *[f"127.61.{i // 250}.{i % 250 + 1}" for i in range(100)])
    return z


def dns_port() -> int:
    sockets = open_dns_sockets("127.0.0.1", 0)  # a port free for UDP and TCP alike
    port = sockets.address[1]
    sockets.close()
    return port


def config(upstream: tuple[str, int], port: int, extra: str = "") -> str:
    return f"""
[[inbound]]
name = "mixed"
listen = "127.0.0.1:{{port}}"
[dns]
resolver = "udp"
servers = ["{upstream[0]}:{upstream[1]}"]
timeout = 2
[dns.server]
enabled = true
listen = "127.0.0.1:{port}"
{extra}
[shutdown]
drain_timeout = 1
"""


async def tool(*args: str, check: bool = True) -> str:
    with trio.fail_after(30):
        result = await trio.run_process(
            list(args), capture_stdout=True, capture_stderr=True, check=False
        )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed: {result.stdout!r} {result.stderr!r}")
    return result.stdout.decode()


async def dig(port: int, *args: str, check: bool = True) -> str:
    assert DIG is not None
    return await tool(DIG, "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", *args, check=check)


async def lab_server(nursery: trio.Nursery) -> DnsServer:
    lab = DnsServer(zone(), ("127.53.9.1", 0))
    await nursery.start(lab.serve)
    return lab


async def test_dig_and_kdig_get_answers_and_the_second_query_is_a_hit(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    lab = await lab_server(nursery)
    assert lab.address is not None
    port = dns_port()
    with run_proxy(tmp_path, config(lab.address, port)) as p:
        assert (await dig(port, "www.lab", "+short")).split() == ["127.60.0.1"]
        asked = lab.queries
        assert asked == 1
        assert (await dig(port, "WWW.Lab", "+short")).split() == ["127.60.0.1"]
        assert lab.queries == asked  # answered from the cache
        assert KDIG is not None
        out = await tool(KDIG, "@127.0.0.1", "-p", str(port), "+tcp", "+short", "www.lab", "AAAA")
        assert out.split() == ["::1"]
        # ANY gets RFC 8482's one HINFO record, and nothing is asked upstream
        before = lab.queries
        out = await dig(port, "www.lab", "ANY", "+noall", "+answer")
        assert "HINFO" in out and '"RFC8482"' in out
        assert lab.queries == before
        # an answer too big for plain UDP comes back truncated; dig then asks over TCP
        out = await dig(port, "big.lab", "+noedns", "+short")
        assert len(out.split()) == 100
        assert "Truncated, retrying in TCP mode" in await dig(port, "big.lab", "+noedns")
        # a name the upstream does not know
        assert "status: NXDOMAIN" in await dig(port, "nowhere.lab")
        await reload_to_a_new_port(p, lab.address, port)


async def reload_to_a_new_port(p: ProxyProcess, upstream: tuple[str, int], old: int) -> None:
    new = dns_port()
    p.config.write_text(config(upstream, new).replace("{port}", str(p.port)))
    os.kill(p.proc.pid, signal.SIGHUP)
    await p.await_log("config reloaded")
    assert (await dig(new, "www.lab", "+short")).split() == ["127.60.0.1"]
    out = await dig(old, "www.lab", "+short", check=False)
    assert "127.60.0.1" not in out


def udp_socket(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((source, 0))
    return sock


def drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            return count
        count += 1


def a_query(msg_id: int, name: bytes = b"\x03www\x03lab\x00") -> bytes:
    return (
        msg_id.to_bytes(2, "big")
        + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + name
        + b"\x00\x01\x00\x01"
    )


async def test_dig_garbage_floods_and_strangers_do_not_stop_other_clients(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    lab = await lab_server(nursery)
    assert lab.address is not None
    port = dns_port()
    extra = 'allow = ["127.0.0.1/32", "127.0.0.2/32"]\nrate_limit = 5\nburst = 10'
    with run_proxy(tmp_path, config(lab.address, port, extra)) as p:
        assert (await dig(port, "www.lab", "+short")).split() == ["127.60.0.1"]
        server = ("127.0.0.1", port)
        with udp_socket("127.0.0.2") as flooder, udp_socket("127.0.0.9") as stranger:
            # malformed packets: short, a compression loop, a response, random bytes
            for junk in (
                b"\x00",
                b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
                b"\x00\x02\x81\x80" + bytes(8),
                os.urandom(300),
            ):
                flooder.sendto(junk, server)
            stranger.sendto(a_query(7), server)  # a cached name: it would be answered at once
            for i in range(300):
                flooder.sendto(a_query(i), server)
            assert (await dig(port, "www.lab", "+short")).split() == ["127.60.0.1"]
            answered = drain(flooder)
            assert drain(stranger) == 0
        assert answered < 150  # the rest were dropped by the rate limit
        assert p.proc.poll() is None
        # and a TCP client outside the allow list is closed unread
        source = ("127.0.0.9", 0)
        with (
            pytest.raises(OSError),
            socket.create_connection(server, timeout=5, source_address=source) as c,
        ):
            c.sendall(len(a_query(8)).to_bytes(2, "big") + a_query(8))
            if not c.recv(100):
                raise ConnectionResetError("closed")
