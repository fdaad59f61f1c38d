"""Fallback and race over real loopback servers that misbehave in the ways censors do."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest
import trio

from proxy.detect.outcome import Outcome
from proxy.inbound.base import IPAddress, Target
from proxy.net.dial import open_tcp
from proxy.protocols.splits import FragmentPolicy, SplitPoint
from proxy.protocols.tls_hello import build_client_hello
from proxy.route.policy import AllFailed, EarlyDial, Policy, resolve_once, run_policy
from proxy.strategies.direct import DirectStrategy
from proxy.strategies.fragment import FragmentStrategy

HELLO = build_client_hello(sni="site.lab")
SERVER_HELLO = b"\x16\x03\x03\x00\x04\x02\x00\x00\x00"

Behaviour = Callable[[trio.SocketStream], Awaitable[None]]


@dataclass
class Fixed:
    """A real strategy that always connects to one local server (a stand-in for a proxy)."""

    name: str
    port: int
    remote_dns: bool = True

    async def connect(
        self, target: Target, addresses: Sequence[IPAddress], first_flight: bytes
    ) -> trio.abc.HalfCloseableStream:
        stream = await open_tcp([ipaddress.ip_address("127.0.0.1")], self.port, timeout=2)
        await stream.send_all(first_flight)
        return stream


async def serve(nursery: trio.Nursery, behaviour: Behaviour) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await behaviour(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return int(port)


async def answers(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await stream.send_all(SERVER_HELLO)
    await trio.sleep_forever()


def slow_answers(delay: float) -> Behaviour:
    async def run(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await trio.sleep(delay)
        await stream.send_all(SERVER_HELLO)
        await trio.sleep_forever()

    return run


async def resets(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def silent(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


async def closes(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)


async def blockpage(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await stream.send_all(b"HTTP/1.1 451 Unavailable\r\n\r\n")


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TARGET = Target("site.lab", 443)


async def no_dns() -> Sequence[IPAddress]:
    raise AssertionError("remote_dns strategies must not resolve locally")


@pytest.mark.parametrize(
    ("behaviour", "outcome"),
    [
        (resets, Outcome.RESET_AFTER_FIRST_FLIGHT),
        (silent, Outcome.TIMEOUT_AFTER_FIRST_FLIGHT),
        (closes, Outcome.EOF_BEFORE_RESPONSE),
        (blockpage, Outcome.NOT_SERVER_HELLO),
    ],
)
async def test_fallback_classifies_then_recovers(
    nursery: trio.Nursery, behaviour: Behaviour, outcome: Outcome
) -> None:
    bad = await serve(nursery, behaviour)
    good = await serve(nursery, answers)
    policy = Policy("p", ("bad", "good"), attempt_timeout=0.5)
    winner = await run_policy(
        policy, [Fixed("bad", bad), Fixed("good", good)], TARGET, no_dns, HELLO, tls=True
    )
    async with winner.stream:
        assert winner.strategy == "good"
        # the last candidate is handed over without waiting: its answer is still in the stream
        assert winner.response + await winner.stream.receive_some(100) == SERVER_HELLO
        assert [(a.strategy, a.outcome) for a in winner.attempts] == [("bad", outcome)]


async def test_fallback_connect_refused_is_classified(nursery: trio.Nursery) -> None:
    good = await serve(nursery, answers)
    strategies = [Fixed("dead", refused_port()), Fixed("good", good)]
    winner = await run_policy(Policy("p", ()), strategies, TARGET, no_dns, HELLO, tls=True)
    async with winner.stream:
        assert winner.attempts[0].outcome is Outcome.CONNECT_REFUSED


async def test_all_failed_lists_every_attempt(nursery: trio.Nursery) -> None:
    bad = await serve(nursery, resets)
    strategies = [Fixed("a", refused_port()), Fixed("b", bad), Fixed("c", refused_port())]
    policy = Policy("p", (), attempt_timeout=0.5)
    with pytest.raises(AllFailed) as info:
        await run_policy(policy, strategies, TARGET, no_dns, HELLO, tls=True)
    assert [(a.strategy, a.outcome) for a in info.value.attempts] == [
        ("a", Outcome.CONNECT_REFUSED),
        ("b", Outcome.RESET_AFTER_FIRST_FLIGHT),
        ("c", Outcome.CONNECT_REFUSED),
    ]
    assert "a: connect-refused" in str(info.value)


async def test_last_candidate_is_not_cut_off_when_slow(nursery: trio.Nursery) -> None:
    slow = await serve(nursery, slow_answers(0.4))
    strategies = [Fixed("dead", refused_port()), Fixed("slow", slow)]
    policy = Policy("p", (), attempt_timeout=0.2)
    winner = await run_policy(policy, strategies, TARGET, no_dns, HELLO, tls=True)
    async with winner.stream:
        assert winner.strategy == "slow"
        assert await winner.stream.receive_some(100) == SERVER_HELLO


async def test_race_picks_the_faster_upstream(nursery: trio.Nursery) -> None:
    slow = await serve(nursery, slow_answers(0.5))
    fast = await serve(nursery, slow_answers(0.05))
    policy = Policy("p", (), mode="race", stagger=0.05, attempt_timeout=2)
    start = trio.current_time()
    winner = await run_policy(
        policy, [Fixed("slow", slow), Fixed("fast", fast)], TARGET, no_dns, HELLO, tls=True
    )
    async with winner.stream:
        assert winner.strategy == "fast"
        assert trio.current_time() - start < 0.4


async def test_race_starts_next_at_once_when_one_fails(nursery: trio.Nursery) -> None:
    good = await serve(nursery, answers)
    policy = Policy("p", (), mode="race", stagger=5, attempt_timeout=2)
    with trio.fail_after(2):
        winner = await run_policy(
            policy,
            [Fixed("dead", refused_port()), Fixed("good", good)],
            TARGET,
            no_dns,
            HELLO,
            tls=True,
        )
    async with winner.stream:
        assert winner.strategy == "good"


async def test_race_all_failed(nursery: trio.Nursery) -> None:
    bad = await serve(nursery, resets)
    policy = Policy("p", (), mode="race", stagger=0.01, attempt_timeout=0.5)
    with pytest.raises(AllFailed) as info:
        await run_policy(
            policy, [Fixed("a", bad), Fixed("b", bad)], TARGET, no_dns, HELLO, tls=True
        )
    assert {a.outcome for a in info.value.attempts} == {Outcome.RESET_AFTER_FIRST_FLIGHT}


async def test_resolve_once_shares_one_lookup() -> None:
    calls = 0

    async def lookup() -> Sequence[IPAddress]:
        nonlocal calls
        calls += 1
        return [ipaddress.ip_address("127.0.0.1")]

    shared = resolve_once(lookup)
    assert await shared() == await shared()
    assert calls == 1


# --- strategies that cannot help are not tried ------------------------------------------------


async def loopback() -> Sequence[IPAddress]:
    return [ipaddress.ip_address("127.0.0.1")]


def http_only(name: str = "http-host-mix") -> FragmentStrategy:
    return FragmentStrategy(name, FragmentPolicy((SplitPoint.parse("host-middle"),)))


def tls_split(name: str = "tls-split") -> FragmentStrategy:
    return FragmentStrategy(name, FragmentPolicy((SplitPoint.parse("sni-middle"),)))


async def test_policy_skips_a_trick_with_nothing_to_change_without_a_record(
    nursery: trio.Nursery,
) -> None:
    # an HTTP-only cut has nothing to do with a TLS hello: it is not an attempt at all
    port = await serve(nursery, answers)
    target = Target("site.lab", port)
    policy = Policy("p", (), attempt_timeout=2)
    with trio.fail_after(5):
        winner = await run_policy(
            policy,
            [http_only(), DirectStrategy()],
            target,
            loopback,
            HELLO,
            tls=True,
        )
    async with winner.stream:
        assert winner.strategy == "direct"
        assert winner.attempts == []


async def test_policy_with_only_inapplicable_tricks_has_no_usable_strategy() -> None:
    policy = Policy("p", ())
    with pytest.raises(AllFailed) as info:
        await run_policy(policy, [http_only(), tls_split()], TARGET, no_dns, b"", tls=False)
    assert info.value.attempts == []
    assert "no usable strategy" in str(info.value)


async def test_policy_skips_same_address_tricks_once_the_address_is_unreachable(
    nursery: trio.Nursery,
) -> None:
    # the plain connection is refused: re-framed hellos to the same address would be refused
    # too, so only the upstream proxy is tried after it
    good = await serve(nursery, answers)
    dead = refused_port()
    target = Target("site.lab", dead)
    policy = Policy("p", (), attempt_timeout=2)
    with trio.fail_after(5):
        winner = await run_policy(
            policy,
            [DirectStrategy(), tls_split(), Fixed("proxy", good)],
            target,
            loopback,
            HELLO,
            tls=True,
        )
    async with winner.stream:
        assert winner.strategy == "proxy"
        assert [(a.strategy, a.outcome) for a in winner.attempts] == [
            ("direct", Outcome.CONNECT_REFUSED)
        ]


async def test_policy_tries_every_trick_after_a_reset(nursery: trio.Nursery) -> None:
    # a reset after the hello says nothing against a re-framed hello: the trick is tried
    bad = await serve(nursery, resets)
    good = await serve(nursery, answers)
    target = Target("site.lab", bad)
    policy = Policy("p", (), attempt_timeout=2)
    with trio.fail_after(5):
        winner = await run_policy(
            policy,
            [DirectStrategy(), tls_split(), Fixed("proxy", good)],
            target,
            loopback,
            HELLO,
            tls=True,
        )
    async with winner.stream:
        assert winner.strategy == "proxy"
        assert [a.strategy for a in winner.attempts] == ["direct", "tls-split"]


async def test_policy_skips_same_address_tricks_when_a_silent_address_fails_the_control(
    nursery: trio.Nursery,
) -> None:
    # silence after the hello, and the address does not answer an innocuous name either: the
    # server is down, so the tricks are not tried (each would wait out its own timeout)
    quiet = await serve(nursery, silent)
    good = await serve(nursery, answers)
    asked = 0

    async def dead() -> bool:
        nonlocal asked
        asked += 1
        return False

    policy = Policy("p", (), attempt_timeout=0.5)
    strategies = [DirectStrategy(), tls_split("a"), tls_split("b"), Fixed("proxy", good)]
    with trio.fail_after(5):
        winner = await run_policy(
            policy, strategies, Target("site.lab", quiet), loopback, HELLO, tls=True,
            address_answers=dead,
        )  # fmt: skip
    async with winner.stream:
        assert winner.strategy == "proxy"
        assert [a.strategy for a in winner.attempts] == ["direct"]
        assert asked == 1


async def test_policy_tries_the_tricks_when_a_silent_address_answers_the_control(
    nursery: trio.Nursery,
) -> None:
    # the address answers an innocuous name: the silence was about this name, tricks go on
    quiet = await serve(nursery, silent)
    good = await serve(nursery, answers)

    async def alive() -> bool:
        return True

    policy = Policy("p", (), attempt_timeout=0.3)
    strategies = [DirectStrategy(), tls_split("a"), Fixed("proxy", good)]
    with trio.fail_after(5):
        winner = await run_policy(
            policy, strategies, Target("site.lab", quiet), loopback, HELLO, tls=True,
            address_answers=alive,
        )  # fmt: skip
    async with winner.stream:
        assert [a.strategy for a in winner.attempts] == ["direct", "a"]


# --- the early connection of a policy that starts with direct ---------------------------------


async def test_early_dial_connection_is_used_by_the_first_attempt(nursery: trio.Nursery) -> None:
    accepted = 0

    async def counting(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await answers(stream)

    port = await serve(nursery, counting)
    target = Target("site.lab", port)
    early = EarlyDial(DirectStrategy(), target, loopback)
    nursery.start_soon(early.run)
    with trio.fail_after(5):
        winner = await run_policy(Policy("p", ()), [early, tls_split()], target, loopback,
                                  HELLO, tls=True)  # fmt: skip
    async with winner.stream:
        assert winner.strategy == "direct" and winner.response == SERVER_HELLO
    await early.aclose()
    assert accepted == 1


async def test_early_dial_error_is_the_first_attempt_outcome(nursery: trio.Nursery) -> None:
    good = await serve(nursery, answers)
    target = Target("site.lab", refused_port())
    early = EarlyDial(DirectStrategy(), target, loopback)
    nursery.start_soon(early.run)
    with trio.fail_after(5):
        winner = await run_policy(Policy("p", ()), [early, Fixed("proxy", good)], target,
                                  loopback, HELLO, tls=True)  # fmt: skip
    async with winner.stream:
        assert [(a.strategy, a.outcome) for a in winner.attempts] == [
            ("direct", Outcome.CONNECT_REFUSED)
        ]


async def test_early_dial_closes_a_connection_nobody_took(nursery: trio.Nursery) -> None:
    closed = trio.Event()

    async def watch(stream: trio.SocketStream) -> None:
        assert await stream.receive_some(1) == b""
        closed.set()

    port = await serve(nursery, watch)
    early = EarlyDial(DirectStrategy(), Target("site.lab", port), loopback)
    with trio.fail_after(5):
        await early.run()
        await early.aclose()
        await closed.wait()


async def test_early_dial_abandoned_before_it_ran_opens_nothing(nursery: trio.Nursery) -> None:
    accepted = 0

    async def counting(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1

    port = await serve(nursery, counting)
    early = EarlyDial(DirectStrategy(), Target("site.lab", port), loopback)
    await early.aclose()  # the owner gave up before the dialling task got to run
    with trio.fail_after(5):
        await early.run()
        assert await early.wait() is not None
    await trio.testing.wait_all_tasks_blocked()
    assert accepted == 0


async def test_early_dial_in_the_callers_task_hands_over_a_ready_connection(
    nursery: trio.Nursery,
) -> None:
    got: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        got.append(await stream.receive_some(65536))
        await stream.send_all(SERVER_HELLO)
        await trio.sleep_forever()

    port = await serve(nursery, record)
    target = Target("site.lab", port)
    early = EarlyDial(DirectStrategy(), target, loopback)
    with trio.fail_after(5):
        await early.dial()
        assert await early.wait() is None
        winner = await run_policy(Policy("p", ()), [early], target, loopback, HELLO, tls=True)
        async with winner.stream:  # the last (only) strategy: its answer is the caller's
            assert winner.strategy == "direct" and winner.response == b""
            assert await winner.stream.receive_some(100) == SERVER_HELLO
    assert got == [HELLO]
    await early.aclose()


async def test_early_dial_sends_a_flight_the_kernel_takes_in_part_exactly_once(
    nursery: trio.Nursery,
) -> None:
    # take_ready() sends what fits at once; the attempt then sends the rest (and only the rest)
    flight = bytes(range(256)) * 40_000  # 10 MB: more than any socket buffer takes at once
    got = bytearray()
    done = trio.Event()

    async def drain(stream: trio.SocketStream) -> None:
        await trio.sleep(0.05)  # let the first write fill the buffers
        while len(got) < len(flight):
            got.extend(await stream.receive_some(1 << 20))
        done.set()
        await trio.sleep_forever()

    port = await serve(nursery, drain)
    target = Target("site.lab", port)
    early = EarlyDial(DirectStrategy(), target, loopback)
    with trio.fail_after(10):
        await early.dial()
        assert early.take_ready(flight) is None  # part of it is on its way
        stream = await early.connect(target, [], flight)
        async with stream:
            await done.wait()
    assert bytes(got) == flight
