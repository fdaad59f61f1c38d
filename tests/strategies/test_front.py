"""The front strategy end to end: sidestep -> censor -> a real nginx CDN edge -> the bridge.

The edge is Debian's nginx (proxy/lab/nginxcdn.py) with the front's site and the bridge's site
on one address; the bridge behind it serves every web carrier on its secret path. Sites are
fetched with curl through sidestep's SOCKS port, as a user would.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from proxy.bridge.config import parse_bridge_config
from proxy.bridge.identity import BridgeURI, generate_identity
from proxy.bridge.server import BridgeServer
from proxy.config import parse_config
from proxy.inbound.base import Target
from proxy.lab.ca import LabCA
from proxy.lab.nginxcdn import Edge, find_nginx, open_nginx_cdn
from proxy.lab.scenarios import RunningSidestep, open_sidestep
from proxy.lab.world import BLOCKED, IP_BLOCKED, OPEN, AbroadResolver, Lab, open_lab
from proxy.protocols.webcarrier import CarrierKind, build_target, make_carrier_id
from proxy.route.learn import LearnedMemory
from proxy.strategies.front import FrontCandidate, FrontStrategy

CURL = shutil.which("curl")
requires_tools = pytest.mark.skipif(
    CURL is None or find_nginx() is None, reason="needs curl and nginx"
)
SECRET = "/f7-secret.path"
BRIDGE = "bridge1.lab"


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


@dataclass
class Fronted:
    server: BridgeServer
    uri: BridgeURI
    edges: list[Edge]


@asynccontextmanager
async def fronted_bridge(
    lab: Lab, refusals: Sequence[int | None] = (None,)
) -> AsyncIterator[Fronted]:
    """A web bridge on loopback behind nginx edges (one per entry of ``refusals``)."""
    config = parse_bridge_config(
        f'[bridge]\ncarrier = "ws"\npath = "{SECRET}"\nprobe_close_delay = [0.0, 0.05]\n'
        'sessions_per_minute = 0\n[destinations]\nallow_networks = ["127.0.0.0/8"]\n',
        "<test>",
    )
    identity = generate_identity()
    server = BridgeServer(config, identity, resolver=AbroadResolver(lab))
    cancel = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[object]) -> None:
        with cancel:
            await server.serve("127.0.0.1:0", task_status=task_status)

    listening = await lab.start_service(serve)
    backend = listening.addresses[0]
    uri = BridgeURI(
        short_id=identity.short_id, public_key=identity.public_key, secret=identity.secret,
        carrier="ws", host=BRIDGE, port=443, path=SECRET,
    )  # fmt: skip
    try:
        async with open_nginx_cdn(
            lab, bridge=BRIDGE, backend=backend, secret=SECRET, refusals=refusals
        ) as edges:
            yield Fronted(server, uri, edges)
    finally:
        cancel.cancel()


def front_config(fronted: Fronted, lab: Lab, carriers: Sequence[str], fronts: Sequence[str]) -> str:
    return (
        f'[[strategy]]\nname = "cdn"\ntype = "front"\nuri = "{fronted.uri}"\n'
        f"fronts = {json.dumps(list(fronts))}\ncarriers = {json.dumps(list(carriers))}\n"
        f'cafile = "{lab.ca_file}"\n'
        '[[policy]]\nname = "f"\nstrategies = ["cdn"]\nattempt_timeout = 15.0\n'
        '[router]\ndefault_policy = "f"\n'
    )


async def curl(side: RunningSidestep, lab: Lab, name: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    with trio.fail_after(40):
        return await trio.run_process(
            [CURL, "--silent", "--show-error", "--max-time", "30",
             "--proxy", f"socks5h://{side.address[0]}:{side.address[1]}",
             "--cacert", str(lab.ca_file), lab.url(name)],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip


async def fetch_all(fronted: Fronted, lab: Lab, carrier: str, names: Sequence[str]) -> None:
    text = front_config(fronted, lab, [carrier], [fronted.edges[0].candidate()])
    async with open_sidestep(lab, parse_config(text, "<test>")) as side:
        for name in names:
            result = await curl(side, lab, name)
            assert result.returncode == 0, (carrier, name, result.stderr)
            assert f"hello from {name}".encode() in result.stdout
        strategy = side.app.dispatcher.router.strategies["cdn"]
        assert isinstance(strategy, FrontStrategy)
        assert strategy.worked is not None and strategy.worked.startswith(f"{carrier} via")


@requires_tools
async def test_front_strategy_passes_an_allowlist_censor_over_every_carrier(ca: LabCA) -> None:
    async with open_lab("allowlist", ca=ca) as lab, fronted_bridge(lab) as fronted:
        for carrier in ("ws", "split", "poll"):
            await fetch_all(fronted, lab, carrier, [BLOCKED])
        # the censor saw only the front's name: everything else it would have silenced
        assert fronted.server.web is not None and fronted.server.web.opened >= 2


@requires_tools
async def test_front_strategy_reaches_ip_blocked_and_dpi_blocked_sites(ca: LabCA) -> None:
    async with open_lab("cn", ca=ca) as lab, fronted_bridge(lab) as fronted:
        for carrier in ("ws", "split", "poll"):
            await fetch_all(fronted, lab, carrier, [IP_BLOCKED, BLOCKED])


@requires_tools
async def test_a_cdn_refusing_fronting_is_dropped_and_not_a_censorship_verdict(
    ca: LabCA,
) -> None:
    async with open_lab("allowlist", ca=ca) as lab, fronted_bridge(lab, (421, None)) as fronted:
        refusing, fronting = fronted.edges
        fronts = [refusing.candidate(), fronting.candidate()]
        text = front_config(fronted, lab, ["ws", "split", "poll"], fronts)
        async with open_sidestep(lab, parse_config(text, "<test>")) as side:
            result = await curl(side, lab, BLOCKED)
            assert result.returncode == 0, result.stderr
            router = side.app.dispatcher.router
            strategy = router.strategies["cdn"]
            assert isinstance(strategy, FrontStrategy)
            assert [str(f) for f in strategy.refused] == [f"cdn.front.lab@{refusing.public[0]}"]
            assert strategy.worked == f"ws via cdn.front.lab@{fronting.public[0]}"
            # nothing about the site was learned as a failure: the refusal is the CDN's policy
            memory = router.memory
            assert memory is not None
            for entry in memory.entries():
                if entry.site == "blocked.lab":
                    assert entry.failures == () and entry.works == "cdn"
            with trio.fail_after(10):  # a connection's line is written when it ends
                while not (lines := blocked_lines(side)):
                    await trio.sleep(0.01)
            assert all(f["verdict"] == "ok" and f["strategy"] == "cdn" for f in lines), lines


def blocked_lines(side: RunningSidestep) -> list[dict[str, object]]:
    return [f for f in side.connections.lines.values() if str(f["target"]).startswith(BLOCKED)]


@requires_tools
async def test_http_carrier_probes_through_the_cdn_get_the_ordinary_404(ca: LabCA) -> None:
    async with open_lab("none", ca=ca) as lab, fronted_bridge(lab) as fronted:
        edge = fronted.edges[0].public
        tls = ssl.create_default_context(cafile=str(lab.ca_file))
        stale = make_carrier_id(fronted.uri.secret, CarrierKind.SPLIT, 1_000_000, bytes(8))
        forged = make_carrier_id(bytes(32), CarrierKind.POLL, 2_000_000_000, bytes(8))
        wrong = await ask(edge, tls, "GET /no-such-page")
        assert wrong.startswith(b"HTTP/1.1 404 ")
        for head in (
            f"GET {SECRET}",
            f"POST {SECRET}",
            f"GET {SECRET}/",
            f"GET {build_target(SECRET, stale)}",
            f"POST {build_target(SECRET, stale, 0)}",
            f"POST {build_target(SECRET, forged, 0)}",
            f"GET {build_target(SECRET, forged)}/7",
            f"POST {SECRET}/{'A' * 30}/0",
            f"GET {SECRET}/x?y=1",
        ):
            assert await ask(edge, tls, head) == wrong, head
        assert fronted.server.web is not None and fronted.server.web.opened == 0
        assert fronted.server.sessions_opened == 0


async def ask(address: tuple[str, int], tls: ssl.SSLContext, head: str) -> bytes:
    """One request (fronted: TLS to the front, Host the bridge's) and its whole answer
    without the Date header."""
    tcp = await trio.open_tcp_stream(*address)
    stream = trio.SSLStream(tcp, tls, server_hostname="cdn.front.lab")
    body = "hello" if head.startswith("POST") else ""
    length = f"\r\nContent-Length: {len(body)}" if body else ""
    async with stream:
        await stream.send_all(
            f"{head} HTTP/1.1\r\nHost: {BRIDGE}{length}\r\nConnection: close\r\n\r\n{body}".encode()
        )
        received = b""
        with trio.fail_after(10):
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass
    lines = [line for line in received.split(b"\r\n") if not line.startswith(b"Date: ")]
    return b"\r\n".join(lines)


# --- which carrier worked is remembered per network (no nginx: a standalone TLS bridge) ----------


@asynccontextmanager
async def standalone_bridge(
    lab: Lab, ca: LabCA
) -> AsyncIterator[tuple[BridgeServer, BridgeURI, int]]:
    issued = ca.issue(BRIDGE)
    cert, key = lab.workdir / "b.pem", lab.workdir / "b.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    config = parse_bridge_config(
        f'[bridge]\ncarrier = "ws"\npath = "{SECRET}"\ntls_certificate = "{cert}"\n'
        f'tls_key = "{key}"\nsessions_per_minute = 0\n'
        '[destinations]\nallow_networks = ["127.0.0.0/8"]\n',
        "<test>",
    )
    identity = generate_identity()
    server = BridgeServer(config, identity, resolver=AbroadResolver(lab))
    listening = await lab.start_service(server.serve, "127.0.0.1:0")
    port = listening.addresses[0][1]
    uri = BridgeURI(
        short_id=identity.short_id, public_key=identity.public_key, secret=identity.secret,
        carrier="ws", host=BRIDGE, port=port, path=SECRET,
    )  # fmt: skip
    yield server, uri, port


async def get_open(strategy: FrontStrategy, lab: Lab) -> bytes:
    request = f"GET / HTTP/1.1\r\nHost: {OPEN}\r\nConnection: close\r\n\r\n".encode()
    stream = await strategy.connect(Target(OPEN, lab.ports.http), [], request)
    answer = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            answer += chunk
    await stream.aclose()
    return answer


async def test_front_strategy_remembers_the_carrier_that_worked_per_network(ca: LabCA) -> None:
    async with open_lab("none", ca=ca) as lab, standalone_bridge(lab, ca) as (server, uri, port):
        dead = FrontCandidate("cdn.front.lab", "127.255.255.254", 9)  # nothing listens there
        alive = FrontCandidate(BRIDGE, "127.0.0.1", port)
        memory = LearnedMemory(None)

        def strategy(network: str, carriers: Sequence[str]) -> FrontStrategy:
            made = FrontStrategy("f", uri, fronts=[dead, alive], carriers=carriers,
                                 cafile=str(lab.ca_file), connect_timeout=2.0)  # fmt: skip
            made.use_memory(memory, network)
            return made

        first = strategy("home", ["split", "poll"])
        assert b"hello from open.lab" in await get_open(first, lab)
        assert first.worked == f"split via {BRIDGE}@127.0.0.1"
        await first.aclose()
        # the next start on the same network goes straight to what worked
        again = strategy("home", ["split", "poll"])
        assert again.options()[0][0] == f"split via {BRIDGE}@127.0.0.1"
        assert [k for k, _, _ in again.options()][-2:] == [
            "split via cdn.front.lab@127.255.255.254", "poll via cdn.front.lab@127.255.255.254"
        ]  # fmt: skip
        # another network starts from the configured order
        elsewhere = strategy("cafe", ["split", "poll"])
        assert elsewhere.options()[0][0] == "split via cdn.front.lab@127.255.255.254"
        assert server.web is not None and server.web.opened == 1


def test_front_candidates_parse_names_and_addresses() -> None:
    assert FrontCandidate.parse("cdn.example", 443) == FrontCandidate(
        "cdn.example", "cdn.example", 443
    )
    assert FrontCandidate.parse("cdn.example@192.0.2.1", 443) == FrontCandidate(
        "cdn.example", "192.0.2.1", 443
    )
    assert FrontCandidate.parse("cdn.example@192.0.2.1:8443", 443).port == 8443
    assert FrontCandidate.parse("cdn.example@[2001:db8::1]:8443", 443).address == "2001:db8::1"
    assert FrontCandidate.parse("cdn.example@2001:db8::1", 443).port == 443
    assert str(FrontCandidate.parse("CDN.example@192.0.2.1", 443)) == "cdn.example@192.0.2.1"


@requires_tools
async def test_doh_travels_through_the_front_when_every_endpoint_is_blocked(ca: LabCA) -> None:
    from proxy.resolve.auto import ViaDohResolver

    async with open_lab("allowlist", ca=ca) as lab, fronted_bridge(lab) as fronted:
        edge = FrontCandidate.parse(fronted.edges[0].candidate(), 443)
        strategy = FrontStrategy("cdn", fronted.uri, fronts=[edge], cafile=str(lab.ca_file))
        famous = next(ep for ep in lab.doh_endpoints if ep.famous)
        doh = ViaDohResolver(famous.url, famous.bootstrap[0], strategy, cafile=str(lab.ca_file))
        try:
            async with doh:
                with trio.fail_after(20):
                    answer = await doh.resolve(OPEN)
        finally:
            await strategy.aclose()
        assert [str(a) for a in answer] == list(lab.addresses(OPEN))
        assert fronted.server.sessions_opened == 1
