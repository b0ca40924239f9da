"""The Truecaller endpoint check: only allowed hosts, https on 443, global addresses, hostile URLs refused."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import BadRequest
from gateway.providers.truecaller.endpoint_guard import CheckedEndpoint, check_endpoint, parse_host_entry

pytestmark = pytest.mark.timeout(5)

HOSTS = ["profile4-noneu.truecaller.com", "profile4-eu.truecaller.com", "profile4.truecaller.com"]
PUBLIC = "157.240.1.1"


class FakeResolver:
    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host in self.answers:
            return self.answers[host]
        if host.endswith("truecaller.com"):
            return [PUBLIC]
        raise OSError("no such host")


async def check(url: object, *, hosts: list[str] = HOSTS, https: bool = True, public: bool = True) -> CheckedEndpoint:
    return await check_endpoint(
        url, allowed_hosts=hosts, require_https=https, require_public_ip=public, resolve=FakeResolver()
    )


HOSTILE: list[str | object] = [
    "https://profile4-noneu.truecaller.com.evil.test/",
    "https://evil.test/profile4-noneu.truecaller.com",
    "https://profile4-noneu.truecaller.com@evil.test/",
    "https://@profile4-noneu.truecaller.com/",
    "https://user:pw@profile4-noneu.truecaller.com/",
    "https://evil.test#@profile4-noneu.truecaller.com",
    "https://profile4-noneu.truecaller.com/v1/default#x",
    "https://profile4-noneu.truecaller.com/#",
    "https://[::1]/",
    "https://[::ffff:127.0.0.1]/",
    "https://127.0.0.1/",
    "https://0x7f.0.0.1/",
    "https://2130706433/",
    "https://127.1/",
    "https://0177.0.0.1/",
    "http://profile4-noneu.truecaller.com/",
    "https://profile4-noneu.truecaller.com:8443/",
    "https://profile4-noneu.truecaller.com:0443/",
    "https://profile4-noneu.truecaller.com:/",
    "https://profile4-noneu.truecaller.com:443:443/",
    "https://profile4-noneu.truecaller.com:99999/",
    "https://profile4-noneu.truecaller.com\\@evil.test/",
    "https://evil.test\\profile4-noneu.truecaller.com/",
    "https://profile4-noneu.truecaller.com /",
    "https://profile4-noneu.truecaller.com/v1/de fault",
    "https://profile4-noneu.truecaller.com\t/",
    "https://profile4-noneu.truecaller.com\n.evil.test/",
    "https://profile4-noneu.truecaller.com\x00.evil.test/",
    "https://profile4-noneu.truecaller.com%2eevil.test/",
    "https://profile4%2dnoneu.truecaller.com/",
    "https://pr\u043efile4-noneu.truecaller.com/",  # Cyrillic o
    "https://profile4-noneu.truecaller.com../",
    "https://.profile4-noneu.truecaller.com/",
    "https://truecaller.com/",
    "https://evil.test/",
    "https:///profile4-noneu.truecaller.com/",
    "https:/profile4-noneu.truecaller.com/",
    "https:profile4-noneu.truecaller.com/",
    "//profile4-noneu.truecaller.com/",
    "profile4-noneu.truecaller.com/v1/default",
    "ftp://profile4-noneu.truecaller.com/",
    "javascript:alert(1)",
    "",
    "https://profile4-noneu.truecaller.com/" + "a" * 2048,
    None,
    42,
    b"https://profile4-noneu.truecaller.com/",
    ["https://profile4-noneu.truecaller.com/"],
]


@pytest.mark.parametrize("url", HOSTILE)
async def test_hostile_endpoint_is_refused(url: object) -> None:
    resolver = FakeResolver()
    with pytest.raises(BadRequest) as caught:
        await check_endpoint(url, allowed_hosts=HOSTS, require_https=True, require_public_ip=True, resolve=resolver)
    assert caught.value.code == "invalid_endpoint"
    assert caught.value.status_code == 400
    assert "evil" not in caught.value.message and "truecaller" not in caught.value.message
    assert resolver.calls == []  # refused before any lookup


async def test_valid_endpoint() -> None:
    endpoint = await check("https://profile4-noneu.truecaller.com/v1/default")
    assert endpoint == CheckedEndpoint(
        url="https://profile4-noneu.truecaller.com/v1/default",
        scheme="https",
        host="profile4-noneu.truecaller.com",
        port=443,
        target="/v1/default",
        addresses=(PUBLIC,),
    )
    assert endpoint.host_header == "profile4-noneu.truecaller.com"


@pytest.mark.parametrize(
    ("url", "host", "target"),
    [
        ("https://PROFILE4-EU.truecaller.com:443/v1/default", "profile4-eu.truecaller.com", "/v1/default"),
        ("HTTPS://profile4-eu.truecaller.com./v1/default", "profile4-eu.truecaller.com", "/v1/default"),
        ("https://profile4.truecaller.com", "profile4.truecaller.com", "/"),
        ("https://profile4.truecaller.com?x=1", "profile4.truecaller.com", "/?x=1"),
        ("https://profile4.truecaller.com/v1/default?a=b&c=d", "profile4.truecaller.com", "/v1/default?a=b&c=d"),
    ],
)
async def test_valid_variants_are_normalised(url: str, host: str, target: str) -> None:
    endpoint = await check(url)
    assert (endpoint.scheme, endpoint.host, endpoint.port, endpoint.target) == ("https", host, 443, target)
    assert endpoint.url == f"https://{host}{target}"


async def test_allow_list_entry_with_trailing_dot_and_case() -> None:
    endpoint = await check("https://profile4.truecaller.com/", hosts=["Profile4.Truecaller.com."])
    assert endpoint.host == "profile4.truecaller.com"


async def test_loopback_sandbox_entry_with_port() -> None:
    endpoint = await check("http://127.0.0.1:8123/x", hosts=["127.0.0.1:8123"], https=False, public=False)
    assert (endpoint.scheme, endpoint.host, endpoint.port, endpoint.target) == ("http", "127.0.0.1", 8123, "/x")
    assert endpoint.addresses == ("127.0.0.1",)
    assert endpoint.host_header == "127.0.0.1:8123"
    assert endpoint.url == "http://127.0.0.1:8123/x"


@pytest.mark.parametrize(
    ("url", "hosts", "https"),
    [
        ("http://127.0.0.1:8124/x", ["127.0.0.1:8123"], False),  # other port
        ("http://127.0.0.1/x", ["127.0.0.1:8123"], False),  # a host:port entry needs that port
        ("http://127.0.0.1:8123/x", ["127.0.0.1"], False),  # a bare entry only matches the default port
        ("http://127.0.0.2:8123/x", ["127.0.0.1:8123"], False),
        ("http://localhost:8123/x", ["127.0.0.1:8123"], False),
        ("http://2130706433:8123/x", ["127.0.0.1:8123"], False),
        ("http://profile4.truecaller.com:8080/", ["profile4.truecaller.com"], False),
        ("http://127.0.0.1:8123/x", ["127.0.0.1:8123"], True),  # require_https still on
        ("https://127.0.0.1:8123/x", ["127.0.0.1:8123"], True),  # https, but not port 443
    ],
)
async def test_entry_rules(url: str, hosts: list[str], https: bool) -> None:
    with pytest.raises(BadRequest):
        await check(url, hosts=hosts, https=https, public=False)


async def test_http_with_bare_entry_uses_port_80() -> None:
    endpoint = await check("http://profile4.truecaller.com/", https=False)
    assert endpoint.port == 80 and endpoint.host_header == "profile4.truecaller.com"


async def test_loopback_literal_refused_when_public_ip_required() -> None:
    with pytest.raises(BadRequest):
        await check("http://127.0.0.1:8123/x", hosts=["127.0.0.1:8123"], https=False, public=True)


async def test_ipv6_literal_entry() -> None:
    endpoint = await check("http://[::1]:8123/x", hosts=["[::1]:8123"], https=False, public=False)
    assert endpoint.host == "::1" and endpoint.host_header == "[::1]:8123" and endpoint.addresses == ("::1",)


@pytest.mark.parametrize(
    "answers",
    [
        ["127.0.0.1"],
        ["10.0.0.1"],
        ["192.168.1.10"],
        ["169.254.169.254"],
        ["100.64.0.1"],
        ["0.0.0.0"],
        ["224.0.0.1"],
        ["::1"],
        ["fe80::1"],
        ["fc00::1"],
        ["::ffff:127.0.0.1"],
        ["::ffff:10.0.0.1"],
        ["64:ff9b::7f00:1"],
        ["2002:7f00:1::"],
        [PUBLIC, "10.0.0.1"],
        ["10.0.0.1", PUBLIC],
        [PUBLIC, "::1"],
        [],
        ["not-an-ip"],
        ["fe80::1%eth0"],
    ],
)
async def test_non_public_resolution_is_refused(answers: list[str]) -> None:
    resolver = FakeResolver({"profile4.truecaller.com": answers})
    with pytest.raises(BadRequest) as caught:
        await check_endpoint(
            "https://profile4.truecaller.com/v1/default",
            allowed_hosts=HOSTS,
            require_https=True,
            require_public_ip=True,
            resolve=resolver,
        )
    assert caught.value.code == "invalid_endpoint"
    assert resolver.calls == [("profile4.truecaller.com", 443)]


async def test_public_answers_are_kept_in_order_without_duplicates() -> None:
    answers = [PUBLIC, "2a03:2880:f10c:83:face:b00c:0:25de", PUBLIC, "::ffff:8.8.8.8"]
    resolver = FakeResolver({"profile4.truecaller.com": answers})
    endpoint = await check_endpoint(
        "https://profile4.truecaller.com/",
        allowed_hosts=HOSTS,
        require_https=True,
        require_public_ip=True,
        resolve=resolver,
    )
    assert endpoint.addresses == (PUBLIC, "2a03:2880:f10c:83:face:b00c:0:25de", "8.8.8.8")


async def test_private_answer_allowed_when_public_ip_not_required() -> None:
    resolver = FakeResolver({"profile.test": ["127.0.0.1"]})
    endpoint = await check_endpoint(
        "http://profile.test:9000/p",
        allowed_hosts=["profile.test:9000"],
        require_https=False,
        require_public_ip=False,
        resolve=resolver,
    )
    assert endpoint.addresses == ("127.0.0.1",) and endpoint.host_header == "profile.test:9000"


async def test_resolution_failure() -> None:
    async def broken(host: str, port: int) -> list[str]:
        raise OSError("boom")

    with pytest.raises(BadRequest):
        await check_endpoint(
            "https://profile4.truecaller.com/",
            allowed_hosts=HOSTS,
            require_https=True,
            require_public_ip=True,
            resolve=broken,
        )


async def test_resolution_timeout() -> None:
    async def hangs(host: str, port: int) -> list[str]:
        await asyncio.Event().wait()
        return []

    with pytest.raises(BadRequest):
        await check_endpoint(
            "https://profile4.truecaller.com/",
            allowed_hosts=HOSTS,
            require_https=True,
            require_public_ip=True,
            resolve=hangs,
            resolve_timeout=0.05,
        )


async def test_default_resolver_handles_literal_without_dns() -> None:
    endpoint = await check_endpoint(
        "http://127.0.0.1:8123/", allowed_hosts=["127.0.0.1:8123"], require_https=False, require_public_ip=False
    )
    assert endpoint.addresses == ("127.0.0.1",)


async def test_default_resolver_localhost() -> None:
    with pytest.raises(BadRequest):
        await check_endpoint(
            "https://localhost/", allowed_hosts=["localhost"], require_https=True, require_public_ip=True
        )


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("profile4.truecaller.com", ("profile4.truecaller.com", None)),
        ("Profile4.Truecaller.com.:443", ("profile4.truecaller.com", 443)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:8080", ("::1", 8080)),
    ],
)
def test_parse_host_entry(entry: str, parsed: tuple[str, int | None]) -> None:
    assert parse_host_entry(entry) == parsed


@pytest.mark.parametrize("entry", ["", "host:", "host:0", "host:x", "::1", "a b", "*.truecaller.com", "0x7f.0.0.1"])
def test_parse_host_entry_rejects(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_host_entry(entry)
