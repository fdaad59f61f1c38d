"""The live connection registry: what it counts, and live bytes from the kernel."""

from __future__ import annotations

import socket
import sys

import pytest
import trio

from proxy.status import (
    ConnectionRegistry,
    LiveConnection,
    kernel_bytes,
    outcome_kind,
    verdict_kind,
)


def _open(registry: ConnectionRegistry, port: int = 1, now: float = 0.0) -> LiveConnection:
    return registry.open(
        client=("127.0.0.1", port),
        inbound="mixed",
        protocol="socks5",
        target=f"site{port}.example:443",
        policy="fragment",
        now=now,
    )


@pytest.mark.parametrize(
    ("outcome", "kind"),
    [
        ("ok", "ok"),
        ("idle-timeout", "idle-timeout"),
        ("all-failed: every strategy of policy 'x' failed (direct: sni-reset)", "all-failed"),
        ("client gone: BrokenResourceError", "client-gone"),
        ("closed: BrokenResourceError", "closed"),
        ("frozen after 20480 bytes: cut, next connections use another way", "frozen"),
        ("connect-timeout: 203.0.113.1:443: timed out", "connect-timeout"),
        ("Weird <Thing>: x", "other"),
        ("", "other"),
    ],
)
def test_status_outcome_kinds_stay_a_small_set(outcome: str, kind: str) -> None:
    assert outcome_kind(outcome) == kind


def test_status_verdict_kinds() -> None:
    assert verdict_kind("sni-reset") == "sni-reset"
    assert verdict_kind("-") is None and verdict_kind(None) is None
    assert verdict_kind('evil"name') == "other"


def test_status_registry_counts_open_and_closed() -> None:
    registry = ConnectionRegistry()
    a, b = _open(registry, 1, 10.0), _open(registry, 2, 20.0)
    assert len(registry) == 2 and registry.opened == 2
    snap = registry.snapshot(25.0)
    assert [c["target"] for c in snap] == ["site2.example:443", "site1.example:443"]  # newest first
    assert [c["age"] for c in snap] == [5.0, 15.0]
    assert registry.snapshot(25.0, limit=1)[0]["id"] == b.id
    registry.close(a, strategy="direct", up=10, down=20, outcome="ok", verdict="ok")
    registry.close(a, strategy="direct", up=10, down=20, outcome="ok", verdict="ok")  # once only
    registry.close(b, strategy="-", up=5, down=0, outcome="all-failed: x", verdict="sni-reset")
    totals = registry.totals()
    assert totals["active"] == 0 and totals["opened"] == 2
    assert (totals["bytes_up"], totals["bytes_down"]) == (15, 20)
    assert totals["closed"] == [
        {"outcome": "all-failed", "strategy": "-", "count": 1},
        {"outcome": "ok", "strategy": "direct", "count": 1},
    ]
    assert totals["verdicts"] == {"ok": 1, "sni-reset": 1}


@pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO byte counters are Linux's")
async def test_status_live_bytes_come_from_the_kernel() -> None:
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = trio.socket.socket()
        await client.connect(listener.getsockname())
        server, _ = await listener.accept()
    async with trio.SocketStream(client) as near, trio.SocketStream(server) as far:
        await near.send_all(b"u" * 3000)
        got = 0
        while got < 3000:
            got += len(await far.receive_some(65536))
        await far.send_all(b"d" * 5000)
        got = 0
        while got < 5000:
            got += len(await near.receive_some(65536))
        with trio.fail_after(5):  # the acknowledgement of the last bytes may trail a little
            while (counts := kernel_bytes(far)) != (3000, 5000):
                await trio.sleep(0.01)
        registry = ConnectionRegistry()
        conn = _open(registry)
        conn.stream, conn.up = far, 100
        live = registry.snapshot(0.0)[0]
        assert (live["up"], live["down"]) == counts


def test_status_kernel_bytes_needs_a_tcp_socket() -> None:
    assert kernel_bytes(None) is None
    assert kernel_bytes(object()) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:

        class Holder:
            socket = unix

        assert kernel_bytes(Holder()) is None
