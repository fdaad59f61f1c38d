"""A real nginx acting as a CDN edge in the lab, for domain fronting tests and the bench.

:func:`open_nginx_cdn` starts Debian's nginx (``master_process off``, every path in the lab's
work directory, so no root and no system files are needed) with, on each edge address, two TLS
sites: the innocuous front (:data:`~proxy.lab.world.CDN_FRONT` by default, serving a small page)
and the bridge's name, whose secret location goes to the bridge through the packaged proxy
snippet (packaging/nginx/sidestep-bridge-proxy.conf: buffering off, HTTP/1.1, long timeouts).
nginx picks the certificate by the TLS server name and the site by the ``Host`` header, which
is exactly what domain fronting needs.

An edge may *refuse* fronting, as most big CDNs do today: its bridge site answers 421 (or 403)
whenever the TLS server name is not the bridge's own name.

Each edge sits behind its own :class:`~proxy.lab.middlebox.Middlebox` running the lab's censor
engine, so clients reach it through the profile's censor exactly like the lab's other hosts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.lab.middlebox import Middlebox
from proxy.lab.world import CDN_FRONT, Lab

Address = tuple[str, int]
PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "nginx"
#: the first edge's addresses: public 127.71.0.1 (the censor), nginx itself on 127.171.0.1
EDGE_NET = "127.71.0."


def find_nginx() -> str | None:
    """nginx on the PATH, or where Debian puts it (often outside a user's PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


@dataclass(frozen=True, slots=True)
class Edge:
    """One running edge: clients dial ``public`` (through the censor) with TLS name ``front``."""

    public: Address
    front: str
    #: the status this edge answers fronted requests with (None: it fronts)
    refuses: int | None

    def candidate(self) -> str:
        """This edge as a front strategy's ``fronts`` entry."""
        return f"{self.front}@{self.public[0]}:{self.public[1]}"


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _site(name: str, listen: Address, cert: Path, key: Path, root: Path, body: str) -> str:
    return (
        f"server {{\n  listen {listen[0]}:{listen[1]} ssl;\n  server_name {name};\n"
        f"  ssl_certificate {cert};\n  ssl_certificate_key {key};\n"
        f"  root {root};\n  error_page 404 /404.html;\n{body}"
        "  location / {\n    try_files $uri $uri/ =404;\n  }\n}\n"
    )


def nginx_config(
    workdir: Path,
    edges: Sequence[tuple[Address, str, int | None]],
    bridge: str,
    backend: Address,
    secret: str,
) -> Path:
    """Write the config for ``edges`` (nginx's listen address, front name, refusal status)
    into ``workdir``; returns the main file."""
    snippet = (PACKAGING / "sidestep-bridge-proxy.conf").read_text()
    (workdir / "snippet.conf").write_text(
        snippet.replace("127.0.0.1:8443", f"{backend[0]}:{backend[1]}")
    )
    sites = []
    for listen, front, refuses in edges:
        www = workdir / f"www-{front}"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_text(f"<html><body>welcome to {front}</body></html>\n")
        sites.append(
            _site(front, listen, workdir / f"{front}.pem", workdir / f"{front}.key", www, "")
        )
        refuse = (
            f'  if ($ssl_server_name != "{bridge}") {{\n    return {refuses};\n  }}\n'
            if refuses is not None
            else ""
        )
        proxied = "".join(
            f"  location {match} {{\n    include {workdir}/snippet.conf;\n  }}\n"
            for match in (f"= {secret}", f"^~ {secret}/")
        )
        www = workdir / "www-bridge"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_text("<html><body>my little blog</body></html>\n")
        sites.append(
            _site(bridge, listen, workdir / "bridge.pem", workdir / "bridge.key", www,
                  refuse + proxied)
        )  # fmt: skip
    temps = "".join(
        f"  {kind}_temp_path {workdir}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = workdir / "nginx.conf"
    main.write_text(
        f"daemon off;\nmaster_process off;\npid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n{temps}"
        '  map $http_upgrade $sidestep_connection {\n    default upgrade;\n    ""      close;\n  }\n'
        + "".join(sites)
        + "}\n"
    )
    return main


def _tail(log: Path) -> str:
    return log.read_text(errors="replace").strip()[-500:] if log.exists() else ""


async def _wait_listening(address: Address, proc: trio.Process, log: Path) -> None:
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream(*address)
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"nginx did not start: {_tail(log)}") from None
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return


@asynccontextmanager
async def open_nginx_cdn(
    lab: Lab,
    *,
    bridge: str,
    backend: Address,
    secret: str,
    refusals: Sequence[int | None] = (None,),
    front: str = CDN_FRONT,
) -> AsyncIterator[list[Edge]]:
    """One nginx process serving an edge per entry of ``refusals`` (None: it fronts; 421 or
    403: it refuses fronting), each behind the lab's censor at 127.71.0.N; the bridge's
    ``secret`` location on name ``bridge`` goes to ``backend``. Yields the edges."""
    nginx = find_nginx()
    if nginx is None:
        raise RuntimeError("nginx is not installed")
    workdir = lab.workdir / "nginx-cdn"
    workdir.mkdir()
    for name, stem in ((front, front), (bridge, "bridge")):
        issued = lab.ca.issue(name)
        (workdir / f"{stem}.pem").write_bytes(issued.cert_pem)
        (workdir / f"{stem}.key").write_bytes(issued.key_pem)
    inside = [(f"127.171.0.{i}", 0) for i in range(1, len(refusals) + 1)]
    inside = [(ip, _free_port(ip)) for ip, _ in inside]
    main = nginx_config(
        workdir, [(a, front, r) for a, r in zip(inside, refusals, strict=True)], bridge,
        backend, secret,
    )  # fmt: skip
    proc = await trio.lowlevel.open_process(
        [nginx, "-p", str(workdir), "-c", str(main)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        edges = []
        for i, (address, refuses) in enumerate(zip(inside, refusals, strict=True), start=1):
            await _wait_listening(address, proc, workdir / "error.log")
            box = Middlebox(lab.engine, listen=(f"{EDGE_NET}{i}", 0), upstream=address)
            public = await lab.start_service(box.serve)
            lab.middleboxes[public] = box
            edges.append(Edge(public, front, refuses))
        yield edges
    finally:
        proc.terminate()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()
