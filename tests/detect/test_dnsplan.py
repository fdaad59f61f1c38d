"""The check plan built from ``[dns]`` (the runs themselves are exercised in the lab tests)."""

from __future__ import annotations

import ipaddress

from proxy.config import parse_config
from proxy.detect.dnsplan import check_plan, system_servers
from proxy.resolve.chain import EndpointKey

CONFIG = """
[dns]
resolver = "auto"
servers = ["192.0.2.53", "[2001:db8::53]:5353"]
canaries = ["blocked.example"]
silent_server = "198.51.100.9:5300"
local_networks = ["192.168.0.0/16"]
blockpage_ips = ["203.0.113.66"]
check_port = 8443
[[dns.endpoints]]
url = "https://doh.example/dns-query"
bootstrap = ["192.0.2.1", "2001:db8::1"]
[[dns.endpoints]]
url = "tls://dot.example"
bootstrap = ["192.0.2.2"]
"""


def test_check_plan_follows_the_config() -> None:
    plan = check_plan(parse_config(CONFIG, "t").dns)
    assert plan.plain_servers == [("192.0.2.53", 53), ("2001:db8::53", 5353)]
    assert plan.canaries == ("blocked.example",)
    assert plan.silent_server == ("198.51.100.9", 5300)
    assert [p.key for p in plan.endpoints] == [
        EndpointKey("192.0.2.1", 443, "doh", "doh.example"),
        EndpointKey("2001:db8::1", 443, "doh", "doh.example"),
        EndpointKey("192.0.2.2", 853, "dot", "dot.example"),
    ]
    why = plan.policy.why_bogus
    assert why(ipaddress.ip_address("192.168.1.1")) is None  # a local network
    assert why(ipaddress.ip_address("203.0.113.66")) == "a known block-page address"
    assert why(ipaddress.ip_address("10.10.34.35")) == "a known block-page address"


def test_check_plan_without_servers_uses_the_system_ones() -> None:
    config = parse_config(CONFIG.replace('servers = ["192.0.2.53", "[2001:db8::53]:5353"]', "")
                          .replace('silent_server = "198.51.100.9:5300"', 'silent_server = ""'),
                          "t")  # fmt: skip
    plan = check_plan(config.dns)
    assert plan.plain_servers == system_servers()
    assert plan.silent_server is None
    for host, port in plan.plain_servers:
        ipaddress.ip_address(host)
        assert port == 53
