"""Sending pieces as separate TCP segments (proxy.net.segments), on real sockets.

The kernel's own counters prove the pieces left as separate segments (``tcpi_data_segs_out``);
the receiver gets exactly the bytes; the TTL option is restored; the urgent byte stays out of
the receiver's stream unless it asks for it inline. With root and ``ip netns``, a three-namespace
path (client, router, server) shows the low-TTL piece dying at the router and the kernel
retransmitting it.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from proxy.net.segments import Segment, send_segments, unsent_bytes, wait_transmitted
from proxy.net.stream import FastStream

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux socket options")

#: struct tcp_info offsets (include/uapi/linux/tcp.h)
TOTAL_RETRANS, DATA_SEGS_OUT = 100, 156


def tcp_info(sock: socket.socket | trio.socket.SocketType, offset: int) -> int:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", raw, offset)[0])


@asynccontextmanager
async def connected(
    family: int = socket.AF_INET,
) -> AsyncIterator[tuple[FastStream, socket.socket]]:
    """A FastStream client and the blocking server socket it is connected to."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        sock = trio.socket.socket(family)
        await sock.connect(listener.getsockname()[:2])
        server, _ = listener.accept()
        stream = FastStream(sock)
        try:
            with server:
                yield stream, server
        finally:
            await stream.aclose()


def read_exactly(server: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = server.recv(n - len(out))
        assert chunk
        out += chunk
    return bytes(out)


@linux
async def test_segments_leave_as_separate_segments() -> None:
    pieces = [b"\x16\x03", b"\x01\x02\x00" + bytes(200), b"tail" * 100]
    async with connected() as (stream, server):
        before = tcp_info(stream.socket, DATA_SEGS_OUT)
        await send_segments(stream, [Segment(p) for p in pieces])
        assert tcp_info(stream.socket, DATA_SEGS_OUT) - before == len(pieces)
        assert read_exactly(server, sum(map(len, pieces))) == b"".join(pieces)
        assert unsent_bytes(stream.socket) == 0


@linux
async def test_segments_wait_gives_up_when_the_window_is_shut() -> None:
    async with connected() as (stream, server):
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        chunk = bytes(65536)
        try:
            while True:  # fill the peer's window and our send buffer
                os.write(stream.socket.fileno(), chunk)
        except BlockingIOError:
            pass
        assert unsent_bytes(stream.socket) > 0
        # a piece written now could not leave on its own: the wait says so, within its bound
        assert not await wait_transmitted(stream.socket, 0.05)


async def test_segments_wait_reports_when_the_kernel_cannot_tell() -> None:
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        assert not await wait_transmitted(sock, 1.0)


@linux
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
async def test_segments_ttl_piece_restores_the_option(family: int) -> None:
    level, option = (
        (socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
        if family == socket.AF_INET6
        else (socket.IPPROTO_IP, socket.IP_TTL)
    )
    async with connected(family) as (stream, server):
        stream.socket.setsockopt(level, option, 42)
        segments = [Segment(b"a", ttl=1), Segment(b"bcdef")]
        await send_segments(stream, segments)
        assert stream.socket.getsockopt(level, option) == 42
        # loopback delivers locally whatever the TTL: the bytes all arrive, in order
        assert read_exactly(server, 6) == b"abcdef"
        # a lone TTL piece is waited for and restored as well
        await send_segments(stream, [Segment(b"g", ttl=3)])
        assert stream.socket.getsockopt(level, option) == 42
        assert read_exactly(server, 1) == b"g"


@linux
async def test_segments_urgent_byte_stays_out_of_the_stream() -> None:
    async with connected() as (stream, server):
        await send_segments(stream, [Segment(b"hello wo", urgent=b"\x00"), Segment(b"rld")])
        assert read_exactly(server, 11) == b"hello world"
    async with connected() as (stream, server):
        server.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        await send_segments(stream, [Segment(b"hello wo", urgent=b"X"), Segment(b"rld")])
        assert read_exactly(server, 12) == b"hello woXrld"


def test_segments_reject_bad_pieces() -> None:
    with pytest.raises(ValueError, match="single byte"):
        Segment(b"a", urgent=b"xy")
    with pytest.raises(ValueError, match="at least one byte"):
        Segment(b"")
    with pytest.raises(ValueError, match="TTL 0"):
        Segment(b"a", ttl=0)


@linux
async def test_segments_delay_and_hook_run_between_pieces(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[tuple[int, float]] = []

    async def hook(i: int) -> None:
        seen.append((i, trio.current_time()))

    async with connected() as (stream, server):
        start = trio.current_time()
        await send_segments(
            stream, [Segment(b"a"), Segment(b"b"), Segment(b"c")], delay=0.25, after_piece=hook
        )
        assert [(i, round(t - start, 2)) for i, t in seen] == [(0, 0.25), (1, 0.5)]
        assert read_exactly(server, 3) == b"abc"


# --- disorder across a real router hop ----------------------------------------------------------

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.231.2.2", 8443))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
want = int(sys.argv[1])
got = b""
while len(got) < want:
    got += c.recv(65536)
sys.stdout.write(got.hex() + "\\n")
"""

CLIENT = """
import socket, struct, sys, trio
from proxy.net.segments import Segment, send_segments
from proxy.net.stream import FastStream

async def main():
    sock = trio.socket.socket()
    await sock.connect(("10.231.2.2", 8443))
    stream = FastStream(sock)
    ttl = sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
    pieces = [bytes.fromhex(p) for p in sys.argv[1:]]
    await send_segments(stream, [Segment(pieces[0], ttl=1)] + [Segment(p) for p in pieces[1:]])
    restored = sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == ttl
    with trio.fail_after(10):
        while struct.unpack("i", __import__("fcntl").ioctl(sock.fileno(), 0x5411, b"0000"))[0]:
            await trio.sleep(0.01)  # wait until everything, the retransmission too, is acked
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    print(restored, struct.unpack_from("I", info, 100)[0], flush=True)
    await stream.aclose()

trio.run(main)
"""


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def router_path() -> Iterator[tuple[str, str, str]]:
    """Namespaces client -> router -> server (10.231.1.0/24, 10.231.2.0/24), or a skip."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to build network namespaces")
    tag = f"ss{os.getpid() % 100000}"
    names = (f"{tag}c", f"{tag}r", f"{tag}s")
    c, r, s = names
    try:
        for ns in names:
            run("ip", "netns", "add", ns)
    except (subprocess.CalledProcessError, OSError) as exc:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        run("ip", "link", "add", f"{tag}a", "netns", c, "type", "veth", "peer", f"{tag}b",
            "netns", r)  # fmt: skip
        run("ip", "link", "add", f"{tag}d", "netns", r, "type", "veth", "peer", f"{tag}e",
            "netns", s)  # fmt: skip
        for ns, dev, addr in ((c, f"{tag}a", "10.231.1.1/24"), (r, f"{tag}b", "10.231.1.2/24"),
                              (r, f"{tag}d", "10.231.2.1/24"), (s, f"{tag}e", "10.231.2.2/24")):  # fmt: skip
            run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", c, "route", "add", "default", "via", "10.231.1.2")
        run("ip", "-n", s, "route", "add", "default", "via", "10.231.2.1")
        run("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield names
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot wire the namespaces: {exc.stderr.decode(errors='replace').strip()}")
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def time_exceeded_sent(ns: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], check=True,
                         capture_output=True, text=True).stdout.splitlines()  # fmt: skip
    names, values = (line.split() for line in out if line.startswith("Icmp:"))
    return int(dict(zip(names, values, strict=True))["OutTimeExcds"])


@linux
def test_segments_disorder_piece_dies_at_the_router_and_is_retransmitted(
    router_path: tuple[str, str, str],
) -> None:
    client_ns, router_ns, server_ns = router_path
    pieces = [b"\x16", b"\x03\x01\x00\x20" + bytes(range(32))]
    total = sum(map(len, pieces))
    python = sys.executable
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, python, "-c", SERVER, str(total)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        before = time_exceeded_sent(router_ns)
        client = subprocess.run(
            ["ip", "netns", "exec", client_ns, python, "-c", textwrap.dedent(CLIENT),
             *(p.hex() for p in pieces)],
            capture_output=True, text=True, timeout=30, cwd=os.getcwd(),
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        restored, retransmitted = client.stdout.split()
        received = server.communicate(timeout=10)[0].strip()
    finally:
        server.kill()
        server.wait()
    assert restored == "True"
    assert int(retransmitted) >= 1  # the kernel sent the first piece again
    assert time_exceeded_sent(router_ns) > before  # ... because the router dropped it (TTL 1)
    assert bytes.fromhex(received) == b"".join(pieces)  # and the server got every byte in order
