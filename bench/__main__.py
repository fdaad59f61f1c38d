"""``python -m bench relay`` / ``socks --port 1080`` / ``rules`` / ``dnscache`` / ``dnsserver`` /
``ttfb`` / ``household`` (see bench/README.md)."""

from __future__ import annotations

import argparse

from bench.relay import MODES, GiB, run_relay_bench


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rel = sub.add_parser("relay", help="throughput of relay() vs direct loopback")
    rel.add_argument("--size-mib", type=int, default=GiB >> 20)
    rel.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    rel.add_argument("--repeat", type=int, default=1)
    socks = sub.add_parser("socks", help="a SOCKS5 proxy vs direct loopback")
    socks.add_argument("--port", type=int, default=1080, help="proxy port (or the one to spawn on)")
    socks.add_argument("--pid", type=int, help="proxy pid, for memory figures")
    spawn = socks.add_mutually_exclusive_group()
    spawn.add_argument("--spawn-sidestep", action="store_true", help="start `python -m proxy run`")
    spawn.add_argument("--spawn-microsocks", action="store_true", help="start microsocks")
    spawn.add_argument("--spawn-dante", action="store_true", help="start danted")
    socks.add_argument("--bulk-mib", type=int, default=1024)
    socks.add_argument("--connections", type=int, default=2000, help="per connection-rate test")
    socks.add_argument("--concurrency", type=int, default=200)
    socks.add_argument("--idle", type=int, default=1000, help="idle tunnels for the memory test")
    cmp = sub.add_parser("compare", help="sidestep, microsocks and dante in one run")
    cmp.add_argument("--port", type=int, default=18080, help="first of the ports to spawn on")
    cmp.add_argument("--bulk-mib", type=int, default=1024)
    cmp.add_argument("--connections", type=int, default=2000)
    cmp.add_argument("--concurrency", type=int, default=200)
    cmp.add_argument("--idle", type=int, default=1000)
    rules = sub.add_parser("rules", help="routing decision cost for many rules")
    rules.add_argument("--rules", type=int, default=10000)
    rules.add_argument("--queries", type=int, default=100000)
    rules.add_argument("--naive-queries", type=int, default=1000, help="for the linear scan")
    rules.add_argument("--seed", type=int, default=1)
    rules.add_argument("--repeat", type=int, default=3, help="passes; the best is printed")
    fb = sub.add_parser("fallback", help="time to first byte of a first visit with one fallback")
    fb.add_argument("--port", type=int, default=18180)
    fb.add_argument("--connections", type=int, default=500)
    dc = sub.add_parser("dnscache", help="cached DNS answers/s: raw-bytes fast path vs dnspython")
    dc.add_argument("--names", type=int, default=1000)
    dc.add_argument("--queries", type=int, default=20000)
    dc.add_argument("--seed", type=int, default=1)
    dc.add_argument("--repeat", type=int, default=3, help="passes; the best is printed")
    ds = sub.add_parser("dnsserver", help="sidestep's DNS server vs dnsmasq, with dnsperf")
    ds.add_argument("--names", type=int, default=1000)
    ds.add_argument("--seconds", type=int, default=10, help="length of the cached-rate run")
    ds.add_argument("--clients", type=int, default=4, help="dnsperf client sockets")
    ds.add_argument("--latency-qps", type=int, default=2000, help="rate of the latency run")
    ds.add_argument("--doh-delay", type=float, default=0.05, help="seconds the DoH server waits")
    ds.add_argument("--doh-queries", type=int, default=200, help="uncached names asked via DoH")
    tt = sub.add_parser("ttfb", help="time to first byte: SNI-reset site first/repeat visit")
    tt.add_argument("--repeat", type=int, default=30, help="fetches per kind; medians printed")
    from bench.bridge import add_bridge_bench_parser

    add_bridge_bench_parser(sub)
    bc = sub.add_parser("bridgecodec", help="bridge record seal+open vs raw ChaCha20-Poly1305")
    bc.add_argument("--mib", type=int, default=256, help="MiB sealed and opened per pass")
    bc.add_argument("--repeat", type=int, default=3, help="passes; the best is printed")
    from bench.household import add_household_parser

    add_household_parser(sub)
    args = parser.parse_args()
    if args.cmd == "relay":
        modes = tuple(m for m in args.modes.split(",") if m)
        unknown = set(modes) - set(MODES)
        if unknown:
            parser.error(f"unknown modes {sorted(unknown)}")
        run_relay_bench(args.size_mib << 20, modes, args.repeat)
    elif args.cmd == "rules":
        from bench.rules import run_rules_bench

        run_rules_bench(args.rules, args.queries, args.naive_queries, args.seed, args.repeat)
    elif args.cmd == "dnscache":
        from bench.dnscache import run_dnscache_bench

        run_dnscache_bench(args.names, args.queries, args.seed, args.repeat)
    elif args.cmd == "dnsserver":
        from bench.dnsserver import run_dnsserver_bench

        run_dnsserver_bench(args)
    elif args.cmd == "bridge":
        from bench.bridge import run_bridge_bench

        run_bridge_bench(args)
    elif args.cmd == "bridgecodec":
        from bench.bridgecodec import run_bridgecodec_bench

        run_bridgecodec_bench(args.mib, args.repeat)
    elif args.cmd == "ttfb":
        from bench.ttfb import run_ttfb_bench

        run_ttfb_bench(args)
    elif args.cmd == "household":
        from bench.household import run_household_bench

        run_household_bench(args)
    elif args.cmd == "fallback":
        from bench.fallback import run_fallback_bench

        run_fallback_bench(args)
    elif args.cmd == "compare":
        from bench.compare import run_compare

        run_compare(args)
    else:
        from bench.socks import run_socks_bench

        run_socks_bench(args)


if __name__ == "__main__":
    main()
