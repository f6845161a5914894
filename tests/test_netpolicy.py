"""The SSRF policy, address by address: pure, no DNS lookup and no packet sent."""

from __future__ import annotations

import ipaddress

import pytest

from streams.netpolicy import (
    AddressPolicy,
    embedded_ipv4,
    forbidden_reason,
    parse_address,
    parse_host_address,
    parse_ipv4_loose,
)
from streams.settings import Settings

FORBIDDEN = [
    # IPv4
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "CGNAT"),
    ("100.100.100.200", "CGNAT"),  # Alibaba Cloud's metadata service
    ("127.0.0.1", "loopback"),
    ("127.0.0.2", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.169.254", "cloud metadata"),
    ("169.254.0.1", "link-local"),
    ("192.0.0.8", "IETF"),
    ("192.0.2.10", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("192.88.99.1", "6to4 relay"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    # IPv6
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("febf::1", "link-local"),
    ("fec0::1", "site-local"),
    ("fc00::1", "unique local"),
    ("fd00:ec2::254", "unique local"),  # AWS' IPv6 metadata endpoint
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("2001:2::1", "benchmarking"),
    ("100::1", "discard"),
    ("64:ff9b:1::a00:1", "NAT64 local-use"),
    ("4000::1", "reserved"),  # outside 2000::/3: not global unicast
    # IPv6 forms that carry an IPv4 address: judged by it
    ("::ffff:127.0.0.1", "IPv4-mapped loopback (127.0.0.1)"),
    ("::ffff:7f00:2", "IPv4-mapped loopback (127.0.0.2)"),
    ("::ffff:169.254.169.254", "IPv4-mapped cloud metadata"),
    ("::ffff:10.1.2.3", "IPv4-mapped private"),
    ("::ffff:0:10.1.2.3", "IPv4-translated private"),
    ("::127.0.0.1", "IPv4-compatible loopback"),
    ("::10.0.0.1", "IPv4-compatible private"),
    ("::0.0.0.2", "IPv4-compatible unspecified"),
    ("2002:7f00:1::", "6to4 loopback (127.0.0.1)"),
    ("2002:a9fe:a9fe::1", "6to4 cloud metadata (169.254.169.254)"),
    ("2002:c0a8:0101::", "6to4 private (192.168.1.1)"),
    ("64:ff9b::127.0.0.1", "NAT64 loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64 cloud metadata"),
    ("64:ff9b::192.168.0.1", "NAT64 private"),
    # Teredo: server 65.54.227.120 (public), client obfuscated 127.0.0.1 / 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo loopback (127.0.0.1)"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "Teredo private (10.0.0.1)"),
]

PUBLIC = [
    "1.1.1.1",
    "8.8.8.8",
    "93.184.216.34",
    "172.32.0.1",  # just outside 172.16/12
    "100.128.0.1",  # just outside 100.64/10
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",  # mapped, carrying a public address
    "64:ff9b::8.8.8.8",  # NAT64 of a public address
    "2002:0808:0808::1",  # 6to4 of 8.8.8.8
]


@pytest.mark.parametrize(("addr", "reason"), FORBIDDEN)
def test_forbidden_addresses(addr: str, reason: str) -> None:
    got = forbidden_reason(parse_address(addr))
    assert got is not None, addr
    assert reason in got, (addr, got)
    assert AddressPolicy().refusal(addr, parse_address(addr)) is not None


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_addresses(addr: str) -> None:
    assert forbidden_reason(parse_address(addr)) is None, addr
    assert AddressPolicy().refusal("example.org", parse_address(addr)) is None


def test_teredo_is_judged_by_both_addresses() -> None:
    # client 192.0.2.45 (documentation range, obfuscated as 3fff:fdd2): refused
    addr = parse_address("2001:0:4136:e378:8000:63bf:3fff:fdd2")
    form, carried = embedded_ipv4(addr) or ("", ())
    assert form == "Teredo"
    assert carried == (ipaddress.IPv4Address("65.54.227.120"), ipaddress.IPv4Address("192.0.2.45"))
    assert "Teredo documentation" in (forbidden_reason(addr) or "")
    public = parse_address("2001:0:4136:e378:8000:63bf:f7f7:f7f7")  # client 8.8.8.8
    assert forbidden_reason(public) is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("2130706434", "127.0.0.2"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0177.0.0.02", "127.0.0.2"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("0x", "0.0.0.0"),
        ("169.254.43518", "169.254.169.254"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("127.0.0.1.", "127.0.0.1"),
        ("1.2.3.4", "1.2.3.4"),
    ],
)
def test_odd_ipv4_spellings_are_addresses(host: str, expected: str) -> None:
    assert parse_ipv4_loose(host) == ipaddress.IPv4Address(expected)
    assert parse_host_address(host) == ipaddress.IPv4Address(expected)


@pytest.mark.parametrize(
    "host",
    ["example.org", "1.2.3.4.5", "256.1.1.1", "1.2.3.256", "08.0.0.1", "0x1g", "1..2", "", "a1"],
)
def test_names_are_not_addresses(host: str) -> None:
    assert parse_ipv4_loose(host) is None


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://127.0.0.1/", "loopback"),
        ("http://2130706433/", "loopback"),
        ("http://0177.0.0.1:8080/x", "loopback"),
        ("http://0x7f.1/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "IPv4-mapped loopback"),
        ("http://[::ffff:7f00:1]/", "IPv4-mapped loopback"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://[fd00:ec2::254]/", "unique local"),
        ("http://user:pw@10.0.0.1/", "private"),
        ("https://[fe80::1%25eth0]/", "link-local"),
        ("ftp://example.org/x", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://example.org/", "scheme 'gopher'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("http:///nohost", "no host"),
    ],
)
def test_url_refusals(url: str, refused: str) -> None:
    got = AddressPolicy().url_refusal(url)
    assert got is not None and refused in got, (url, got)


def test_names_pass_the_url_check_and_are_judged_at_connect_time() -> None:
    assert AddressPolicy().url_refusal("https://example.org/page") is None
    assert AddressPolicy().url_refusal("http://localhost:8000/") is None  # resolved later


def test_allow_list() -> None:
    policy = AddressPolicy.parse(" 127.0.0.1/32, 10.0.0.0/8 ,wiki.corp.example, *.intra.example,")
    lo, lo2 = parse_address("127.0.0.1"), parse_address("127.0.0.2")
    assert policy.refusal("127.0.0.1", lo) is None
    assert policy.refusal("127.0.0.2", lo2) is not None
    assert policy.refusal("x", parse_address("::ffff:127.0.0.1")) is None  # carried address
    assert policy.refusal("x", parse_address("::ffff:127.0.0.2")) is not None
    assert policy.refusal("x", parse_address("10.9.8.7")) is None
    assert policy.refusal("x", parse_address("169.254.169.254")) is not None
    assert policy.refusal("x", parse_address("::1")) is not None  # v6 loopback not listed
    # a host name entry allows that name whatever it resolves to; *. allows the names under
    assert policy.refusal("wiki.corp.example", parse_address("192.168.5.5")) is None
    assert policy.refusal("WIKI.corp.example.", parse_address("192.168.5.5")) is None
    assert policy.refusal("evil.wiki.corp.example", parse_address("192.168.5.5")) is not None
    assert policy.refusal("a.b.intra.example", parse_address("172.16.0.9")) is None
    assert policy.refusal("intra.example", parse_address("172.16.0.9")) is not None
    assert policy.url_refusal("http://127.0.0.1:1234/") is None
    assert policy.url_refusal("http://2130706434:1234/") is not None
    empty = AddressPolicy.parse("")
    assert empty == AddressPolicy()
    assert empty.refusal("localhost", lo) is not None


@pytest.mark.parametrize(
    "entry", ["127.0.0.1/33", "999.1.1.1", "not a host", "a..b", "*.", "1.2.3"]
)
def test_allow_list_typos_are_errors(entry: str) -> None:
    with pytest.raises(ValueError, match="fetch allow list"):
        AddressPolicy.parse(entry)
    with pytest.raises(ValueError):
        Settings(fetch_allow=entry)


def test_the_guard_is_on_by_default() -> None:
    assert Settings.model_fields["fetch_allow"].default == ""
    assert Settings(fetch_allow="").fetch_policy.url_refusal("http://127.0.0.1/") is not None


# --- file:// URLs: only under a directory the allow list names ---------------------------


def test_file_urls_are_refused_without_a_directory_in_the_allow_list() -> None:
    for allow in ("", "127.0.0.1/32,wiki.corp.example"):
        got = AddressPolicy.parse(allow).file_refusal("file:///srv/docs/a.md")
        assert got is not None and "RAGSTREAM_FETCH_ALLOW" in got
    # and an http(s) check never lets a file URL through, allowed directory or not
    with_dir = AddressPolicy.parse("file:///srv/docs")
    assert "scheme 'file'" in (with_dir.url_refusal("file:///srv/docs/a.md") or "")


def test_a_file_entry_allows_its_directory_and_nothing_beside_it() -> None:
    policy = AddressPolicy.parse("127.0.0.1/32, file:///srv/Docs/ ,file://localhost/opt/x%20y")
    assert policy.file_roots == ("/srv/Docs", "/opt/x y")  # case kept, escapes decoded
    assert policy.networks == (ipaddress.ip_network("127.0.0.1/32"),)
    for url in (
        "file:///srv/Docs/a.md",
        "file:///srv/Docs/sub/dir/b.pdf",
        "file:///srv/Docs",
        "file://localhost/srv/Docs/a.md",
        "file:///opt/x%20y/readme.txt",
        "file:///srv/Docs/caf%C3%A9.md",
    ):
        assert policy.file_refusal(url) is None, url


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("file:///srv/DocsX/a.md", "not under"),  # a sibling sharing the prefix
        ("file:///srv/docs/a.md", "not under"),  # paths keep their case
        ("file:///srv/a.md", "not under"),
        ("file:///etc/passwd", "not under"),
        ("file:///srv/Docs/../../etc/passwd", "'..'"),
        ("file:///srv/Docs/%2e%2e/secret", "'..'"),  # escaped dots are dots
        ("file:///srv/Docs/./a.md", "'..'"),
        ("file://evil.example/srv/Docs/a.md", "not a host"),
        ("file:///srv/Docs/a.md?x=1", "no query"),
        ("file:///srv/Docs/a%00.md", "NUL"),
        ("file:///srv/Docs/%FF.md", "not"),  # not UTF-8
        ("file:srv/Docs/a.md", "absolute"),
    ],
)
def test_file_refusals(url: str, refused: str) -> None:
    got = AddressPolicy.parse("file:///srv/Docs").file_refusal(url)
    assert got is not None and refused in got, (url, got)


@pytest.mark.parametrize(
    "entry", ["file:///", "file://", "file:relative/dir", "file://host/dir", "file:///a/../b"]
)
def test_file_entries_that_open_too_much_or_nothing_are_errors(entry: str) -> None:
    with pytest.raises(ValueError, match="fetch allow list"):
        AddressPolicy.parse(entry)
