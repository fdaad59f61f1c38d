"""A SOCKS5 proxy (sidestep, microsocks, dante, ...) measured against direct loopback.

An origin server process (``bench.loadgen origin``) serves both paths; every figure is printed
next to the same measurement made directly to the origin in the same run:

* bulk download of ``--bulk-mib`` MiB (throughput ratio),
* sequential connections (connect, handshake, 8-byte request, 1-byte answer, close) per second,
* ``--concurrency``-way concurrent connections per second with p50/p99 latency added by the proxy,
* with ``--pid`` (or a spawned proxy): resident memory idle and with ``--idle`` open tunnels.

The load generator is plain blocking sockets in threads: each connection spends its time in
system calls, where the GIL is released.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.loadgen import CHUNK, HOLD

Opener = Callable[[int], socket.socket]


def sidestep_config(port: int) -> str:
    """The config ``--spawn-sidestep`` writes (tentative shape: the only place that knows it)."""
    level = os.environ.get("BENCH_SIDESTEP_LOG", "info")
    return (
        f'[[inbound]]\nname = "bench"\nprotocol = "socks5"\nlisten = "127.0.0.1:{port}"\n'
        f'[log]\nlevel = "{level}"\n'
    )


def dante_config(port: int) -> str:
    """A loopback-only danted.conf without authentication (dante 1.4 syntax)."""
    return (
        "logoutput: stderr\n"
        f"internal: 127.0.0.1 port = {port}\n"
        "external: 127.0.0.1\n"
        "clientmethod: none\n"
        "socksmethod: none\n"
        "user.privileged: root\n"
        "user.unprivileged: nobody\n"
        "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
        "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
    )


# -- clients ---------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("unexpected EOF")
        data += chunk
    return data


def direct_opener(origin_port: int) -> Opener:
    def open_direct(_: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", origin_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return open_direct


def socks_opener(proxy_port: int, origin_port: int) -> Opener:
    request = b"\x05\x01\x00\x01" + ipaddress.IPv4Address("127.0.0.1").packed
    request += struct.pack("!H", origin_port)

    def open_socks(_: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", proxy_port))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"\x05\x01\x00")
            if _recv_exact(sock, 2) != b"\x05\x00":
                raise ConnectionError("proxy refused no-auth")
            sock.sendall(request)
            head = _recv_exact(sock, 4)
            if head[1] != 0:
                raise ConnectionError(f"SOCKS reply {head[1]}")
            atyp = head[3]
            rest = 6 if atyp == 1 else 18 if atyp == 4 else _recv_exact(sock, 1)[0] + 2
            _recv_exact(sock, rest)
        except BaseException:
            sock.close()
            raise
        return sock

    return open_socks


def one_exchange(opener: Opener) -> float:
    """Connect, ask for one byte, read it and the EOF, close; return the seconds it took."""
    start = time.perf_counter()
    sock = opener(0)
    try:
        sock.sendall(struct.pack("!Q", 1))
        _recv_exact(sock, 1)
    finally:
        sock.close()
    return time.perf_counter() - start


def bulk(opener: Opener, size: int) -> float:
    sock = opener(0)
    buf = bytearray(CHUNK)
    try:
        start = time.perf_counter()
        sock.sendall(struct.pack("!Q", size))
        got = 0
        while n := sock.recv_into(buf):
            got += n
        elapsed = time.perf_counter() - start
    finally:
        sock.close()
    if got != size:
        raise RuntimeError(f"bulk got {got} of {size} bytes")
    return elapsed


def rate(opener: Opener, total: int, workers: int) -> tuple[float, list[float]]:
    """``total`` exchanges spread over ``workers`` threads: (connections/s, latencies)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    per_worker = [total // workers + (i < total % workers) for i in range(workers)]
    barrier = threading.Barrier(workers + 1)

    def work(count: int) -> None:
        mine = []
        barrier.wait()
        try:
            for _ in range(count):
                mine.append(one_exchange(opener))
        except OSError as exc:
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=work, args=(n,)) for n in per_worker]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        print(f"    {len(errors)} worker(s) failed, first: {errors[0]!r}")
    return len(latencies) / elapsed, latencies


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# -- processes -------------------------------------------------------------------------------


@contextlib.contextmanager
def origin_server() -> Iterator[int]:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", "origin", "--fd", str(listener.fileno())],
        pass_fds=[listener.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    listener.close()
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_port(port: int, proc: subprocess.Popen[bytes], limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {limit:g} s")


@contextlib.contextmanager
def spawned_proxy(kind: str, port: int, extra_config: str = "") -> Iterator[int]:
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "sidestep":
            if importlib.util.find_spec("proxy.cli") is None:
                raise SystemExit("proxy.cli does not exist yet: cannot --spawn-sidestep")
            config = Path(tmp) / "bench.toml"
            config.write_text(sidestep_config(port) + extra_config)
            # learned memory and evidence of a benchmark run stay in its temporary folder
            os.environ["XDG_STATE_HOME"] = tmp
            cmd = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
        elif kind == "dante":
            binary = shutil.which("danted") or shutil.which("sockd")
            if binary is None:
                raise SystemExit("dante is not installed (apt-get install dante-server)")
            config = Path(tmp) / "danted.conf"
            config.write_text(dante_config(port))
            cmd = [binary, "-f", str(config)]
        else:
            binary = shutil.which("microsocks")
            if binary is None:
                raise SystemExit("microsocks is not installed (apt-get install microsocks)")
            cmd = [binary, "-i", "127.0.0.1", "-p", str(port)]
        log = (Path(tmp) / "proxy.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                _wait_port(port, proc)
            except RuntimeError:
                log.flush()
                print((Path(tmp) / "proxy.log").read_text(errors="replace")[-3000:])
                raise
            yield proc.pid
        finally:
            log.close()
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the benchmark ---------------------------------------------------------------------------


def _measure(args: argparse.Namespace, pid: int | None) -> None:
    with origin_server() as origin:
        direct = direct_opener(origin)
        proxied = socks_opener(args.port, origin)
        one_exchange(proxied)  # fail early when the proxy does not work

        size = args.bulk_mib << 20
        # best of two, interleaved, to damp the noise of a shared machine
        d = min(bulk(direct, size), bulk(direct, size))
        p = min(bulk(proxied, size), bulk(proxied, size))
        print(f"bulk download {args.bulk_mib} MiB")
        print(f"  direct {size * 8 / d / 1e9:6.2f} Gbit/s   proxy {size * 8 / p / 1e9:6.2f} Gbit/s")
        print(f"  ratio  {d / p:.2f}x direct")

        for label, workers in (("sequential", 1), (f"{args.concurrency}-way", args.concurrency)):
            d_rate, d_lat = rate(direct, args.connections, workers)
            p_rate, p_lat = rate(proxied, args.connections, workers)
            print(f"{label} connections ({args.connections})")
            print(
                f"  direct {d_rate:8.0f}/s   proxy {p_rate:8.0f}/s   ratio {p_rate / d_rate:.2f}x"
            )
            for q in (0.5, 0.99):
                dq, pq = _pct(d_lat, q), _pct(p_lat, q)
                print(
                    f"  p{int(q * 100):<2}   direct {dq * 1e3:7.2f} ms  proxy {pq * 1e3:7.2f} ms  "
                    f"added {(pq - dq) * 1e3:7.2f} ms  ratio {pq / dq:.2f}x"
                )

        if pid is not None:
            _memory(args, proxied, pid)


def rss_with_idle_tunnels(proxied: Opener, pid: int, count: int) -> tuple[int, int, int]:
    """RSS of ``pid`` in KiB idle and with ``count`` relayed tunnels held open, and how many
    tunnels were held."""
    time.sleep(0.5)
    idle = rss_kib(pid)
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = proxied(0)
            held.append(sock)
            sock.sendall(struct.pack("!Q", HOLD))
        for sock in held:
            _recv_exact(sock, 1)  # the tunnel is up and relaying
        time.sleep(0.5)
        loaded = rss_kib(pid)
    finally:
        for sock in held:
            sock.close()
    return idle, loaded, len(held)


def _memory(args: argparse.Namespace, proxied: Opener, pid: int) -> None:
    idle, loaded, n = rss_with_idle_tunnels(proxied, pid, args.idle)
    per = (loaded - idle) / max(1, n)
    print(f"memory of pid {pid}")
    print(f"  idle {idle / 1024:.1f} MiB   with {n} idle tunnels {loaded / 1024:.1f} MiB")
    print(f"  {per:.1f} KiB per relayed connection")


def run_socks_bench(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.idle + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # children inherit it
    kind = (
        "sidestep"
        if args.spawn_sidestep
        else "microsocks"
        if args.spawn_microsocks
        else "dante"
        if args.spawn_dante
        else None
    )
    print(f"SOCKS5 benchmark on 127.0.0.1:{args.port} ({kind or 'already running'})")
    if kind is None:
        _measure(args, args.pid)
        return
    with spawned_proxy(kind, args.port) as pid:
        _measure(args, args.pid or pid)
