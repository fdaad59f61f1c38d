"""The far side of the router test, run inside the router's network namespace.

    python -m tests.e2e.netns_world CA_DIR

Serves site.example over HTTP and HTTPS on 198.51.100.1 (an address the test puts on the
namespace's loopback: "the Internet"), and an honest DNS server on 127.0.0.1:5353 saying so.
The lab CA's certificate is written to CA_DIR/ca.pem. Prints "ready" when everything listens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from proxy.lab.ca import LabCA
from proxy.lab.dnsserver import DnsServer, Zone
from proxy.lab.origin import OriginServer

ORIGIN_IP = "198.51.100.1"
NAME = "site.example"


async def main(ca_dir: Path) -> None:
    ca = LabCA.create()
    ca.write_cert(ca_dir / "ca.pem")
    plain = OriginServer(NAME)
    tls = OriginServer(NAME, tls=ca.issue(NAME).server_context())
    dns = DnsServer(Zone("example").add(NAME, ORIGIN_IP), ("127.0.0.1", 5353))
    async with trio.open_nursery() as nursery:
        await nursery.start(plain.serve, ORIGIN_IP, 80)
        await nursery.start(tls.serve, ORIGIN_IP, 443)
        await nursery.start(dns.serve)
        print("ready", flush=True)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]))
