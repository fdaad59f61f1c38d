"""sidestep next to microsocks and dante, all measured in one run against direct loopback.

``python -m bench compare`` spawns each proxy that is installed on its own port and measures,
for each, what issue #2 sets targets for: bulk download throughput, sequential connection rate
with the p50 latency added, 200-way concurrent rate, the proxy's CPU seconds per GiB relayed,
and resident memory idle and per idle relayed connection. Every figure is a ratio against
direct loopback (and sidestep's also against the other proxies), because the machine is shared
and absolute numbers drift from run to run.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass, field

from bench.socks import (
    Opener,
    _pct,
    bulk,
    direct_opener,
    origin_server,
    rate,
    rss_with_idle_tunnels,
    socks_opener,
    spawned_proxy,
)

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass
class Figures:
    bulk_gbit: float = 0.0
    cpu_per_gib: float = 0.0
    seq_rate: float = 0.0
    seq_p50_ms: float = 0.0
    conc_rate: float = 0.0
    conc_p50_ms: float = 0.0
    idle_mib: float = 0.0
    per_conn_kib: float = 0.0
    notes: list[str] = field(default_factory=list)


def _measure(opener: Opener, args: argparse.Namespace, pid: int | None) -> Figures:
    f = Figures()
    size = args.bulk_mib << 20
    cpu0 = cpu_seconds(pid) if pid else 0.0
    secs = min(bulk(opener, size), bulk(opener, size))
    if pid:
        f.cpu_per_gib = (cpu_seconds(pid) - cpu0) / (2 * size / (1 << 30))
    f.bulk_gbit = size * 8 / secs / 1e9
    f.seq_rate, lat = rate(opener, args.connections, 1)
    f.seq_p50_ms = _pct(lat, 0.5) * 1e3
    f.conc_rate, lat = rate(opener, args.connections, args.concurrency)
    f.conc_p50_ms = _pct(lat, 0.5) * 1e3
    if pid:
        idle, loaded, held = rss_with_idle_tunnels(opener, pid, args.idle)
        f.idle_mib = idle / 1024
        f.per_conn_kib = (loaded - idle) / max(1, held)
    return f


def run_compare(args: argparse.Namespace) -> None:
    kinds = ["sidestep"]
    if shutil.which("microsocks"):
        kinds.append("microsocks")
    if shutil.which("danted") or shutil.which("sockd"):
        kinds.append("dante")
    results: dict[str, Figures] = {}
    with origin_server() as origin:
        results["direct"] = _measure(direct_opener(origin), args, None)
        for i, kind in enumerate(kinds):
            port = args.port + i
            with spawned_proxy(kind, port) as pid:
                socks_opener(port, origin)(0).close()
                results[kind] = _measure(socks_opener(port, origin), args, pid)
    _print(results, args)


def _print(results: dict[str, Figures], args: argparse.Namespace) -> None:
    d = results["direct"]
    print(
        f"bulk {args.bulk_mib} MiB, {args.connections} connections, "
        f"{args.concurrency}-way, {args.idle} idle tunnels"
    )
    head = f"{'':12}{'bulk Gbit/s':>12}{'CPU s/GiB':>10}{'seq/s':>8}{'+p50 us':>9}"
    head += f"{'200-way/s':>10}{'+p50 ms':>9}{'idle MiB':>9}{'KiB/conn':>9}"
    print(head)
    for name, f in results.items():
        print(
            f"{name:12}{f.bulk_gbit:12.2f}{f.cpu_per_gib:10.2f}{f.seq_rate:8.0f}"
            f"{(f.seq_p50_ms - d.seq_p50_ms) * 1e3:9.0f}{f.conc_rate:10.0f}"
            f"{f.conc_p50_ms - d.conc_p50_ms:9.1f}{f.idle_mib:9.1f}{f.per_conn_kib:9.1f}"
        )
    s = results["sidestep"]
    print("sidestep as ratios (targets of issue #2 in brackets):")
    print(f"  bulk           {s.bulk_gbit / d.bulk_gbit:5.2f}x direct   [>= 0.5x]")
    if "dante" in results:
        print(
            f"  bulk           {s.bulk_gbit / results['dante'].bulk_gbit:5.2f}x dante    [>= 1.5x]"
        )
    if "microsocks" in results:
        m = results["microsocks"]
        print(f"  sequential     {s.seq_rate / m.seq_rate:5.2f}x microsocks [>= 0.25x]")
        print(f"  200-way        {s.conc_rate / m.conc_rate:5.2f}x microsocks")
    print(f"  sequential     {s.seq_rate / d.seq_rate:5.2f}x direct")
    print(f"  added p50      {(s.seq_p50_ms - d.seq_p50_ms) * 1e3:5.0f} us        [<= 700 us]")
    print(f"  per idle conn  {s.per_conn_kib:5.1f} KiB       [<= 14 KiB]")
    print(f"  idle RSS       {s.idle_mib:5.1f} MiB       [<= 40 MiB]")
