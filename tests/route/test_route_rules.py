"""Tests for proxy/route/rules.py: each criterion, first-match order, list files and reload,
errors, and hypothesis checks against a plain linear first-match scan."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.route.rules import IPAddress, Match, RuleSet, RuleSpec, normalize_host

ip = ipaddress.ip_address


def decide(
    specs: list[RuleSpec],
    host: str | None = None,
    addr: str | None = None,
    port: int = 443,
    inbound: str = "socks",
) -> Match:
    rules = RuleSet.compile(specs, "default")
    return rules.match(host, ip(addr) if addr else None, port, inbound)


# --- one criterion at a time ------------------------------------------------------------------


def test_rules_domain_exact_matches_only_that_name() -> None:
    specs = [RuleSpec("p", domain=("Example.COM.",))]
    assert decide(specs, "example.com").reason == "domain example.com"
    assert decide(specs, "EXAMPLE.com.").policy == "p"
    assert decide(specs, "www.example.com").policy == "default"


def test_rules_domain_suffix_matches_on_label_boundary() -> None:
    specs = [RuleSpec("p", domain_suffix=(".example.com",))]
    assert decide(specs, "example.com").policy == "p"
    assert decide(specs, "a.b.example.com").reason == "domain_suffix example.com"
    assert decide(specs, "badexample.com").policy == "default"
    assert decide(specs, "example.com.evil").policy == "default"


def test_rules_domain_keyword_matches_substrings() -> None:
    specs = [RuleSpec("p", domain_keyword=("tube", "ogle"))]
    assert decide(specs, "m.youtube.com").reason == "domain_keyword tube"
    assert decide(specs, "GOOGLE.com").policy == "p"
    assert decide(specs, "example.com").policy == "default"


def test_rules_overlapping_keywords_are_all_found() -> None:
    # "abc" is seen first while scanning; the rule that wins names only "bcd"
    specs = [
        RuleSpec("filtered", domain_keyword=("abc",), port=(1,)),
        RuleSpec("p", domain_keyword=("bcd",)),
    ]
    assert decide(specs, "xabcdx", port=443).rule_index == 1
    assert decide(specs, "xabcdx", port=1).rule_index == 0


def test_rules_domain_regex_is_searched_in_normalised_name() -> None:
    specs = [RuleSpec("p", domain_regex=(r"^ads?\d*\.", r"(?i)TRACK"))]
    assert decide(specs, "ads2.example.com").policy == "p"
    assert decide(specs, "x.tracker.net").reason == "domain_regex (?i)TRACK"
    assert decide(specs, "bads.example.com").policy == "default"


def test_rules_regex_with_backreference_still_works() -> None:
    specs = [RuleSpec("p", domain_regex=(r"(\w)\1\.",))]
    assert decide(specs, "baa.com").policy == "p"
    assert decide(specs, "bab.com").policy == "default"


def test_rules_combinable_and_other_regexes_keep_rule_order() -> None:
    # "(?i)..." and group-using patterns cannot join the combined prefilter; order still holds
    specs = [
        RuleSpec("upper", domain_regex=(r"(?i)^ZZ",)),
        RuleSpec("plain", domain_regex=(r"a",), port=(443,)),
        RuleSpec("group", domain_regex=(r"(a)",)),
    ]
    assert decide(specs, "zza.com").policy == "upper"
    assert decide(specs, "a.com").policy == "plain"
    assert decide(specs, "a.com", port=80).policy == "group"
    assert decide(specs, "b.org").policy == "default"


def test_rules_cidr_v4_and_v6() -> None:
    specs = [RuleSpec("p", ip_cidr=("10.0.0.0/8", "192.0.2.7", "2001:db8::/32"))]
    assert decide(specs, addr="10.200.0.1").reason == "ip_cidr 10.0.0.0/8"
    assert decide(specs, addr="192.0.2.7").reason == "ip_cidr 192.0.2.7/32"
    assert decide(specs, addr="192.0.2.8").policy == "default"
    assert decide(specs, addr="2001:db8:1::5").reason == "ip_cidr 2001:db8::/32"
    assert decide(specs, addr="2001:db9::1").policy == "default"
    assert decide(specs, addr="::ffff:10.1.1.1").policy == "p"  # v4-mapped counts as v4


def test_rules_cidr_host_bits_are_masked() -> None:
    assert decide([RuleSpec("p", ip_cidr=("10.1.2.3/8",))], addr="10.9.9.9").policy == "p"


def test_rules_ip_literal_host_is_an_address_not_a_name() -> None:
    specs = [RuleSpec("name", domain_keyword=("10",)), RuleSpec("net", ip_cidr=("10.0.0.0/8",))]
    assert decide(specs, "10.1.1.1").policy == "net"
    assert decide(specs, "[2001:db8::1]").policy == "default"
    assert decide([RuleSpec("v6", ip_cidr=("2001:db8::/32",))], "[2001:db8::1]").policy == "v6"


def test_rules_unresolved_name_matches_no_cidr_and_resolved_both_kinds() -> None:
    specs = [RuleSpec("net", ip_cidr=("10.0.0.0/8",)), RuleSpec("name", domain=("a.com",))]
    assert decide(specs, "a.com").policy == "name"
    assert decide(specs, "a.com", "10.0.0.1").policy == "net"  # rule order decides
    assert decide(specs, "b.com", "10.0.0.1").policy == "net"


def test_rules_port_single_and_range() -> None:
    specs = [RuleSpec("p", port=(22, "8000-8080", "993"))]
    assert decide(specs, "x.com", port=22).reason == "port 22,8000-8080,993"
    assert decide(specs, "x.com", port=8080).policy == "p"
    assert decide(specs, "x.com", port=993).policy == "p"
    assert decide(specs, "x.com", port=8081).policy == "default"


def test_rules_inbound_name() -> None:
    specs = [RuleSpec("p", inbound=("lan",))]
    assert decide(specs, "x.com", inbound="lan").reason == "inbound lan"
    assert decide(specs, "x.com", inbound="socks").policy == "default"


def test_rules_kinds_are_anded_and_items_ored() -> None:
    specs = [
        RuleSpec(
            "p", domain_suffix=("a.com",), ip_cidr=("10.0.0.0/8",), port=(443,), inbound=("lan",)
        )
    ]
    assert decide(specs, "x.a.com", port=443, inbound="lan").reason == (
        "domain_suffix a.com; port 443; inbound lan"
    )
    assert decide(specs, addr="10.0.0.1", port=443, inbound="lan").policy == "p"
    assert decide(specs, "x.a.com", port=80, inbound="lan").policy == "default"
    assert decide(specs, "x.a.com", port=443, inbound="socks").policy == "default"
    assert decide(specs, "b.com", port=443, inbound="lan").policy == "default"


def test_rules_first_match_wins_and_default_policy() -> None:
    specs = [
        RuleSpec("web", port=(80, 443), name="web"),
        RuleSpec("suffix", domain_suffix=("example.com",)),
        RuleSpec("exact", domain=("www.example.com",)),
    ]
    m = decide(specs, "www.example.com", port=443)
    assert (m.policy, m.rule_index, m.rule_name) == ("web", 0, "web")
    assert decide(specs, "www.example.com", port=22).policy == "suffix"
    assert decide(specs, "other.org", port=22) == Match("default", None, "", "default")


def test_rules_idna_names_are_compared_in_punycode() -> None:
    assert normalize_host("Пример.РФ.") == "xn--e1afmkfd.xn--p1ai"
    specs = [RuleSpec("p", domain_suffix=("пример.рф",))]
    assert decide(specs, "www.xn--e1afmkfd.xn--p1ai").policy == "p"
    assert decide(specs, "WWW.Пример.рф").policy == "p"


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (RuleSpec("p"), "rule 0: no match field"),
        (RuleSpec("p", ip_cidr=("10.0.0.0/33",)), "not an IP network"),
        (RuleSpec("p", domain_regex=("a(",)), "bad regex 'a('"),
        (RuleSpec("p", domain_suffix=("exa mple.com",)), "not a domain name"),
        (RuleSpec("p", domain=("1.2.3.4",)), "is an IP address"),
        (RuleSpec("p", domain_keyword=("",)), "keyword"),
        (RuleSpec("p", port=("80-20",)), "out of 0-65535 or reversed"),
        (RuleSpec("p", port=("http",)), "not a port"),
        (
            RuleSpec("p", domain_suffix="a.com", name="s"),
            "rule 0 (s): domain_suffix must be a tuple",
        ),  # type: ignore[arg-type]
        (RuleSpec("", port=(1,)), "policy"),
    ],
)
def test_rules_bad_spec_raises_value_error(spec: RuleSpec, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RuleSet.compile([spec], "default")


def test_rules_missing_list_file_names_it(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=re.escape(path)):
        RuleSet.compile([RuleSpec("p", domain_list=(path,))], "default")


@pytest.mark.parametrize(
    ("kind", "text", "where"),
    [
        ("domain_list", "a.com\n\nbad name\n", ":3: "),
        ("domain_list", "# x\nfoo:a.com\n", ":2: unknown prefix 'foo'"),
        ("domain_list", "regexp:a(\n", ":1: bad regex"),
        ("ip_list", "10.0.0.0/8\n300.1.1.1\n", ":2: '300.1.1.1' is not an IP"),
    ],
)
def test_rules_bad_list_line_names_file_and_line(
    tmp_path: Path, kind: str, text: str, where: str
) -> None:
    path = tmp_path / "list.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}{where}")):
        RuleSet.compile([RuleSpec("p", **{kind: (str(path),)})], "default")


def test_rules_same_file_as_domain_and_ip_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "both.txt"
    path.write_text("")
    specs = [RuleSpec("p", domain_list=(str(path),)), RuleSpec("q", ip_list=(str(path),))]
    with pytest.raises(ValueError, match="both domain_list and ip_list"):
        RuleSet.compile(specs, "default")


# --- list files -------------------------------------------------------------------------------


DOMAINS = """\
# blocked sites
twitter.com          # suffix by default
domain:t.co
full:exact.example   # exact only
keyword:tube

regexp:^cdn\\d+\\.
"""


def test_rules_domain_list_loads_every_form(tmp_path: Path) -> None:
    path = tmp_path / "blocked.txt"
    path.write_text(DOMAINS)
    rules = RuleSet.compile([RuleSpec("bridge", domain_list=(str(path),))], "direct")
    assert rules.list_files == (str(path),)
    for host, policy in [
        ("api.twitter.com", "bridge"),
        ("nottwitter.com", "direct"),
        ("x.t.co", "bridge"),
        ("exact.example", "bridge"),
        ("a.exact.example", "direct"),
        ("youtube.com", "bridge"),
        ("cdn12.example.net", "bridge"),
        ("blocked", "direct"),
    ]:
        assert rules.match(host, None, 443).policy == policy, host
    assert rules.match("api.twitter.com", None, 443).reason == (
        f"domain_suffix twitter.com (from {path})"
    )


def test_rules_ip_list_loads(tmp_path: Path) -> None:
    path = tmp_path / "nets.txt"
    path.write_text("# nets\n10.0.0.0/8\n192.0.2.1  # one host\n2001:db8::/32\n")
    rules = RuleSet.compile([RuleSpec("p", ip_list=(str(path),))], "direct")
    for addr, policy in [("10.1.1.1", "p"), ("192.0.2.1", "p"), ("192.0.2.2", "direct")]:
        assert rules.match(None, ip(addr), 443).policy == policy
    assert rules.match(None, ip("2001:db8::9"), 443).policy == "p"


def test_rules_empty_list_file_matches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("# nothing yet\n")
    rules = RuleSet.compile([RuleSpec("p", domain_list=(str(path),), port=(443,))], "direct")
    assert rules.match("a.com", None, 443).policy == "direct"


def _touch_later(path: Path, text: str) -> None:
    """Write and move the mtime forward, so the change shows even on coarse clocks."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_rules_list_reload_after_change(tmp_path: Path) -> None:
    path = tmp_path / "blocked.txt"
    path.write_text("a.com\n")
    rules = RuleSet.compile([RuleSpec("p", domain_list=(str(path),))], "direct")
    assert rules.refresh() == []
    assert rules.match("a.com", None, 443).policy == "p"
    _touch_later(path, "b.com\n# a.com removed\n")
    assert rules.refresh() == []
    assert rules.match("a.com", None, 443).policy == "direct"
    assert rules.match("x.b.com", None, 443).policy == "p"


def test_rules_maybe_refresh_waits_for_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "nets.txt"
    path.write_text("10.0.0.0/8\n")
    rules = RuleSet.compile([RuleSpec("p", ip_list=(str(path),))], "d", refresh_interval=5.0)
    rules.maybe_refresh(100.0)
    _touch_later(path, "11.0.0.0/8\n")
    rules.maybe_refresh(104.0)  # too soon: the old contents stay
    assert rules.match(None, ip("10.0.0.1"), 1).policy == "p"
    rules.maybe_refresh(105.0)
    assert rules.match(None, ip("10.0.0.1"), 1).policy == "d"
    assert rules.match(None, ip("11.0.0.1"), 1).policy == "p"


def test_rules_bad_reload_keeps_old_contents_and_reports_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "blocked.txt"
    path.write_text("a.com\n")
    rules = RuleSet.compile([RuleSpec("p", domain_list=(str(path),))], "direct")
    _touch_later(path, "a.com\nnot a name\n")
    with caplog.at_level(logging.WARNING, logger="sidestep.route"):
        problems = rules.refresh()
    assert len(problems) == 1 and f"{path}:2:" in problems[0]
    assert f"{path}:2:" in caplog.text
    assert rules.refresh() == []  # same broken file: not reported again
    assert rules.match("a.com", None, 443).policy == "p"
    path.unlink()
    (problem,) = rules.refresh()
    assert str(path) in problem
    assert rules.match("a.com", None, 443).policy == "p"
    path.write_text("b.com\n")
    assert rules.refresh() == []
    assert rules.match("b.com", None, 443).policy == "p"
    assert rules.match("a.com", None, 443).policy == "direct"


# --- properties -------------------------------------------------------------------------------

labels = st.text("abcxyz0-", min_size=1, max_size=6).filter(lambda s: s[0] != "-")


@given(st.lists(labels, min_size=0, max_size=3), labels)
def test_rules_suffix_matches_exactly_on_label_boundary(prefix: list[str], glued: str) -> None:
    rules = RuleSet.compile([RuleSpec("p", domain_suffix=("example.com",))], "d")
    name = ".".join([*prefix, "example.com"])
    assert rules.match(name, None, 1).policy == "p"
    assert rules.match(name.upper() + ".", None, 1).policy == "p"
    assert rules.match(f"{glued}example.com", None, 1).policy == "d"
    assert rules.match(f"{name}.{glued}", None, 1).policy == "d"


def reference(
    specs: list[RuleSpec], host: str | None, addr: IPAddress | None, port: int, inbound: str
) -> tuple[str, int | None]:
    """The meaning of the rules written as a plain linear first-match scan."""
    name = host.lower().rstrip(".") if host else None
    if name is not None:
        try:
            literal = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            pass
        else:
            name, addr = None, addr or literal
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    for i, s in enumerate(specs):
        nets = [ipaddress.ip_network(c, strict=False) for c in s.ip_cidr]
        dest_items = s.domain + s.domain_suffix + s.domain_keyword + s.domain_regex + s.ip_cidr
        by_name = name is not None and (
            name in s.domain
            or any(name == x or name.endswith("." + x) for x in s.domain_suffix)
            or any(k in name for k in s.domain_keyword)
            or any(re.search(r, name) for r in s.domain_regex)
        )
        by_addr = addr is not None and any(addr in n for n in nets if n.version == addr.version)
        ports = [tuple(map(int, str(p).split("-"))) for p in s.port]
        port_ok = not ports or any(r[0] <= port <= r[-1] for r in ports)
        if (
            (not dest_items or by_name or by_addr)
            and port_ok
            and (not s.inbound or inbound in s.inbound)
        ):
            return s.policy, i
    return "default", None


NAME_POOL = ["a.com", "b.a.com", "ab.com", "com", "x.b.a.com", "ba.org", "aa.b.org", "c"]
REGEX_POOL = [r"^a", r"com$", r"b\.a", r"(?i)AB", r"(\w)\1", r"^x.*org$"]
NET_POOL = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3/32",
    "192.0.2.0/24",
    "0.0.0.0/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "::/0",
    "2001:db8::1/128",
]
ADDR_POOL = [
    "10.1.2.3",
    "10.1.9.9",
    "10.200.0.1",
    "192.0.2.1",
    "8.8.8.8",
    "2001:db8::1",
    "2001:db8:1::7",
    "2001:db9::1",
    "::ffff:10.1.2.3",
]

small = lambda pool: st.lists(st.sampled_from(pool), max_size=2).map(tuple)  # noqa: E731


@st.composite
def rule_specs(draw: st.DrawFn) -> RuleSpec:
    spec = RuleSpec(
        policy=draw(st.sampled_from(["p", "q", "r"])),
        domain=draw(small(NAME_POOL)),
        domain_suffix=draw(small(NAME_POOL)),
        domain_keyword=draw(small(["a", "b", "ab", "ba", "co", "x.b"])),
        domain_regex=draw(small(REGEX_POOL)),
        ip_cidr=draw(small(NET_POOL)),
        port=draw(small([80, 443, "1-100", "400-500"])),
        inbound=draw(small(["socks", "http"])),
    )
    fields = (spec.domain, spec.domain_suffix, spec.domain_keyword, spec.domain_regex)
    if not any((*fields, spec.ip_cidr, spec.port, spec.inbound)):
        spec = replace(spec, inbound=(draw(st.sampled_from(["socks", "http"])),))
    return spec


hosts = st.one_of(
    st.none(),
    st.sampled_from([*NAME_POOL, "10.1.2.3", "[2001:db8::1]", "Ab.COM.", "zzz.org"]),
    st.builds(lambda a, b: f"{a}.{b}", labels, st.sampled_from(NAME_POOL)),
)
addrs = st.one_of(st.none(), st.sampled_from(ADDR_POOL).map(ipaddress.ip_address))


@given(
    st.lists(rule_specs(), min_size=1, max_size=12),
    st.lists(
        st.tuples(
            hosts,
            addrs,
            st.sampled_from([22, 80, 443, 450]),
            st.sampled_from(["socks", "http", "lan"]),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_rules_compiled_equals_linear_scan(
    specs: list[RuleSpec], queries: list[tuple[str | None, IPAddress | None, int, str]]
) -> None:
    rules = RuleSet.compile(specs, "default")
    for host, addr, port, inbound in queries:
        got = rules.match(host, addr, port, inbound)
        assert (got.policy, got.rule_index) == reference(specs, host, addr, port, inbound)
        if got.rule_index is not None:
            assert got.reason  # names what matched
