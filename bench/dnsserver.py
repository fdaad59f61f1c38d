"""sidestep's DNS server against dnsmasq, measured with dnsperf in one run.

Both servers forward to the same upstream, a lab DnsServer in a thread of this process, and
serve ``--names`` names from it. Printed for each:

- cached queries/s: every name asked once to fill the caches, then dnsperf asks them over and
  over for ``--seconds`` (``--clients`` sockets, 100 queries outstanding); sidestep's rate is
  also printed as a ratio of dnsmasq's (issue #5's target: at least 0.5x);
- latency of cached answers at a moderate rate (``--latency-qps``, per-query times from
  dnsperf's verbose output): p50 and p99;
- resident memory (VmRSS) after the runs;
- uncached latency through a DNS-over-HTTPS upstream (a lab DohServer with the lab CA) that
  waits ``--doh-delay`` seconds before each answer: every query a new name, so every one is a
  miss; p50/p99 and what sidestep adds on top of the delay. dnsmasq speaks no DoH, so this one
  is sidestep's alone.

Needs dnsperf and dnsmasq (Debian packages of those names); says so and stops when either is
missing.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import trio

from proxy.lab.ca import LabCA
from proxy.lab.dnsserver import DnsServer, Zone
from proxy.lab.dohserver import DohFaults, DohServer
from proxy.resolve.doh import DohResolver

from .socks import _pct, rss_kib

UPSTREAM_IP = "127.0.0.1"


def _zone(names: int, prefix: str) -> Zone:
    z = Zone("bench")
    for i in range(names):
        z.add(f"{prefix}{i}.bench", f"127.70.{i // 250 % 250}.{i % 250 + 1}")
    return z


class Upstreams:
    """A plain DNS server and a DoH server (with a delay) in a trio loop of their own."""

    def __init__(self, names: int, doh_names: int, doh_delay: float, ca: LabCA) -> None:
        self.plain = DnsServer(_zone(names, "www"), (UPSTREAM_IP, 0))
        self.doh = DohServer(
            _zone(doh_names, "new"),
            ca.issue("doh.bench.test"),
            (UPSTREAM_IP, 0),
            faults=DohFaults(answer_delay=doh_delay),
        )
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.plain.serve)
            await nursery.start(self.doh.serve)
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the lab upstreams did not start")


def _free_udp_tcp_port() -> int:
    from proxy.inbound.dnsserver import open_dns_sockets

    sockets = open_dns_sockets("127.0.0.1", 0)
    port = sockets.address[1]
    sockets.close()
    return port


def _wait_dns(port: int, proc: subprocess.Popen[bytes], log: Path, limit: float = 20.0) -> None:
    """Until something answers a DNS query on ``port`` (any answer will do)."""
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04ping\x05bench\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + limit
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()}")
            s.sendto(query, ("127.0.0.1", port))
            try:
                s.recv(512)
                return
            except OSError:
                continue
    raise RuntimeError(f"nothing answers on port {port}:\n{log.read_text()}")


@contextlib.contextmanager
def _spawn(cmd: list[str], port: int, log: Path) -> Iterator[int]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_dns(port, proc, log)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def sidestep_config(port: int, resolver: str) -> str:
    return f"""
[[inbound]]
name = "mixed"
listen = "127.0.0.1:0"
[dns]
timeout = 5
{resolver}
[dns.server]
enabled = true
listen = "127.0.0.1:{port}"
rate_limit = 0
[log]
level = "warning"
"""


def spawn_sidestep(
    port: int, resolver: str, folder: Path
) -> contextlib.AbstractContextManager[int]:
    cfg = folder / f"sidestep-{port}.toml"
    cfg.write_text(sidestep_config(port, resolver))
    cmd = [sys.executable, "-m", "proxy", "run", "--config", str(cfg)]
    return _spawn(cmd, port, folder / f"sidestep-{port}.log")


def spawn_dnsmasq(
    port: int, upstream: tuple[str, int], folder: Path
) -> contextlib.AbstractContextManager[int]:
    dnsmasq = shutil.which("dnsmasq")
    assert dnsmasq is not None
    cmd = [
        dnsmasq,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--pid-file=",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        f"--server={upstream[0]}#{upstream[1]}",
        "--cache-size=10000",
        "--log-facility=-",
    ]
    return _spawn(cmd, port, folder / f"dnsmasq-{port}.log")


def _write_queries(path: Path, names: list[str]) -> Path:
    path.write_text("".join(f"{n} A\n" for n in names))
    return path


def dnsperf(port: int, queries: Path, *extra: str) -> str:
    dnsperf_bin = shutil.which("dnsperf")
    assert dnsperf_bin is not None
    cmd = [dnsperf_bin, "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _field(output: str, label: str) -> float:
    for line in output.splitlines():
        if line.strip().startswith(label):
            return float(line.split(":", 1)[1].split()[0])
    raise RuntimeError(f"dnsperf printed no {label!r}:\n{output}")


def _latencies(output: str) -> list[float]:
    """Per-query seconds from ``dnsperf -v`` lines like ``> NOERROR www1.bench A 0.000123``."""
    out = []
    for line in output.splitlines():
        if line.startswith("> "):
            parts = line.split()
            with contextlib.suppress(ValueError, IndexError):
                out.append(float(parts[-1]))
    return out


def _measure_cached(port: int, queries: Path, args: argparse.Namespace) -> dict[str, float]:
    dnsperf(port, queries, "-n", "1", "-t", "5")  # every name once: fills the cache
    run = dnsperf(port, queries, "-l", str(args.seconds), "-c", str(args.clients), "-t", "5")
    lost = _field(run, "Queries lost")
    qps = _field(run, "Queries per second")
    lat = dnsperf(port, queries, "-l", "3", "-Q", str(args.latency_qps), "-v", "-t", "5")
    times = _latencies(lat)
    return {"qps": qps, "lost": lost, "p50": _pct(times, 0.50), "p99": _pct(times, 0.99)}


def run_dnsserver_bench(args: argparse.Namespace) -> None:
    missing = [tool for tool in ("dnsperf", "dnsmasq") if shutil.which(tool) is None]
    if missing:
        print(
            f"dnsserver: skipped, {' and '.join(missing)} not installed (apt-get install {' '.join(missing)})"
        )
        return
    ca = LabCA.create()
    upstreams = Upstreams(args.names, 2 * args.doh_queries, args.doh_delay, ca)
    upstreams.start()
    assert upstreams.plain.address is not None and upstreams.doh.address is not None
    plain = upstreams.plain.address
    with tempfile.TemporaryDirectory(prefix="sidestep-bench-dns-") as tmp:
        folder = Path(tmp)
        queries = _write_queries(
            folder / "cached.txt", [f"www{i}.bench" for i in range(args.names)]
        )
        results: dict[str, dict[str, float]] = {}
        udp = f'resolver = "udp"\nservers = ["{plain[0]}:{plain[1]}"]'
        s_port, d_port = _free_udp_tcp_port(), _free_udp_tcp_port()
        with (
            spawn_sidestep(s_port, udp, folder) as s_pid,
            spawn_dnsmasq(d_port, plain, folder) as d_pid,
        ):
            for label, port, pid in (("sidestep", s_port, s_pid), ("dnsmasq", d_port, d_pid)):
                results[label] = _measure_cached(port, queries, args)
                results[label]["rss"] = rss_kib(pid)
        print(
            f"dnsserver: {args.names} names cached, dnsperf {args.seconds} s x {args.clients} clients; "
            f"latency at {args.latency_qps} q/s"
        )
        print(f"  {'':<9} {'queries/s':>11} {'lost':>6} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8}")
        for label, r in results.items():
            print(
                f"  {label:<9} {r['qps']:>11,.0f} {r['lost']:>6.0f} {r['p50'] * 1e3:>8.3f} "
                f"{r['p99'] * 1e3:>8.3f} {r['rss'] / 1024:>8.1f}"
            )
        ratio = results["sidestep"]["qps"] / results["dnsmasq"]["qps"]
        print(f"  sidestep / dnsmasq cached rate: {ratio:.2f}x (target >= 0.5x)")

        # uncached, through DoH with a fixed delay
        cafile = ca.write_cert(folder / "ca.pem")
        doh = upstreams.doh
        secure = (
            'resolver = "secure"\n'
            "[[dns.endpoints]]\n"
            f'url = "{doh.url}"\n'
            f'bootstrap = ["{UPSTREAM_IP}"]\n'
            f'cafile = "{cafile}"'
        )
        fresh = _write_queries(
            folder / "fresh.txt", [f"new{i}.bench" for i in range(args.doh_queries)]
        )
        port = _free_udp_tcp_port()
        with spawn_sidestep(port, secure, folder):
            out = dnsperf(port, fresh, "-n", "1", "-q", "1", "-v", "-t", "5")  # one at a time
        times = _latencies(out)
        names = [f"new{i}.bench" for i in range(args.doh_queries, 2 * args.doh_queries)]
        direct = trio.run(_direct_doh, doh.url, str(cafile), names)
        p50, p99 = _pct(times, 0.50), _pct(times, 0.99)
        d50, d99 = _pct(direct, 0.50), _pct(direct, 0.99)
        print(
            f"  uncached via DoH (the server waits {args.doh_delay * 1e3:.0f} ms), "
            f"{len(times)} new names each:"
        )
        print(
            f"    through sidestep's DNS server   p50 {p50 * 1e3:6.1f} ms   p99 {p99 * 1e3:6.1f} ms"
        )
        print(
            f"    a DohResolver asked directly     p50 {d50 * 1e3:6.1f} ms   p99 {d99 * 1e3:6.1f} ms"
        )
        print(f"    the DNS server adds              p50 {(p50 - d50) * 1e3:6.1f} ms")


async def _direct_doh(url: str, cafile: str, names: list[str]) -> list[float]:
    """Seconds per query of a DohResolver in this process, one query at a time: the baseline
    for what the DNS server adds (the same DoH client code, no cache, no server)."""
    times = []
    async with DohResolver(url, [UPSTREAM_IP], cafile=cafile) as doh:
        for name in names:
            start = time.perf_counter()
            await doh.forward(dns.message.make_query(name, "A"))
            times.append(time.perf_counter() - start)
    return times
