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


@pytest.mark.parametrize(
    ("line", "where", "message"),
    [
        ("freeze_min_bytes = 0", "router.freeze_min_bytes", "greater than 0"),
        ("freeze_max_bytes = -5", "router.freeze_max_bytes", "greater than 0"),
        ("freeze_min_bytes = 30000", "router.freeze_min_bytes", "freeze_max_bytes"),
        ("freeze_stall = -1", "router.freeze_stall", "at least 0"),
        ("throttle_factor = 0.5", "router.throttle_factor", "above 1"),
        ('throttle_factor = "fast"', "router.throttle_factor", "number"),
    ],
)
def test_router_detection_knobs_reject_bad_values(line: str, where: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"[router]\n{line}\n", "bad.toml")
    err = str(info.value)
    assert err.startswith("bad.toml:") and where in err and message in err, err
    assert info.value.line is not None


def test_router_detection_knobs_accept_off() -> None:
    config = parse_config("[router]\nfreeze_stall = 0\nthrottle_factor = 0\n", "t.toml")
    assert config.router.freeze_stall == 0 and config.router.throttle_factor == 0


def test_rule_resolver_choice_is_checked() -> None:
    rule = '[[rule]]\npolicy = "direct"\ndomain = ["x.org"]\n'
    with pytest.raises(ConfigError) as info:
        parse_config(rule + 'resolver = "doh"\n', "bad.toml")
    assert info.value.key == "rule[0].resolver" and info.value.line == 4
    assert '"default", "secure", "system"' in info.value.message
    with pytest.raises(ConfigError) as info:
        parse_config(rule + 'resolver = "secure"\n', "bad.toml")
    assert info.value.key == "rule[0].resolver" and "dns.endpoints" in info.value.message
    config = parse_config(rule + 'resolver = "system"\n', "ok.toml")
    assert config.rule[0].resolver == "system"


FRAGMENT = """
[[strategy]]
name = "split"
type = "fragment"
split = ["start+2", "sni-middle"]
records = true
delay = 0.01

[[policy]]
name = "censored"
strategies = ["direct", "split", "tls-record-split", "disorder"]
"""


def test_fragment_strategy_config_loads_and_round_trips() -> None:
    config = parse_config(FRAGMENT, "good.toml")
    [s] = config.strategy
    assert (s.type, s.split, s.records, s.segments, s.delay) == (
        "fragment", ("start+2", "sni-middle"), True, True, 0.01,
    )  # fmt: skip
    assert parse_config(render_config(config, mask_secrets=False), "again") == config
    # the built-in policy can be named without being defined
    parse_config('[router]\ndefault_policy = "fragment"\n', "t.toml")


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        (('split = ["start+2", "sni-middle"]', 'split = ["sni-centre"]'), "strategy[0].split[0]",
         "not a split point"),
        (('split = ["start+2", "sni-middle"]', "split = []"), "strategy[0].split", "needs split"),
        (("delay = 0.01", "delay = 3"), "strategy[0].delay", "0 to 2"),
        (("delay = 0.01", "delay = -1"), "strategy[0].delay", "0 to 2"),
        (("records = true", "records = false\nsegments = false"), "strategy[0].segments",
         "segments must be true"),
        (("records = true", 'host_header = "Hots"'), "strategy[0].host_header", '"host"'),
        (("records = true", 'host_space = " x"'), "strategy[0].host_space", "spaces or tabs"),
        (("records = true", 'host_space = "         "'), "strategy[0].host_space", "up to 8"),
        (("records = true", "ttl = 3"), "strategy[0].ttl", "only disorder"),
        (('type = "fragment"', 'type = "disorder"\nttl = 0'), "strategy[0].ttl", "between 1"),
        (('type = "fragment"', 'type = "oob"\nsegments = false'), "strategy[0].segments",
         "always sends segments"),
        (('type = "fragment"', 'type = "fragment"\nserver = "127.0.0.1:1"'),
         "strategy[0].server", "no server"),
        (('type = "fragment"', 'type = "socks5"\nserver = "127.0.0.1:1"'),
         "strategy[0].split", "only fragment, disorder and oob"),
        (('type = "fragment"', 'type = "fragmnet"'), "strategy[0].type", "fragment"),
        (('name = "split"', 'name = "disorder"'), "strategy[0].name", "built-in strategy"),
        (('name = "censored"', 'name = "fragment"'), "policy[0].name", "built-in policy"),
    ],
)  # fmt: skip
def test_fragment_strategy_config_errors_name_key_and_line(
    change: tuple[str, str], where: str, message: str
) -> None:
    text = FRAGMENT.replace(*change)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.toml")
    err = str(info.value)
    assert err.startswith("bad.toml:") and where in err and message in err, err
    assert info.value.line is not None


BRIDGE_URI = (
    "sidestep://0123456789abcdef@192.0.2.7:443?pk=" + "A" * 43 + "&secret=" + "B" * 42 + "A"
    "&carrier=raw"
)


def test_bridge_strategy_config_loads_and_masks_its_uri() -> None:
    text = f'[[strategy]]\nname = "b"\ntype = "bridge"\nuri = "{BRIDGE_URI}"\n'
    config = parse_config(text, "b.toml")
    assert config.strategy[0].uri == BRIDGE_URI
    shown = render_config(config)
    assert "B" * 42 not in shown and "uri = " in shown
    assert parse_config(render_config(config, mask_secrets=False), "again") == config


@pytest.mark.parametrize(
    ("body", "where", "message"),
    [
        ('type = "bridge"\n', "strategy[0].uri", "needs uri"),
        ('type = "bridge"\nuri = "https://x"\n', "strategy[0].uri", "sidestep://"),
        (f'type = "bridge"\nuri = "{BRIDGE_URI[:-3]}"\n', "strategy[0].uri", "carrier"),
        (f'type = "direct"\nuri = "{BRIDGE_URI}"\n', "strategy[0].uri", "only bridge"),
        ('type = "direct"\ncafile = "ca.pem"\n', "strategy[0].cafile", "only bridge"),
        (
            f'type = "bridge"\nuri = "{BRIDGE_URI}"\nserver = "127.0.0.1:1"\n',
            "strategy[0].server",
            "no server",
        ),
        (
            'type = "bridge"\nuri = "' + BRIDGE_URI.replace("raw", "ws") + '"\n',
            "strategy[0].uri",
            "path",
        ),
    ],
)
def test_bridge_strategy_config_errors_name_key_and_line(
    body: str, where: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[strategy]]\nname = "b"\n{body}', "bad.toml")
    err = str(info.value)
    assert err.startswith("bad.toml:") and where in err and message in err, err
    assert "B" * 42 not in err  # the secret never appears in an error
    assert info.value.line is not None


FRONT_URI = BRIDGE_URI.replace("192.0.2.7:443", "bridge.example:443/a1b2c3").replace(
    "carrier=raw", "carrier=ws"
)


def test_front_strategy_config_loads_with_fronts_and_carriers() -> None:
    text = (
        f'[[strategy]]\nname = "f"\ntype = "front"\nuri = "{FRONT_URI}"\n'
        'fronts = ["cdn.example", "cdn.example@192.0.2.9:8443"]\ncarriers = ["split", "poll"]\n'
    )
    config = parse_config(text, "f.toml")
    assert config.strategy[0].fronts == ("cdn.example", "cdn.example@192.0.2.9:8443")
    assert config.strategy[0].carriers == ("split", "poll")
    assert parse_config(render_config(config, mask_secrets=False), "again") == config
    # the URI's own front= is enough; the carriers default to all three
    fronted = FRONT_URI + "&front=cdn.example"
    config = parse_config(f'[[strategy]]\nname = "f"\ntype = "front"\nuri = "{fronted}"\n', "f")
    assert config.strategy[0].carriers == ("ws", "split", "poll")


@pytest.mark.parametrize(
    ("body", "where", "message"),
    [
        ('type = "front"\nfronts = ["cdn.example"]\n', "strategy[0].uri", "needs uri"),
        (f'type = "front"\nuri = "{FRONT_URI}"\n', "strategy[0].fronts", "fronts = ["),
        (
            f'type = "front"\nuri = "{BRIDGE_URI}"\nfronts = ["cdn.example"]\n',
            "strategy[0].uri",
            "web carrier",
        ),
        (
            f'type = "front"\nuri = "{FRONT_URI}"\nfronts = ["not a name"]\n',
            "strategy[0].fronts[0]",
            "NAME or NAME@ADDRESS",
        ),
        (
            f'type = "front"\nuri = "{FRONT_URI}"\nfronts = ["cdn.example@192.0.2.9:99999"]\n',
            "strategy[0].fronts[0]",
            "port",
        ),
        (
            f'type = "front"\nuri = "{FRONT_URI}"\nfronts = ["c.example"]\ncarriers = ["quic"]\n',
            "strategy[0].carriers[0]",
            "one of ws, split, poll",
        ),
        (
            f'type = "front"\nuri = "{FRONT_URI}"\nfronts = ["c.example"]\ncarriers = []\n',
            "strategy[0].carriers",
            "at least one carrier",
        ),
        (
            f'type = "front"\nuri = "{FRONT_URI}"\nfronts = ["c.example"]\n'
            'carriers = ["ws", "ws"]\n',
            "strategy[0].carriers",
            "listed twice",
        ),
        ('type = "direct"\nfronts = ["cdn.example"]\n', "strategy[0].fronts", "only front"),
        ('type = "direct"\ncarriers = ["ws"]\n', "strategy[0].carriers", "only front"),
        (
            f'type = "bridge"\nuri = "{FRONT_URI}&front=cdn.example"\n',
            "strategy[0].uri",
            'type = "front"',
        ),
    ],
)
def test_front_strategy_config_errors_name_key_and_line(
    body: str, where: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[strategy]]\nname = "f"\n{body}', "bad.toml")
    err = str(info.value)
    assert err.startswith("bad.toml:") and where in err and message in err, err
    assert "B" * 42 not in err
    assert info.value.line is not None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("100", "a number of bytes from 4096"),
        ("-1", "a number of bytes from 4096"),
        ('"never"', 'must be one of "auto"'),
        ("true", 'must be one of "auto"'),
        ("1.5", 'must be one of "auto"'),
    ],
)
def test_bridge_strategy_rotate_after_refuses_bad_values(value: str, message: str) -> None:
    text = f'[[strategy]]\nname = "b"\ntype = "bridge"\nuri = "{BRIDGE_URI}"\n\nrotate_after = {value}\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.toml")
    assert str(info.value).startswith("bad.toml:6: strategy[0].rotate_after: "), info.value
    assert message in str(info.value)


def test_bridge_strategy_rotate_after_takes_auto_a_size_or_zero_and_only_on_bridges() -> None:
    head = f'[[strategy]]\nname = "b"\ntype = "bridge"\nuri = "{BRIDGE_URI}"\n'
    for value, expected in (('"auto"', "auto"), ("16384", 16384), ("0", 0)):
        config = parse_config(f"{head}rotate_after = {value}\n", "t.toml")
        assert config.strategy[0].rotate_after == expected
        assert parse_config(render_config(config, mask_secrets=False), "again") == config
    assert parse_config(head, "t.toml").strategy[0].rotate_after == "auto"
    with pytest.raises(ConfigError, match="only bridge and front strategies take rotate_after"):
        parse_config('[[strategy]]\nname = "d"\ntype = "direct"\nrotate_after = 0\n', "t.toml")
