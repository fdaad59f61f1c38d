"""Registrable domains and network identity."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.route.site import (
    MULTI_LABEL_SUFFIXES,
    UNKNOWN_NETWORK,
    DefaultRoute,
    network_id,
    parse_ipv4_routes,
    parse_ipv6_routes,
    route_network_id,
    site_of,
)


@pytest.mark.parametrize(
    ("host", "site"),
    [
        ("www.example.com", "example.com"),
        ("a.b.c.example.com", "example.com"),
        ("example.com", "example.com"),
        ("WWW.Example.COM.", "example.com"),
        ("news.bbc.co.uk", "bbc.co.uk"),
        ("bbc.co.uk", "bbc.co.uk"),
        ("co.uk", "co.uk"),
        ("user.github.io", "user.github.io"),
        ("a.user.github.io", "user.github.io"),
        ("bucket.s3.amazonaws.com", "bucket.s3.amazonaws.com"),
        ("x.bucket.s3.amazonaws.com", "bucket.s3.amazonaws.com"),
        ("localhost", "localhost"),
        ("192.0.2.7", "192.0.2.7"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
    ],
)
def test_site_of_examples(host: str, site: str) -> None:
    assert site_of(host) == site


@pytest.mark.parametrize("host", ["", ".", "a..b", "example..com", " "])
def test_site_of_rejects_empty_labels(host: str) -> None:
    with pytest.raises(ValueError):
        site_of(host)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_suffix = st.sampled_from([*sorted(MULTI_LABEL_SUFFIXES), "com", "org", "ru", "ir", "cn"])
_hosts = st.builds(
    lambda labels, suffix: ".".join([*labels, suffix]),
    st.lists(_label, min_size=0, max_size=5),
    _suffix,
)


@given(_hosts)
def test_site_of_is_idempotent(host: str) -> None:
    site = site_of(host)
    assert site_of(site) == site


@given(_hosts)
def test_site_of_is_a_label_boundary_suffix(host: str) -> None:
    site = site_of(host)
    assert host == site or host.endswith("." + site)


@given(st.lists(_label, min_size=1, max_size=4), st.sampled_from(sorted(MULTI_LABEL_SUFFIXES)))
def test_site_of_keeps_one_label_under_a_listed_suffix(labels: list[str], suffix: str) -> None:
    site = site_of(".".join([*labels, suffix]))
    # Longest match wins, so the site is the suffix plus one label, or a longer listed suffix
    # ending in ours plus one label.
    assert site.endswith("." + suffix)
    assert site.count(".") >= suffix.count(".") + 1


@given(st.ip_addresses())
def test_site_of_ip_is_canonical_ip(ip: object) -> None:
    assert site_of(str(ip)) == str(ip)
    assert site_of(str(ip).upper()) == str(ip)


IPV4_ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t0000A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
tun0\t00000000\t00000000\t0201\t0\t0\t50\t00000000\t0\t0\t0
garbage line
"""

IPV6_ROUTES = """\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
zz
"""


def test_parse_ipv4_routes_picks_lowest_metric_default() -> None:
    assert parse_ipv4_routes(IPV4_ROUTES) == DefaultRoute("eth0", "192.0.2.1", 100)


def test_parse_ipv4_routes_without_default() -> None:
    assert parse_ipv4_routes(IPV4_ROUTES.splitlines()[0] + "\n") is None
    assert parse_ipv4_routes("") is None


def test_parse_ipv6_routes_skips_loopback_reject_route() -> None:
    assert parse_ipv6_routes(IPV6_ROUTES) == DefaultRoute("eth0", "fe80::1", 0x400)
    assert parse_ipv6_routes(IPV6_ROUTES.splitlines()[2]) is None


def test_route_network_id_is_short_and_stable() -> None:
    a = route_network_id(DefaultRoute("eth0", "192.0.2.1", 100))
    assert a == route_network_id(DefaultRoute("eth0", "192.0.2.1", 5))
    assert a.startswith("gw-") and len(a) == 9
    assert a != route_network_id(DefaultRoute("wlan0", "192.0.2.1", 100))
    assert a != route_network_id(DefaultRoute("eth0", "192.0.2.254", 100))


def test_network_id_prefers_profile_then_ipv4_then_ipv6(tmp_path: Path) -> None:
    v4, v6 = tmp_path / "route", tmp_path / "ipv6_route"
    missing = tmp_path / "missing"
    v4.write_text(IPV4_ROUTES)
    v6.write_text(IPV6_ROUTES)
    expected_v4 = route_network_id(DefaultRoute("eth0", "192.0.2.1", 100))
    expected_v6 = route_network_id(DefaultRoute("eth0", "fe80::1", 0x400))
    assert network_id("home", ipv4_routes=v4, ipv6_routes=v6) == "home"
    assert network_id(ipv4_routes=v4, ipv6_routes=v6) == expected_v4
    assert network_id(ipv4_routes=missing, ipv6_routes=v6) == expected_v6
    assert network_id(ipv4_routes=missing, ipv6_routes=missing) == UNKNOWN_NETWORK
