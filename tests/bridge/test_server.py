"""The bridge server and the bridge strategy end to end: real sockets, the censor lab, curl."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from proxy.bridge.config import parse_bridge_config
from proxy.bridge.identity import BridgeIdentity, BridgeURI, generate_identity, write_identity
from proxy.bridge.server import BridgeServer, DestinationPolicy, SessionRateLimit
from proxy.config import parse_config
from proxy.errors import NotAllowed
from proxy.lab.ca import LabCA
from proxy.lab.scenarios import RunningSidestep, open_sidestep
from proxy.lab.world import BLOCKED, IP_BLOCKED, OPEN, AbroadResolver, Lab, open_lab
from proxy.protocols.bridge import BridgeConnection
from proxy.resolve.auto import ViaDohResolver
from proxy.strategies.bridge import BridgeStrategy

CURL = shutil.which("curl")
requires_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


def bridge_config_text(prefix: str = "none", delay: str = "[0.0, 0.05]") -> str:
    return (
        f'[bridge]\nprefix = "{prefix}"\nprobe_close_delay = {delay}\n'
        '[destinations]\nallow_networks = ["127.0.0.0/8"]\n'
    )


@dataclass
class RunningBridge:
    server: BridgeServer
    identity: BridgeIdentity
    uri: BridgeURI
    address: tuple[str, int]
    cancel: trio.CancelScope


@asynccontextmanager
async def bridge_in_lab(
    lab: Lab, *, prefix: str = "none", config_text: str | None = None
) -> AsyncIterator[RunningBridge]:
    """A bridge in the lab's first bridge slot (behind the censor), names resolved honestly."""
    slot = lab.bridge_slots[0]
    config = parse_bridge_config(config_text or bridge_config_text(prefix), "<test>")
    identity = generate_identity()
    server = BridgeServer(config, identity, resolver=AbroadResolver(lab))
    cancel = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[None]) -> None:
        with cancel:
            await server.serve(f"{slot.direct[0]}:{slot.direct[1]}", task_status=task_status)

    await lab.start_service(serve)
    uri = BridgeURI(
        short_id=identity.short_id,
        public_key=identity.public_key,
        secret=identity.secret,
        carrier="raw",
        host=slot.public[0],
        port=slot.public[1],
        prefix=prefix,
    )
    try:
        yield RunningBridge(server, identity, uri, slot.public, cancel)
    finally:
        cancel.cancel()


def client_config(uri: BridgeURI, *, fallback: bool = False) -> str:
    strategies = '["my-bridge", "direct"]' if fallback else '["my-bridge"]'
    return f"""
[[strategy]]
name = "my-bridge"
type = "bridge"
uri = "{uri}"

[[policy]]
name = "via-bridge"
strategies = {strategies}
attempt_timeout = 5.0

[router]
default_policy = "via-bridge"
learn = false
"""


async def curl(side: RunningSidestep, lab: Lab, name: str, *extra: str) -> trio.Process:
    assert CURL is not None
    with trio.fail_after(30):
        return await trio.run_process(
            [CURL, "--silent", "--show-error", "--max-time", "20",
             "--proxy", f"socks5h://{side.address[0]}:{side.address[1]}",
             "--cacert", str(lab.ca_file), *extra, lab.url(name)],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip


@requires_curl
@pytest.mark.parametrize(("profile", "prefix"), [("cn", "none"), ("cn", "ascii"), ("ir", "tls")])
async def test_bridge_carries_ip_blocked_and_sni_blocked_sites_with_curl(
    ca: LabCA, profile: str, prefix: str
) -> None:
    async with open_lab(profile, ca=ca) as lab, bridge_in_lab(lab, prefix=prefix) as bridge:
        config = parse_config(client_config(bridge.uri), "<test>")
        async with open_sidestep(lab, config) as side:
            for name in (IP_BLOCKED, BLOCKED, OPEN):
                result = await curl(side, lab, name)
                assert result.returncode == 0, (name, result.stderr)
                assert f"hello from {name}".encode() in result.stdout
        # one session carried every connection
        assert bridge.server.sessions_opened == 1
        assert bridge.server.probes_silenced == 0


# --- probes get nothing ------------------------------------------------------------------------


async def probe(address: tuple[str, int], payload: bytes, *, close: bool = False) -> bytes:
    """Send ``payload`` to the bridge and return everything it answers until it closes."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        if payload:
            await stream.send_all(payload)
        if close:
            await stream.send_eof()
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return received


def genuine_hello(bridge: RunningBridge, now: float | None = None) -> bytes:
    conn = BridgeConnection.client(
        bridge.uri.line(), rng=os.urandom, now=time.time() if now is None else now
    )
    return conn.data_to_send()


async def test_bridge_answers_probes_with_silence_then_close(ca: LabCA) -> None:
    async with open_lab("none", ca=ca) as lab, bridge_in_lab(lab) as bridge:
        server = bridge.server
        hello = genuine_hello(bridge)
        # the genuine hello gets an answer (the control)
        assert len(await probe(bridge.address, hello, close=True)) >= 50
        assert server.sessions_opened == 1
        probes = [
            os.urandom(600),  # random bytes
            hello,  # the same hello replayed
            hello[:40],  # a hello cut short, then EOF
            genuine_hello(bridge, time.time() - 3600),  # a stale hello
            b"GET / HTTP/1.1\r\nHost: bridge1.lab\r\n\r\n",  # an ordinary web request
            b"\x16\x03\x01\x02\x00" + os.urandom(512),  # a TLS-looking start
            b"",  # nothing at all, then EOF
        ]
        for payload in probes:
            assert await probe(bridge.address, payload, close=True) == b""
        assert server.sessions_opened == 1
        assert server.probes_silenced == len(probes)
        assert len(server.replay) >= 1


async def test_bridge_with_prefix_silences_a_hello_without_it(ca: LabCA) -> None:
    async with open_lab("none", ca=ca) as lab, bridge_in_lab(lab, prefix="tls") as bridge:
        assert await probe(bridge.address, genuine_hello(bridge), close=True) == b""
        answer = await probe(
            bridge.address, b"\x16\x03\x01\x01\x00" + genuine_hello(bridge), close=True
        )
        assert len(answer) >= 50
        assert bridge.server.sessions_opened == 1


@requires_curl
async def test_killed_bridge_makes_new_connections_fall_back_to_the_next_strategy(
    ca: LabCA,
) -> None:
    async with open_lab("none", ca=ca) as lab, bridge_in_lab(lab) as bridge:
        config = parse_config(client_config(bridge.uri, fallback=True), "<test>")
        async with open_sidestep(lab, config) as side:
            result = await curl(side, lab, OPEN)
            assert result.returncode == 0, result.stderr
            with trio.fail_after(5):
                while len(side.connections.lines) < 1:
                    await trio.sleep(0.01)
            [first] = side.connections.lines.values()
            assert first["strategy"] == "my-bridge"
            bridge.cancel.cancel()  # the bridge goes away, sessions and all
            strategy = side.app.dispatcher.router.strategies["my-bridge"]
            assert isinstance(strategy, BridgeStrategy)
            session = await strategy.session()
            with trio.fail_after(5):
                while not session.dead:  # the client notices the carrier closing
                    await trio.sleep(0.01)
            result = await curl(side, lab, OPEN)
            assert result.returncode == 0, result.stderr
            assert b"hello from open.lab" in result.stdout
            with trio.fail_after(5):
                while len(side.connections.lines) < 2:
                    await trio.sleep(0.01)
            second = list(side.connections.lines.values())[-1]
            assert second["strategy"].startswith("direct (after my-bridge")


async def test_doh_through_the_bridge_reaches_a_blocked_doh_service(ca: LabCA) -> None:
    async with open_lab("cn", ca=ca) as lab, bridge_in_lab(lab) as bridge:
        famous = next(ep for ep in lab.doh_endpoints if ep.famous)
        strategy = BridgeStrategy("my-bridge", bridge.uri)
        doh = ViaDohResolver(famous.url, famous.bootstrap[0], strategy, cafile=str(lab.ca_file))
        async with doh:
            with trio.fail_after(10):
                answer = await doh.resolve(OPEN)
        assert [str(a) for a in answer] == list(lab.addresses(OPEN))
        assert bridge.server.sessions_opened == 1
        await strategy.aclose()


# --- destination policy and rate limit ---------------------------------------------------------


def policy_of(text: str) -> DestinationPolicy:
    return DestinationPolicy.from_config(parse_bridge_config(text, "<test>").destinations)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.1.1", "::1", "fe80::1", "0.0.0.0",
     "::ffff:127.0.0.1", "fd00::1", "224.0.0.1"],
)  # fmt: skip
def test_destination_policy_refuses_local_networks_by_default(address: str) -> None:
    assert not policy_of("").permits(ipaddress.ip_address(address), "x.example")


def test_destination_policy_allow_networks_lists_and_names() -> None:
    policy = policy_of('[destinations]\nallow_networks = ["10.0.0.0/8"]\n')
    assert policy.permits(ipaddress.ip_address("10.9.9.9"), "lan.example")
    assert not policy.permits(ipaddress.ip_address("192.168.1.1"), "lan.example")
    assert policy.permits(ipaddress.ip_address("93.184.216.34"), "example.com")
    only = policy_of('[destinations]\nallow = ["example.com", "8.8.8.0/24"]\n')
    assert only.permits(ipaddress.ip_address("93.184.216.34"), "www.example.com")
    assert not only.permits(ipaddress.ip_address("93.184.216.34"), "example.org")
    assert only.permits(ipaddress.ip_address("8.8.8.8"), "other.org")
    assert not only.permits(ipaddress.ip_address("10.0.0.1"), "example.com")  # still local
    deny = policy_of('[destinations]\ndeny = ["bad.example", "8.8.4.0/24"]\n')
    with pytest.raises(NotAllowed):
        deny.check_name("www.bad.example")
    deny.check_name("notbad.example")
    assert not deny.permits(ipaddress.ip_address("8.8.4.4"), "fine.example")


def test_session_rate_limit_counts_per_client_over_a_minute() -> None:
    limit = SessionRateLimit(2)
    assert limit.allow("a", 0.0) and limit.allow("a", 1.0)
    assert not limit.allow("a", 2.0)
    assert limit.allow("b", 2.0)
    assert limit.allow("a", 60.5)  # the first one left the window
    assert SessionRateLimit(0).allow("a", 0.0)


# --- the command -------------------------------------------------------------------------------


def test_bridge_command_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[bridge]\nidentity = "missing.key"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "bridge", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "cannot read the identity" in proc.stderr


async def test_bridge_command_serves_genuine_clients(tmp_path: Path) -> None:
    identity = generate_identity()
    write_identity(tmp_path / "bridge.key", identity, force=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "bridge.toml").write_text(
        f'[bridge]\nidentity = "bridge.key"\nlisten = "127.0.0.1:{port}"\n'
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "proxy", "bridge", "--config", str(tmp_path / "bridge.toml")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        said = b""
        with trio.fail_after(20):
            while b"\n" not in said:
                said += await proc.stderr.receive_some()
        assert f"listening on 127.0.0.1:{port}".encode() in said
        uri = BridgeURI(
            short_id=identity.short_id, public_key=identity.public_key,
            secret=identity.secret, carrier="raw", host="127.0.0.1", port=port,
        )  # fmt: skip
        strategy = BridgeStrategy("b", uri)
        session = await strategy.session()
        assert not session.dead
        await strategy.aclose()
    finally:
        proc.terminate()
        with trio.fail_after(10):
            await proc.wait()
        if proc.stderr is not None:
            await proc.stderr.aclose()
