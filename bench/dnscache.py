"""Cached-answer rate of :class:`proxy.resolve.cache.DnsCache` vs parsing each query with dnspython.

Fills a cache with ``--names`` names (an A answer with two addresses each, half of the queries
with an EDNS OPT record, mixed letter case), then answers ``--queries`` queries drawn from them
(all hits) four ways, in one thread, no sockets:

- ``fast``: ``DnsCache.lookup`` (key from the raw question bytes, ID and question patched in,
  the TTL-rewritten body reused within the same second).
- ``fast, new second``: the same with a clock that moves a second on every lookup, so every hit
  rewrites the TTL fields (the worst case for the fast path).
- ``parse``: ``dns.message.from_wire`` on every query, key on (name, type, class, DO), return the
  cached response bytes with the ID patched (the cheapest way that still parses).
- ``parse+render``: as ``parse`` but keeping dnspython messages and rendering the answer with
  ``to_wire`` (what a cache written the obvious way does).

Prints lookups per second (best of ``--repeat`` passes) and each one's ratio to ``fast``.
"""

from __future__ import annotations

import itertools
import random
import struct
import time
from collections.abc import Callable

import dns.flags
import dns.message
import dns.rrset

from proxy.resolve.cache import DnsCache

_U16 = struct.Struct(">H")


def _names(n: int, rng: random.Random) -> list[str]:
    words = ("www", "api", "cdn", "mail", "static", "img", "login", "m")
    return [f"{rng.choice(words)}.site{i}.example{i % 7}.com." for i in range(n)]


def _mixed_case(name: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.3 else c for c in name)


def _response(q: dns.message.Message, name: str) -> dns.message.Message:
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(name, 86400, "IN", "A", "192.0.2.1", "198.51.100.7"))
    return r


def _best_rate(fn: Callable[[bytes], object], queries: list[bytes], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for w in queries:
            fn(w)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best


def run_dnscache_bench(names: int, queries: int, seed: int, repeat: int) -> None:
    rng = random.Random(seed)
    clock_now = [0.0]
    cache = DnsCache(max_entries=max(names, 1), clock=lambda: clock_now[0])
    ticks = itertools.count()
    ticking = DnsCache(max_entries=max(names, 1), clock=lambda: float(next(ticks)))
    by_key: dict[tuple[object, int, int, bool], dns.message.Message] = {}
    wire_by_key: dict[tuple[object, int, int, bool], bytes] = {}
    templates: list[dns.message.Message] = []
    for name in _names(names, rng):
        edns = rng.random() < 0.5
        q = dns.message.make_query(name, "A", use_edns=0 if edns else False)
        r = _response(q, name)
        cache.store(q.to_wire(), r)
        ticking.store(q.to_wire(), r)
        key = (q.question[0].name, 1, 1, False)
        by_key[key] = r
        wire_by_key[key] = r.to_wire()
        templates.append(q)
    wires = []
    for _ in range(queries):
        t = rng.choice(templates)
        q = dns.message.make_query(
            _mixed_case(t.question[0].name.to_text(), rng), "A", use_edns=t.edns
        )
        q.id = rng.randrange(0x10000)
        wires.append(q.to_wire())
    clock_now[0] = 42.0  # hits show TTL 86358

    def parse(w: bytes) -> bytes:
        m = dns.message.from_wire(w)
        q = m.question[0]
        cached = wire_by_key[(q.name, q.rdtype, q.rdclass, bool(m.ednsflags & dns.flags.DO))]
        return _U16.pack(m.id) + cached[2:]

    def parse_render(w: bytes) -> bytes:
        m = dns.message.from_wire(w)
        q = m.question[0]
        r = by_key[(q.name, q.rdtype, q.rdclass, bool(m.ednsflags & dns.flags.DO))]
        r.id = m.id
        return r.to_wire()

    for w in wires[:100]:  # all three agree on what they answer
        out = cache.lookup(w)
        assert out is not None and out[:2] == parse(w)[:2] == parse_render(w)[:2]

    rates = {
        "fast": _best_rate(cache.lookup, wires, repeat),
        "fast, new second": _best_rate(ticking.lookup, wires, repeat),
        "parse": _best_rate(parse, wires, repeat),
        "parse+render": _best_rate(parse_render, wires, repeat),
    }
    print(f"dnscache: {names} names, {queries} cached queries, best of {repeat}")
    for label, rate in rates.items():
        print(f"  {label:<17} {rate:>12,.0f} lookups/s   {rate / rates['fast']:.3f}x of fast")
    print(f"  fast / parse = {rates['fast'] / rates['parse']:.1f}")
