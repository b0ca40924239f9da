"""Typed, frozen settings loaded from config.toml, with secrets from the environment.

Every key is declared once, as a dataclass field; the loader derives type checks from the
annotations and runs the range checks of `_check`. Each problem is reported as one line
naming the file and the dotted key, before anything binds a port.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.auth import MIN_SECRET_LENGTH, split_secrets, strong_enough
from gateway.errors import ConfigError

ENV_CONFIG = "GATEWAY_CONFIG"
SECRET_ENV = {
    ("providers", "truecaller", "partner_key"): "GATEWAY_TRUECALLER_PARTNER_KEY",
    ("providers", "veriphone", "api_key"): "GATEWAY_VERIPHONE_API_KEY",
    ("providers", "veriphone", "api_secret"): "GATEWAY_VERIPHONE_API_SECRET",
}

TRUECALLER_LANGS = ("en", "hi", "mr", "te", "ml", "ur", "pa", "ta", "bn", "kn", "sw", "ar")
TRUECALLER_LOGIN_PREFIXES = (
    "getstarted",
    "continue",
    "placeorder",
    "completepurchase",
    "checkout",
    "completebooking",
    "proceedwithbooking",
    "getdetails",
    "viewmore",
    "continuereading",
)
TRUECALLER_LOGIN_SUFFIXES = ("verifymobile", "login")
TRUECALLER_CTA_PREFIXES = ("use", "continuewith", "proceedwith")
TRUECALLER_BTN_SHAPES = ("round", "rect")
TRUECALLER_SKIP_OPTIONS = ("useanothernum", "useanothermethod", "manualdetails")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    cors_allow_origins: tuple[str, ...] = ()
    # Addresses (or CIDR networks) of reverse proxies whose X-Forwarded-For is believed.
    trusted_proxies: tuple[str, ...] = ()
    # Serve the demo page at /demo (always on in sandbox mode).
    demo: bool = False
    # Seconds SIGTERM waits for in-flight callback work before closing the database.
    shutdown_timeout: float = 5.0
    # Seconds over which SIGTERM closes the open streams (each at a random moment), so browsers
    # do not all reconnect at once. Below shutdown_timeout; at most half of it is used, so every
    # stream still ends cleanly before uvicorn's graceful timeout. 0: all at once.
    shutdown_spread: float = 2.0


@dataclass(frozen=True)
class DatabaseConfig:
    path: str = "gateway.db"
    busy_timeout: int = 5000  # milliseconds
    # New sessions are refused (503 storage_full) while the database holds more than this
    # many MiB (SQLite: pages in use plus the WAL). 0: no cap.
    max_size_mb: int = 1024
    # PostgreSQL instead of the SQLite file: postgresql://user@host:port/dbname. The password
    # never sits in this file: GATEWAY_DATABASE_URL (which overrides this key) or libpq's
    # PGPASSWORD / ~/.pgpass. Empty: SQLite at `path`.
    url: str = field(default="", repr=False)
    pool_min: int = 2  # PostgreSQL connections kept open per process
    pool_max: int = 10  # and at most


@dataclass(frozen=True)
class SessionsConfig:
    ttl: int = 120
    retention: int = 900
    # Seconds after completion before a session's row and events are deleted (its personal
    # data went at `retention`); `gateway stats` counts what is still kept. 0: keep forever.
    keep: int = 604_800


@dataclass(frozen=True)
class StreamConfig:
    heartbeat: float = 15
    retry: int = 3000
    # Milliseconds of random extra added to each stream's `retry:` (0 = every stream sends
    # exactly `retry`), another way to spread reconnects after a restart.
    retry_jitter: int = 0
    max_duration: float = 300
    # Events buffered per subscriber before a slow reader is dropped (it reconnects).
    buffer: int = 16


@dataclass(frozen=True)
class PollingConfig:
    max_wait: float = 25


@dataclass(frozen=True)
class LimitsConfig:
    """Abuse limits, per gateway process (config.toml explains each default)."""

    enabled: bool = True
    # Token buckets: `burst` requests at once, refilled at `rate` per minute.
    sessions_per_ip_burst: int = 20
    sessions_per_ip_rate: float = 10
    sessions_per_phone_burst: int = 5
    sessions_per_phone_rate: float = 1
    callbacks_per_ip_burst: int = 500
    callbacks_per_ip_rate: float = 6000
    max_pending_sessions: int = 10_000
    streams_per_ip: int = 100
    streams_total: int = 10_000
    long_polls_per_ip: int = 20
    long_polls_total: int = 2_000
    body_timeout: float = 10
    header_timeout: float = 10
    max_header_bytes: int = 32_768
    max_query_bytes: int = 2_048
    tracked_keys: int = 50_000
    # Client addresses (or CIDRs) the per-address limits skip: loopback, so a proxy on this
    # host whose X-Forwarded-For is not trusted yet does not put every user in one bucket.
    exempt: tuple[str, ...] = ("127.0.0.0/8", "::1")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"  # auto | json | text


@dataclass(frozen=True)
class TruecallerConfig:
    enabled: bool = True
    partner_key: str = ""
    partner_name: str = ""
    lang: str = "en"
    privacy_url: str = ""
    terms_url: str = ""
    callback_timeout: float = 30
    # Seconds a process owns a stored token's profile fetch; on a shared (PostgreSQL) database
    # another instance takes the fetch over once it passed with the session still pending.
    fetch_lease: float = 30
    profile_hosts: tuple[str, ...] = (
        "profile4-noneu.truecaller.com",
        "profile4-eu.truecaller.com",
        "profile4.truecaller.com",
    )
    require_https: bool = True
    require_public_ip: bool = True
    http_timeout: float = 2.5
    login_prefix: str = ""
    login_suffix: str = ""
    cta_prefix: str = ""
    cta_color: str = ""
    cta_text_color: str = ""
    btn_shape: str = ""
    skip_option: str = ""
    ttl: int = 0  # milliseconds the Truecaller dialog stays up; 0 leaves it out of the deep link


@dataclass(frozen=True)
class VeriphoneConfig:
    enabled: bool = True
    api_base: str = "https://service.veriph.one"
    api_key: str = ""
    api_secret: str = ""
    http_timeout: float = 5
    success_url: str = ""
    failure_url: str = ""
    locale: str = "en"


@dataclass(frozen=True)
class ProvidersConfig:
    truecaller: TruecallerConfig = field(default_factory=TruecallerConfig)
    veriphone: VeriphoneConfig = field(default_factory=VeriphoneConfig)


WEBHOOK_EVENTS = ("session.completed",)
WEBHOOK_SECRET_ENV = "GATEWAY_WEBHOOK_SECRET"  # noqa: S105 - the variable's name, not a secret
DATABASE_URL_ENV = "GATEWAY_DATABASE_URL"


@dataclass(frozen=True)
class WebhooksConfig:
    # Where signed outcome events are POSTed; empty = off. https, or http on a loopback host.
    url: str = ""
    timeout: float = 5.0  # seconds per delivery attempt, connect to last byte
    max_attempts: int = 12  # attempts before a delivery is marked failed
    max_age: float = 86_400  # seconds after which an undelivered event is marked failed
    backoff: float = 1.0  # seconds before the first retry; doubles each attempt (with jitter), at most 1 h
    concurrency: int = 4  # deliveries in flight at once
    events: tuple[str, ...] = WEBHOOK_EVENTS
    # The signing secrets (whsec_<base64>), only from the environment: GATEWAY_WEBHOOK_SECRET,
    # several separated by spaces while a secret is rotated (each one signs every delivery).
    secrets: tuple[str, ...] = field(default=(), repr=False, metadata={"env": WEBHOOK_SECRET_ENV})


AUTH_KEYS_ENV = "GATEWAY_API_KEYS"
TICKET_SECRET_ENV = "GATEWAY_TICKET_SECRET"  # noqa: S105 - the variable's name, not a secret


@dataclass(frozen=True)
class AuthConfig:
    # Anonymous POST /v1/sessions is refused (401) unless it has an API key or a start ticket.
    require: bool = False
    ticket_max_age: int = 600  # seconds a start ticket's expiry may lie ahead, at most
    # Only from the environment, several separated by spaces or commas (rotation).
    api_keys: tuple[str, ...] = field(default=(), repr=False, metadata={"env": AUTH_KEYS_ENV})
    ticket_secrets: tuple[str, ...] = field(default=(), repr=False, metadata={"env": TICKET_SECRET_ENV})


@dataclass(frozen=True)
class Settings:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    polling: PollingConfig = field(default_factory=PollingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    providers: ProvidersConfig = field(default_factory=ProvidersConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    source: str = "<defaults>"
    sandbox: bool = False


def load_settings(path: str | None = None, *, env: Mapping[str, str] | None = None) -> Settings:
    """Find, read and validate the config: `path`, else $GATEWAY_CONFIG, else ./config.toml if present."""
    env = os.environ if env is None else env
    explicit = path or env.get(ENV_CONFIG) or None
    candidate = Path(explicit) if explicit else Path("config.toml")
    if explicit and not candidate.is_file():
        raise ConfigError(f"{candidate}: config file not found")
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if candidate.is_file():
        source = str(candidate)
        try:
            with candidate.open("rb") as fh:
                raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: TOML syntax error: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    return settings_from_dict(raw, source=source, env=env)


def settings_from_dict(
    raw: Mapping[str, Any], *, source: str = "<dict>", env: Mapping[str, str] | None = None
) -> Settings:
    env = {} if env is None else env
    merged = _with_secrets(raw, env)
    settings = _build(Settings, merged, prefix="", source=source)
    secrets = tuple(env.get(WEBHOOK_SECRET_ENV, "").split())
    settings = dataclasses.replace(
        settings, source=source, webhooks=dataclasses.replace(settings.webhooks, secrets=secrets)
    )
    settings = dataclasses.replace(
        settings,
        auth=dataclasses.replace(
            settings.auth,
            api_keys=split_secrets(env.get(AUTH_KEYS_ENV, "")),
            ticket_secrets=split_secrets(env.get(TICKET_SECRET_ENV, "")),
        ),
    )
    if urlsplit(settings.database.url).password is not None:
        raise ConfigError(
            f"{source}: database.url: holds a password; put it in {DATABASE_URL_ENV} or PGPASSWORD instead"
        )
    if env.get(DATABASE_URL_ENV):
        settings = dataclasses.replace(
            settings, database=dataclasses.replace(settings.database, url=env[DATABASE_URL_ENV].strip())
        )
    _check(settings)
    return settings


def _with_secrets(raw: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    merged: dict[str, Any] = _deep_copy(raw)
    for keys, var in SECRET_ENV.items():
        value = env.get(var)
        if value:
            node = merged
            for key in keys[:-1]:
                child = node.setdefault(key, {})
                if not isinstance(child, dict):
                    break  # a type error the builder reports with the right key
                node = child
            else:
                node[keys[-1]] = value
    return merged


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


_T = typing.TypeVar("_T")


def _build(cls: type[_T], raw: Mapping[str, Any], *, prefix: str, source: str) -> _T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    # Not from the file: the source and mode the loader sets, and secrets only the environment gives.
    settable = {
        name for name, f in fields.items() if (name not in ("source", "sandbox") or prefix) and "env" not in f.metadata
    }
    for key in raw:
        if key not in settable:
            known = ", ".join(sorted(settable))
            raise ConfigError(f"{source}: {prefix}{key}: unknown key (known here: {known})")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        hint = hints[name]
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {dotted}: expected a table [{dotted}], got {_kind(value)}")
            values[name] = _build(hint, value, prefix=f"{dotted}.", source=source)  # type: ignore[arg-type]
        else:
            values[name] = _coerce(hint, value, dotted, source)
    return cls(**values)


def _kind(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _coerce(hint: Any, value: Any, dotted: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{source}: {dotted}: expected a list of {item.__name__}s, got {_kind(value)}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {dotted}: expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {dotted}: expected an integer, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {dotted}: expected a number, got {_kind(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {dotted}: expected a string, got {_kind(value)}")
        return value
    if isinstance(hint, types.UnionType):  # pragma: no cover - no optional keys today
        raise ConfigError(f"{source}: {dotted}: unsupported type")
    raise ConfigError(f"{source}: {dotted}: unsupported type {hint!r}")  # pragma: no cover


def _check(s: Settings) -> None:
    """Range and cross-key checks; the first failure is raised as one line."""
    src = s.source
    problems: list[tuple[str, bool, str, object]] = [
        ("server.port", 0 <= s.server.port <= 65535, "a port number 0-65535", s.server.port),
        ("server.host", bool(s.server.host.strip()), "a host name or address", s.server.host),
        (
            "server.shutdown_timeout",
            0 < s.server.shutdown_timeout <= 120,
            "seconds > 0 and <= 120",
            s.server.shutdown_timeout,
        ),
        ("database.path", bool(s.database.path.strip()), "a file path (or :memory:)", s.database.path),
        (
            "database.busy_timeout",
            0 <= s.database.busy_timeout <= 600_000,
            "milliseconds 0-600000",
            s.database.busy_timeout,
        ),
        ("sessions.ttl", 1 <= s.sessions.ttl <= 86_400, "seconds from 1 to 86400", s.sessions.ttl),
        (
            "sessions.keep",
            s.sessions.keep == 0 or s.sessions.retention <= s.sessions.keep <= 315_360_000,
            f"0 (keep forever) or seconds from sessions.retention ({s.sessions.retention}) to 315360000",
            s.sessions.keep,
        ),
        (
            "database.max_size_mb",
            0 <= s.database.max_size_mb <= 16_777_216,
            "MiB from 0 (no cap) to 16777216",
            s.database.max_size_mb,
        ),
        (
            "auth.ticket_max_age",
            1 <= s.auth.ticket_max_age <= 86_400,
            "seconds from 1 to 86400",
            s.auth.ticket_max_age,
        ),
        (
            "sessions.retention",
            0 <= s.sessions.retention <= 31_536_000,
            "seconds from 0 to 31536000",
            s.sessions.retention,
        ),
        (
            "stream.heartbeat",
            0 < s.stream.heartbeat < s.stream.max_duration,
            "seconds > 0 and below stream.max_duration",
            s.stream.heartbeat,
        ),
        ("stream.retry", 0 <= s.stream.retry <= 3_600_000, "milliseconds 0-3600000", s.stream.retry),
        (
            "stream.retry_jitter",
            0 <= s.stream.retry_jitter <= 3_600_000,
            "milliseconds 0-3600000",
            s.stream.retry_jitter,
        ),
        (
            "server.shutdown_spread",
            0 <= s.server.shutdown_spread < s.server.shutdown_timeout,
            f"seconds >= 0 and below server.shutdown_timeout ({s.server.shutdown_timeout:g})",
            s.server.shutdown_spread,
        ),
        ("stream.max_duration", 0 < s.stream.max_duration <= 86_400, "seconds > 0 and <= 86400", s.stream.max_duration),
        ("stream.buffer", 2 <= s.stream.buffer <= 1024, "an integer 2-1024", s.stream.buffer),
        ("polling.max_wait", 0 <= s.polling.max_wait <= 300, "seconds 0-300", s.polling.max_wait),
        (
            "logging.level",
            s.logging.level in ("debug", "info", "warning", "error"),
            "one of debug, info, warning, error",
            s.logging.level,
        ),
        ("logging.format", s.logging.format in ("auto", "json", "text"), "one of auto, json, text", s.logging.format),
    ]
    for origin in s.server.cors_allow_origins:
        problems.append(
            (
                "server.cors_allow_origins",
                _is_origin(origin),
                'exact origins like "https://www.example.com" (never "*")',
                origin,
            )
        )
    for proxy in s.server.trusted_proxies:
        problems.append(("server.trusted_proxies", _is_network(proxy), "IP addresses or CIDR networks", proxy))

    tc = s.providers.truecaller
    p = "providers.truecaller."
    problems += [
        (p + "lang", tc.lang in TRUECALLER_LANGS, "one of " + ", ".join(TRUECALLER_LANGS), tc.lang),
        (p + "callback_timeout", 0 < tc.callback_timeout <= 600, "seconds > 0 and <= 600", tc.callback_timeout),
        (p + "http_timeout", 0 < tc.http_timeout <= 60, "seconds > 0 and <= 60", tc.http_timeout),
        (p + "fetch_lease", 1 <= tc.fetch_lease <= 600, "seconds from 1 to 600", tc.fetch_lease),
        (p + "profile_hosts", bool(tc.profile_hosts) or not tc.enabled, "at least one host", list(tc.profile_hosts)),
        (p + "privacy_url", tc.privacy_url == "" or _is_url(tc.privacy_url), "an http(s) URL", tc.privacy_url),
        (p + "terms_url", tc.terms_url == "" or _is_url(tc.terms_url), "an http(s) URL", tc.terms_url),
        (p + "partner_name", len(tc.partner_name) <= 100, "at most 100 characters", tc.partner_name),
        _one_of(p + "login_prefix", tc.login_prefix, TRUECALLER_LOGIN_PREFIXES),
        _one_of(p + "login_suffix", tc.login_suffix, TRUECALLER_LOGIN_SUFFIXES),
        _one_of(p + "cta_prefix", tc.cta_prefix, TRUECALLER_CTA_PREFIXES),
        (p + "cta_color", tc.cta_color == "" or _is_colour(tc.cta_color), 'a colour like "#1a73e8"', tc.cta_color),
        (
            p + "cta_text_color",
            tc.cta_text_color == "" or _is_colour(tc.cta_text_color),
            'a colour like "#ffffff"',
            tc.cta_text_color,
        ),
        _one_of(p + "btn_shape", tc.btn_shape, TRUECALLER_BTN_SHAPES),
        _one_of(p + "skip_option", tc.skip_option, TRUECALLER_SKIP_OPTIONS),
        (p + "ttl", 0 <= tc.ttl <= 600_000, "milliseconds 0-600000 (0 = leave out)", tc.ttl),
    ]
    for host in tc.profile_hosts:
        problems.append((p + "profile_hosts", _is_host_entry(host), '"host" or "host:port" entries', host))

    vp = s.providers.veriphone
    p = "providers.veriphone."
    problems += [
        (
            p + "api_base",
            _is_url(vp.api_base) and not vp.api_base.endswith("/"),
            "an http(s) base URL without trailing slash",
            vp.api_base,
        ),
        (p + "http_timeout", 0 < vp.http_timeout <= 60, "seconds > 0 and <= 60", vp.http_timeout),
        (p + "success_url", vp.success_url == "" or _is_url(vp.success_url), "an absolute http(s) URL", vp.success_url),
        (p + "failure_url", vp.failure_url == "" or _is_url(vp.failure_url), "an absolute http(s) URL", vp.failure_url),
        (p + "locale", 2 <= len(vp.locale) <= 10, "a locale such as en or es", vp.locale),
    ]
    wh = s.webhooks
    p = "webhooks."
    problems += [
        (p + "url", wh.url == "" or _is_webhook_url(wh.url), "empty, an https URL, or http on a loopback host", wh.url),
        (p + "timeout", 0 < wh.timeout <= 60, "seconds > 0 and <= 60", wh.timeout),
        (p + "max_attempts", 1 <= wh.max_attempts <= 100, "an integer 1-100", wh.max_attempts),
        (p + "max_age", 60 <= wh.max_age <= 2_592_000, "seconds from 60 to 2592000 (30 days)", wh.max_age),
        (p + "backoff", 0 < wh.backoff <= 3600, "seconds > 0 and <= 3600", wh.backoff),
        (p + "concurrency", 1 <= wh.concurrency <= 64, "an integer 1-64", wh.concurrency),
    ]
    for event in wh.events:
        problems.append((p + "events", event in WEBHOOK_EVENTS, "a list of " + ", ".join(WEBHOOK_EVENTS), event))
    lim = s.limits
    p = "limits."
    for name in ("sessions_per_ip", "sessions_per_phone", "callbacks_per_ip"):
        burst, rate = getattr(lim, name + "_burst"), getattr(lim, name + "_rate")
        problems += [
            (f"{p}{name}_burst", 1 <= burst <= 1_000_000, "an integer 1-1000000", burst),
            (f"{p}{name}_rate", 0 < rate <= 6_000_000, "a number per minute > 0 and <= 6000000", rate),
        ]
    problems += [
        (
            p + "max_pending_sessions",
            1 <= lim.max_pending_sessions <= 100_000_000,
            "an integer 1-100000000",
            lim.max_pending_sessions,
        ),
        (p + "streams_total", 1 <= lim.streams_total <= 1_000_000, "an integer 1-1000000", lim.streams_total),
        (
            p + "streams_per_ip",
            1 <= lim.streams_per_ip <= lim.streams_total,
            f"an integer from 1 to limits.streams_total ({lim.streams_total})",
            lim.streams_per_ip,
        ),
        (p + "long_polls_total", 1 <= lim.long_polls_total <= 1_000_000, "an integer 1-1000000", lim.long_polls_total),
        (
            p + "long_polls_per_ip",
            1 <= lim.long_polls_per_ip <= lim.long_polls_total,
            f"an integer from 1 to limits.long_polls_total ({lim.long_polls_total})",
            lim.long_polls_per_ip,
        ),
        (p + "body_timeout", 0 < lim.body_timeout <= 600, "seconds > 0 and <= 600", lim.body_timeout),
        (p + "header_timeout", 0 < lim.header_timeout <= 600, "seconds > 0 and <= 600", lim.header_timeout),
        (
            p + "max_header_bytes",
            1024 <= lim.max_header_bytes <= 1_048_576,
            "bytes 1024-1048576",
            lim.max_header_bytes,
        ),
        (p + "max_query_bytes", 256 <= lim.max_query_bytes <= 1_048_576, "bytes 256-1048576", lim.max_query_bytes),
        (p + "tracked_keys", 100 <= lim.tracked_keys <= 10_000_000, "an integer 100-10000000", lim.tracked_keys),
    ]
    for entry in lim.exempt:
        problems.append((p + "exempt", _is_network(entry), "IP addresses or CIDR networks", entry))
    for key, ok, expected, got in problems:
        if not ok:
            raise ConfigError(f"{src}: {key}: expected {expected}, got {got!r}")
    db = s.database
    # A URL may hold a password (from the environment): an error names it, never shows it.
    if db.url and urlsplit(db.url).scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{src}: database.url (or {DATABASE_URL_ENV}): expected postgresql://user@host:port/dbname")
    if not 1 <= db.pool_min <= db.pool_max <= 200:
        raise ConfigError(f"{src}: database.pool_min, pool_max: expected 1 <= pool_min <= pool_max <= 200")
    # The secrets are never echoed, not even in an error.
    for var, values in ((AUTH_KEYS_ENV, s.auth.api_keys), (TICKET_SECRET_ENV, s.auth.ticket_secrets)):
        for number, value in enumerate(values, 1):
            if not strong_enough(value):
                raise ConfigError(
                    f"{var}: value {number} of {len(values)} is too short or too regular: use at least"
                    f" {MIN_SECRET_LENGTH} random characters, e.g. python -c 'import secrets;"
                    " print(secrets.token_urlsafe(32))'"
                )
    if s.auth.require and not (s.auth.api_keys or s.auth.ticket_secrets):
        raise ConfigError(
            f"{src}: auth.require is true, but neither {AUTH_KEYS_ENV} nor {TICKET_SECRET_ENV} is set:"
            " nobody could start a session"
        )
    if wh.url and not wh.secrets:
        raise ConfigError(f"{src}: webhooks.url is set, but {WEBHOOK_SECRET_ENV} is not (whsec_<base64>)")
    for number, secret in enumerate(wh.secrets, 1):
        if not _is_webhook_secret(secret):
            raise ConfigError(
                f"{WEBHOOK_SECRET_ENV}: secret {number} of {len(wh.secrets)} is not whsec_ followed by the"
                " base64 of 24 to 64 random bytes"
            )


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> tuple[str, bool, str, object]:
    """An optional documented value: empty leaves the parameter out of the deep link."""
    return key, value in ("", *choices), "empty or one of " + ", ".join(choices), value


def _is_webhook_url(value: str) -> bool:
    """https anywhere; plain http only to a loopback host (tests, a receiver on the same machine)."""
    if not _is_url(value):
        return False
    parts = urlsplit(value)
    if parts.scheme == "https":
        return True
    host = (parts.hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_webhook_secret(value: str) -> bool:
    if not value.startswith("whsec_"):
        return False
    try:
        key = base64.b64decode(value[len("whsec_") :], validate=True)
    except ValueError:
        return False
    return 24 <= len(key) <= 64


def _is_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.username
    except ValueError:  # e.g. an unclosed "[" in the host
        return False


def _is_origin(value: str) -> bool:
    if not _is_url(value):
        return False
    parts = urlsplit(value)
    return (
        parts.path == ""
        and not parts.query
        and not parts.fragment
        and value == value.strip()
        and value.lower() == f"{parts.scheme}://{parts.netloc}".lower()
    )


def _is_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def _is_colour(value: str) -> bool:
    body = value[1:] if value.startswith("#") else ""
    return len(body) in (3, 6, 8) and all(c in "0123456789abcdefABCDEF" for c in body)


def _is_host_entry(value: str) -> bool:
    """`host` or `host:port`, ASCII letters, digits, dots and hyphens (what the endpoint check can match)."""
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if value.count(":") == 1 and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return False
    return bool(host) and host.isascii() and all(c.isalnum() or c in ".-" for c in host)
