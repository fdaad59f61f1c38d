"""Control probes over real loopback: a strategy that cannot reach the control site either is
broken on this network, and its failures are not learned as blocks."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from proxy.config import parse_config
from proxy.detect.evidence import EvidenceLog
from proxy.detect.outcome import Outcome
from proxy.errors import ConfigError, ResolveError
from proxy.inbound.base import IPAddress, Target
from proxy.net.dial import open_tcp
from proxy.route.control import ControlResult, probe_control
from proxy.route.learn import LearnedMemory
from proxy.route.policy import AllFailed, AttemptRecord, run_policy
from proxy.route.router import Router
from proxy.strategies.direct import DirectStrategy

NET = "lab-net"
LOCALHOST = ipaddress.ip_address("127.0.0.1")


def closed_port() -> int:
    """A loopback port nothing listens on (connecting is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A loopback listener that counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> Server:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])

        async def handler(stream: trio.SocketStream) -> None:
            self.accepted += 1
            async with stream:
                await trio.sleep_forever()

        nursery.start_soon(trio.serve_listeners, handler, listeners)
        return self


@dataclass
class Broken:
    """A strategy broken on this network: whatever the target, its connection is refused."""

    name: str
    remote_dns: bool = False

    async def connect(
        self, target: Target, addresses: Sequence[IPAddress], first_flight: bytes
    ) -> trio.abc.HalfCloseableStream:
        return await open_tcp([LOCALHOST], closed_port(), timeout=2)


def failure(strategy: str, outcome: Outcome) -> AttemptRecord:
    return AttemptRecord(strategy, outcome, 0.01)


async def resolve_lab(host: str) -> Sequence[IPAddress]:
    """Every ``.test`` name is on loopback; anything else does not resolve."""
    if host.endswith(".test"):
        return [LOCALHOST]
    raise ResolveError(f"{host}: no such name")


def make_router(
    tmp_path: Path, control: Sequence[str], *, strategies: Sequence[str] = ("s",)
) -> Router:
    """A router whose policy ``p`` tries direct-type strategies named ``strategies``."""
    defs = "".join(f'[[strategy]]\nname = "{name}"\ntype = "direct"\n' for name in strategies)
    text = f"""
{defs}
[[policy]]
name = "p"
strategies = {json.dumps(list(strategies))}
attempt_timeout = 2
[router]
default_policy = "p"
control = {json.dumps(list(control))}
control_timeout = 2
"""
    return Router(
        parse_config(text, "test.toml"),
        memory=LearnedMemory(None),
        evidence=EvidenceLog(tmp_path / "evidence.jsonl"),
        network=NET,
    )


async def visit(router: Router, host: str, port: int) -> str | None:
    """What the dispatcher does for one connection: decide, attempt, then settle the record."""
    target = Target.parse(host, port)
    decision = router.decide(target, "mixed")

    async def lookup() -> Sequence[IPAddress]:
        return await resolve_lab(target.host)

    try:
        winner = await run_policy(
            decision.policy, decision.strategies, target, lookup, b"", tls=False
        )
    except AllFailed as exc:
        await router.settle(decision, target, None, exc.attempts, None, resolve_lab)
        return None
    await winner.stream.aclose()
    await router.settle(decision, target, None, winner.attempts, winner.strategy, resolve_lab)
    return winner.strategy


def evidence(tmp_path: Path) -> list[tuple[str, str]]:
    path = tmp_path / "evidence.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [(e["strategy"], e["outcome"]) for e in lines]


def memory_of(router: Router) -> LearnedMemory:
    assert router.memory is not None
    return router.memory


async def test_control_failing_too_marks_strategy_unhealthy_and_learns_nothing(
    tmp_path: Path,
) -> None:
    router = make_router(tmp_path, [f"127.0.0.1:{closed_port()}"])
    assert await visit(router, "blocked.test", closed_port()) is None
    memory = memory_of(router)
    assert memory.entries() == []
    assert memory.is_unhealthy(NET, "s")
    assert evidence(tmp_path) == []  # not evidence of a block: neither the failure nor "exhausted"


async def test_control_reached_records_the_failure_and_keeps_strategy_healthy(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    control = await Server().start(nursery)
    router = make_router(tmp_path, [f"127.0.0.1:{control.port}"])
    memory = memory_of(router)
    memory.mark_unhealthy(NET, "s")  # an older mark is lifted by a control that gets through
    assert await visit(router, "blocked.test", closed_port()) is None
    (entry,) = memory.entries()
    assert (entry.site, [(f.strategy, f.outcome) for f in entry.failures]) == (
        "blocked.test",
        [("s", "connect-refused")],
    )
    assert not memory.is_unhealthy(NET, "s")
    assert evidence(tmp_path) == [("s", "connect-refused"), (None, "exhausted")]
    await trio.testing.wait_all_tasks_blocked()
    assert control.accepted == 1


async def test_control_results_are_cached_per_strategy_and_shared_by_a_burst(
    tmp_path: Path, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    control = await Server().start(nursery)
    router = make_router(tmp_path, [f"127.0.0.1:{control.port}"])
    assert router.control is not None
    dead = closed_port()
    async with trio.open_nursery() as burst:  # three failures at once: one probe
        for host in ("a.test", "b.test", "c.test"):
            burst.start_soon(visit, router, host, dead)
    await visit(router, "d.test", dead)  # within the minute: from the cache
    await trio.testing.wait_all_tasks_blocked()
    assert (control.accepted, router.control.probes_sent) == (1, 1)
    assert len(memory_of(router).entries()) == 4  # every failure was still recorded
    mock_clock.jump(61)  # the cached result has expired: probe again
    await visit(router, "e.test", dead)
    await trio.testing.wait_all_tasks_blocked()
    assert (control.accepted, router.control.probes_sent) == (2, 2)


async def test_control_each_failed_strategy_is_checked_and_only_the_broken_one_dropped(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    control = await Server().start(nursery)
    router = make_router(tmp_path, [f"127.0.0.1:{control.port}"], strategies=("s", "t", "direct"))
    target = Target.parse("blocked.test", 443)
    decision = router.decide(target, "mixed")
    router.strategies["t"] = Broken("t")  # "t" cannot reach the control either
    failures = [failure("s", Outcome.CONNECT_REFUSED), failure("t", Outcome.CONNECT_TIMEOUT)]
    await router.settle(decision, target, None, failures, "direct", resolve_lab)
    memory = memory_of(router)
    (entry,) = memory.entries()
    assert [f.strategy for f in entry.failures] == ["s"]
    assert entry.works == "direct"
    assert memory.is_unhealthy(NET, "t") and not memory.is_unhealthy(NET, "s")
    assert evidence(tmp_path) == [("s", "connect-refused"), ("direct", "recovered")]
    # an unhealthy strategy goes last, whatever it did before
    assert [s.name for s in router.decide(target, "mixed").strategies] == ["direct", "s", "t"]


async def test_control_unhealthy_strategy_that_works_is_trusted_only_after_a_control(
    tmp_path: Path, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    control = await Server().start(nursery)
    open_site = await Server().start(nursery)
    router = make_router(tmp_path, [f"127.0.0.1:{control.port}"], strategies=("s", "t"))
    memory = memory_of(router)
    memory.mark_unhealthy(NET, "s")
    assert router.to_check([], "s") == ["s"]
    target = Target.parse("open.test", open_site.port)
    decision = router.decide(target, "mixed")
    assert [s.name for s in decision.strategies] == ["t", "s"]
    router.strategies["s"] = Broken("s")  # still broken: its success is not stored
    await router.settle(decision, target, None, [], "s", resolve_lab)
    assert memory.entries() == [] and memory.is_unhealthy(NET, "s")
    mock_clock.jump(61)  # past the cached control result
    router.strategies["s"] = DirectStrategy("s", 2)  # working again: healthy, success stored
    await router.settle(decision, target, None, [], "s", resolve_lab)
    assert not memory.is_unhealthy(NET, "s")
    assert memory.known_good(NET, "open.test") == "s"


async def test_control_without_controls_records_at_once(tmp_path: Path) -> None:
    router = make_router(tmp_path, [])
    assert router.control is None
    assert router.to_check([failure("s", Outcome.CONNECT_REFUSED)], None) == []
    assert await visit(router, "blocked.test", closed_port()) is None
    assert [f.strategy for f in memory_of(router).entries()[0].failures] == ["s"]


async def test_probe_control_resolves_names_for_local_dns_strategies(
    nursery: trio.Nursery,
) -> None:
    control = await Server().start(nursery)
    direct = DirectStrategy("direct", 2)
    reached = await probe_control(
        direct, [Target.parse("control.test", control.port)], resolve_lab, 2
    )
    assert reached is ControlResult.REACHED
    # a control name that does not resolve says nothing about the strategy
    unknown = await probe_control(direct, [Target.parse("nowhere.example", 443)], resolve_lab, 2)
    assert unknown is ControlResult.UNKNOWN
    # the next control is tried when one cannot be reached
    controls = [Target.parse("127.0.0.1", closed_port()), Target.parse("127.0.0.1", control.port)]
    assert await probe_control(direct, controls, resolve_lab, 2) is ControlResult.REACHED
    await trio.testing.wait_all_tasks_blocked()
    assert control.accepted == 2


async def test_control_unknown_result_records_the_failure(tmp_path: Path) -> None:
    router = make_router(tmp_path, ["nowhere.example:443"])
    assert await visit(router, "blocked.test", closed_port()) is None
    memory = memory_of(router)
    assert [f.strategy for f in memory.entries()[0].failures] == ["s"]
    assert not memory.is_unhealthy(NET, "s")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("example.org", "host:port"),
        (":443", "host:port"),
        ("example.org:0", "port"),
        ("example.org:https", "port"),
        ("2001:db8::1:443", "brackets"),
        ("[2001:db8::zz]:443", "IPv6"),
        ("exa mple.org:443", "host name"),
    ],
)
def test_control_config_rejects_bad_sites(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[router]\ncontrol = ["{value}"]\n', "bad.toml")
    assert info.value.key == "router.control[0]"
    assert message in str(info.value)


def test_control_config_accepts_names_and_addresses() -> None:
    config = parse_config(
        '[router]\ncontrol = ["example.org:443", "192.0.2.1:80", "[2001:db8::1]:443"]\n'
        "control_timeout = 3\n",
        "good.toml",
    )
    assert config.router.control_timeout == 3.0
    controls = Router(config).control
    assert controls is not None
    assert [str(c) for c in controls.controls] == [
        "example.org:443",
        "192.0.2.1:80",
        "[2001:db8::1]:443",
    ]
