from __future__ import annotations

import ipaddress
import socket

import pytest
import trio

from proxy.errors import ResolveError
from proxy.resolve.base import Resolver, ip_literal
from proxy.resolve.system import SystemResolver


class _Hanging:
    """A trio hostname resolver that never answers."""

    async def getaddrinfo(self, *args: object) -> list[object]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def getnameinfo(self, *args: object) -> tuple[str, str]:
        raise NotImplementedError


class _Canned:
    """A trio hostname resolver with a fixed answer (or error)."""

    def __init__(self, answer: list[tuple[object, ...]] | BaseException) -> None:
        self.answer = answer

    async def getaddrinfo(self, *args: object) -> list[tuple[object, ...]]:
        await trio.lowlevel.checkpoint()
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def getnameinfo(self, *args: object) -> tuple[str, str]:
        raise NotImplementedError


def _info(host: str) -> tuple[object, ...]:
    if ":" in host:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (host, 0, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (host, 0))


def test_system_resolver_satisfies_protocol() -> None:
    resolver: Resolver = SystemResolver()
    assert resolver.timeout == 5.0


async def test_system_resolves_localhost_to_loopback() -> None:
    addresses = await SystemResolver().resolve("localhost")
    assert addresses
    assert all(a.is_loopback for a in addresses)
    assert len(addresses) == len(set(addresses))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("10.1.2.3", "10.1.2.3"),
        ("::1", "::1"),
        ("[2001:db8::1]", "2001:db8::1"),
    ],
)
async def test_system_returns_ip_literal_without_lookup(host: str, expected: str) -> None:
    trio.socket.set_custom_hostname_resolver(_Hanging())  # a lookup would hang
    assert await SystemResolver().resolve(host) == [ipaddress.ip_address(expected)]


@pytest.mark.parametrize("host", ["nothing-here.invalid", "invalid.", "", "a..b", ".x"])
async def test_system_bad_name_raises_resolve_error(host: str) -> None:
    with pytest.raises(ResolveError):
        await SystemResolver(timeout=5).resolve(host)


async def test_system_timeout_raises_resolve_error(autojump_clock: trio.testing.MockClock) -> None:
    trio.socket.set_custom_hostname_resolver(_Hanging())
    start = trio.current_time()
    with pytest.raises(ResolveError, match="within 2 s"):
        await SystemResolver(timeout=2).resolve("slow.example")
    assert trio.current_time() - start == pytest.approx(2)


async def test_system_maps_gaierror() -> None:
    error = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    trio.socket.set_custom_hostname_resolver(_Canned(error))
    with pytest.raises(ResolveError, match="Temporary failure") as info:
        await SystemResolver().resolve("example.com")
    assert info.value.__cause__ is error


async def test_system_dedupes_and_keeps_order() -> None:
    answer = [
        _info(h) for h in ["2001:db8::1", "192.0.2.1", "2001:db8::1", "192.0.2.2", "192.0.2.1"]
    ]
    trio.socket.set_custom_hostname_resolver(_Canned(answer))
    got = await SystemResolver().resolve("example.com")
    assert [str(a) for a in got] == ["2001:db8::1", "192.0.2.1", "192.0.2.2"]


async def test_system_empty_answer_raises() -> None:
    trio.socket.set_custom_hostname_resolver(_Canned([]))
    with pytest.raises(ResolveError, match="no IPv4 or IPv6"):
        await SystemResolver().resolve("example.com")


def test_ip_literal() -> None:
    assert ip_literal("192.0.2.7") == ipaddress.ip_address("192.0.2.7")
    assert ip_literal("[::1]") == ipaddress.ip_address("::1")
    assert ip_literal("example.com") is None
    assert ip_literal("") is None


def test_system_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError):
        SystemResolver(timeout=0)
