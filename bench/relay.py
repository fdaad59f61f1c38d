"""Bulk throughput of :func:`proxy.net.relay.relay` against a direct loopback transfer.

A source process sends ``size`` bytes to a sink process, once directly and once through a trio
relay in this process (source -> listener here -> relay -> sink). The sink times the transfer; the
relay's CPU time comes from ``getrusage`` of this process, which does nothing else meanwhile.
Modes: ``hybrid`` (the default relay: copy, then splice for bulk), ``copy`` (``splice=False``),
``stream`` (the generic receive_some/send_all path, forced by wrapping the sockets).
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
from dataclasses import dataclass

import trio

from proxy.net.relay import relay

GiB = 1 << 30
MODES = ("hybrid", "copy", "stream")


@dataclass
class Result:
    mode: str
    seconds: float
    cpu: float

    def gbps(self, size: int) -> float:
        return size * 8 / self.seconds / 1e9


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def _start_sink() -> tuple[subprocess.Popen[str], int]:
    listener = _listener()
    port = listener.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", "sink", "--fd", str(listener.fileno())],
        pass_fds=[listener.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    listener.close()
    return proc, port


def _start_source(port: int, size: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", "source", "--port", str(port), "--bytes", str(size)]
    )


def _finish(sink: subprocess.Popen[str], source: subprocess.Popen[str], size: int) -> float:
    out, _ = sink.communicate(timeout=600)
    source.wait(timeout=60)
    got, seconds = out.split()
    if int(got) != size:
        raise RuntimeError(f"sink received {got} bytes, expected {size}")
    return float(seconds)


def run_direct(size: int) -> Result:
    sink, port = _start_sink()
    source = _start_source(port, size)
    return Result("direct", _finish(sink, source, size), 0.0)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _relay_once(mode: str, size: int) -> Result:
    sink, sink_port = _start_sink()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    source = _start_source(port, size)
    a = await listeners[0].accept()
    await listeners[0].aclose()
    b = await trio.open_tcp_stream("127.0.0.1", sink_port)
    cpu = _cpu()
    if mode == "stream":
        await relay(trio.StapledStream(a, a), trio.StapledStream(b, b), idle_timeout=30)
    else:
        await relay(a, b, idle_timeout=30, splice=(mode == "hybrid"))
    cpu = _cpu() - cpu
    await a.aclose()
    await b.aclose()
    seconds = await trio.to_thread.run_sync(_finish, sink, source, size)
    return Result(mode, seconds, cpu)


def run_relay_bench(size: int = GiB, modes: tuple[str, ...] = MODES, repeat: int = 1) -> None:
    print(f"relay benchmark: {size / GiB:g} GiB per transfer, best of {repeat}")
    best_direct = min((run_direct(size) for _ in range(repeat)), key=lambda r: r.seconds)
    print(f"  {'direct':>7}: {best_direct.seconds:6.3f} s  {best_direct.gbps(size):6.2f} Gbit/s")
    for mode in modes:
        results = [trio.run(_relay_once, mode, size) for _ in range(repeat)]
        best = min(results, key=lambda r: r.seconds)
        print(
            f"  {mode:>7}: {best.seconds:6.3f} s  {best.gbps(size):6.2f} Gbit/s  "
            f"ratio {best_direct.seconds / best.seconds:5.2f}x direct  "
            f"relay CPU {best.cpu / (size / GiB):5.2f} s/GiB"
        )
    # direct again at the end: shows how steady the machine was during the run
    again = run_direct(size)
    print(f"  {'direct':>7}: {again.seconds:6.3f} s  {again.gbps(size):6.2f} Gbit/s  (re-run)")
