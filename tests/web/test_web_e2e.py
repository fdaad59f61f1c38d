"""End to end: the real ``sidestep run`` process, real curl through it, and the status page,
JSON API and metrics it serves about those connections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from proxy.lab.origin import OriginServer
from tests.e2e.conftest import curl, free_port, requires_curl, run_proxy

pytestmark = requires_curl

CONFIG = """
[[inbound]]
name = "mixed"
listen = "127.0.0.1:{port}"

[web]
listen = "127.0.0.1:WEBPORT"

[shutdown]
drain_timeout = 1

# the plain path: the held connection below shows its strategy while it waits for an answer
# (with a policy, the strategy is only known once the server answered)
[router]
default_policy = "direct"
"""


class Holder:
    """A server that takes a connection, reads what comes, and answers only when told."""

    def __init__(self) -> None:
        self.received = b""
        self.got_data = trio.Event()
        self.release = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listener:
            task_status.started(listener.socket.getsockname()[1])
            stream = await listener.accept()
        async with stream:
            self.received = await stream.receive_some(65536)
            self.got_data.set()
            await self.release.wait()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nheld"
            )


def metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def status(web: int) -> dict[str, Any]:
    result = await curl(f"http://127.0.0.1:{web}/api/status")
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


async def test_web_e2e_connections_show_up_and_counters_move(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    web = free_port()
    plain = OriginServer("plain")
    origin = await nursery.start(plain.serve)
    holder = Holder()
    held = await nursery.start(holder.serve)
    with run_proxy(tmp_path, CONFIG.replace("WEBPORT", str(web))) as proxy:
        proxy.wait_log("status page: http://127.0.0.1:")
        before = (await curl(f"http://127.0.0.1:{web}/metrics")).stdout.decode()
        assert metric(before, "sidestep_connections_active") == 0

        # a connection that stays open while we look: it is listed with its target and SNI
        async with trio.open_nursery() as inner:
            done: list[Any] = []

            async def slow() -> None:
                args = ("--socks5-hostname", proxy.url_socks5, "--insecure")
                done.append(await curl(*args, f"https://localhost:{held}/", check=False))

            inner.start_soon(slow)
            await holder.got_data.wait()
            with trio.fail_after(10):  # the first flight is read just after the data arrived
                while not [c for c in (await status(web))["connections"] if c["sni"]]:
                    await trio.sleep(0.05)
            doc = await status(web)
            [live] = doc["connections"]
            assert live["target"] == f"localhost:{held}" and live["sni"] == "localhost"
            assert live["strategy"] == "direct" and live["up"] >= len(holder.received) > 200
            page = (await curl(f"http://127.0.0.1:{web}/")).stdout.decode()
            assert f"localhost:{held}" in page
            during = (await curl(f"http://127.0.0.1:{web}/metrics")).stdout.decode()
            assert metric(during, "sidestep_connections_active") == 1
            holder.release.set()

        # a whole exchange moves the totals
        got = await curl(
            "--proxy", f"socks5h://{proxy.url_socks5}", f"http://127.0.0.1:{origin[1]}/"
        )
        assert got.stdout
        with trio.fail_after(10):  # the log line (and the count) follow the close
            while (doc := await status(web))["totals"]["opened"] < 2 or doc["connections"]:
                await trio.sleep(0.05)
        after = (await curl(f"http://127.0.0.1:{web}/metrics")).stdout.decode()
        assert metric(after, "sidestep_connections_opened_total") == 2
        assert metric(after, 'sidestep_connections_total{outcome="ok",strategy="direct"}') >= 1
        assert metric(after, 'sidestep_bytes_total{direction="down"}') > len(got.stdout)
        assert metric(after, 'sidestep_bytes_total{direction="up"}') > len(holder.received)
        assert metric(after, "sidestep_connections_active") == 0
