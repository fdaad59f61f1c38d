"""A user's view: the real curl through a real ``sidestep run`` to local origins."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from proxy.lab.origin import pattern_bytes

from .conftest import Origins, ProxyProcess, curl, requires_curl

pytestmark = requires_curl


async def test_socks5_hostname_https(proxy: ProxyProcess, origins: Origins, ca_file: Path) -> None:
    port = origins.https[1]
    r = await curl(
        "--socks5-hostname",
        proxy.url_socks5,
        "--cacert",
        str(ca_file),
        f"https://localhost:{port}/",
    )
    assert r.stdout.startswith(b"hello from secure")
    text = await proxy.await_log(f"localhost:{port} via mixed/socks5 sni=localhost")
    assert "strategy=direct" in text


async def test_socks5_ip_target_plain_http(proxy: ProxyProcess, origins: Origins) -> None:
    port = origins.http[1]
    r = await curl("--socks5", proxy.url_socks5, f"http://127.0.0.1:{port}/")
    assert r.stdout.startswith(b"hello from plain")


async def test_socks4a_and_socks4(proxy: ProxyProcess, origins: Origins, ca_file: Path) -> None:
    port = origins.https[1]
    r = await curl(
        "--socks4a", proxy.url_socks5, "--cacert", str(ca_file), f"https://localhost:{port}/"
    )
    assert r.stdout.startswith(b"hello from secure")
    r = await curl("--socks4", proxy.url_socks5, f"http://127.0.0.1:{origins.http[1]}/")
    assert r.stdout.startswith(b"hello from plain")


async def test_http_connect(proxy: ProxyProcess, origins: Origins, ca_file: Path) -> None:
    port = origins.https[1]
    r = await curl(
        "-x", f"http://{proxy.url_socks5}", "--cacert", str(ca_file), f"https://localhost:{port}/"
    )
    assert r.stdout.startswith(b"hello from secure")
    await proxy.await_log(f"localhost:{port} via mixed/http-connect sni=localhost")


async def test_http_forward_keep_alive(proxy: ProxyProcess, origins: Origins) -> None:
    base = f"http://localhost:{origins.http[1]}"
    r = await curl("-v", "-x", f"http://{proxy.url_socks5}", f"{base}/", f"{base}/bytes/1000")
    assert r.stdout.startswith(b"hello from plain")
    assert r.stdout.endswith(pattern_bytes(1000))
    # curl reuses its one connection to the proxy for the second request
    assert b"Re-using existing connection" in r.stderr or b"Reusing existing" in r.stderr
    assert [t for (_, _, t) in origins.http_server.requests] == ["/", "/bytes/1000"]
    # one log line per forwarded request, without the path
    text = await proxy.await_log("http-forward GET status=200 strategy=direct down=1000")
    assert "/bytes/1000" not in text


async def test_http_forward_post_body(proxy: ProxyProcess, origins: Origins) -> None:
    body = "x" * 100_000
    r = await curl(
        "-x",
        f"http://{proxy.url_socks5}",
        "--data-binary",
        body,
        f"http://localhost:{origins.http[1]}/echo",
    )
    assert r.stdout == body.encode()


@pytest.mark.parametrize("flag", ["--socks5-hostname", "-x"])
async def test_large_download_is_intact(
    proxy: ProxyProcess, origins: Origins, ca_file: Path, tmp_path: Path, flag: str
) -> None:
    size = 48 * 1024 * 1024
    out = tmp_path / "big"
    target = f"https://localhost:{origins.https[1]}/bytes/{size}"
    via = proxy.url_socks5 if flag != "-x" else f"http://{proxy.url_socks5}"
    await curl(flag, via, "--cacert", str(ca_file), "-o", str(out), target, timeout=120)
    assert out.stat().st_size == size
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(pattern_bytes(size)).digest()


async def test_dead_upstream_gets_protocol_errors(proxy: ProxyProcess) -> None:
    from .conftest import free_port

    dead = free_port()
    r = await curl("--socks5-hostname", proxy.url_socks5, f"http://localhost:{dead}/", check=False)
    assert r.returncode == 97  # curl: "proxy handshake error"; SOCKS5 reply was a failure
    assert b"onnection refused" in r.stderr or b"SOCKS5" in r.stderr
    r = await curl("-x", f"http://{proxy.url_socks5}", f"https://localhost:{dead}/", check=False)
    assert b"502" in r.stderr
    r = await curl(
        "-x", f"http://{proxy.url_socks5}", "-i", f"http://localhost:{dead}/", check=False
    )
    assert r.stdout.startswith(b"HTTP/1.1 502")
    await proxy.await_log("connect-refused")
