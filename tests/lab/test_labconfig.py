"""lab_config keeps a checked config inside the lab: secure DNS and upstreams included."""

from __future__ import annotations

from proxy.config import parse_config
from proxy.lab.scenarios import OUTSIDE_LAB, lab_config, open_sidestep
from proxy.lab.world import Lab

SECURE = """
[dns]
resolver = "secure"
[[dns.endpoints]]
url = "https://cloudflare-dns.com/dns-query"
bootstrap = ["1.1.1.1"]
[[strategy]]
name = "vps"
type = "socks5"
server = "203.0.113.5:1080"
[[strategy]]
name = "local"
type = "socks5"
server = "127.0.0.1:1081"
[[strategy]]
name = "tor"
type = "tor"
"""


async def test_lab_config_maps_secure_dns_and_outside_upstreams_into_the_lab(lab: Lab) -> None:
    checked = lab_config(parse_config(SECURE, "secure.toml"), lab)
    urls = [ep.url for ep in checked.dns.endpoints]
    assert urls == [ep.url for ep in sorted(lab.doh_endpoints, key=lambda e: not e.famous)]
    assert all(ep.cafile == str(lab.ca_file) for ep in checked.dns.endpoints)
    assert all(b.startswith("127.") for ep in checked.dns.endpoints for b in ep.bootstrap)
    servers = {s.name: s.server for s in checked.strategy}
    assert servers == {"vps": OUTSIDE_LAB, "local": "127.0.0.1:1081", "tor": None}


async def test_secure_config_resolves_through_lab_doh(lab: Lab) -> None:
    from proxy.lab.scenarios import fetch

    config = parse_config(SECURE, "secure.toml")
    async with open_sidestep(lab, config) as running:
        result = await fetch(running.address, lab.url("open.lab"), tls=lab.ca.client_context())
    assert result.status == 200, result
    assert any(e.qname.startswith("open.lab") for s in lab.doh_servers.values() for e in s.log)


async def test_lab_config_keeps_every_part_of_auto_dns_inside_the_lab(lab: Lab) -> None:
    from pathlib import Path

    shipped = parse_config((Path(__file__).parents[2] / "configs" / "lan.toml").read_text(), "lan")
    assert shipped.dns.resolver == "auto"
    checked = lab_config(shipped, lab)
    dns = checked.dns
    assert dns.servers == (f"{lab.isp_resolver[0]}:{lab.isp_resolver[1]}",)
    assert dns.silent_server == f"{lab.silent_resolver[0]}:{lab.silent_resolver[1]}"
    assert dns.check_cafile == str(lab.ca_file)
    assert dns.endpoints and all(ep.cafile == str(lab.ca_file) for ep in dns.endpoints)
    lab_ips = {ip for ep in lab.doh_endpoints for ip in ep.bootstrap}
    for ep in dns.endpoints:
        assert set(ep.bootstrap) <= lab_ips


async def test_lab_config_sends_a_bridge_out_there_nowhere(lab: Lab) -> None:
    from proxy.bridge.identity import BridgeURI, generate_identity, parse_bridge_uri

    ident = generate_identity()

    def uri(host: str, port: int) -> str:
        return str(
            BridgeURI(
                short_id=ident.short_id,
                public_key=ident.public_key,
                secret=ident.secret,
                carrier="raw",
                host=host,
                port=port,
            )
        )

    real, local = uri("bridge.example.net", 443), uri("127.80.0.1", 4433)
    config = parse_config(
        f'[[strategy]]\nname = "far"\ntype = "bridge"\nuri = "{real}"\n'
        f'[[strategy]]\nname = "near"\ntype = "bridge"\nuri = "{local}"\n',
        "t",
    )
    far, near = lab_config(config, lab).strategy
    assert far.uri is not None and near.uri == local
    mapped = parse_bridge_uri(far.uri)
    assert f"{mapped.host}:{mapped.port}" == OUTSIDE_LAB
    assert mapped.secret == ident.secret  # only where it dials changed
    assert ident.secret.hex() not in repr(far) and "secret" not in repr(far).lower()
