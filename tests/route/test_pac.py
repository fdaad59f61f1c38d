"""The PAC script says what the router would: checked by running it in a real JavaScript engine.

node evaluates the generated script for many URLs and its answers are compared with
:meth:`RuleSet.match` for the same destinations (DIRECT exactly when the matching policy is a
plain direct one).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pac import PacScript, parse_host_header, proxy_directive
from proxy.route.rules import RuleSet, RuleSpec, normalize_host

NODE = shutil.which("node") or shutil.which("nodejs")
requires_node = pytest.mark.skipif(NODE is None, reason="node (a JavaScript engine) not installed")

PROXY = "PROXY 127.0.0.1:1080"
DRIVER = """
const fs = require("fs");
const vm = require("vm");
const ctx = {};
vm.createContext(ctx);
vm.runInContext(fs.readFileSync(process.argv[2], "utf8"), ctx);
const queries = JSON.parse(fs.readFileSync(0, "utf8"));
const out = queries.map(([url, host]) => ctx.FindProxyForURL(url, host));
process.stdout.write(JSON.stringify(out));
"""


def run_pac(script: bytes, queries: list[tuple[str, str]], tmp: Path) -> list[str]:
    assert NODE is not None
    (tmp / "proxy.pac").write_bytes(script)
    (tmp / "driver.js").write_text(DRIVER)
    proc = subprocess.run(
        [NODE, str(tmp / "driver.js"), str(tmp / "proxy.pac")],
        input=json.dumps(queries).encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def expected(rules: RuleSet, direct: set[str], host: str, port: int, inbound: str) -> str:
    bare = host.strip("[]")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    name = None if ip is not None else normalize_host(host)
    match = rules.match(name, ip, port, inbound)
    return "DIRECT" if match.policy in direct else PROXY


def url_for(host: str, port: int, scheme: str) -> str:
    default = {"http": 80, "https": 443}[scheme]
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{netloc}{'' if port == default else f':{port}'}/path?q=1"


@pytest.fixture
def ruleset(tmp_path: Path) -> RuleSet:
    listed = tmp_path / "blocked.txt"
    listed.write_text("# censored\nlisted.example\nfull:exact-listed.example\nkeyword:tube\n")
    ips = tmp_path / "ips.txt"
    ips.write_text("203.0.113.0/24\n2001:db8:bad::/48\n")
    specs = [
        RuleSpec("direct", domain=("safe.twitter.com",), name="carve-out"),
        RuleSpec("censored", domain_suffix=("twitter.com", "t.co"), name="social"),
        RuleSpec("censored", domain_keyword=("twimg",)),
        RuleSpec("censored", domain_regex=(r"^video[0-9]+\.", r"(?P<x>cdn)-(?P=x)\.")),
        RuleSpec("censored", ip_cidr=("198.51.100.0/24", "2001:db8:1::/64")),
        RuleSpec("tor", domain_suffix=("onion.example",), port=("443", "8000-8999")),
        RuleSpec("censored", domain_list=(str(listed),), ip_list=(str(ips),)),
        RuleSpec("censored", inbound=("other",), domain_suffix=("other-only.example",)),
        RuleSpec("censored", port=("6667",)),
    ]
    return RuleSet.compile(specs, "direct")


HOSTS = [
    "twitter.com", "safe.twitter.com", "api.twitter.com", "badtwitter.com", "T.CO.", "t.co",
    "pbs.twimg.com", "video12.example", "cdn-cdn.example", "cdn-xyz.example", "example.org",
    "198.51.100.7", "198.51.101.7", "2001:db8:1::5", "2001:db8:2::5", "::ffff:198.51.100.9",
    "onion.example", "a.onion.example", "listed.example", "x.listed.example",
    "exact-listed.example", "sub.exact-listed.example", "youtube.example", "203.0.113.9",
    "2001:db8:bad:1::1", "other-only.example", "localhost", "127.0.0.1",
]  # fmt: skip


@requires_node
def test_pac_agrees_with_the_router(ruleset: RuleSet, tmp_path: Path) -> None:
    direct = {"direct"}
    script = PacScript(ruleset, direct, "mixed").render(PROXY)
    queries, wanted = [], []
    for host in HOSTS:
        for port, scheme in ((80, "http"), (443, "https"), (8080, "http"), (6667, "http")):
            queries.append((url_for(host, port, scheme), host))
            wanted.append(expected(ruleset, direct, host, port, "mixed"))
    got = run_pac(script, queries, tmp_path)
    mismatches = [(q, w, g) for q, w, g in zip(queries, wanted, got, strict=True) if w != g]
    assert mismatches == []
    # spot checks, so the comparison itself is known to discriminate
    answers = dict(zip(queries, got, strict=True))
    assert answers[("https://api.twitter.com/path?q=1", "api.twitter.com")] == PROXY
    assert answers[("https://safe.twitter.com/path?q=1", "safe.twitter.com")] == "DIRECT"
    assert answers[("https://example.org/path?q=1", "example.org")] == "DIRECT"
    assert answers[("http://example.org:6667/path?q=1", "example.org")] == PROXY


@requires_node
def test_rules_for_another_inbound_are_left_out(ruleset: RuleSet, tmp_path: Path) -> None:
    query = [("https://other-only.example/", "other-only.example")]
    mine = PacScript(ruleset, {"direct"}, "mixed").render(PROXY)
    theirs = PacScript(ruleset, {"direct"}, "other").render(PROXY)
    assert run_pac(mine, query, tmp_path) == ["DIRECT"]
    assert run_pac(theirs, query, tmp_path) == [PROXY]


_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)
_name = st.lists(_label, min_size=1, max_size=4).map(".".join)
_v4 = st.ip_addresses(v=4).map(str)
_v6 = st.ip_addresses(v=6).map(str)
_net = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
).map(lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False))


@requires_node
# each example runs node once (~50 ms): a quarter of the profile's examples
@settings(max_examples=max(10, settings.default.max_examples // 4), deadline=None)
@given(
    suffixes=st.lists(_name, max_size=5),
    keywords=st.lists(_label, max_size=3),
    nets=st.lists(_net, max_size=4),
    default_direct=st.booleans(),
    hosts=st.lists(st.one_of(_name, _v4, _v6), min_size=1, max_size=30),
    port=st.integers(1, 65535),
)
def test_pac_agrees_with_the_router_for_random_rules(
    tmp_path_factory: pytest.TempPathFactory,
    suffixes: list[str],
    keywords: list[str],
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    default_direct: bool,
    hosts: list[str],
    port: int,
) -> None:
    specs = []
    if suffixes:
        specs.append(RuleSpec("p1", domain_suffix=tuple(suffixes)))
    if keywords:
        specs.append(RuleSpec("direct", domain_keyword=tuple(keywords)))
    if nets:
        specs.append(RuleSpec("p2", ip_cidr=tuple(str(n) for n in nets), port=(str(port),)))
    rules = RuleSet.compile(specs, "direct" if default_direct else "p1")
    script = PacScript(rules, {"direct"}, "mixed").render(PROXY)
    # names that the rules know, and random ones
    hosts = hosts + [f"x.{s}" for s in suffixes] + [str(n.network_address) for n in nets]
    queries = [(url_for(h, port, "http"), h) for h in hosts]
    got = run_pac(script, queries, tmp_path_factory.mktemp("pac"))
    assert got == [expected(rules, {"direct"}, h, port, "mixed") for h in hosts]


def test_proxy_directive_per_protocol() -> None:
    assert proxy_directive("mixed", "127.0.0.1:1080") == "PROXY 127.0.0.1:1080"
    assert proxy_directive("http", "10.0.0.1:8080") == "PROXY 10.0.0.1:8080"
    assert proxy_directive("socks5", "127.0.0.1:1080") == "SOCKS5 127.0.0.1:1080"
    assert proxy_directive("socks4", "127.0.0.1:1080") == "SOCKS 127.0.0.1:1080"


def test_script_has_no_direct_fallback_and_no_dns(ruleset: RuleSet) -> None:
    text = PacScript(ruleset, {"direct"}, "mixed").render(PROXY).decode()
    assert "; DIRECT" not in text
    for leaky in ("dnsResolve(", "isInNet(", "isResolvable(", "myIpAddress("):
        assert leaky not in text


@pytest.mark.parametrize(
    ("header", "address"),
    [
        ("127.0.0.1:1080", "127.0.0.1:1080"),
        ("[::1]:1080", "[::1]:1080"),
        ("router.lan:1080", "router.lan:1080"),
        ("192.168.1.1", None),
        ("evil\r\nX: y:1080", None),
        ("host:99999", None),
        ("", None),
        (None, None),
    ],
)
def test_host_header_parsing(header: str | None, address: str | None) -> None:
    assert parse_host_header(header) == address
