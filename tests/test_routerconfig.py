"""The router's config sections: cross-references and values are checked with key and line."""

from __future__ import annotations

import pytest

from proxy.config import parse_config, render_config
from proxy.errors import ConfigError

GOOD = """
[[strategy]]
name = "vps"
type = "socks5"
server = "127.0.0.1:1081"
username = "me"
password = "hunter2"

[[strategy]]
name = "tor"
type = "tor"

[[policy]]
name = "censored"
strategies = ["direct", "vps", "tor"]
mode = "race"

[[rule]]
policy = "censored"
domain_suffix = ["twitter.com"]
port = ["443", "8000-8999"]

[router]
default_policy = "direct"
"""


def test_routing_config_loads_and_renders_without_secrets() -> None:
    config = parse_config(GOOD, "good.toml")
    assert [s.name for s in config.strategy] == ["vps", "tor"]
    assert config.policy[0].mode == "race"
    assert config.rule[0].port == ("443", "8000-8999")
    text = render_config(config)
    assert "hunter2" not in text
    assert parse_config(render_config(config, mask_secrets=False), "again") == config


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        (('"direct", "vps", "tor"', '"direct", "nope"'), "policy[0].strategies[1]", "no strategy"),
        (('policy = "censored"', 'policy = "other"'), "rule[0].policy", "no policy"),
        (
            ('default_policy = "direct"', 'default_policy = "x"'),
            "router.default_policy",
            "no policy",
        ),
        (('server = "127.0.0.1:1081"', 'server = "vps.example:1081"'), "strategy[0].server", "IP"),
        (('port = ["443", "8000-8999"]', 'port = ["9-1"]'), "rule[0].port[0]", "backwards"),
        (('mode = "race"', 'mode = "racing"'), "policy[0].mode", "fallback"),
        (('domain_suffix = ["twitter.com"]\nport = ["443", "8000-8999"]', ""), "rule[0]", "match"),
    ],
)
def test_routing_config_errors_name_key_and_line(
    change: tuple[str, str], where: str, message: str
) -> None:
    text = GOOD.replace(*change)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.toml")
    err = str(info.value)
    assert err.startswith("bad.toml:") and where in err and message in err, err
    assert info.value.line is not None


def test_socks5_strategy_needs_a_server() -> None:
    with pytest.raises(ConfigError, match=r"strategy\[0\]\.server"):
        parse_config('[[strategy]]\nname = "x"\ntype = "socks5"\n', "t.toml")
