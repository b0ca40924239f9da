"""The client's IP address as the gateway sees it: X-Forwarded-For only from trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """`server.trusted_proxies` entries (addresses or CIDRs, validated by the config) as networks."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def parse_ip(value: str) -> IPAddress | None:
    """An address from a peer or an X-Forwarded-For entry; tolerates a port and brackets, None if unusable."""
    text = value.strip()
    if text.startswith("["):  # "[2001:db8::1]:443" as some proxies write IPv6 with a port
        text, closed, _ = text[1:].partition("]")
        if not closed:
            return None
    elif text.count(":") == 1:  # "203.0.113.9:5678"; bare IPv6 has two or more colons
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])  # no zone ids: they are host-local
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; compare and report them as IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, trusted: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def client_ip(peer: str | None, xff_header: str | None, trusted: Iterable[str | IPNetwork]) -> str | None:
    """The right-most X-Forwarded-For address that is not a trusted proxy, if the peer is one; else the peer.

    The header is a list anyone can prepend to, so it is read from the right and only as far
    as trusted proxies vouch for it. An unparseable entry stops the walk: nothing left of it
    was vouched for, so the last address that was (the proxy that wrote it) is the answer.
    None when not even the peer is a usable address.
    """
    networks = tuple(ipaddress.ip_network(t, strict=False) if isinstance(t, str) else t for t in trusted)
    peer_ip = parse_ip(peer) if peer else None
    if peer_ip is None:
        return None
    if not xff_header or not _trusted(peer_ip, networks):
        return str(peer_ip)
    last = peer_ip
    for entry in reversed(xff_header.split(",")):
        if not entry.strip():
            continue  # "a, , b" or a trailing comma: an empty element, not a hop
        address = parse_ip(entry)
        if address is None:
            break
        last = address
        if not _trusted(address, networks):
            break
    # Reaching the left end means every hop was a trusted proxy: the left-most is the origin.
    return str(last)
