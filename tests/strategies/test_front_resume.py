"""A fronted bridge session outlives its carrier, and a dead bridge hands over to the next strategy.

sidestep -> a cuttable TCP forwarder -> the censor -> a real nginx CDN edge
(proxy/lab/nginxcdn.py) -> the bridge. curl downloads and uploads megabytes through sidestep's
SOCKS port while the test resets the connections between sidestep and the edge (all of them,
for a moment all new ones too, or only a split carrier's download), which breaks the carrier
(WebSocket, split HTTP or polling) mid-transfer: the session resumes over a new one and curl
gets every byte. Carriers rotated on purpose lose nothing either. When the bridge itself is
stopped, the edge answers the resume with 502, which gives the session up at once: its streams
break, and new connections go to the policy's next strategy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from proxy.bridge.config import parse_bridge_config
from proxy.bridge.identity import BridgeURI, generate_identity
from proxy.bridge.server import BridgeServer
from proxy.config import parse_config
from proxy.lab.ca import LabCA
from proxy.lab.nginxcdn import find_nginx, open_nginx_cdn
from proxy.lab.origin import pattern_bytes
from proxy.lab.scenarios import RunningSidestep, open_sidestep
from proxy.lab.world import CDN_FRONT, OPEN, AbroadResolver, Lab, open_lab
from proxy.strategies.front import FrontStrategy

CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None or find_nginx() is None, reason="needs curl and nginx")
SECRET = "/r7-secret.path"
BRIDGE = "bridge7.lab"
CARRIERS = ("ws", "split", "poll")
DOWNLOAD = 4 * 1024 * 1024
UPLOAD = 2 * 1024 * 1024
_RESET = struct.pack("ii", 1, 0)


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


class Forwarder:
    """Forwards TCP connections to ``target``, and breaks them on a plan (:meth:`at`): the
    moment the bytes forwarded one way pass a mark, before the chunk that passes it goes on,
    so the break always falls mid-transfer, however fast the transfer runs."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.address: tuple[str, int] = ("", 0)
        self.down = 0  # bytes forwarded towards the client, all connections
        self.up = 0  # and towards the edge
        self.cuts = 0
        self.refuse_until = -1.0  # trio time: until then new connections are reset at once
        self._open: dict[trio.CancelScope, list[int]] = {}  # scope -> [bytes down]
        self._marks: list[int] = []
        self._up = False
        self._action: Callable[[], None] = self.cut

    def at(self, marks: Sequence[int], action: Callable[[], None], *, up: bool = False) -> None:
        """Run ``action`` when the bytes brought down (``up``: sent up) pass each mark."""
        self._marks, self._action, self._up = sorted(marks), action, up

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, client: trio.SocketStream) -> None:
        if trio.current_time() < self.refuse_until:
            _reset(client)
            return
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            _reset(client)
            return
        counter = [0]
        scope = trio.CancelScope()
        self._open[scope] = counter
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, upstream, None)
                    nursery.start_soon(self._pipe, upstream, client, counter)
        finally:
            self._open.pop(scope, None)
            for stream in (client, upstream):
                if scope.cancelled_caught:
                    _reset(stream)
                else:
                    stream.socket.close()  # no checkpoint: the lab may be shutting down

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, counter: list[int] | None
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                upward = counter is None
                total = (self.up if upward else self.down) + len(data)
                if self._marks and upward == self._up and total >= self._marks[0]:
                    del self._marks[0]
                    self._action()
                    await trio.lowlevel.checkpoint()  # a cut of this connection lands here
                if upward:
                    self.up += len(data)
                else:
                    counter[0] += len(data)
                    self.down += len(data)
                await sink.send_all(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def cut(self) -> None:
        """Reset every open connection."""
        self.cuts += 1
        for scope in list(self._open):
            scope.cancel()

    def outage(self, seconds: float) -> Callable[[], None]:
        """An action: cut everything, and reset new connections for ``seconds``."""

        def action() -> None:
            self.refuse_until = trio.current_time() + seconds
            self.cut()

        return action

    def cut_busiest(self) -> None:
        """Reset only the connection that brought the most bytes down (a download)."""
        self.cuts += 1
        scope = max(self._open, key=lambda s: self._open[s][0])
        scope.cancel()


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST, as a middlebox or a crashed host does."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    stream.socket.close()


@dataclass
class Fronted:
    server: BridgeServer
    uri: BridgeURI
    forwarder: Forwarder
    stop: trio.CancelScope  # stops the bridge server


@asynccontextmanager
async def fronted_bridge(lab: Lab) -> AsyncIterator[Fronted]:
    """A web bridge behind a real nginx edge; clients reach the edge through a forwarder."""
    config = parse_bridge_config(
        f'[bridge]\ncarrier = "ws"\npath = "{SECRET}"\nprobe_close_delay = [0.0, 0.05]\n'
        'sessions_per_minute = 0\n[destinations]\nallow_networks = ["127.0.0.0/8"]\n',
        "<test>",
    )
    identity = generate_identity()
    server = BridgeServer(config, identity, resolver=AbroadResolver(lab))
    stop = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[object]) -> None:
        with stop:
            await server.serve("127.0.0.1:0", task_status=task_status)

    listening = await lab.start_service(serve)
    uri = BridgeURI(
        short_id=identity.short_id, public_key=identity.public_key, secret=identity.secret,
        carrier="ws", host=BRIDGE, port=443, path=SECRET,
    )  # fmt: skip
    try:
        async with open_nginx_cdn(
            lab, bridge=BRIDGE, backend=listening.addresses[0], secret=SECRET
        ) as edges:
            forwarder = Forwarder(edges[0].public)
            await lab.start_service(forwarder.serve)
            yield Fronted(server, uri, forwarder, stop)
    finally:
        stop.cancel()


def client_config(
    fronted: Fronted, lab: Lab, carrier: str, *, then: Sequence[str] = (), rotate: int = 0
) -> str:
    front = f"{CDN_FRONT}@{fronted.forwarder.address[0]}:{fronted.forwarder.address[1]}"
    rotate_after = f"rotate_after = {rotate}\n" if rotate else ""
    return (
        f'[[strategy]]\nname = "cdn"\ntype = "front"\nuri = "{fronted.uri}"\n'
        f"fronts = {json.dumps([front])}\ncarriers = {json.dumps([carrier])}\n"
        f'cafile = "{lab.ca_file}"\n{rotate_after}'
        f'[[policy]]\nname = "f"\nstrategies = {json.dumps(["cdn", *then])}\n'
        'attempt_timeout = 15.0\n[router]\ndefault_policy = "f"\n'
    )


async def curl(
    side: RunningSidestep, lab: Lab, path: str, *, upload: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    body = ["--data-binary", f"@{upload}"] if upload is not None else []
    with trio.fail_after(90):
        return await trio.run_process(
            [CURL, "--silent", "--show-error", "--max-time", "80",
             "--socks5-hostname", f"{side.address[0]}:{side.address[1]}",
             "--cacert", str(lab.ca_file), *body, lab.url(OPEN, path)],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def front_of(side: RunningSidestep) -> FrontStrategy:
    strategy = side.app.dispatcher.router.strategies["cdn"]
    assert isinstance(strategy, FrontStrategy)
    return strategy


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_a_fronted_session_resumes_over_a_new_carrier_without_losing_a_byte(
    ca: LabCA, carrier: str
) -> None:
    async with open_lab("allowlist", ca=ca) as lab, fronted_bridge(lab) as fronted:
        forwarder = fronted.forwarder
        config = parse_config(client_config(fronted, lab, carrier), "<test>")
        async with open_sidestep(lab, config) as side:
            strategy = front_of(side)
            forwarder.at([DOWNLOAD // 3, 2 * DOWNLOAD // 3], forwarder.cut)
            got = await curl(side, lab, f"/bytes/{DOWNLOAD}")
            assert got.returncode == 0, got.stderr
            assert sha(got.stdout) == sha(pattern_bytes(DOWNLOAD))
            [session_id] = fronted.server.sessions
            assert forwarder.cuts == 2
            # a poll carrier survives a cut by itself (each poll is retried on a fresh link,
            # and the bridge answers a repeated poll again); the others are resumed
            if carrier != "poll":
                assert strategy.resumes >= 2
            # and the other way: an upload echoed back, cut once on its way
            payload = pattern_bytes(UPLOAD)[::-1]
            upload = lab.workdir / "upload.bin"
            upload.write_bytes(payload)
            forwarder.at([forwarder.up + UPLOAD // 2], forwarder.cut, up=True)
            echoed = await curl(side, lab, "/echo", upload=upload)
            assert echoed.returncode == 0, echoed.stderr
            assert sha(echoed.stdout) == sha(payload)
            assert forwarder.cuts == 3
            if carrier != "poll":
                assert strategy.resumes >= 3
            assert fronted.server.sessions_resumed == strategy.resumes
            assert list(fronted.server.sessions) == [session_id]
            assert strategy.sessions_opened == 1 and fronted.server.sessions_opened == 1
            assert strategy.worked is not None and strategy.worked.startswith(carrier)


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_a_fronted_session_resumes_after_an_outage_of_the_path_to_the_cdn(
    ca: LabCA, carrier: str
) -> None:
    async with open_lab("allowlist", ca=ca) as lab, fronted_bridge(lab) as fronted:
        forwarder = fronted.forwarder
        config = parse_config(client_config(fronted, lab, carrier), "<test>")
        async with open_sidestep(lab, config) as side:
            strategy = front_of(side)
            # every connection to the edge is reset, new ones too, for a moment: the carrier
            # is lost, whatever it is (a poll's retries fail too), and the session resumes
            forwarder.at([DOWNLOAD // 2], forwarder.outage(0.4))
            got = await curl(side, lab, f"/bytes/{DOWNLOAD}")
            assert got.returncode == 0, got.stderr
            assert sha(got.stdout) == sha(pattern_bytes(DOWNLOAD))
            assert strategy.resumes >= 1
            assert strategy.sessions_opened == 1 and fronted.server.sessions_opened == 1
            assert fronted.server.sessions_resumed == strategy.resumes


async def test_a_split_carrier_whose_download_breaks_is_resumed(ca: LabCA) -> None:
    async with open_lab("allowlist", ca=ca) as lab, fronted_bridge(lab) as fronted:
        forwarder = fronted.forwarder
        config = parse_config(client_config(fronted, lab, "split"), "<test>")
        async with open_sidestep(lab, config) as side:
            strategy = front_of(side)
            # only the streaming GET is reset; the upload links stay up
            forwarder.at([DOWNLOAD // 3, 2 * DOWNLOAD // 3], forwarder.cut_busiest)
            got = await curl(side, lab, f"/bytes/{DOWNLOAD}")
            assert got.returncode == 0, got.stderr
            assert sha(got.stdout) == sha(pattern_bytes(DOWNLOAD))
            assert strategy.resumes == 2 and fronted.server.sessions_resumed == 2
            assert strategy.sessions_opened == 1 and fronted.server.sessions_opened == 1


def lines_of(side: RunningSidestep) -> list[dict[str, object]]:
    return list(side.connections.lines.values())


async def wait_lines(side: RunningSidestep, n: int) -> list[dict[str, object]]:
    with trio.fail_after(10):  # a connection's line is written when it ends
        while len(side.connections.lines) < n:
            await trio.sleep(0.01)
    return lines_of(side)


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_a_killed_bridge_breaks_its_streams_and_new_connections_fall_back(
    ca: LabCA, carrier: str
) -> None:
    async with open_lab("none", ca=ca) as lab, fronted_bridge(lab) as fronted:
        text = client_config(fronted, lab, carrier, then=["direct"])
        async with open_sidestep(lab, parse_config(text, "<test>")) as side:
            strategy = front_of(side)
            session = await strategy.session()

            def kill() -> None:  # the bridge goes away, sessions, carriers and all
                fronted.stop.cancel()
                fronted.forwarder.cut()  # (and nothing it sent is still on its way)

            fronted.forwarder.at([DOWNLOAD // 3], kill)
            cut = await curl(side, lab, f"/bytes/{DOWNLOAD}")
            assert cut.returncode != 0  # the stream broke: curl says so, no silent truncation
            assert len(cut.stdout) < DOWNLOAD
            assert cut.stdout == pattern_bytes(len(cut.stdout))  # what came is right
            # the stream broke because the session was given up: the edge answered the resume
            # with 502, which ends the attempts at once (no back-off: the bridge is gone)
            assert session.dead and strategy.resumes == 0
            assert "cannot resume the session" in (session.error or "")
            assert "the bridge is down" in (session.error or "") and "502" in (session.error or "")
            [first] = await wait_lines(side, 1)
            assert first["strategy"] == "cdn"
            # new connections go to the policy's next strategy and work
            result = await curl(side, lab, "/")
            assert result.returncode == 0, result.stderr
            assert b"hello from open.lab" in result.stdout
            second = (await wait_lines(side, 2))[-1]
            assert str(second["strategy"]).startswith("direct (after cdn"), second
            assert strategy.sessions_opened == 1 and fronted.server.sessions_opened == 1


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_carriers_rotated_through_the_cdn_lose_nothing(ca: LabCA, carrier: str) -> None:
    async with open_lab("allowlist", ca=ca) as lab, fronted_bridge(lab) as fronted:
        rotate = 512 * 1024
        text = client_config(fronted, lab, carrier, rotate=rotate)
        async with open_sidestep(lab, parse_config(text, "<test>")) as side:
            strategy = front_of(side)
            got = await curl(side, lab, f"/bytes/{DOWNLOAD}")
            assert got.returncode == 0, got.stderr
            assert sha(got.stdout) == sha(pattern_bytes(DOWNLOAD))
            payload = pattern_bytes(UPLOAD)[::-1]
            upload = lab.workdir / "upload.bin"
            upload.write_bytes(payload)
            echoed = await curl(side, lab, "/echo", upload=upload)
            assert echoed.returncode == 0, echoed.stderr
            assert sha(echoed.stdout) == sha(payload)
            # a new carrier once one has carried 512 KiB either way (what is already on its way
            # down still arrives on the old one, so a carrier may end with a little more)
            assert strategy.rotations >= (DOWNLOAD + UPLOAD) // rotate
            # a rotation may still be on its way when curl is done: the bridge counts it when
            # it accepts the resume, the client once the swap is over
            with trio.fail_after(5):
                while fronted.server.sessions_resumed != strategy.rotations:
                    await trio.sleep(0.01)
            assert strategy.resumes == 0
            session = await strategy.session()
            assert session.carriers == strategy.rotations + 1
            assert strategy.sessions_opened == 1 and fronted.server.sessions_opened == 1
