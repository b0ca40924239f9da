"""The client address behind trusted proxies, table-driven: X-Forwarded-For is believed only from them."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.clientip import client_ip, parse_ip, parse_networks

PROXIES = ("10.0.0.0/8", "192.0.2.7", "2001:db8:ffff::/48")

CASES = [
    # (why, peer, X-Forwarded-For, trusted, expected)
    ("no proxies configured: header ignored", "203.0.113.9", "198.51.100.1", (), "203.0.113.9"),
    ("untrusted peer: header ignored", "203.0.113.9", "198.51.100.1", PROXIES, "203.0.113.9"),
    ("trusted peer without header", "10.1.2.3", None, PROXIES, "10.1.2.3"),
    ("trusted peer, empty header", "10.1.2.3", "", PROXIES, "10.1.2.3"),
    ("trusted peer (CIDR): right-most entry", "10.1.2.3", "198.51.100.1", PROXIES, "198.51.100.1"),
    ("trusted peer (single address)", "192.0.2.7", "198.51.100.1", PROXIES, "198.51.100.1"),
    ("spoofed left entries are not believed", "10.1.2.3", "1.1.1.1, 6.6.6.6, 198.51.100.1", PROXIES, "198.51.100.1"),
    ("trusted hops are skipped", "10.1.2.3", "1.1.1.1, 198.51.100.1, 10.9.9.9, 192.0.2.7", PROXIES, "198.51.100.1"),
    ("all hops trusted: the left-most", "10.1.2.3", "10.0.0.5, 10.0.0.6", PROXIES, "10.0.0.5"),
    ("garbage right-most: the peer", "10.1.2.3", "198.51.100.1, unknown", PROXIES, "10.1.2.3"),
    ("garbage behind a trusted hop: that hop", "10.1.2.3", "evil, 10.0.0.6", PROXIES, "10.0.0.6"),
    ("spaces and empty elements", "10.1.2.3", " 198.51.100.1 ,, ", PROXIES, "198.51.100.1"),
    ("IPv4 with a port", "10.1.2.3", "198.51.100.1:5678", PROXIES, "198.51.100.1"),
    ("IPv6 entry", "10.1.2.3", "2001:db8:1::5", PROXIES, "2001:db8:1::5"),
    ("bracketed IPv6 with a port", "10.1.2.3", "[2001:db8:1::5]:443", PROXIES, "2001:db8:1::5"),
    ("IPv6 trusted peer", "2001:db8:ffff::1", "203.0.113.5", PROXIES, "203.0.113.5"),
    ("IPv4-mapped peer matches IPv4 proxy", "::ffff:10.1.2.3", "203.0.113.5", PROXIES, "203.0.113.5"),
    ("IPv4-mapped peer is reported as IPv4", "::ffff:203.0.113.9", None, (), "203.0.113.9"),
    ("IPv4-mapped entry is reported as IPv4", "10.1.2.3", "::ffff:198.51.100.1", PROXIES, "198.51.100.1"),
    ("IPv6 proxy does not cover IPv4", "198.51.100.1", "203.0.113.5", ("::/0",), "198.51.100.1"),
    ("no peer", None, "198.51.100.1", PROXIES, None),
    ("unusable peer", "testclient", "198.51.100.1", PROXIES, None),
    ("zone id dropped", "fe80::1%eth0", None, (), "fe80::1"),
]


@pytest.mark.parametrize(("why", "peer", "xff", "trusted", "expected"), CASES, ids=[c[0] for c in CASES])
def test_client_ip(why: str, peer: str | None, xff: str | None, trusted: tuple[str, ...], expected: str | None) -> None:
    assert client_ip(peer, xff, trusted) == expected


def test_parsed_networks_give_the_same_answers() -> None:
    networks = parse_networks(PROXIES)
    for _why, peer, xff, trusted, expected in CASES:
        if trusted == PROXIES:
            assert client_ip(peer, xff, networks) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("198.51.100.1", "198.51.100.1"),
        (" 198.51.100.1 ", "198.51.100.1"),
        ("198.51.100.1:80", "198.51.100.1"),
        ("[::1]:80", "::1"),
        ("::1", "::1"),
        ("unknown", None),
        ("", None),
        ("_hidden", None),
        ("999.1.1.1", None),
        ("[::1", None),
    ],
)
def test_parse_ip(raw: str, expected: str | None) -> None:
    parsed = parse_ip(raw)
    assert (str(parsed) if parsed is not None else None) == expected
    if parsed is not None:
        assert isinstance(parsed, ipaddress.IPv4Address | ipaddress.IPv6Address)
