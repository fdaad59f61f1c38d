"""Probing a site through each strategy (:mod:`proxy.detect.siteprobe`): the SITE parser, the
exit status, and real probes inside the censor lab (virtual time, never the Internet)."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import default_config, parse_config
from proxy.detect.siteprobe import (
    EXIT_CIRCUMVENTED,
    EXIT_DIRECT,
    EXIT_UNREACHABLE,
    Site,
    SiteReport,
    StrategyResult,
    exit_status,
    open_setup,
    parse_site,
    probe_site,
    read_sites,
)
from proxy.lab import world
from proxy.lab.ca import LabCA
from proxy.lab.cli import probe_env
from proxy.lab.world import open_lab

DOWN = "127.60.9.9"  # in the lab plan, but nothing listens there, in front or behind


@pytest.fixture(scope="module")
def lab_ca() -> LabCA:
    return LabCA.create()


# --- SITE ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", Site("example.com", 443, True)),
        ("Example.COM.", Site("example.com", 443, True)),
        ("example.com:8443", Site("example.com", 8443, True)),
        ("https://example.com/a/b?c#d", Site("example.com", 443, True)),
        ("http://example.com", Site("example.com", 80, False)),
        ("HTTP://example.com:8080/x?y=1#frag", Site("example.com", 8080, False, "/x?y=1")),
        ("http://example.com?q", Site("example.com", 80, False, "/?q")),
        ("192.0.2.7", Site("192.0.2.7", 443, True)),
        ("[2001:db8::1]:8443", Site("2001:db8::1", 8443, True)),
        ("2001:db8::1", Site("2001:db8::1", 443, True)),
        ("http://[::1]/", Site("::1", 80, False)),
    ],
)
def test_parse_site_reads_hosts_ports_and_urls(text: str, expected: Site) -> None:
    assert parse_site(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "ftp://example.com", "example.com:", "example.com:0", "example.com:65536",
     "example.com:https", "a b.com", "user@example.com", "[example.com]:443", "[::1",
     "-bad-.com", "exa_mple..com", "http://", "x" * 64 + ".com", "example.com:\uff11\uff12"],
)  # fmt: skip
def test_parse_site_rejects_what_is_not_a_site(text: str) -> None:
    with pytest.raises(ValueError):
        parse_site(text)


def test_parse_site_lab_ports_replace_the_defaults_only() -> None:
    assert parse_site("a.lab", https_port=10443).port == 10443
    assert parse_site("http://a.lab", http_port=10080).port == 10080
    assert parse_site("a.lab:443", https_port=10443).port == 443


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_names = st.lists(_label, min_size=1, max_size=4).map(".".join)


@given(
    name=_names,
    port=st.one_of(st.none(), st.integers(1, 65535)),
    scheme=st.sampled_from(["", "http://", "https://", "HTTPS://"]),
    path=st.sampled_from(["", "/", "/x/y", "/p?q=1", "?q", "#f"]),
    upper=st.booleans(),
)
def test_parse_site_roundtrip(
    name: str, port: int | None, scheme: str, path: str, upper: bool
) -> None:
    text = scheme + (name.upper() if upper else name) + (f":{port}" if port else "")
    if scheme:
        text += path
    site = parse_site(text)
    tls = scheme.lower() != "http://"
    assert (site.host, site.tls) == (name, tls)
    assert site.port == (port or (443 if tls else 80))
    if not tls:
        assert site.path.startswith("/") and "#" not in site.path
    # what is printed parses back to the same place
    again = parse_site(("https://" if tls else "http://") + str(site))
    assert (again.host, again.port, again.tls) == (site.host, site.port, site.tls)


@given(st.text(max_size=40))
def test_parse_site_fuzz_gives_a_site_or_value_error(text: str) -> None:
    try:
        site = parse_site(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert 0 < site.port < 65536 and site.host
    assert site.first_flight(443 if site.tls else 80)


def test_read_sites_skips_comments_and_names_the_bad_line() -> None:
    text = "# sites\nopen.lab\n\n  http://open.lab  # plain\nblocked.lab:8443\n"
    assert [str(s) for s in read_sites(text)] == ["open.lab:443", "open.lab:80", "blocked.lab:8443"]
    with pytest.raises(ValueError, match="line 2"):
        read_sites("ok.lab\nftp://nope\n")


def test_http_first_flight_is_a_get_with_the_host() -> None:
    site = parse_site("http://open.lab:8080/x?y")
    assert site.first_flight(80).startswith(b"GET /x?y HTTP/1.1\r\nHost: open.lab:8080\r\n")
    assert b"Host: open.lab\r\n" in parse_site("http://open.lab").first_flight(80)


# --- exit status -------------------------------------------------------------------------------


def _report(*oks: tuple[str, bool]) -> SiteReport:
    results = tuple(
        StrategyResult(name, "ok" if ok else "reset-after-first-flight",
                       "ok" if ok else "sni-reset", 0.1)
        for name, ok in oks
    )  # fmt: skip
    return SiteReport(Site("a.lab", 443), results, plain=frozenset({"direct"}))


def test_exit_status_is_the_worst_site() -> None:
    direct = _report(("direct", True), ("trick", True))
    tricked = _report(("direct", False), ("trick", True))
    nothing = _report(("direct", False), ("trick", False))
    assert (direct.status, tricked.status, nothing.status) == (
        "direct",
        "circumvented",
        "unreachable",
    )
    assert tricked.verdict == "sni-reset" and tricked.working == ["trick"]
    assert exit_status([direct]) == EXIT_DIRECT
    assert exit_status([direct, tricked]) == EXIT_CIRCUMVENTED
    assert exit_status([tricked, nothing, direct]) == EXIT_UNREACHABLE


# --- in the lab --------------------------------------------------------------------------------


async def test_probe_in_the_tspu_lab_judges_each_strategy(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_lab("ru-tspu", ca=lab_ca) as lab:
        env = probe_env(lab)
        config = env.prepare(default_config())
        async with open_setup(config, attempt_timeout=3.0, env=env) as setup:
            site = parse_site(world.BLOCKED, https_port=env.https_port)
            blocked = await probe_site(setup, site)
            opened = await probe_site(setup, parse_site(world.OPEN, https_port=env.https_port))
            down = await probe_site(setup, parse_site(DOWN, https_port=env.https_port))
    by = {r.strategy: r for r in blocked.results}
    assert (by["direct"].outcome, by["direct"].verdict) == ("reset-after-first-flight", "sni-reset")
    assert (by["tls-record-split"].outcome, by["tls-record-split"].verdict) == ("ok", "ok")
    assert by["http-host-mix"].outcome == "skipped"  # nothing of plain HTTP in a ClientHello
    assert blocked.status == "circumvented" and blocked.verdict == "sni-reset"
    assert blocked.addresses == (lab.address(world.BLOCKED)[0],)

    assert opened.status == "direct"
    assert [r.verdict for r in opened.results if r.outcome != "skipped"] == ["ok"] * len(
        [r for r in opened.results if r.outcome != "skipped"]
    )

    assert down.status == "unreachable" and down.verdict == "site-down"
    assert all(r.verdict in ("site-down", "-") for r in down.results)


async def test_probe_plain_http_block_page_is_judged_blockpage(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_lab("ru-tspu", ca=lab_ca) as lab:
        env = probe_env(lab)
        async with open_setup(env.prepare(default_config()), attempt_timeout=3.0,
                              env=env) as setup:  # fmt: skip
            site = parse_site(f"http://{world.HTTP_BLOCKED}", http_port=env.http_port)
            report = await probe_site(setup, site)
    by = {r.strategy: r for r in report.results}
    assert by["direct"].verdict == "blockpage", by["direct"]
    assert by["tls-record-split"].outcome == "skipped"
    assert report.status in ("circumvented", "unreachable")


async def test_a_dead_upstream_is_path_failed_not_blocked_when_controls_are_set(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    with socket.socket() as unused:  # a port where no proxy listens
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
    async with open_lab("ru-tspu", ca=lab_ca) as lab:
        env = probe_env(lab)
        text = f"""
[[strategy]]
name = "dead-proxy"
type = "socks5"
server = "127.0.0.1:{dead}"

[router]
control = ["{world.OPEN}:{env.https_port}"]
"""
        config = env.prepare(parse_config(text, "dead.toml"))
        only = ["direct", "tls-record-split", "dead-proxy"]
        async with open_setup(config, only=only, attempt_timeout=3.0, env=env) as setup:
            report = await probe_site(setup, parse_site(world.BLOCKED, https_port=env.https_port))
            # without control sites nothing is said about the proxy beyond its own failure
            setup.controls = None
            unchecked = await probe_site(
                setup, parse_site(world.BLOCKED, https_port=env.https_port)
            )
    by = {r.strategy: r for r in report.results}
    assert [r.strategy for r in report.results] == only
    assert by["dead-proxy"].verdict == "path-failed"
    assert "no control site" in by["dead-proxy"].detail
    assert by["direct"].verdict == "sni-reset" and by["tls-record-split"].ok
    assert "no control site" not in {r.strategy: r for r in unchecked.results}["dead-proxy"].detail
