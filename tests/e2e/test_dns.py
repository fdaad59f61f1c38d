"""resolver = "secure": names go to DNS-over-HTTPS endpoints through their bootstrap IPs.

Real curl through a real sidestep process; the DoH servers are the lab's (RFC 8484 on h2) with
certificates from the lab CA, which the config names as the endpoints' CA file.
"""

from __future__ import annotations

from pathlib import Path

import trio

from proxy.lab.ca import LabCA
from proxy.lab.dnsserver import Zone
from proxy.lab.dohserver import DohServer

from .conftest import Origins, curl, free_port, requires_curl, run_proxy

pytestmark = requires_curl


async def test_secure_resolver_uses_doh_and_falls_back_between_endpoints(
    tmp_path: Path, origins: Origins, lab_ca: LabCA, ca_file: Path, nursery: trio.Nursery
) -> None:
    zone = Zone("test").add("only-doh-knows.test", "127.0.0.1")
    good = DohServer(zone, lab_ca.issue("doh.small.test"), ("127.54.2.2", 0))
    await nursery.start(good.serve)
    dead_port = free_port("127.54.1.1")  # the "famous" provider: nothing answers there
    config = f"""
[[inbound]]
name = "mixed"
listen = "127.0.0.1:{{port}}"
[dns]
resolver = "secure"
timeout = 3
[[dns.endpoints]]
url = "https://dns.famous.test:{dead_port}/dns-query"
bootstrap = ["127.54.1.1"]
cafile = "{ca_file}"
[[dns.endpoints]]
url = "{good.url}"
bootstrap = ["127.54.2.2"]
cafile = "{ca_file}"
"""
    with run_proxy(tmp_path, config) as p:
        url = f"http://only-doh-knows.test:{origins.http[1]}/"
        r = await curl("--socks5-hostname", f"127.0.0.1:{p.port}", url)
        assert r.stdout.startswith(b"hello from plain")
        assert [e.qname for e in good.log].count("only-doh-knows.test") >= 1
        # a name the DoH server does not know fails cleanly: no plaintext fallback
        r = await curl(
            "--socks5-hostname",
            f"127.0.0.1:{p.port}",
            f"http://nowhere.test:{origins.http[1]}/",
            check=False,
        )
        assert r.returncode != 0
        # the small endpoint's NXDOMAIN is the answer (through the DNS service's cache)
        await p.await_log("resolve-error: nowhere.test: no such name (NXDOMAIN)")
