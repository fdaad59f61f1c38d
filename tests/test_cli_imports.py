"""The proxy loads only what its config uses (idle memory is mostly imported modules).

Each check runs in a fresh interpreter so that ``sys.modules`` shows exactly what one command
imported: the default config serving a SOCKS5 connection must not load the bridge, the censor
lab, the DNS probes, the secure resolvers or the libraries only they need (cryptography, h2),
which together cost the running proxy more than 10 MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

#: modules (and packages) the default config never needs
HEAVY = (
    "proxy.bridge",
    "proxy.lab",
    "proxy.protocols.bridge",
    "proxy.strategies.bridge",
    "proxy.detect.dnsprobe_cli",
    "proxy.detect.dnscheck",
    "proxy.detect.siteprobe",
    "proxy.resolve.auto",
    "proxy.resolve.chain",
    "proxy.resolve.dot",
    "proxy.net.h2client",
    "cryptography",
    "h2",
)


def _loaded_after(code: str) -> list[str]:
    """Run ``code`` in a new interpreter; the heavy modules it left in ``sys.modules``."""
    program = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        heavy = {HEAVY!r}
        print(json.dumps(sorted(
            m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy)
        )))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_cli_help_and_run_parser_import_no_heavy_module() -> None:
    loaded = _loaded_after(
        """
        import contextlib, io
        from proxy.cli import _parser, main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            main(["--help"])
        _parser(["run", "--config", "x.toml"]).parse_args(["run", "--config", "x.toml"])
        """
    )
    assert loaded == []


def test_default_config_serving_a_connection_imports_no_heavy_module() -> None:
    # The embedded default config (fragment policy, system resolver, status page), with ports
    # the system picks, relays one SOCKS5 connection to a local server and shuts down.
    loaded = _loaded_after(
        """
        import dataclasses, socket, struct
        import trio
        from proxy.app import App
        from proxy.config import load_config

        config = load_config(None)
        config = dataclasses.replace(
            config,
            inbound=tuple(dataclasses.replace(i, listen="127.0.0.1:0") for i in config.inbound),
            web=dataclasses.replace(config.web, listen="127.0.0.1:0"),
        )
        assert config.router.default_policy == "fragment" and config.dns.resolver == "system"

        def client(proxy_port: int, origin_port: int) -> bytes:
            with socket.create_connection(("127.0.0.1", proxy_port)) as sock:
                sock.sendall(b"\\x05\\x01\\x00")
                assert sock.recv(2) == b"\\x05\\x00"
                sock.sendall(b"\\x05\\x01\\x00\\x01\\x7f\\x00\\x00\\x01" + struct.pack("!H", origin_port))
                reply = b""
                while len(reply) < 10:
                    reply += sock.recv(10 - len(reply))
                assert reply[1] == 0, reply
                sock.sendall(b"ping")
                return sock.recv(10)

        async def main() -> None:
            app = App(config)
            origin = trio.socket.socket()
            await origin.bind(("127.0.0.1", 0))
            origin.listen()

            async def serve_origin() -> None:
                conn, _ = await origin.accept()
                with conn:
                    assert await conn.recv(10) == b"ping"
                    await conn.send(b"pong")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(app.run)
                nursery.start_soon(serve_origin)
                await app.ready.wait()
                port = next(iter(app.addresses().values()))[1]
                answer = await trio.to_thread.run_sync(client, port, origin.getsockname()[1])
                assert answer == b"pong", answer
                app.stop()

        trio.run(main)
        """
    )
    assert loaded == []


def test_secure_resolver_still_loads_what_it_needs() -> None:
    # the imports are lazy, not gone: a config asking for DoH gets the secure chain
    loaded = _loaded_after(
        """
        import dataclasses
        from proxy.app import make_resolver
        from proxy.config import DnsEndpointConfig, load_config

        config = load_config(None)
        endpoint = DnsEndpointConfig(url="https://dns.example/dns-query", bootstrap=("192.0.2.1",))
        dns = dataclasses.replace(config.dns, resolver="secure", endpoints=(endpoint,))
        make_resolver(dataclasses.replace(config, dns=dns))
        """
    )
    assert "proxy.resolve.chain" in loaded
