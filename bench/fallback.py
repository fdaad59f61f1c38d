"""What one fallback costs a first visit: time to first byte through a policy whose first
strategy is refused, against the direct policy and direct loopback, all in one run.

``python -m bench fallback`` starts two sidestep processes: one on its default (direct) policy,
one whose only policy is ``["dead", "direct"]`` where ``dead`` is a SOCKS5 upstream on a port
nothing listens on, with learning off so that every connection is a first visit and pays the
failed attempt. Each figure is the p50 of sequential exchanges (connect, SOCKS5 handshake,
8-byte request, first byte of the answer).
"""

from __future__ import annotations

import argparse
import socket

from bench.socks import _pct, direct_opener, origin_server, rate, socks_opener, spawned_proxy


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fallback_config(dead_port: int) -> str:
    return (
        '[[strategy]]\nname = "dead"\ntype = "socks5"\n'
        f'server = "127.0.0.1:{dead_port}"\n'
        '[[policy]]\nname = "first-visit"\nstrategies = ["dead", "direct"]\n'
        '[router]\ndefault_policy = "first-visit"\nlearn = false\n'
    )


def run_fallback_bench(args: argparse.Namespace) -> None:
    n = args.connections
    with origin_server() as origin:
        _, direct = rate(direct_opener(origin), n, 1)
        with spawned_proxy("sidestep", args.port) as _pid:
            _, plain = rate(socks_opener(args.port, origin), n, 1)
        config = fallback_config(_closed_port())
        with spawned_proxy("sidestep", args.port + 1, config) as _pid:
            _, fallback = rate(socks_opener(args.port + 1, origin), n, 1)
    d, p, f = (_pct(x, 0.5) * 1e3 for x in (direct, plain, fallback))
    print(f"time to first byte, p50 of {n} sequential first visits")
    print(f"  direct loopback            {d:7.2f} ms")
    print(f"  sidestep, direct policy    {p:7.2f} ms   {p / d:5.2f}x direct")
    print(
        f"  sidestep, one fallback     {f:7.2f} ms   {f / d:5.2f}x direct   {f / p:5.2f}x direct policy"
    )
    print(f"  the fallback adds          {f - p:7.2f} ms")
