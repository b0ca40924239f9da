"""Vet a provider-supplied URL before any credential is sent to it.

Truecaller's callback is unsigned and names the host the Bearer token goes to, so the
URL is attacker-controlled input: every rule here fails closed, the URL is parsed by
hand and cross-checked against urllib, and the host is resolved once so the fetch can
connect to exactly the addresses that were checked (no second, rebindable lookup).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.errors import BadRequest

Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"https": 443, "http": 80}

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# A last label like "1" or "0x7f" makes inet_aton read the name as an IPv4 number.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class CheckedEndpoint:
    url: str
    scheme: str
    host: str
    port: int
    target: str
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        """`host[:port]` as the server expects it in `Host`, IPv6 bracketed, default port omitted."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


@functools.lru_cache(maxsize=64)
def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` → (normalised host, port or None); ValueError if malformed."""
    host, port = _split_authority(entry)
    return _normalise_host(host), port


async def check_endpoint(
    url: object,
    *,
    allowed_hosts: Sequence[str],
    require_https: bool,
    require_public_ip: bool,
    resolve: Resolver | None = None,
    resolve_timeout: float = 2.0,
) -> CheckedEndpoint:
    """Validate `url` against the allow-list and resolve it; BadRequest("invalid_endpoint") otherwise."""
    scheme, host, port, target = _parse(url, require_https=require_https)
    if not _allowed(host, port, scheme, allowed_hosts):
        raise _invalid("host is not an allowed profile host")
    literal = _ip_literal(host)
    if literal is not None:
        raw = [host]
    else:
        try:
            async with asyncio.timeout(resolve_timeout):
                raw = await (resolve or _getaddrinfo)(host, port)
        except (OSError, TimeoutError, UnicodeError, ValueError):
            raise _invalid("host could not be resolved") from None
    addresses = _vet_addresses(raw, require_public_ip=require_public_ip)
    url_host = f"[{host}]" if ":" in host else host
    shown_port = "" if port == DEFAULT_PORTS[scheme] else f":{port}"
    return CheckedEndpoint(
        url=f"{scheme}://{url_host}{shown_port}{target}",
        scheme=scheme,
        host=host,
        port=port,
        target=target,
        addresses=addresses,
    )


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _invalid(reason: str) -> BadRequest:
    # Never echo the URL: it is attacker-chosen and may carry a token or personal data.
    return BadRequest("invalid_endpoint", f"The profile endpoint was refused: {reason}.")


def _parse(url: object, *, require_https: bool) -> tuple[str, str, int, str]:
    if not isinstance(url, str):
        raise _invalid("it is not a string")
    return _parse_text(url, require_https)


# Pure, and Truecaller sends a handful of distinct URLs: without the cache every callback
# paid ~40 µs here. Refusals raise, so only accepted parses are cached.
@functools.lru_cache(maxsize=256)
def _parse_text(url: str, require_https: bool) -> tuple[str, str, int, str]:
    if not url or len(url) > MAX_URL_LENGTH:
        raise _invalid("it is empty or too long")
    # Printable ASCII only: rules out whitespace, control characters and IDN tricks.
    if any(not 0x21 <= ord(c) <= 0x7E for c in url):
        raise _invalid("it contains whitespace, control or non-ASCII characters")
    if "\\" in url:
        raise _invalid("it contains a backslash")
    if "#" in url:
        raise _invalid("it has a fragment")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    allowed_schemes = ("https",) if require_https else ("https", "http")
    if not sep or scheme not in allowed_schemes:
        raise _invalid("the scheme is not " + " or ".join(allowed_schemes))
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, target = rest[:cut], rest[cut:]
    if "@" in authority:
        raise _invalid("it carries user information")
    if "%" in authority:
        raise _invalid("the host is percent-encoded")
    try:
        raw_host, explicit_port = _split_authority(authority)
        host = _normalise_host(raw_host)
    except ValueError:
        raise _invalid("the host or port is malformed") from None
    port = DEFAULT_PORTS[scheme] if explicit_port is None else explicit_port
    if require_https and port != 443:
        raise _invalid("the port is not 443")
    if target.startswith("?"):
        target = "/" + target
    target = target or "/"
    # Cross-check with the standard parser: any disagreement means an ambiguous URL.
    try:
        split = urlsplit(url)
        split_port = split.port
    except ValueError:
        raise _invalid("the URL is ambiguous") from None
    split_host = _normalise_host(split.hostname or "") if split.hostname else ""
    if (
        split.scheme.lower() != scheme
        or split.username is not None
        or split.fragment
        or split_host != host
        or (split_port if split_port is not None else DEFAULT_PORTS[scheme]) != port
    ):
        raise _invalid("the URL is ambiguous")
    return scheme, host, port, target


def _split_authority(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError("unclosed bracket")
        host, rest = authority[1:end], authority[end + 1 :]
        if not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            raise ValueError("brackets around a non-IPv6 host")
    else:
        host, colon, port_text = authority.partition(":")
        rest = colon + port_text
        if ":" in port_text:
            raise ValueError("bare IPv6 or several ports")
    if not rest:
        return host, None
    if not rest.startswith(":") or not _PORT.fullmatch(rest[1:]) or int(rest[1:]) > 65535:
        raise ValueError("bad port")
    return host, int(rest[1:])


def _normalise_host(host: str) -> str:
    host = host.lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not host:
        raise ValueError("empty host")
    literal = _ip_literal(host)
    if literal is not None:
        return literal
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("not a DNS name")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise ValueError("numeric host that is not a canonical IP literal")
    return host


@functools.lru_cache(maxsize=256)
def _ip_literal(host: str) -> str | None:
    """The canonical text of an IP literal, or None; only canonical forms count as literals."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv4Address) and str(ip) != host:
        return None
    return str(ip)


def _allowed(host: str, port: int, scheme: str, allowed_hosts: Sequence[str]) -> bool:
    for entry in allowed_hosts:
        try:
            entry_host, entry_port = parse_host_entry(entry)
        except ValueError:
            continue  # a malformed entry can never match; config validation reports it
        wanted_port = DEFAULT_PORTS[scheme] if entry_port is None else entry_port
        if entry_host == host and wanted_port == port:
            return True
    return False


def _vet_addresses(raw: list[str], *, require_public_ip: bool) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise _invalid("host could not be resolved")
    addresses: list[str] = []
    for text in raw:
        try:
            if not isinstance(text, str) or "%" in text:
                raise ValueError("zoned or not text")
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise _invalid("host resolved to an unusable address") from None
        if require_public_ip and not _is_public(ip):
            raise _invalid("host resolved to a non-public address")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # the same host; connecting over IPv4 avoids needing an IPv6 route
        if str(ip) not in addresses:
            addresses.append(str(ip))
    return tuple(addresses)


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses that embed an IPv4 one reach it through a translator: judge that too.
        embedded = [ip.ipv4_mapped, ip.sixtofour]
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(_is_public(v4) for v4 in embedded if v4 is not None)
    return True
