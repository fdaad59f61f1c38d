"""The web server on real loopback sockets (and memory streams for the slow-client timeouts),
and the app starting, moving and stopping it."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from proxy.app import App
from proxy.config import LOOPBACK_NETWORKS, load_config
from proxy.web.server import MAX_HEAD, WebServer, WebSources, host_allowed, host_name

PAC = b"function FindProxyForURL(url, host) { return 'DIRECT'; }\n"


def _sources(status: dict[str, Any]) -> WebSources:
    return WebSources(status=lambda: status, pac=lambda host: PAC + host.encode())


async def _serve(nursery: trio.Nursery, server: WebServer) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(server.serve, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw`` and read until the server closes."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
            return data


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of HTTP/1.1 responses (all with Content-Length)."""
    out = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers["content-length"])
        out.append((int(status_line.split()[1]), headers, data[:length]))
        data = data[length:]
    return out


def get(path: str, *, host: str = "127.0.0.1:9099", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


@pytest.fixture
async def port(nursery: trio.Nursery, status_doc: dict[str, Any]) -> int:
    return await _serve(nursery, WebServer(_sources(status_doc), allow=LOOPBACK_NETWORKS))


async def test_webserver_serves_every_route_on_one_kept_alive_connection(port: int) -> None:
    raw = b"".join(get(p) for p in ("/", "/api/status?x=1", "/metrics", "/proxy.pac"))
    data = await exchange(port, raw + get("/", extra="Connection: close\r\n"))
    got = responses(data)
    assert [status for status, _, _ in got] == [200] * 5
    kinds = [headers["content-type"] for _, headers, _ in got]
    assert kinds[:4] == [
        "text/html; charset=utf-8",
        "application/json",
        "text/plain; version=0.0.4; charset=utf-8",
        "application/x-ns-proxy-autoconfig",
    ]
    assert got[0][2].startswith(b"<!DOCTYPE html>")
    assert b'"connections"' in got[1][2] and b"# TYPE sidestep_up gauge" in got[2][2]
    assert got[3][2] == PAC + b"127.0.0.1"  # the PAC learns the host the client used
    for _, headers, _ in got:
        assert headers["cache-control"] == "no-store"
        assert "default-src 'none'" in headers["content-security-policy"]
        assert "access-control-allow-origin" not in headers
    assert got[-1][1]["connection"] == "close"


async def test_webserver_head_has_headers_only(port: int) -> None:
    data = await exchange(port, get("/metrics", method="HEAD", extra="Connection: close\r\n"))
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b""
    assert b"content-length: " in head and b"content-length: 0" not in head


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (get("/nope"), 404),
        (get("/favicon.ico"), 404),
        (get("/", method="POST", extra="Content-Length: 5\r\n") + b"hello", 405),
        (get("/", method="DELETE"), 405),
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (get("/", host="evil.example:9099"), 403),  # DNS rebinding
        (get("/", host="127.0.0.1.nip.example"), 403),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEAD + 1000), 431),  # endless head
    ],
)
async def test_webserver_refusals(port: int, raw: bytes, status: int) -> None:
    [(got, headers, body)] = responses(await exchange(port, raw))
    assert got == status
    assert headers["connection"] == "close"
    assert b"Traceback" not in body and len(body) < 200
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        (b"127.0.0.1", True),
        (b"127.0.0.1:9099", True),
        (b"localhost:9099", True),
        (b"LOCALHOST", True),
        (b"[::1]:9099", True),
        (b"[::1]", True),
        (b"192.168.1.1:9099", True),
        (b"example.com", False),
        (b"localhost.example.com:9099", False),
        (b"[::1]x", False),
        (b"127.0.0.1:port", False),
        (b"", False),
        (None, False),
        ("h\u00e9".encode(), False),
    ],
)
def test_webserver_host_header_rule(host: bytes | None, ok: bool) -> None:
    assert host_allowed(host) is ok


def test_webserver_host_name() -> None:
    assert [host_name(h) for h in (b"[::1]:9099", b"127.0.0.1:80", b"localhost")] == [
        "::1",
        "127.0.0.1",
        "localhost",
    ]


async def test_webserver_refuses_clients_outside_the_allow_list(
    nursery: trio.Nursery, status_doc: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    import ipaddress

    server = WebServer(_sources(status_doc), allow=(ipaddress.ip_network("10.0.0.0/8"),))
    port = await _serve(nursery, server)
    assert await exchange(port, get("/")) == b""
    assert "not in the allow list" in caplog.text


async def test_webserver_render_error_is_a_500_and_one_log_line(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, Any]:
        return {}  # lacks every key: rendering fails

    port = await _serve(
        nursery, WebServer(WebSources(broken, lambda h: None), allow=LOOPBACK_NETWORKS)
    )
    assert responses(await exchange(port, get("/proxy.pac")))[0][0] == 404  # no PAC here
    [(status, _, body)] = responses(await exchange(port, get("/")))
    assert status == 500 and b"Traceback" not in body and b"KeyError" not in body
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "KeyError" in errors[0].getMessage() and errors[0].exc_info is None


async def _talk(server: WebServer, data: bytes) -> bytes:
    """Serve one memory-stream client that sends ``data`` and then waits forever."""
    client, ours = trio.testing.memory_stream_pair()
    got = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, ours)
        await client.send_all(data)
        while chunk := await client.receive_some():
            got += chunk
    return got


async def test_webserver_slow_request_gets_408_then_closed(
    autojump_clock: trio.testing.MockClock, status_doc: dict[str, Any]
) -> None:
    server = WebServer(_sources(status_doc), allow=LOOPBACK_NETWORKS, timeout=10)
    start = trio.current_time()
    got = await _talk(server, b"GET / HTTP/1.1\r\nHost: 127")
    assert got.startswith(b"HTTP/1.1 408 ")
    assert trio.current_time() - start == pytest.approx(10)


async def test_webserver_silent_or_idle_client_is_closed(
    autojump_clock: trio.testing.MockClock, status_doc: dict[str, Any]
) -> None:
    server = WebServer(_sources(status_doc), allow=LOOPBACK_NETWORKS, timeout=10)
    assert await _talk(server, b"") == b""
    # one request answered, then the kept-alive connection idles out without a word
    got = await _talk(server, get("/metrics"))
    assert [status for status, _, _ in responses(got)] == [200]
    assert server.active == 0 and server.requests == 1


# --- in the app ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(path: Path, web: str) -> Path:
    path.write_text(
        '[[inbound]]\nname = "m"\nlisten = "127.0.0.1:0"\n'
        f'[web]\n{web}\n[router]\nstate_file = "{path.parent / "learned.json"}"\n'
        f'evidence_file = "{path.parent / "evidence.jsonl"}"\n'
    )
    return path


async def test_webserver_app_starts_moves_and_stops_the_web_port(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    first, second = _free_port(), _free_port()
    path = _config(tmp_path / "c.toml", f'listen = "127.0.0.1:{first}"')
    app = App(load_config(path), config_path=str(path))
    nursery.start_soon(app.run)
    await app.ready.wait()
    assert app.web.address == ("127.0.0.1", first)
    [(status, _, body)] = responses(
        await exchange(first, get("/proxy.pac", extra="Connection: close\r\n"))
    )
    inbound_port = app.addresses()["m"][1]
    assert status == 200 and f"127.0.0.1:{inbound_port}".encode() in body  # the real inbound

    _config(path, f'listen = "127.0.0.1:{second}"')
    assert await app.reload()
    assert app.web.address == ("127.0.0.1", second)
    assert responses(await exchange(second, get("/", extra="Connection: close\r\n")))[0][0] == 200
    with pytest.raises(OSError):
        await exchange(first, get("/"))

    _config(path, "enabled = false")
    assert await app.reload()
    assert app.web.address is None
    with pytest.raises(OSError):
        await exchange(second, get("/"))
    app.stop()


async def test_webserver_port_in_use_leaves_the_app_running(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = _config(tmp_path / "c.toml", f'listen = "127.0.0.1:{port}"')
        app = App(load_config(path), config_path=str(path))
        nursery.start_soon(app.run)
        await app.ready.wait()
        assert app.web.address is None and app.addresses()["m"][1] > 0
        assert "status page: cannot listen on" in caplog.text
        app.stop()
