"""The WebSocket carrier: behind a real nginx built from packaging/nginx, and standalone TLS."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from bench.bridge import find_nginx, nginx_in_front, wait_listening
from proxy.bridge.config import parse_bridge_config
from proxy.bridge.identity import BridgeURI, generate_identity
from proxy.bridge.server import BridgeServer
from proxy.config import parse_config
from proxy.inbound.base import Target
from proxy.lab.ca import LabCA
from proxy.lab.scenarios import RunningSidestep, open_sidestep
from proxy.lab.world import BLOCKED, IP_BLOCKED, OPEN, AbroadResolver, Lab, open_lab
from proxy.protocols.websocket import Opcode, encode_frame
from proxy.strategies.bridge import BridgeStrategy

CURL = shutil.which("curl")
requires_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")

requires_nginx = pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed")
SECRET = "/k7Hq2-bridge"


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def curl(side: RunningSidestep, lab: Lab, name: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    with trio.fail_after(30):
        return await trio.run_process(
            [CURL, "--silent", "--show-error", "--max-time", "20",
             "--proxy", f"socks5h://{side.address[0]}:{side.address[1]}",
             "--cacert", str(lab.ca_file), lab.url(name)],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip


async def probe_web(
    address: tuple[str, int], name: str, tls: ssl.SSLContext, head: str, *, after: bytes = b""
) -> bytes:
    """Send one request over TLS and return everything until the server closes, without the
    Date header (it differs between any two answers)."""
    tcp = await trio.open_tcp_stream(*address)
    stream = trio.SSLStream(tcp, tls, server_hostname=name)
    async with stream:
        closing = "" if "Upgrade:" in head else "\r\nConnection: close"
        await stream.send_all(f"{head}\r\nHost: {name}{closing}\r\n\r\n".encode() + after)
        received = b""
        with trio.fail_after(10):
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass  # a close without TLS close_notify
    return re.sub(rb"\r\nDate: [^\r]*", b"", received)


@asynccontextmanager
async def ws_bridge_behind_nginx(
    lab: Lab, ca: LabCA
) -> AsyncIterator[tuple[BridgeServer, BridgeURI, trio.CancelScope]]:
    """A ws bridge behind nginx; cancelling the yielded scope kills the bridge (nginx stays)."""
    slot = lab.bridge_slots[0]
    backend = ("127.0.0.1", free_port())
    config = parse_bridge_config(
        f'[bridge]\ncarrier = "ws"\npath = "{SECRET}"\nprobe_close_delay = [0.0, 0.05]\n'
        '[destinations]\nallow_networks = ["127.0.0.0/8"]\n',
        "<test>",
    )
    identity = generate_identity()
    server = BridgeServer(config, identity, resolver=AbroadResolver(lab))
    cancel = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[None]) -> None:
        with cancel:
            await server.serve(f"{backend[0]}:{backend[1]}", task_status=task_status)

    await lab.start_service(serve)
    uri = BridgeURI(
        short_id=identity.short_id, public_key=identity.public_key, secret=identity.secret,
        carrier="ws", host=slot.public[0], port=slot.public[1], path=SECRET, sni=slot.name,
    )  # fmt: skip
    with nginx_in_front(lab.workdir / "nginx", ca, slot.name, slot.direct, backend, SECRET):
        await wait_listening(slot.direct)
        try:
            yield server, uri, cancel
        finally:
            cancel.cancel()


@requires_nginx
@requires_curl
async def test_ws_bridge_behind_real_nginx_carries_blocked_sites_with_curl(ca: LabCA) -> None:
    async with open_lab("cn", ca=ca) as lab:
        (lab.workdir / "nginx").mkdir()
        async with ws_bridge_behind_nginx(lab, ca) as (server, uri, _):
            text = (
                f'[[strategy]]\nname = "ws-bridge"\ntype = "bridge"\nuri = "{uri}"\n'
                f'cafile = "{lab.ca_file}"\n'
                '[[policy]]\nname = "b"\nstrategies = ["ws-bridge"]\n'
                '[router]\ndefault_policy = "b"\nlearn = false\n'
            )
            async with open_sidestep(lab, parse_config(text, "<test>")) as side:
                for name in (IP_BLOCKED, BLOCKED, OPEN):
                    result = await curl(side, lab, name)
                    assert result.returncode == 0, (name, result.stderr)
                    assert f"hello from {name}".encode() in result.stdout
            assert server.sessions_opened == 1


@requires_nginx
async def test_a_dead_bridge_behind_its_nginx_is_known_down_and_not_retried(ca: LabCA) -> None:
    async with open_lab("cn", ca=ca) as lab:
        (lab.workdir / "nginx").mkdir()
        async with ws_bridge_behind_nginx(lab, ca) as (_, uri, kill):
            strategy = BridgeStrategy("ws-bridge", uri, cafile=str(lab.ca_file))
            try:
                session = await strategy.session()
                kill.cancel()  # nginx stays up and answers 502 for the bridge's path
                start = trio.current_time()
                with trio.fail_after(10):
                    while not session.dead:
                        await trio.sleep(0.02)
                # the first 502 ends the resume attempts: no back-off over 3.75 s
                assert trio.current_time() - start < 2.0
                assert "the bridge is down" in (session.error or ""), session.error
                assert "502" in (session.error or "")
            finally:
                await strategy.aclose()


@requires_nginx
async def test_ws_bridge_secret_path_answers_plain_requests_like_any_wrong_path(
    ca: LabCA,
) -> None:
    async with open_lab("none", ca=ca) as lab:
        (lab.workdir / "nginx").mkdir()
        async with ws_bridge_behind_nginx(lab, ca) as (server, _, _):
            tls = ssl.create_default_context(cafile=str(lab.ca_file))
            slot = lab.bridge_slots[0]
            wrong = await probe_web(slot.public, slot.name, tls, "GET /no-such-page HTTP/1.1")
            secret = await probe_web(slot.public, slot.name, tls, f"GET {SECRET} HTTP/1.1")
            below = await probe_web(slot.public, slot.name, tls, f"POST {SECRET}/x HTTP/1.1")
            home = await probe_web(slot.public, slot.name, tls, "GET / HTTP/1.1")
            assert wrong.startswith(b"HTTP/1.1 404 ")
            assert secret == wrong == below  # headers (Date aside) and body alike
            assert b"my little blog" in home
            # a real upgrade of the secret path with a bad hello: upgraded, then silence
            upgraded = await probe_web(
                slot.public, slot.name, tls,
                f"GET {SECRET} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                after=encode_frame(Opcode.BINARY, os.urandom(1400), mask=b"mask"),
            )  # fmt: skip
            assert upgraded.startswith(b"HTTP/1.1 101 ")
            assert upgraded.endswith(b"\r\n\r\n")  # nothing after the upgrade
            assert server.sessions_opened == 0
            assert server.probes_silenced == 1


async def test_ws_bridge_standalone_tls_serves_a_cover_page_and_the_bridge(ca: LabCA) -> None:
    async with open_lab("none", ca=ca) as lab:
        issued = ca.issue("bridge1.lab")
        cert, key = lab.workdir / "b.pem", lab.workdir / "b.key"
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        config = parse_bridge_config(
            f'[bridge]\ncarrier = "ws"\npath = "{SECRET}"\ntls_certificate = "{cert}"\n'
            f'tls_key = "{key}"\n[destinations]\nallow_networks = ["127.0.0.0/8"]\n',
            "<test>",
        )
        identity = generate_identity()
        server = BridgeServer(config, identity, resolver=AbroadResolver(lab))
        listening = await lab.start_service(server.serve, "127.0.0.1:0")
        address = listening.addresses[0]
        tls = ssl.create_default_context(cafile=str(lab.ca_file))
        home = await probe_web(address, "bridge1.lab", tls, "GET / HTTP/1.1")
        assert home.startswith(b"HTTP/1.1 200 ") and b"Welcome" in home
        secret = await probe_web(address, "bridge1.lab", tls, f"GET {SECRET} HTTP/1.1")
        assert secret.startswith(b"HTTP/1.1 404 ")
        uri = BridgeURI(
            short_id=identity.short_id, public_key=identity.public_key, secret=identity.secret,
            carrier="ws", host=address[0], port=address[1], path=SECRET, sni="bridge1.lab",
        )  # fmt: skip
        strategy = BridgeStrategy("ws", uri, cafile=str(lab.ca_file))
        request = f"GET / HTTP/1.1\r\nHost: {OPEN}\r\nConnection: close\r\n\r\n"
        stream = await strategy.connect(Target(OPEN, lab.ports.http), [], request.encode())
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b"hello from open.lab" in answer
        await stream.aclose()
        await strategy.aclose()
        assert server.sessions_opened == 1
