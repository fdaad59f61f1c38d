"""Verdicts with their controls, in-line freeze and throttle detection, and the safety of tricks,
on the censor lab with the real app.

Every test runs sidestep with a policy of ``direct`` then ``outside``: a SOCKS5 upstream in the
lab (:class:`~proxy.lab.outside.OutsideProxy`) whose traffic never crosses the censor, the lab's
stand-in for a proxy abroad. Each censor behaviour must produce its verdict in the connection's
log line and in the evidence log, and the verdict must steer the next connection (or, for an
outage, steer nothing). Virtual time (``autojump_clock``) keeps timeouts, throttling and the
residual penalty box free; the curl tests run on the real clock with short knobs.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing

from proxy.config import Config, parse_config
from proxy.detect.evidence import EvidenceEvent, read_events
from proxy.inbound.base import IPAddress, Target
from proxy.lab import world
from proxy.lab.ca import LabCA
from proxy.lab.outside import OutsideProxy
from proxy.lab.profiles import RESIDUAL_SECONDS, Profile
from proxy.lab.rules import Action, NameMatch, Penalty, PenaltyKey, Reassembly, Rule, Sni
from proxy.lab.scenarios import Fetch, RunningSidestep, Scenario, fetch, open_sidestep
from proxy.lab.world import Lab, open_lab
from proxy.net.dial import open_tcp
from proxy.resolve.doh import DohResolver
from proxy.route.site import site_of

POLICY = ("direct", "outside")


def make_config(
    outside: tuple[str, int], strategies: Sequence[str] = POLICY, router: str = ""
) -> Config:
    text = f"""
[[strategy]]
name = "outside"
type = "socks5"
server = "{outside[0]}:{outside[1]}"

[[strategy]]
name = "split"
type = "direct"

[[policy]]
name = "censored"
strategies = {json.dumps(list(strategies))}
attempt_timeout = 3

[router]
default_policy = "censored"
{router}
"""
    return parse_config(text, "verdicts.toml")


@dataclass
class World:
    lab: Lab
    side: RunningSidestep
    outside: OutsideProxy

    @property
    def network(self) -> str:
        return f"lab-{self.lab.profile.name}"

    def order(self, site: str) -> list[str]:
        memory = self.side.app.memory
        assert memory is not None
        return memory.order(self.network, site, POLICY)

    def evidence(self) -> list[EvidenceEvent]:
        return list(read_events(self.lab.workdir / "evidence.jsonl"))

    async def fetch(
        self, name: str, path: str = "/", scheme: str = "https", *, timeout: float = 30.0
    ) -> Fetch:
        scenario = Scenario("x", name, scheme, path)
        return await fetch(
            self.side.address,
            scenario.url(self.lab),
            tls=self.lab.ca.client_context(),
            timeout=timeout,
            expected=scenario.expected(self.lab),
        )

    async def get(
        self, name: str, path: str = "/", scheme: str = "https", *, timeout: float = 30.0
    ) -> tuple[Fetch, dict[str, Any]]:
        """Fetch through sidestep; the fetch and sidestep's log line for it."""
        got = await self.fetch(name, path, scheme, timeout=timeout)
        assert got.client is not None
        await self.side.connections.wait_for([got.client], timeout=10)
        line = self.side.connections.get(got.client)
        assert line is not None, got
        return got, line


@asynccontextmanager
async def running(
    profile: str | Profile,
    ca: LabCA,
    *,
    strategies: Sequence[str] = POLICY,
    router: str = "",
) -> AsyncIterator[World]:
    async with open_lab(profile, ca=ca) as lab:
        outside = OutsideProxy(lab)
        address = await lab.start_service(outside.serve)
        config = make_config(address, strategies, router)
        async with open_sidestep(lab, config) as side:
            yield World(lab, side, outside)


# --- one verdict per censor behaviour -----------------------------------------------------------


async def test_site_down_everywhere_is_site_down_and_nothing_is_learned(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with running("ru-tspu", lab_ca) as w:
        # an address of the lab plan where nothing listens, neither in front nor behind
        got, line = await w.get("127.60.9.9")
        assert not got.ok
        assert line["verdict"] == "site-down", line
        assert "all-failed" in line["outcome"]
        events = w.evidence()
        assert {e.outcome for e in events if e.strategy in POLICY} == {"site-down"}
        memory = w.side.app.memory
        assert memory is not None and memory.entries() == []


async def test_sni_reset_is_judged_and_the_next_strategy_learned(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with running("ru-tspu", lab_ca) as w:
        got, line = await w.get(world.BLOCKED)
        assert got.ok, got
        assert line["verdict"] == "sni-reset", line
        assert line["strategy"] == "outside (after direct: sni-reset)"
        assert [(e.strategy, e.outcome) for e in w.evidence()] == [
            ("direct", "sni-reset"),
            ("outside", "recovered"),
        ]
        assert w.order("blocked.lab") == ["outside", "direct"]
        # the repeat visit goes straight to the way that worked: no failed attempt
        again, line = await w.get(world.BLOCKED)
        assert again.ok and line["strategy"] == "outside" and line["verdict"] == "ok"


async def test_blackhole_is_sni_timeout(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with running("ru-tspu", lab_ca) as w:
        got, line = await w.get(world.TWITTER)
        assert got.ok, got
        assert line["verdict"] == "sni-timeout", line
        assert w.order(site_of(world.TWITTER)) == ["outside", "direct"]


async def test_ip_block_is_ip_blocked(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with running("ru-tspu", lab_ca) as w:
        got, line = await w.get(world.IP_BLOCKED)
        assert got.ok, got
        assert line["verdict"] == "ip-blocked", line


async def test_uncensored_twin_gets_no_verdict_and_no_trick(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with running("ru-tspu", lab_ca) as w:
        got, line = await w.get(world.OPEN)
        assert got.ok and line["strategy"] == "direct" and line["verdict"] == "ok", line
        assert w.evidence() == []
        assert w.outside.connections == []


async def test_http_block_page_is_blockpage(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with running("ru-tspu", lab_ca) as w:
        got, line = await w.get(world.HTTP_BLOCKED, scheme="http")
        assert got.ok, got
        assert line["verdict"] == "blockpage", line
        assert w.order("http-blocked.lab") == ["outside", "direct"]


async def test_poisoned_dns_is_dns_tampering_with_a_secure_view(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with running("cn", lab_ca) as w:
        endpoint = next(ep for ep in w.lab.doh_endpoints if not ep.famous)
        async with DohResolver(
            endpoint.url, endpoint.bootstrap, cafile=str(w.lab.ca_file)
        ) as secure:
            w.side.app.dispatcher.dns_control = secure
            got, line = await w.get(world.POISONED)
        assert got.ok, got
        assert line["verdict"] == "dns-tampering", line
        first = w.evidence()[0]
        assert (first.strategy, first.outcome) == ("direct", "dns-tampering")


# --- in-line degradation -----------------------------------------------------------------------


async def test_freeze_is_detected_in_line_cut_and_the_next_connection_escapes(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with running("ru-2025", lab_ca) as w:
        start = trio.current_time()
        got, line = await w.get(world.FROZEN, "/bytes/65536", timeout=60)
        # cut with a reset a few (virtual) seconds after the data stopped, not left hanging
        assert got.error == "reset", got
        assert trio.current_time() - start < 10
        assert line["verdict"] == "frozen", line
        assert line["strategy"] == "direct"
        assert line["down"] == 16 * 1024
        assert ("direct", "frozen") in [(e.strategy, e.outcome) for e in w.evidence()]
        assert w.order("frozen.lab") == ["outside", "direct"]
        again, line = await w.get(world.FROZEN, "/bytes/65536")
        assert again.ok and line["strategy"] == "outside", (again, line)


async def test_throttling_is_detected_against_the_baseline_and_the_next_connection_escapes(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with running("ru-2021", lab_ca) as w:
        # an uncensored bulk transfer teaches the network's baseline for "direct"
        got, line = await w.get(world.OPEN, "/bytes/1048576")
        assert got.ok and line["verdict"] == "ok"
        assert w.side.app.dispatcher.baselines[(w.network, "direct")].samples == 1
        # 64 KiB at 16 kbit/s: detected while it runs; the download itself goes on
        got, line = await w.get(world.THROTTLED, "/bytes/65536", timeout=120)
        assert got.ok, got
        assert line["verdict"] == "throttled", line
        assert w.order("throttled.lab") == ["outside", "direct"]
        again, line = await w.get(world.THROTTLED, "/bytes/65536")
        assert again.ok and line["strategy"] == "outside" and line["verdict"] == "ok"


async def test_browser_like_parallel_connections_benefit_from_a_freeze_at_once(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    """A connection opened while a frozen one is still stuck uses ``direct`` too, but every one
    opened after the verdict goes out straight away."""
    async with running("ru-2025", lab_ca) as w:
        first, _ = await w.get(world.FROZEN, "/bytes/65536", timeout=60)
        assert first.error == "reset"
        results: list[tuple[Fetch, dict[str, Any]]] = []

        async def one() -> None:
            results.append(await w.get(world.FROZEN, "/bytes/65536"))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        assert all(f.ok and line["strategy"] == "outside" for f, line in results), results


# --- safety of tricks --------------------------------------------------------------------------


class Split:
    """A minimal trick for the penalty-box test: the ClientHello in two TCP segments."""

    name = "split"
    remote_dns = False

    async def connect(
        self, target: Target, addresses: Sequence[IPAddress], first_flight: bytes
    ) -> trio.abc.HalfCloseableStream:
        stream = await open_tcp(addresses, target.port, timeout=5)
        try:
            stream.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await stream.send_all(first_flight[:3])
            await trio.sleep(0.05)
            await stream.send_all(first_flight[3:])
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream


def residual_profile() -> Profile:
    """A GFW-like censor that inspects one segment, resets listed names and then blackholes
    the client/server pair for two minutes (a split ClientHello slips past it)."""
    penalty = Penalty(RESIDUAL_SECONDS, PenaltyKey.THREE_TUPLE, Action.blackhole())
    rule = Rule(
        "residual-sni",
        Sni((world.BLOCKED,), NameMatch.SUFFIX),
        Action.reset(),
        Reassembly.NONE,
        penalty,
    )
    return Profile("residual", "SNI reset of one segment, then 120 s of residual blocking", (rule,))


async def test_one_plain_attempt_costs_the_site_for_the_penalty_and_trick_first_avoids_it(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    # plain first (the default order): the plain attempt trips the censor, and the trick, tried
    # next, lands in the penalty box: the site is lost for the penalty's duration
    async with running(residual_profile(), lab_ca, strategies=("direct", "split")) as w:
        w.side.app.dispatcher.router.strategies["split"] = Split()  # type: ignore[union-attr]
        got = await w.fetch(world.BLOCKED, timeout=20)
        assert not got.ok
        actions = [e.action for e in w.lab.events(world.BLOCKED)]
        assert actions[:2] == ["reset", "blackhole"], actions
        await trio.sleep(RESIDUAL_SECONDS / 2)
        got = await w.fetch(world.BLOCKED, timeout=20)
        assert not got.ok
    # trick first ("fragment first" for listed sites: a policy that starts with the trick):
    # the site works at once and the censor never fires
    async with running(residual_profile(), lab_ca, strategies=("split", "direct")) as w:
        w.side.app.dispatcher.router.strategies["split"] = Split()  # type: ignore[union-attr]
        got, line = await w.get(world.BLOCKED)
        assert got.ok, got
        assert line["strategy"] == "split" and line["verdict"] == "ok", line
        assert "reset" not in [e.action for e in w.lab.events(world.BLOCKED)]


async def test_the_last_strategy_is_only_learned_once_the_site_answered_through_it(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    """The last strategy of a policy gets no deadline for its first answer (a slow server is
    not cut off), but it only counts as working once the site answered through it: one that
    connects and then meets the same silence is judged like the others, not stored."""
    # "split" is a second plain strategy here: the blackhole swallows its hello too
    async with running("ru-tspu", lab_ca, strategies=("direct", "split")) as w:
        got, line = await w.get(world.TWITTER, timeout=400)
        assert not got.ok
        assert line["verdict"] == "sni-timeout", line
        assert line["strategy"] == "- (after direct: sni-timeout, split: sni-timeout)", line
        memory = w.side.app.memory
        assert memory is not None
        assert memory.known_good(w.network, site_of(world.TWITTER)) is None


# --- real curl through the real app ------------------------------------------------------------


async def test_curl_gets_a_reset_site_and_a_frozen_site_through_sidestep(
    lab_ca: LabCA, curl: Any
) -> None:
    router = "freeze_stall = 0.5\ncontrol_timeout = 2"
    async with running("ru-2025", lab_ca, router=router) as w:
        proxy = f"socks5h://{w.side.address[0]}:{w.side.address[1]}"
        port = w.lab.ports.https
        ca = ["--cacert", str(w.lab.ca_file), "--proxy", proxy]
        r = await curl(*ca, f"https://{world.BLOCKED}:{port}/")
        assert r.returncode == 0 and r.stdout.startswith(b"hello from blocked.lab"), r.stderr
        url = f"https://{world.FROZEN}:{port}/bytes/65536"
        r = await curl(*ca, url)
        assert r.returncode != 0  # the frozen connection is cut: curl sees the reset
        r = await curl(*ca, url)
        assert r.returncode == 0 and len(r.stdout) == 65536, r.stderr
        verdicts = [e.outcome for e in w.evidence() if e.strategy == "direct"]
        assert verdicts == ["sni-reset", "frozen"]
