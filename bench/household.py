"""The router memory budget: sidestep serving a household, resident memory sampled throughout.

The issue's budget is <= 64 MiB RSS with 200 concurrent connections and 50 DNS queries/s. This
benchmark starts sidestep as a router runs it (a mixed proxy port and the LAN DNS server, plain
DNS upstream with the cache on) and, for ``--seconds``:

* keeps ``--connections`` SOCKS5 tunnels busy: each client thread opens a tunnel, downloads
  ``--object-kib`` KiB (a web page and its images, roughly), closes, and starts again; about a
  quarter of the tunnels instead stay open and idle (keep-alive connections a browser holds);
* sends ``--qps`` DNS queries per second to sidestep's DNS server for names drawn from a
  ``--names``-name zone (so the cache both hits and grows).

It prints the RSS peak (VmHWM) and the last sample against the 64 MiB budget, with an idle
sidestep measured in the same run as the reference. Everything runs on loopback.

    python -m bench household [--connections 200] [--qps 50] [--seconds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.dnsserver import Upstreams, _free_udp_tcp_port, _spawn
from bench.loadgen import HOLD
from bench.socks import _recv_exact, origin_server, rss_kib, socks_opener
from proxy.lab.ca import LabCA

BUDGET_MIB = 64.0


def household_config(proxy_port: int, dns_port: int, upstream: tuple[str, int]) -> str:
    return f"""
[[inbound]]
name = "lan"
listen = "127.0.0.1:{proxy_port}"

[dns]
resolver = "udp"
servers = ["{upstream[0]}:{upstream[1]}"]

[dns.server]
enabled = true
listen = "127.0.0.1:{dns_port}"
rate_limit = 0

[log]
level = "warning"
"""


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def _dns_query(name: str) -> bytes:
    qid = random.getrandbits(16)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


def _dns_load(port: int, qps: float, names: list[str], stop: threading.Event) -> list[int]:
    """Send ``qps`` queries per second until ``stop``; returns [sent, answered]."""
    counts = [0, 0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        interval = 1.0 / qps
        next_at = time.monotonic()
        while not stop.is_set():
            sock.sendto(_dns_query(random.choice(names)), ("127.0.0.1", port))
            counts[0] += 1
            next_at += interval
            while time.monotonic() < next_at:
                try:
                    sock.recv(4096)
                    counts[1] += 1
                except BlockingIOError:
                    time.sleep(min(0.002, max(0.0, next_at - time.monotonic())))
    return counts


def _client(opener: object, size: int, hold: bool, stop: threading.Event, done: list[int]) -> None:
    open_tunnel = opener  # a bench.socks Opener
    while not stop.is_set():
        try:
            sock = open_tunnel(0)  # type: ignore[operator]
        except OSError:
            time.sleep(0.05)
            continue
        with sock:
            if hold:
                sock.sendall(struct.pack("!Q", HOLD))
                _recv_exact(sock, 1)
                stop.wait()
                return
            sock.sendall(struct.pack("!Q", size))
            left = size
            while left:
                chunk = sock.recv(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
            done[0] += 1


def run_household_bench(args: argparse.Namespace) -> None:
    ca = LabCA.create()
    upstreams = Upstreams(args.names, 1, 0.0, ca)
    upstreams.start()
    assert upstreams.plain.address is not None
    names = [f"www{i}.bench" for i in range(args.names)]
    with tempfile.TemporaryDirectory() as tmp, origin_server() as origin:
        folder = Path(tmp)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            proxy_port = probe.getsockname()[1]
        dns_port = _free_udp_tcp_port()
        cfg = folder / "household.toml"
        cfg.write_text(household_config(proxy_port, dns_port, upstreams.plain.address))
        cmd = [sys.executable, "-m", "proxy", "run", "--config", str(cfg)]
        with _spawn(cmd, dns_port, folder / "sidestep.log") as pid:
            time.sleep(1.0)
            idle = rss_kib(pid)
            stop = threading.Event()
            opener = socks_opener(proxy_port, origin)
            done = [0]
            held = args.connections // 4
            threads = [
                threading.Thread(
                    target=_client,
                    args=(opener, args.object_kib << 10, i < held, stop, done),
                    daemon=True,
                )
                for i in range(args.connections)
            ]
            dns_counts: list[int] = []
            dns_thread = threading.Thread(
                target=lambda: dns_counts.extend(_dns_load(dns_port, args.qps, names, stop)),
                daemon=True,
            )
            for t in threads:
                t.start()
            dns_thread.start()
            samples = []
            end = time.monotonic() + args.seconds
            with contextlib.suppress(KeyboardInterrupt):
                while time.monotonic() < end:
                    time.sleep(0.5)
                    samples.append(rss_kib(pid))
            peak = vm_hwm_kib(pid)
            stop.set()
            for t in threads:
                t.join(5)
            dns_thread.join(5)
    sent, answered = dns_counts or [0, 0]
    mib = 1024.0
    print(f"household load for {args.seconds:g} s on loopback")
    print(
        f"  {args.connections} concurrent tunnels ({held} held open, the rest downloading "
        f"{args.object_kib} KiB objects): {done[0]} objects, {done[0] / args.seconds:.0f}/s"
    )
    print(f"  DNS: {sent} queries sent ({sent / args.seconds:.0f}/s), {answered} answered")
    print(f"  RSS idle (reference)  {idle / mib:6.1f} MiB")
    print(f"  RSS under load, last  {samples[-1] / mib:6.1f} MiB" if samples else "  no samples")
    print(f"  RSS peak (VmHWM)      {peak / mib:6.1f} MiB")
    print(
        f"  peak / budget {BUDGET_MIB:g} MiB = {peak / mib / BUDGET_MIB:.2f}x   "
        f"peak / idle = {peak / idle:.2f}x"
    )


def add_household_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("household", help="RSS of a router serving 200 connections + 50 DNS q/s")
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--qps", type=float, default=50.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--object-kib", type=int, default=256)
    p.add_argument("--names", type=int, default=2000)
