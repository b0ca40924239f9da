"""config.toml: the contract's defaults, secrets from the environment, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_settings, settings_from_dict
from gateway.errors import ConfigError


def test_defaults_match_the_contract() -> None:
    s = settings_from_dict({})
    assert (s.server.host, s.server.port, s.server.cors_allow_origins) == ("127.0.0.1", 8080, ())
    assert (s.sessions.ttl, s.sessions.retention) == (120, 900)
    assert (s.stream.heartbeat, s.stream.retry, s.stream.max_duration) == (15, 3000, 300)
    assert s.polling.max_wait == 25
    tc = s.providers.truecaller
    assert tc.profile_hosts[0] == "profile4-noneu.truecaller.com" and tc.require_https and tc.require_public_ip
    assert tc.http_timeout == 2.5 and tc.callback_timeout == 30
    assert s.providers.veriphone.api_base == "https://service.veriph.one"


def test_shipped_config_toml_is_valid_and_equals_the_defaults() -> None:
    shipped = load_settings(str(Path(__file__).parent.parent / "config.toml"), env={})
    assert shipped.server == settings_from_dict({}).server
    assert shipped.providers == settings_from_dict({}).providers
    assert shipped.stream == settings_from_dict({}).stream
    assert shipped.webhooks == settings_from_dict({}).webhooks


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"server": {"prot": 1}}, "server.prot"),
        ({"nope": {}}, "nope"),
        ({"server": {"port": "8080"}}, "server.port"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"port": True}}, "server.port"),
        ({"server": {"cors_allow_origins": "*"}}, "server.cors_allow_origins"),
        ({"server": {"cors_allow_origins": ["*"]}}, "server.cors_allow_origins"),
        ({"server": {"cors_allow_origins": ["https://a.example/path"]}}, "server.cors_allow_origins"),
        ({"server": {"trusted_proxies": ["not-an-ip"]}}, "server.trusted_proxies"),
        ({"server": "x"}, "server"),
        ({"sessions": {"ttl": -1}}, "sessions.ttl"),
        ({"sessions": {"ttl": 1.5}}, "sessions.ttl"),
        ({"stream": {"heartbeat": -1}}, "stream.heartbeat"),
        ({"stream": {"heartbeat": 300, "max_duration": 300}}, "stream.heartbeat"),
        ({"stream": {"heartbeat": 0}}, "stream.heartbeat"),
        ({"stream": {"retry": -5}}, "stream.retry"),
        ({"stream": {"retry_jitter": -1}}, "stream.retry_jitter"),
        ({"stream": {"retry_jitter": 1.5}}, "stream.retry_jitter"),
        ({"stream": {"retry_jitter": 3_600_001}}, "stream.retry_jitter"),
        ({"server": {"shutdown_spread": -0.5}}, "server.shutdown_spread"),
        ({"server": {"shutdown_spread": "2"}}, "server.shutdown_spread"),
        ({"server": {"shutdown_spread": 5, "shutdown_timeout": 5}}, "server.shutdown_spread"),
        ({"server": {"shutdown_timeout": 1}}, "server.shutdown_spread"),  # the default spread (2 s) is not below it
        ({"polling": {"max_wait": -1}}, "polling.max_wait"),
        ({"providers": {"truecaller": {"http_timeout": 0}}}, "providers.truecaller.http_timeout"),
        ({"providers": {"truecaller": {"lang": "fr"}}}, "providers.truecaller.lang"),
        ({"providers": {"truecaller": {"btn_shape": "oval"}}}, "providers.truecaller.btn_shape"),
        ({"providers": {"truecaller": {"cta_color": "red"}}}, "providers.truecaller.cta_color"),
        ({"providers": {"truecaller": {"login_prefix": "hello"}}}, "providers.truecaller.login_prefix"),
        ({"providers": {"truecaller": {"profile_hosts": ["a b"]}}}, "providers.truecaller.profile_hosts"),
        ({"providers": {"truecaller": {"profile_hosts": [1]}}}, "providers.truecaller.profile_hosts"),
        ({"providers": {"veriphone": {"api_base": "ftp://x"}}}, "providers.veriphone.api_base"),
        ({"providers": {"veriphone": {"success_url": "/relative"}}}, "providers.veriphone.success_url"),
        ({"providers": {"mystery": {}}}, "providers.mystery"),
        ({"logging": {"format": "xml"}}, "logging.format"),
    ],
)
def test_bad_values_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(raw, source="cfg.toml")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"cfg.toml: {key}: ")


def test_reconnect_spreading_defaults_and_bounds() -> None:
    s = settings_from_dict({})
    assert (s.server.shutdown_spread, s.server.shutdown_timeout, s.stream.retry_jitter) == (2.0, 5.0, 0)
    s = settings_from_dict({"server": {"shutdown_spread": 4.5}, "stream": {"retry_jitter": 2000}})
    assert (s.server.shutdown_spread, s.stream.retry_jitter) == (4.5, 2000)
    s = settings_from_dict({"server": {"shutdown_timeout": 0.2, "shutdown_spread": 0}})  # 0: all at once
    assert s.server.shutdown_spread == 0
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"server": {"shutdown_spread": 6}}, source="cfg.toml")
    assert str(err.value) == (
        "cfg.toml: server.shutdown_spread: expected seconds >= 0 and below server.shutdown_timeout (5), got 6.0"
    )


def test_secrets_come_from_the_environment() -> None:
    env = {
        "GATEWAY_TRUECALLER_PARTNER_KEY": "pk-from-env",
        "GATEWAY_VERIPHONE_API_KEY": "vk-from-env",
        "GATEWAY_VERIPHONE_API_SECRET": "vs-from-env",
    }
    s = settings_from_dict({"providers": {"truecaller": {"partner_key": "in-file"}}}, env=env)
    assert s.providers.truecaller.partner_key == "pk-from-env"
    assert s.providers.veriphone.api_key == "vk-from-env"
    assert s.providers.veriphone.api_secret == "vs-from-env"


def test_settings_are_frozen() -> None:
    s = settings_from_dict({})
    with pytest.raises(AttributeError):
        s.server.port = 1  # type: ignore[misc]


def test_config_file_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(None, env={}).source == "<defaults>"  # no ./config.toml: defaults
    (tmp_path / "config.toml").write_text("[server]\nport = 9001\n")
    assert load_settings(None, env={}).server.port == 9001
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 9002\n")
    assert load_settings(None, env={"GATEWAY_CONFIG": str(other)}).server.port == 9002
    assert load_settings(str(other), env={"GATEWAY_CONFIG": "/nope"}).server.port == 9002
    with pytest.raises(ConfigError, match="not found"):
        load_settings(str(tmp_path / "missing.toml"), env={})
    (tmp_path / "broken.toml").write_text("[server\nport=")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_settings(str(tmp_path / "broken.toml"), env={})


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"providers": {"veriphone": {"success_url": "http://[bad"}}}, "providers.veriphone.success_url"),
        ({"server": {"cors_allow_origins": ["https://[x"]}}, "server.cors_allow_origins"),
        ({"providers": {"truecaller": {"profile_hosts": ["host:²"]}}}, "providers.truecaller.profile_hosts"),
        ({"providers": {"truecaller": {"profile_hosts": ["host:"]}}}, "providers.truecaller.profile_hosts"),
        ({"providers": {"truecaller": {"profile_hosts": ["prоfile.example"]}}}, "providers.truecaller.profile_hosts"),
    ],
)
def test_malformed_urls_and_hosts_are_one_line_errors(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^cfg.toml: {key}: "):
        settings_from_dict(raw, source="cfg.toml")
