"""Opening TCP connections: Happy Eyeballs v2 (RFC 8305) over already-resolved addresses.

Resolution is the resolver's job; this module takes the address list, reorders it so the address
families alternate, and races connection attempts staggered by ``attempt_delay``: the next attempt
starts when the delay passes or as soon as the previous one fails, the first connection to
complete wins, and every other attempt is cancelled and its socket closed.

It is also the one place where connect-time ``OSError``\\s and trio errors become sidestep's
:class:`~proxy.errors.UpstreamError` family (:func:`map_connect_error`).

A single address is connected inline, without a nursery, and its timeout is only armed when
the handshake has to be waited for: most destinations resolve to one address (or arrive as an
IP literal), on loopback and LANs the handshake is done by the time we look, and connection
rate matters to a proxy.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Awaitable, Callable, Sequence

import trio

from proxy.errors import ConnectRefused, ConnectTimeout, Unreachable, UpstreamError
from proxy.inbound.base import IPAddress
from proxy.net.stream import FastStream, TcpStream

#: how an attempt connects one address; tests inject a fake through ``open_tcp(_connect=...)``
ConnectFn = Callable[[IPAddress, int], Awaitable[TcpStream]]

_REFUSED = frozenset({errno.ECONNREFUSED})
_UNREACHABLE = frozenset(
    {
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
        errno.EADDRNOTAVAIL,  # e.g. no source address of that family
        errno.EAFNOSUPPORT,  # the kernel has no IPv6 at all
        errno.EPERM,  # a local firewall dropped the SYN
        errno.EACCES,
    }
)
_TIMED_OUT = frozenset({errno.ETIMEDOUT})
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
#: the first byte of ``struct tcp_info`` (the state) of an established connection
_ESTABLISHED = bytes([1])
#: a socket type flag that makes it non-blocking at creation (Linux), else 0
_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)

# Which error describes a failed race best: a refusal proves the host is there and answered,
# a timeout (silence) says more about a blackhole than "no route" does about the destination.
_RANK: dict[type[UpstreamError], int] = {
    ConnectRefused: 3,
    ConnectTimeout: 2,
    Unreachable: 1,
    UpstreamError: 0,
}


def format_address(address: IPAddress, port: int) -> str:
    """``host:port`` with IPv6 in brackets."""
    if address.version == 6:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def map_connect_error(
    exc: BaseException, address: IPAddress | None = None, port: int | None = None
) -> UpstreamError:
    """Translate an error from connecting (``OSError``, trio errors) into our error tree.

    Already-translated errors are returned unchanged. The caller raises the result ``from exc``.
    """
    if isinstance(exc, UpstreamError):
        return exc
    where = format_address(address, port) if address is not None and port is not None else ""
    prefix = f"{where}: " if where else ""
    if isinstance(exc, trio.TooSlowError):
        return ConnectTimeout(f"{prefix}connect timed out")
    if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.errno in _REFUSED:
            return ConnectRefused(f"{prefix}connection refused")
        if exc.errno in _UNREACHABLE:
            return Unreachable(f"{prefix}unreachable ({reason})")
        if exc.errno in _TIMED_OUT or isinstance(exc, TimeoutError):
            return ConnectTimeout(f"{prefix}connect timed out ({reason})")
        return UpstreamError(f"{prefix}connect failed ({reason})")
    return UpstreamError(f"{prefix}connect failed ({exc!r})")


def interleave_families(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    """Order addresses for Happy Eyeballs (RFC 8305 section 4).

    The family of the first address goes first, then the families alternate; within a family the
    given (resolver's) order is kept. Duplicates are dropped.
    """
    if len(addresses) < 2:  # an IP literal or a single answer: nothing to order
        return list(addresses)
    unique = list(dict.fromkeys(addresses))
    first = unique[0].version
    preferred = [a for a in unique if a.version == first]
    other = [a for a in unique if a.version != first]
    ordered: list[IPAddress] = []
    for i in range(max(len(preferred), len(other))):
        if i < len(preferred):
            ordered.append(preferred[i])
        if i < len(other):
            ordered.append(other[i])
    return ordered


async def open_tcp(
    addresses: Sequence[IPAddress],
    port: int,
    *,
    attempt_delay: float = 0.25,
    timeout: float = 10.0,
    nodelay: bool = True,
    _connect: ConnectFn | None = None,
) -> TcpStream:
    """Connect to ``port`` on one of ``addresses`` and return the first stream that connects.

    Raises :class:`ConnectTimeout` when nothing connected within ``timeout`` seconds,
    :class:`ConnectRefused` when every address refused, :class:`Unreachable` for routing errors;
    with mixed failures the most telling one, its message naming every address tried.
    """
    ordered = interleave_families(addresses)
    if not ordered:
        await trio.lowlevel.checkpoint()
        raise Unreachable(f"no address to connect to for port {port}")
    if _connect is not None:
        connect = _connect
    else:

        async def connect(address: IPAddress, port: int) -> TcpStream:
            return await _connect_socket(address, port, nodelay)

    if len(ordered) == 1:
        address = ordered[0]
        if _connect is None:
            # the deadline is only armed when the connect has to wait (not on loopback/LANs)
            try:
                return await _connect_socket(address, port, nodelay, timeout)
            except (OSError, UpstreamError, trio.BrokenResourceError) as exc:
                raise map_connect_error(exc, address, port) from exc
        with trio.move_on_after(timeout):
            try:
                return await connect(address, port)
            except (OSError, UpstreamError, trio.BrokenResourceError) as exc:
                raise map_connect_error(exc, address, port) from exc
        raise ConnectTimeout(f"{format_address(address, port)}: no answer within {timeout:g} s")
    return await _race(ordered, port, attempt_delay, timeout, connect)


async def _race(
    ordered: list[IPAddress],
    port: int,
    attempt_delay: float,
    limit: float,
    connect: ConnectFn,
) -> TcpStream:
    winner: TcpStream | None = None
    failures: list[tuple[IPAddress, BaseException]] = []
    started: list[IPAddress] = []

    async def attempt(address: IPAddress, failed: trio.Event, done: trio.CancelScope) -> None:
        nonlocal winner
        try:
            stream = await connect(address, port)
        except (OSError, UpstreamError, trio.BrokenResourceError) as exc:
            failures.append((address, exc))
            failed.set()
            return
        if winner is None:
            winner = stream
            done.cancel()
        else:
            # two attempts completed in the same scheduler batch: keep the first
            await trio.aclose_forcefully(stream)

    try:
        with trio.move_on_after(limit):
            async with trio.open_nursery() as nursery:
                for address in ordered:
                    failed = trio.Event()
                    started.append(address)
                    nursery.start_soon(attempt, address, failed, nursery.cancel_scope)
                    with trio.move_on_after(attempt_delay):
                        await failed.wait()
    except BaseException:
        if winner is not None:
            await trio.aclose_forcefully(winner)
        raise
    if winner is not None:
        return winner
    raise _race_error(started, failures, port, limit)


def _race_error(
    started: list[IPAddress],
    failures: list[tuple[IPAddress, BaseException]],
    port: int,
    timeout: float,
) -> UpstreamError:
    outcomes: list[tuple[UpstreamError, BaseException | None]] = []
    parts: list[str] = []
    failed = {address for address, _ in failures}
    for address, exc in failures:
        mapped = map_connect_error(exc)
        outcomes.append((mapped, exc))
        parts.append(f"{address} {_describe(mapped)}")
    for address in started:
        if address not in failed:
            outcomes.append((ConnectTimeout(), None))
            parts.append(f"{address} no answer within {timeout:g} s")
    best, cause = max(outcomes, key=lambda item: _RANK.get(type(item[0]), 0))
    error = type(best)(f"connect to port {port} failed: " + "; ".join(parts))
    error.__cause__ = cause
    return error


def _describe(error: UpstreamError) -> str:
    text = str(error)
    return text or type(error).__name__


def _sockaddr(address: IPAddress, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    if address.version == 4:
        return (str(address), port)
    scope = getattr(address, "scope_id", None)
    if scope:
        index = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
        return (str(address).split("%", 1)[0], port, 0, index)
    return (str(address), port, 0, 0)


def _connected_now(sock: socket.socket) -> bool:
    """Whether a connect in progress is done and worked, asked without waiting: the TCP state
    is ESTABLISHED (one getsockopt where TCP_INFO exists, else a zero-timeout poll and the
    socket's error)."""
    if _TCP_INFO is not None:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1) == _ESTABLISHED
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0)) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


async def _connect_socket(
    address: IPAddress, port: int, nodelay: bool, timeout: float | None = None
) -> TcpStream:
    """Non-blocking connect of one TCP socket, closed again on failure or cancellation.

    With ``timeout``, a connect that has to wait for the handshake gives up after that many
    seconds (:class:`ConnectTimeout`); without, the caller's scope bounds it.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    # non-blocking from birth: no ioctl for setblocking()
    sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
    try:
        if not _NONBLOCK:
            sock.setblocking(False)
        err = sock.connect_ex(_sockaddr(address, port))
        if err == errno.EINPROGRESS:
            # On loopback and LANs the handshake is often done by now: asking is far cheaper
            # than parking the task for a whole scheduler pass.
            if _connected_now(sock):
                err = 0
            else:
                if timeout is None:
                    await trio.lowlevel.wait_writable(sock)
                else:
                    with trio.move_on_after(timeout) as scope:
                        await trio.lowlevel.wait_writable(sock)
                    if scope.cancelled_caught:
                        where = format_address(address, port)
                        raise ConnectTimeout(f"{where}: no answer within {timeout:g} s")
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        elif err == 0:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if err:
            raise OSError(err, os.strerror(err))
        # SocketStream turns TCP_NODELAY on by itself
        stream = FastStream(trio.socket.from_stdlib_socket(sock), tcp=True)
        if not nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    except BaseException:
        sock.close()
        raise
    return stream
