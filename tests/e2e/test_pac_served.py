"""The PAC file as a browser fetches it: plain GET to the proxy port, real curl."""

from __future__ import annotations

from pathlib import Path

from .conftest import curl, requires_curl, run_proxy

pytestmark = requires_curl

CONFIG = """
[[inbound]]
name = "mixed"
listen = "127.0.0.1:{port}"

[[inbound]]
name = "socks"
protocol = "socks5"
listen = "127.0.0.1:{socks_port}"

[[strategy]]
name = "up"
type = "socks5"
server = "127.0.0.1:9"

[[policy]]
name = "censored"
strategies = ["direct", "up"]

[[rule]]
policy = "censored"
domain_suffix = ["blocked.example"]

[shutdown]
drain_timeout = 1
"""


async def test_proxy_port_serves_the_pac_file(tmp_path: Path) -> None:
    from .conftest import free_port

    socks_port = free_port()
    with run_proxy(tmp_path, CONFIG.replace("{socks_port}", str(socks_port))) as proxy:
        base = f"http://127.0.0.1:{proxy.port}"
        got = await curl("--include", f"{base}/proxy.pac")
        head, _, body = got.stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"Content-Type: application/x-ns-proxy-autoconfig" in head
        text = body.decode()
        assert "function FindProxyForURL(url, host)" in text
        # it points back at the address the client used, and knows the censored suffix
        assert f'var sidestepProxy = "PROXY 127.0.0.1:{proxy.port}";' in text
        assert '"blocked.example"' in text
        wpad = await curl(f"{base}/wpad.dat")
        assert wpad.stdout == body

        head_only = await curl("--head", f"{base}/proxy.pac")
        assert head_only.stdout.startswith(b"HTTP/1.1 200")
        posted = await curl("--include", "--data", "x", f"{base}/proxy.pac", check=False)
        assert posted.stdout.startswith(b"HTTP/1.1 405")
        other = await curl("--include", f"{base}/index.html", check=False)
        assert other.stdout.startswith(b"HTTP/1.1 400")
        # the socks5-only port does not speak HTTP: a GET there gets no PAC
        refused = await curl(f"http://127.0.0.1:{socks_port}/proxy.pac", check=False)
        assert refused.returncode != 0
