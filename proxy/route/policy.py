"""Trying strategies in turn (``fallback``) or in a staggered race (``race``) with replay.

Each attempt opens a path with one strategy, sends the client's first flight through it and
waits for the first response bytes. Only a plausible first response (for TLS: the start of a
ServerHello) counts as success; everything else is classified (:mod:`proxy.detect.outcome`) and
the next strategy gets the same first flight. The client only ever sees the winner.

Two cases skip the wait for a response, because no judgement could follow from it: an empty
first flight (the server speaks first, or the client is waiting for us), and the last candidate
of a ``fallback`` policy (there is nothing left to fall back to, and a slow but working server
must not be cut off). The dispatcher still waits for that candidate's first answer, without a
deadline of its own, before it stores it as working for the site.

Two rules keep a policy from cycling through tricks that cannot help:

* a strategy with nothing to change in this first flight (a ``fragment`` variant given a
  flight it cannot re-frame: an HTTP-only cut for a TLS hello, a protocol it does not know, an
  empty flight; :class:`~proxy.strategies.fragment.NotApplicable`) is left out before the
  first attempt: no attempt, no record, nothing learned, no evidence;
* once a strategy that dials the target itself (``direct`` or a ``fragment`` variant) could not
  even open the connection or resolve the name, the other such strategies are skipped as well:
  they differ only in how the first flight is framed, so they would fail the same way, each
  after its own timeout. The same holds when such an attempt met silence and the address
  does not answer an innocuous request either (the server is down, not the name censored).
  Upstream proxies are still tried (``fallback`` mode).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import trio

from proxy.detect.outcome import Outcome, judge_first_response, outcome_of_connect_error
from proxy.errors import ConnectTimeout, ProxyError, ResolveError, UpstreamError
from proxy.inbound.base import IPAddress, Target
from proxy.net.dial import open_tcp
from proxy.net.stream import FastStream, TcpStream, limited
from proxy.strategies.base import Strategy
from proxy.strategies.direct import DirectStrategy
from proxy.strategies.fragment import FragmentStrategy, NotApplicable, reframable

log = logging.getLogger("sidestep.route")

#: bytes read while waiting for the first response (a ServerHello fits easily)
FIRST_RESPONSE_READ = 16384
#: bytes of a wrong first answer kept in its :class:`AttemptRecord`
ANSWER_KEPT = 512
#: outcomes of an attempt that never got a connection to the target's address
UNREACHED: frozenset[Outcome] = frozenset(
    {Outcome.CONNECT_REFUSED, Outcome.CONNECT_TIMEOUT, Outcome.UNREACHABLE, Outcome.RESOLVE_ERROR}
)


@dataclass(frozen=True, slots=True)
class Policy:
    """An ordered list of strategy names and how to try them."""

    name: str
    strategies: tuple[str, ...]
    mode: Literal["fallback", "race"] = "fallback"
    #: delay between race starts, as in Happy Eyeballs
    stagger: float = 0.25
    #: seconds one attempt may take to connect and get its first response
    attempt_timeout: float = 8.0
    #: when every strategy failed: "fail" closes the client, "direct" tries a plain connection
    on_all_failed: Literal["fail", "direct"] = "fail"


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """What happened to one attempt."""

    strategy: str
    outcome: Outcome
    duration: float
    detail: str = ""
    #: the verdict once the dispatcher consulted its controls (:mod:`proxy.detect.verdict`);
    #: empty until then
    verdict: str = ""
    #: the first bytes of a wrong answer (block page checks compare it with the winner's)
    answer: bytes = b""

    @property
    def label(self) -> str:
        """What is remembered and logged: the verdict, or the raw outcome before one exists."""
        return self.verdict or self.outcome.value


@dataclass(slots=True)
class Winner:
    """The strategy that got through, its stream and the response bytes already read."""

    strategy: str
    stream: trio.abc.HalfCloseableStream
    response: bytes
    attempts: list[AttemptRecord] = field(default_factory=list)


class AllFailed(UpstreamError):
    """Every strategy of the policy failed; ``attempts`` says how."""

    def __init__(self, message: str, attempts: list[AttemptRecord], cause: BaseException | None):
        super().__init__(message)
        self.attempts = attempts
        self.cause = cause


class _AttemptFailed(Exception):
    def __init__(self, record: AttemptRecord, cause: BaseException | None) -> None:
        super().__init__(record.detail)
        self.record = record
        self.cause = cause


Resolve = Callable[[], Awaitable[Sequence[IPAddress]]]
#: does the target's address answer a request for an innocuous name? (a control)
AddressCheck = Callable[[], Awaitable[bool]]


async def attempt(
    strategy: Strategy,
    target: Target,
    resolve: Resolve,
    first_flight: bytes,
    *,
    tls: bool,
    timeout: float,
    wait_response: bool,
) -> Winner:
    """One attempt; raises :class:`_AttemptFailed` with the classified outcome."""
    start = trio.current_time()

    def failed(
        outcome: Outcome, detail: str, cause: BaseException | None = None, answer: bytes = b""
    ) -> _AttemptFailed:
        took = trio.current_time() - start
        record = AttemptRecord(strategy.name, outcome, took, detail, answer=answer)
        return _AttemptFailed(record, cause)

    stream: trio.abc.HalfCloseableStream | None = None
    try:
        if isinstance(strategy, EarlyDial):  # often nothing is left to wait for
            stream = strategy.take_ready(first_flight)
        if stream is None:
            with trio.fail_after(timeout):
                addresses: Sequence[IPAddress] = ()
                if not (strategy.remote_dns and target.ip is None):
                    addresses = await resolve()
                stream = await strategy.connect(target, addresses, first_flight)
    except (ProxyError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        outcome = outcome_of_connect_error(exc)
        raise failed(outcome, str(exc) or outcome.value, exc) from None
    if not first_flight or not wait_response:
        return Winner(strategy.name, stream, b"")
    left = max(0.0, timeout - (trio.current_time() - start))
    try:
        response = await limited(stream, left, stream.receive_some(FIRST_RESPONSE_READ))
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise failed(
            Outcome.TIMEOUT_AFTER_FIRST_FLIGHT, f"no answer within {timeout:g} s"
        ) from None
    except (trio.BrokenResourceError, OSError) as exc:
        await trio.aclose_forcefully(stream)
        detail = f"reset after the first flight ({exc})"
        raise failed(Outcome.RESET_AFTER_FIRST_FLIGHT, detail, exc) from None
    except BaseException:  # cancelled (a race was won elsewhere): never leak the stream
        await trio.aclose_forcefully(stream)
        raise
    verdict = judge_first_response(first_flight, response, tls=tls)
    if verdict is not Outcome.OK:
        await trio.aclose_forcefully(stream)
        detail = verdict.value if response else "closed before answering"
        if verdict is Outcome.NOT_SERVER_HELLO:
            detail = f"answered {response[:12]!r} instead of a ServerHello"
        elif verdict is Outcome.BLOCKPAGE:
            status_line = response.partition(b"\r\n")[0][:60]
            detail = f"answered {status_line!r}"
        raise failed(verdict, detail, answer=response[:ANSWER_KEPT])
    return Winner(strategy.name, stream, response)


async def run_policy(
    policy: Policy,
    strategies: Sequence[Strategy],
    target: Target,
    resolve: Resolve,
    first_flight: bytes,
    *,
    tls: bool,
    direct: Strategy | None = None,
    address_answers: AddressCheck | None = None,
) -> Winner:
    """Try ``strategies`` (already ordered, e.g. by learned memory) as ``policy`` says.

    With ``on_all_failed = "direct"`` and a ``direct`` strategy given, a plain connection is
    tried last when every strategy failed (and was not itself a direct one).

    ``address_answers`` is the neutral-name control of the target's address
    (:func:`proxy.route.control.probe_address`): in ``fallback`` mode, when an attempt that
    dialled the target met silence after its first flight, it is asked once whether the server
    answers at all; if not, the site is down and the other strategies that dial it are skipped.
    """
    try:
        if policy.mode == "race" and len(strategies) > 1:
            usable = [s for s in strategies if applies(s, first_flight)]
            if len(usable) > 1:
                return await _race(policy, usable, target, resolve, first_flight, tls=tls)
            strategies = usable
        return await _fallback(
            policy,
            strategies,
            target,
            resolve,
            first_flight,
            tls=tls,
            address_answers=address_answers,
        )
    except AllFailed as exc:
        if policy.on_all_failed != "direct" or direct is None:
            raise
        if any(s.name == direct.name for s in strategies):
            raise
        try:
            winner = await attempt(
                direct,
                target,
                resolve,
                first_flight,
                tls=tls,
                timeout=policy.attempt_timeout,
                wait_response=False,
            )
        except _AttemptFailed as last:
            records = [*exc.attempts, last.record]
            raise AllFailed(_summary(policy, records), records, last.cause) from None
        winner.attempts = exc.attempts
        return winner


async def _fallback(
    policy: Policy,
    strategies: Sequence[Strategy],
    target: Target,
    resolve: Resolve,
    first_flight: bytes,
    *,
    tls: bool,
    address_answers: AddressCheck | None = None,
) -> Winner:
    records: list[AttemptRecord] = []
    cause: BaseException | None = None
    checked = False
    # applicability is checked lazily, one candidate ahead (enough to know which one is last):
    # when the first strategy gets through, the tricks behind it cost nothing
    if reframable(first_flight):
        pending = _usable_ahead(list(strategies), first_flight)
    else:  # no fragment variant has anything to re-frame here: one pass drops them all
        pending = [
            s
            for s in strategies
            if not isinstance(s.strategy if isinstance(s, EarlyDial) else s, FragmentStrategy)
        ]
    if not pending:
        raise AllFailed(f"policy {policy.name!r} has no usable strategy", [], None)
    while pending:
        strategy = pending.pop(0)
        pending = _usable_ahead(pending, first_flight)
        last = not pending
        try:
            winner = await attempt(
                strategy,
                target,
                resolve,
                first_flight,
                tls=tls,
                timeout=policy.attempt_timeout,
                wait_response=not last,
            )
        except _AttemptFailed as exc:
            records.append(exc.record)
            cause = exc.cause
            outcome = exc.record.outcome
            if not dials_target(strategy) or not any(dials_target(s) for s in pending):
                continue
            unreached = outcome in UNREACHED
            if (
                not unreached
                and outcome is Outcome.TIMEOUT_AFTER_FIRST_FLIGHT
                and address_answers is not None
                and not checked
            ):
                # silence: a censor swallowing the name, or a server that answers nobody
                checked = True
                unreached = not await address_answers()
            if unreached:
                others = [s for s in pending if not dials_target(s)]
                pending = _usable_ahead(others, first_flight)
            continue
        winner.attempts = records
        return winner
    raise AllFailed(_summary(policy, records), records, cause)


class EarlyDial:
    """A strategy that dials the target (``direct`` or a ``fragment`` variant) whose
    connection is opened before the first flight is known.

    The dispatcher answers the client "connected" at once and then waits for its first flight;
    when the policy starts with such a strategy, the TCP connection to the target can be opened
    in that same moment (:meth:`run`) instead of after it, which takes the connect off the time
    to first byte. An :class:`EarlyDial` stands in for that strategy in the list given to
    :func:`run_policy`: its :meth:`connect` takes the early connection (or raises the error that
    opening it met) and sends the first flight as the strategy would. Whoever started
    :meth:`run` calls :meth:`aclose` when done, which closes a connection nobody took.
    """

    def __init__(
        self, strategy: DirectStrategy | FragmentStrategy, target: Target, resolve: Resolve
    ) -> None:
        self.strategy = strategy
        self.name = strategy.name
        self.remote_dns = False
        self.target = target
        self.resolve = resolve
        self._done = trio.Event()
        #: the scope :meth:`run` dials in (none when the caller dials in its own task)
        self._scope: trio.CancelScope | None = None
        self._stopped = False
        self._stream: TcpStream | None = None
        self._error: BaseException | None = None
        self._taken = False
        #: bytes of the first flight :meth:`take_ready` already sent
        self._sent = 0

    async def run(self) -> None:
        """Open the connection in a task of its own; never raises (an error is kept for
        :meth:`connect`), ends early when :meth:`aclose` is called first."""
        abandoned = ConnectTimeout("the early connection was abandoned")
        if self._stopped:  # before this task got to run
            self._error = abandoned
            self._done.set()
            return
        self._scope = scope = trio.CancelScope()
        with scope:
            await self.dial()
        if scope.cancelled_caught and self._error is None:
            self._error = abandoned
        stream = self._stream
        if self._stopped and stream is not None:  # opened after aclose() looked
            self._stream = None
            await trio.aclose_forcefully(stream)

    async def dial(self) -> None:
        """Open the connection in the caller's own task (which nothing else abandons: no
        cancel scope of its own, unlike :meth:`run`); an error is kept for :meth:`connect`."""
        s = self.strategy
        try:
            addresses = await self.resolve()
            self._stream = await open_tcp(
                addresses,
                self.target.port,
                attempt_delay=s.happy_eyeballs_delay,
                timeout=s.connect_timeout,
            )
        except (ProxyError, OSError, trio.BrokenResourceError) as exc:
            self._error = exc
        finally:
            self._done.set()

    async def wait(self) -> BaseException | None:
        """Wait until the connection is open (None) or failed (the error)."""
        if not self._done.is_set():  # when it is, waiting would only cost a scheduler pass
            await self._done.wait()
        return self._error

    async def connect(
        self, target: Target, addresses: Sequence[IPAddress], first_flight: bytes
    ) -> trio.abc.HalfCloseableStream:
        if self._taken:  # asked a second time: an ordinary connection
            return await self.strategy.connect(target, addresses, first_flight)
        self._taken = True
        try:
            if not self._done.is_set():
                await self._done.wait()
        except BaseException:  # the attempt timed out or was cancelled: stop dialling too
            self._stop()
            raise
        if self._error is not None:
            raise self._error
        stream, self._stream = self._stream, None
        assert stream is not None  # run() ended without an error
        if isinstance(self.strategy, FragmentStrategy):
            try:
                await self.strategy.send_over(stream, first_flight)
            except NotApplicable:
                await trio.aclose_forcefully(stream)
                raise
        elif len(first_flight) > self._sent:
            try:
                await stream.send_all(memoryview(first_flight)[self._sent :])
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return stream

    def take_ready(self, first_flight: bytes) -> TcpStream | None:
        """The early connection with ``first_flight`` sent, when that needs no waiting: the
        dial is over and worked, the strategy is ``direct`` and the kernel takes the whole
        flight at once. Otherwise None, and :meth:`connect` does the rest (under the
        attempt's time limit, without sending again what was sent here). Raises
        ``trio.BrokenResourceError`` (the stream closed) when sending fails."""
        stream = self._stream
        if (
            self._taken
            or stream is None
            or not isinstance(stream, FastStream)
            or isinstance(self.strategy, FragmentStrategy)
        ):
            return None
        if len(first_flight) > self._sent:
            try:
                self._sent += stream.send_nowait(memoryview(first_flight)[self._sent :])
            except trio.BrokenResourceError:
                self._taken, self._stream = True, None
                stream.socket.close()
                raise
            if self._sent < len(first_flight):
                return None
        self._taken, self._stream = True, None
        return stream

    def _stop(self) -> None:
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    async def aclose(self) -> None:
        """Stop dialling, and close the early connection if no attempt took it."""
        self._stop()
        stream, self._stream = self._stream, None
        if stream is not None:
            await trio.aclose_forcefully(stream)


def _usable_ahead(pending: list[Strategy], first_flight: bytes) -> list[Strategy]:
    """``pending`` (itself, or what is left of it) without the strategies at its head that do
    not apply to the flight."""
    # a flight that is neither TLS nor HTTP skips every fragment variant after one glance
    reframable_flight: bool | None = None
    for skip, strategy in enumerate(pending):
        if isinstance(strategy, EarlyDial):
            strategy = strategy.strategy
        if isinstance(strategy, FragmentStrategy):
            if reframable_flight is None:
                reframable_flight = reframable(first_flight)
            if not (reframable_flight and strategy.applies_to(first_flight)):
                continue
        return pending[skip:] if skip else pending
    return []


def applies(strategy: Strategy, first_flight: bytes) -> bool:
    """Whether ``strategy`` has something to do with ``first_flight`` (see the module
    docstring): False only for a ``fragment`` variant with nothing to re-frame in it."""
    if isinstance(strategy, EarlyDial):
        strategy = strategy.strategy
    return not isinstance(strategy, FragmentStrategy) or strategy.applies_to(first_flight)


def dials_target(strategy: Strategy) -> bool:
    """Whether ``strategy`` connects to the target's own addresses (no proxy in between)."""
    return isinstance(strategy, DirectStrategy | FragmentStrategy | EarlyDial)


async def _race(
    policy: Policy,
    strategies: Sequence[Strategy],
    target: Target,
    resolve: Resolve,
    first_flight: bytes,
    *,
    tls: bool,
) -> Winner:
    records: list[AttemptRecord] = []
    winner: Winner | None = None
    cause: BaseException | None = None

    async with trio.open_nursery() as nursery:
        failed_events = [trio.Event() for _ in strategies]

        async def run_one(i: int, strategy: Strategy) -> None:
            nonlocal winner, cause
            if i:
                # start after the stagger, or as soon as the previous attempt failed
                with trio.move_on_after(policy.stagger):
                    await failed_events[i - 1].wait()
            try:
                got = await attempt(
                    strategy,
                    target,
                    resolve,
                    first_flight,
                    tls=tls,
                    timeout=policy.attempt_timeout,
                    wait_response=True,
                )
            except _AttemptFailed as exc:
                records.append(exc.record)
                cause = exc.cause
                failed_events[i].set()
                return
            if winner is None:
                winner = got
                nursery.cancel_scope.cancel()
            else:
                await trio.aclose_forcefully(got.stream)

        for i, strategy in enumerate(strategies):
            nursery.start_soon(run_one, i, strategy)
    if winner is None:
        raise AllFailed(_summary(policy, records), records, cause)
    winner.attempts = records
    return winner


def _summary(policy: Policy, records: list[AttemptRecord]) -> str:
    tried = ", ".join(f"{r.strategy}: {r.label}" for r in records)
    return f"every strategy of policy {policy.name!r} failed ({tried})"


def resolve_once(resolve: Resolve) -> Resolve:
    """Share one lookup between attempts (the first caller resolves; failures repeat)."""
    result: list[Sequence[IPAddress]] = []
    error: list[ResolveError] = []
    lock = trio.Lock()

    async def shared() -> Sequence[IPAddress]:
        async with lock:
            if result:
                return result[0]
            if error:
                raise error[0]
            try:
                addrs = await resolve()
            except ResolveError as exc:
                error.append(exc)
                raise
            result.append(addrs)
            return addrs

    return shared
