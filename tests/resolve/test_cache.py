"""Tests for proxy.resolve.cache: TTLs, clamps, negative caching, serve-stale, LRU, prefetch."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import dns.wire
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocols.dnswire import build_query, question_key
from proxy.resolve.cache import DnsCache

SOA = "ns1.example.com. hostmaster.example.com. 1 7200 900 1209600 {minimum}"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def query(
    name: str = "www.example.com.", rdtype: str = "A", msg_id: int = 1, **kw: object
) -> dns.message.QueryMessage:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    q.id = msg_id
    return q


def answer(q: dns.message.Message, *rrsets: dns.rrset.RRset) -> dns.message.Message:
    r = dns.message.make_response(q)
    r.answer.extend(rrsets)
    return r


def a_rrset(name: str = "www.example.com.", ttl: int = 300) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", "A", "192.0.2.1", "192.0.2.2")


def negative(
    q: dns.message.Message, rcode: int, soa_ttl: int | None, minimum: int = 60
) -> dns.message.Message:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if soa_ttl is not None:
        r.authority.append(
            dns.rrset.from_text("example.com.", soa_ttl, "IN", "SOA", SOA.format(minimum=minimum))
        )
    return r


def ttls(wire: bytes) -> list[int]:
    m = dns.message.from_wire(wire)
    return [rr.ttl for section in (m.answer, m.authority) for rr in section]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_cache_hit_patches_id_and_decrements_ttl(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    q = query(msg_id=7)
    cname = dns.rrset.from_text("www.example.com.", 3600, "IN", "CNAME", "web.example.net.")
    assert cache.store(q.to_wire(), answer(q, cname, a_rrset("web.example.net.", 300)))
    clock.now += 100.4
    out = cache.lookup(query(msg_id=4242).to_wire())
    assert out is not None
    m = dns.message.from_wire(out)
    assert m.id == 4242
    assert m.rcode() == dns.rcode.NOERROR
    assert [rr.ttl for rr in m.answer] == [3500, 200]
    assert sorted(rr.to_text() for rr in m.answer[1]) == ["192.0.2.1", "192.0.2.2"]
    assert m.question[0].name.to_text() == "www.example.com."
    again = cache.lookup(query(msg_id=1).to_wire())  # same second: the rendered body is reused
    assert again is not None and again[2:] == out[2:]
    clock.now += 1
    later = cache.lookup(query(msg_id=1).to_wire())
    assert later is not None and ttls(later) == [3499, 199]
    assert cache.hits == 3


def test_cache_hit_gives_the_askers_letter_case_and_rd_bit(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    q = query()
    cache.store(q.to_wire(), answer(q, a_rrset()))
    q2 = query("WwW.ExAmPlE.cOm.")
    q2.flags &= ~dns.flags.RD
    out = cache.lookup(q2.to_wire())
    assert out is not None
    m = dns.message.from_wire(out)
    assert m.question[0].name.to_text() == "WwW.ExAmPlE.cOm."
    assert not m.flags & dns.flags.RD
    assert q2.is_response(m)


def test_cache_miss_and_expiry(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    q = query()
    assert cache.lookup(q.to_wire()) is None
    cache.store(q.to_wire(), answer(q, a_rrset(ttl=60)))
    clock.now += 59.9
    out = cache.lookup(q.to_wire())
    assert out is not None and ttls(out) == [1]
    clock.now += 0.1
    assert cache.lookup(q.to_wire()) is None
    assert cache.misses == 2


def test_cache_keys_differ_by_type_and_dnssec(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    q = query()
    cache.store(q.to_wire(), answer(q, a_rrset()))
    assert cache.lookup(query(rdtype="AAAA").to_wire()) is None
    assert cache.lookup(query(want_dnssec=True).to_wire()) is None
    assert cache.lookup(query(use_edns=0).to_wire()) is None


def test_cache_clamps_ttls(clock: FakeClock) -> None:
    cache = DnsCache(min_ttl=120, max_ttl=600, clock=clock)
    q = query()
    short = dns.rrset.from_text("www.example.com.", 5, "IN", "A", "192.0.2.1")
    cache.store(q.to_wire(), answer(q, short))
    out = cache.lookup(q.to_wire())
    assert out is not None and ttls(out) == [120]
    clock.now += 119
    assert cache.lookup(q.to_wire()) is not None
    clock.now += 1
    assert cache.lookup(q.to_wire()) is None
    q2 = query("long.example.com.")
    cache.store(q2.to_wire(), answer(q2, a_rrset("long.example.com.", 86400)))
    out = cache.lookup(q2.to_wire())
    assert out is not None and ttls(out) == [600]


def test_cache_zero_ttl_is_not_stored(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    q = query()
    assert not cache.store(q.to_wire(), answer(q, a_rrset(ttl=0)))
    assert len(cache) == 0


def test_cache_nxdomain_lives_for_the_soa_minimum(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    q = query("nope.example.com.")
    assert cache.store(q.to_wire(), negative(q, dns.rcode.NXDOMAIN, soa_ttl=3600, minimum=60))
    clock.now += 10
    out = cache.lookup(q.to_wire())
    assert out is not None
    m = dns.message.from_wire(out)
    assert m.rcode() == dns.rcode.NXDOMAIN
    assert [rr.ttl for rr in m.authority] == [50]  # the SOA shows the negative TTL left
    clock.now += 50
    assert cache.lookup(q.to_wire()) is None


def test_cache_nodata_uses_the_soa_ttl_when_smaller(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    q = query(rdtype="AAAA")
    assert cache.store(q.to_wire(), negative(q, dns.rcode.NOERROR, soa_ttl=30, minimum=900))
    clock.now += 29
    out = cache.lookup(q.to_wire())
    assert out is not None and ttls(out) == [1]
    clock.now += 1
    assert cache.lookup(q.to_wire()) is None


def test_cache_nodata_behind_a_cname_is_negative(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    q = query(rdtype="AAAA")
    r = negative(q, dns.rcode.NOERROR, soa_ttl=3600, minimum=40)
    r.answer.append(dns.rrset.from_text("www.example.com.", 3600, "IN", "CNAME", "x.example."))
    assert cache.store(q.to_wire(), r)
    clock.now += 40
    assert cache.lookup(q.to_wire()) is None


def test_cache_negative_without_soa_uses_the_default(clock: FakeClock) -> None:
    cache = DnsCache(negative_ttl_default=20, clock=clock)
    q = query()
    assert cache.store(q.to_wire(), negative(q, dns.rcode.NXDOMAIN, soa_ttl=None))
    clock.now += 19
    assert cache.lookup(q.to_wire()) is not None
    clock.now += 1
    assert cache.lookup(q.to_wire()) is None
    off = DnsCache(negative_ttl_default=0, clock=clock)
    assert not off.store(q.to_wire(), negative(q, dns.rcode.NXDOMAIN, soa_ttl=None))


def test_cache_refuses_failures_truncation_and_other_questions(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    q = query()
    servfail = dns.message.make_response(q)
    servfail.set_rcode(dns.rcode.SERVFAIL)
    assert not cache.store(q.to_wire(), servfail)
    truncated = answer(q, a_rrset())
    truncated.flags |= dns.flags.TC
    assert not cache.store(q.to_wire(), truncated)
    other = query("other.example.com.")
    assert not cache.store(q.to_wire(), answer(other, a_rrset("other.example.com.")))
    assert not cache.store(q.to_wire(), q.to_wire())  # a query, not a response
    assert not cache.store(q.to_wire(), answer(q, a_rrset()).to_wire()[:-1])
    assert not cache.store(b"garbage", answer(q, a_rrset()))
    assert len(cache) == 0


def test_cache_store_accepts_wire_and_keys(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    q = query()
    qk = question_key(q.to_wire())
    assert qk is not None
    assert cache.store(qk, answer(q, a_rrset()).to_wire())
    assert cache.lookup(q.to_wire()) is not None


def test_cache_serves_stale_only_through_lookup_stale(clock: FakeClock) -> None:
    cache = DnsCache(stale_ttl=3600, clock=clock)
    q = query()
    cache.store(q.to_wire(), answer(q, a_rrset(ttl=60)))
    clock.now += 10
    fresh = cache.lookup_stale(q.to_wire())
    assert fresh is not None and ttls(fresh) == [50]
    clock.now += 100
    assert cache.lookup(q.to_wire()) is None
    stale = cache.lookup_stale(query(msg_id=99).to_wire())
    assert stale is not None
    m = dns.message.from_wire(stale)
    assert m.id == 99 and [rr.ttl for rr in m.answer] == [30]
    assert cache.stale_hits == 1
    clock.now += 3600
    assert cache.lookup_stale(q.to_wire()) is None
    assert len(cache) == 0
    assert cache.lookup_stale(b"junk") is None
    assert cache.lookup_stale(query("unknown.example.").to_wire()) is None


def test_cache_purge_drops_entries_past_the_stale_window(clock: FakeClock) -> None:
    cache = DnsCache(stale_ttl=100, clock=clock)
    for i, ttl in enumerate((10, 1000)):
        q = query(f"n{i}.example.com.")
        cache.store(q.to_wire(), answer(q, a_rrset(f"n{i}.example.com.", ttl)))
    clock.now += 200
    assert cache.purge() == 1
    assert len(cache) == 1


def test_cache_evicts_least_recently_used(clock: FakeClock) -> None:
    cache = DnsCache(max_entries=2, clock=clock)
    qs = [query(f"n{i}.example.com.") for i in range(3)]
    for q in qs[:2]:
        cache.store(q.to_wire(), answer(q, a_rrset(q.question[0].name.to_text())))
    assert cache.lookup(qs[0].to_wire()) is not None  # n0 is now the most recent
    cache.store(qs[2].to_wire(), answer(qs[2], a_rrset("n2.example.com.")))
    assert len(cache) == 2
    assert cache.lookup(qs[1].to_wire()) is None
    assert cache.lookup(qs[0].to_wire()) is not None
    assert cache.lookup(qs[2].to_wire()) is not None


def test_cache_prefetch_candidates_are_popular_and_expiring(clock: FakeClock) -> None:
    cache = DnsCache(clock=clock)
    popular, rare, later = (query(f"{n}.example.com.") for n in ("popular", "rare", "later"))
    cache.store(popular.to_wire(), answer(popular, a_rrset("popular.example.com.", 60)))
    cache.store(rare.to_wire(), answer(rare, a_rrset("rare.example.com.", 60)))
    cache.store(later.to_wire(), answer(later, a_rrset("later.example.com.", 3600)))
    for _ in range(5):
        cache.lookup(popular.to_wire())
        cache.lookup(later.to_wire())
    cache.lookup(rare.to_wire())
    assert cache.prefetch_candidates(window=10, min_hits=3) == []
    clock.now += 55
    due = cache.prefetch_candidates(window=10, min_hits=3)
    assert [k.name_text() for k in due] == ["popular.example.com."]
    assert cache.prefetch_candidates(window=10, min_hits=3) == []  # offered once
    # the resolver refreshes it with a query built from the key
    refresh = dns.message.from_wire(build_query(due[0], 5))
    assert cache.store(due[0], answer(refresh, a_rrset("popular.example.com.", 60)))
    clock.now += 1
    out = cache.lookup(popular.to_wire())
    assert out is not None and ttls(out) == [59]


def test_cache_hit_does_not_call_dnspython(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = DnsCache(clock=clock)
    q = query(use_edns=0)
    cache.store(q.to_wire(), answer(q, a_rrset()))
    wire = q.to_wire()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("dnspython called on the hot path")

    with monkeypatch.context() as m:
        m.setattr(dns.message, "from_wire", forbidden)
        m.setattr(dns.message.Message, "to_wire", forbidden)
        m.setattr(dns.wire.Parser, "__init__", forbidden)
        out = cache.lookup(wire)
    assert out is not None
    assert dns.message.from_wire(out).answer[0].ttl == 300


def test_cache_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        DnsCache(max_entries=0)
    with pytest.raises(ValueError):
        DnsCache(min_ttl=10, max_ttl=5)
    with pytest.raises(ValueError):
        DnsCache(stale_ttl=-1)


@given(st.integers(0, 200), st.integers(0, 255))
def test_cache_store_of_a_damaged_response_never_raises(where: int, value: int) -> None:
    cache = DnsCache(clock=FakeClock())
    q = query(use_edns=0)
    r = answer(q, a_rrset())
    r.authority.append(dns.rrset.from_text("example.com.", 60, "IN", "SOA", SOA.format(minimum=5)))
    wire = bytearray(r.to_wire())
    wire[where % len(wire)] = value
    if cache.store(q.to_wire(), bytes(wire)):
        out = cache.lookup(query(msg_id=77, use_edns=0).to_wire())
        assert out is not None and out[:2] == b"\x00\x4d" and len(out) == len(wire)
