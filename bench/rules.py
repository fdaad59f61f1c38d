"""Cost of one routing decision with :class:`proxy.route.rules.RuleSet` for many rules.

Builds ``--rules`` rules of mixed kinds (mostly domain suffixes and CIDRs, some exact names,
keywords and port/inbound filters, a few regexes), times the compile, then the mean cost of
``match`` over ``--queries`` random destinations (half of them built to hit a rule), per kind
of query. The same run times a plain linear first-match scan over the same pre-parsed rules
(regexes compiled, networks as integers) on ``--naive-queries`` of those destinations, checks
that both give the same answers, and prints the ratio.
"""

from __future__ import annotations

import ipaddress
import random
import re
import string
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

from proxy.route.rules import IPAddress, RuleSet, RuleSpec

POLICIES = ("direct", "fragment", "front", "bridge", "block")
TLDS = ("com", "org", "net", "ru", "ir", "cn", "io", "co.uk", "com.tr")
INBOUNDS = ("socks", "http", "lan")
Query = tuple[str | None, IPAddress | None, int, str]


def _label(rng: random.Random, lo: int = 3, hi: int = 10) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(lo, hi)))


def _domain(rng: random.Random) -> str:
    return ".".join([_label(rng) for _ in range(rng.choice((1, 1, 1, 2)))] + [rng.choice(TLDS)])


def _network(rng: random.Random) -> str:
    if rng.random() < 0.15:
        plen = rng.choice((32, 40, 48, 56, 64, 128))
        return str(ipaddress.IPv6Network((rng.getrandbits(128), plen), strict=False))
    plen = rng.choice((16, 20, 22, 24, 24, 24, 28, 32, 32)) if rng.random() > 0.002 else 8
    return str(ipaddress.IPv4Network((rng.getrandbits(32), plen), strict=False))


def build_rules(n: int, rng: random.Random) -> list[RuleSpec]:
    """Mostly suffixes and CIDRs; ~3% exact, ~5% keywords, ~0.3% regexes, ~5% with a filter."""
    specs = []
    for i in range(n):
        policy = rng.choice(POLICIES)
        roll = rng.random()
        extra: dict[str, tuple[int | str, ...]] = {}
        if rng.random() < 0.04:
            extra["port"] = (rng.choice((80, 443, "8000-8999")),)
        if rng.random() < 0.01:
            extra["inbound"] = (rng.choice(INBOUNDS),)
        if roll < 0.55:
            suffixes = tuple(_domain(rng) for _ in range(rng.choice((1, 1, 2, 3))))
            spec = RuleSpec(policy, domain_suffix=suffixes, **extra)  # type: ignore[arg-type]
        elif roll < 0.87:
            nets = tuple(_network(rng) for _ in range(rng.choice((1, 1, 2))))
            spec = RuleSpec(policy, ip_cidr=nets, **extra)  # type: ignore[arg-type]
        elif roll < 0.90:
            spec = RuleSpec(policy, domain=(_domain(rng),), **extra)  # type: ignore[arg-type]
        elif roll < 0.95:
            spec = RuleSpec(policy, domain_keyword=(_label(rng, 4, 8),), **extra)  # type: ignore[arg-type]
        elif roll < 0.953:
            pattern = rf"^{_label(rng, 2, 4)}\d*\.{_label(rng, 3, 6)}"
            spec = RuleSpec(policy, domain_regex=(pattern,))
        elif roll < 0.955:
            spec = RuleSpec(policy, port=(rng.randint(1, 1024),), inbound=(rng.choice(INBOUNDS),))
        else:
            spec = RuleSpec(policy, domain_suffix=(_domain(rng),), **extra)  # type: ignore[arg-type]
        specs.append(RuleSpec(**{**spec.__dict__, "name": f"r{i}"}))
    return specs


def build_queries(specs: list[RuleSpec], n: int, rng: random.Random) -> dict[str, list[Query]]:
    """Queries by kind: name hit/miss, address hit/miss (half of each hit a rule by design)."""
    suffixes = [s for spec in specs for s in spec.domain_suffix + spec.domain]
    keywords = [k for spec in specs for k in spec.domain_keyword]
    nets = [ipaddress.ip_network(c) for spec in specs for c in spec.ip_cidr]
    out: dict[str, list[Query]] = {"name hit": [], "name miss": [], "ip hit": [], "ip miss": []}

    def common() -> tuple[int, str]:
        return rng.choice((443, 443, 443, 80, 8443)), rng.choice(INBOUNDS)

    for _ in range(n // 4):
        if rng.random() < 0.8 or not keywords:
            host = f"{_label(rng)}.{rng.choice(suffixes)}"
        else:
            host = f"{_label(rng, 1, 3)}{rng.choice(keywords)}{_label(rng, 1, 3)}.com"
        out["name hit"].append((host, None, *common()))
        out["name miss"].append((f"www.{_label(rng)}.{_label(rng)}.example", None, *common()))
        net = rng.choice(nets)
        addr = ipaddress.ip_address(int(net.network_address) + rng.randrange(net.num_addresses))
        out["ip hit"].append((None, addr, *common()))
        miss = ipaddress.ip_address(
            rng.getrandbits(32) if rng.random() < 0.85 else rng.getrandbits(128)
        )
        out["ip miss"].append((None, miss, *common()))
    return out


@dataclass(frozen=True, slots=True)
class _Naive:
    """One rule pre-parsed for the linear scan."""

    policy: str
    exact: frozenset[str]
    suffixes: tuple[str, ...]
    keywords: tuple[str, ...]
    regexes: tuple[re.Pattern[str], ...]
    nets: tuple[tuple[int, int, int], ...]  # (version, network int, mask)
    has_dest: bool
    ports: tuple[tuple[int, int], ...]
    inbounds: frozenset[str]


def naive_matcher(specs: list[RuleSpec], default: str) -> Callable[[Query], tuple[str, int | None]]:
    """A straightforward first-match scan, the way a router without indexes would do it."""
    rules = []
    for spec in specs:
        nets = []
        for cidr in spec.ip_cidr:
            net = ipaddress.ip_network(cidr, strict=False)
            nets.append((net.version, int(net.network_address), int(net.netmask)))
        ports = []
        for p in spec.port:
            lo, _, hi = str(p).partition("-")
            ports.append((int(lo), int(hi or lo)))
        dest = spec.domain + spec.domain_suffix + spec.domain_keyword + spec.domain_regex
        rules.append(
            _Naive(
                spec.policy,
                frozenset(spec.domain),
                tuple(spec.domain_suffix),
                spec.domain_keyword,
                tuple(re.compile(r) for r in spec.domain_regex),
                tuple(nets),
                bool(dest or spec.ip_cidr),
                tuple(ports),
                frozenset(spec.inbound),
            )
        )

    def match(query: Query) -> tuple[str, int | None]:
        host, addr, port, inbound = query
        name = host.lower().rstrip(".") if host else None
        value = int(addr) if addr is not None else 0
        for i, r in enumerate(rules):
            if r.inbounds and inbound not in r.inbounds:
                continue
            if r.ports and not any(lo <= port <= hi for lo, hi in r.ports):
                continue
            if r.has_dest:
                hit = name is not None and (
                    name in r.exact
                    or any(name == s or name.endswith("." + s) for s in r.suffixes)
                    or any(k in name for k in r.keywords)
                    or any(rx.search(name) for rx in r.regexes)
                )
                if not hit and addr is not None:
                    hit = any(v == addr.version and value & m == n for v, n, m in r.nets)
                if not hit:
                    continue
            return r.policy, i
        return default, None

    return match


def _mean_us(fn: Callable[[Query], object], queries: list[Query], repeat: int = 1) -> float:
    """Mean cost per query in microseconds, the best of ``repeat`` passes (the host is shared)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for q in queries:
            fn(q)
        best = min(best, time.perf_counter() - start)
    return best / len(queries) * 1e6


def run_rules_bench(n_rules: int, n_queries: int, n_naive: int, seed: int, repeat: int) -> None:
    rng = random.Random(seed)
    specs = build_rules(n_rules, rng)
    start = time.perf_counter()
    ruleset = RuleSet.compile(specs, "direct")
    compile_s = time.perf_counter() - start
    tracemalloc.start()
    again = RuleSet.compile(specs, "direct")
    size, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del again
    print(f"rules: {n_rules}, compile {compile_s * 1e3:.1f} ms, index ~{size / 2**20:.1f} MiB")

    by_kind = build_queries(specs, n_queries, rng)

    def compiled(q: Query) -> object:
        return ruleset.match(*q)

    naive = naive_matcher(specs, "direct")
    print(f"best of {repeat} passes; 'hit %' is the share that matched a rule (not the default)")
    print(
        f"{'queries':<10} {'n':>7} {'hit %':>6} {'compiled us':>12} {'naive us':>10} {'ratio':>8}"
    )
    total_c = total_n = 0.0
    agree = True
    for kind, queries in by_kind.items():
        sample = queries[: max(1, n_naive // len(by_kind))]
        for q in sample:
            m = ruleset.match(*q)
            agree &= (m.policy, m.rule_index) == naive(q)
        hits = sum(ruleset.match(*q).rule_index is not None for q in queries) / len(queries)
        c_us = _mean_us(compiled, queries, repeat)
        n_us = _mean_us(naive, sample)
        total_c += c_us
        total_n += n_us
        print(
            f"{kind:<10} {len(queries):>7} {hits:>6.0%} {c_us:>12.2f} {n_us:>10.1f} "
            f"{n_us / c_us:>7.0f}x"
        )
    k = len(by_kind)
    print(
        f"{'mean':<10} {sum(map(len, by_kind.values())):>7} {'':>6} {total_c / k:>12.2f} "
        f"{total_n / k:>10.1f} {total_n / total_c:>7.0f}x"
    )
    print(f"compiled and naive answers agree on the naive sample: {'yes' if agree else 'NO'}")
