"""Deterministic ids: URL normalisation, doc/chunk ids, text hashes."""

from __future__ import annotations

import hashlib

import pytest

from streams.ids import chunk_id, doc_id, normalize_url, text_hash


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # scheme and host lowercased, empty path becomes "/"
        ("HTTP://Example.COM", "http://example.com/"),
        ("https://EXAMPLE.com/Path/Case", "https://example.com/Path/Case"),
        # default ports dropped, others kept
        ("http://example.com:80/a", "http://example.com/a"),
        ("https://example.com:443/a", "https://example.com/a"),
        ("http://example.com:443/a", "http://example.com:443/a"),
        ("https://example.com:80/a", "https://example.com:80/a"),
        ("http://example.com:8080/a", "http://example.com:8080/a"),
        # fragment dropped
        ("http://example.com/a#section-2", "http://example.com/a"),
        ("http://example.com/a?x=1#frag", "http://example.com/a?x=1"),
        # tracking params removed, the rest sorted
        (
            "http://example.com/a?utm_source=news&b=2&utm_medium=mail&a=1&fbclid=XyZ&gclid=1",
            "http://example.com/a?a=1&b=2",
        ),
        ("http://example.com/a?UTM_Campaign=x", "http://example.com/a"),
        ("http://example.com/a?utm_source=x", "http://example.com/a"),
        ("http://example.com/a?z=1&a=2&m=3", "http://example.com/a?a=2&m=3&z=1"),
        ("http://example.com/a?b=2&a=9&a=1", "http://example.com/a?a=1&a=9&b=2"),
        ("http://example.com/a?&&a=1&", "http://example.com/a?a=1"),
        ("http://example.com/a?", "http://example.com/a"),
        # a parameter that merely contains "utm" is not tracking
        ("http://example.com/a?xutm_a=1", "http://example.com/a?xutm_a=1"),
        # dot segments resolved; never above the root
        ("http://example.com/a/./b/../c", "http://example.com/a/c"),
        ("http://example.com/a/b/..", "http://example.com/a/"),
        ("http://example.com/a/b/.", "http://example.com/a/b/"),
        ("http://example.com/../../x", "http://example.com/x"),
        ("http://example.com/a/%2E%2E/b", "http://example.com/b"),
        # trailing slash kept as given
        ("http://example.com/docs/", "http://example.com/docs/"),
        ("http://example.com/docs", "http://example.com/docs"),
        # percent-encoding: uppercase hex, unreserved decoded, raw unsafe encoded
        ("http://example.com/caf%c3%a9", "http://example.com/caf%C3%A9"),
        ("http://example.com/caf\u00e9", "http://example.com/caf%C3%A9"),
        ("http://example.com/%7euser/%41", "http://example.com/~user/A"),
        ("http://example.com/a%2fb", "http://example.com/a%2Fb"),
        ("http://example.com/a b", "http://example.com/a%20b"),
        ("http://example.com/100%", "http://example.com/100%25"),
        ("http://example.com/s?q=a%2bb&r=x+y", "http://example.com/s?q=a%2Bb&r=x+y"),
        # surrounding whitespace, IPv6, IDN, userinfo
        ("  http://example.com/a \n", "http://example.com/a"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        ("http://[2001:DB8::1]:8080/", "http://[2001:db8::1]:8080/"),
        ("http://B\u00fccher.de/", "http://xn--bcher-kva.de/"),
        ("http://user:pw@Example.com:80/", "http://user:pw@example.com/"),
    ],
)
def test_normalize_url(raw: str, expected: str) -> None:
    assert normalize_url(raw) == expected


def test_normalize_url_is_idempotent() -> None:
    urls = [
        "HTTP://Example.COM:80/a/./b/../c%7e?utm_source=x&b=2&a=1#f",
        "https://example.com/caf\u00e9/?q=a b",
        "http://[::1]/x/..",
    ]
    for url in urls:
        once = normalize_url(url)
        assert normalize_url(once) == once


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("ftp://example.com/file", "only http and https"),
        ("file://host/etc/passwd", "local path"),  # file URLs: only file:///path
        ("file:///a?b=1", "no query"),
        ("file:relative", "absolute path"),
        ("mailto:someone@example.com", "only http and https"),
        ("example.com/page", "only http and https"),
        ("//example.com/page", "only http and https"),
        ("", "only http and https"),
        ("http:///path", "no host"),
        ("https://", "no host"),
        ("http://example.com:99999/", "invalid port"),
        ("http://example.com:abc/", "invalid port"),
        ("http://[::1/", "not a valid URL"),
    ],
)
def test_normalize_url_rejects(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_url(raw)


def test_file_urls_normalize_to_one_spelling() -> None:
    """Local files (``ragstream publish ./docs``) are documents too; whether one may be read
    is the fetch policy's call (tests/test_netpolicy.py), not the normaliser's."""
    for raw in ("FILE:///srv/docs/a%7e%2fb.md#top", "file://localhost/srv/docs/a~%2Fb.md"):
        assert normalize_url(raw) == "file:///srv/docs/a~%2Fb.md"
    assert normalize_url("file:///srv/my docs/caf\u00e9.md") == "file:///srv/my%20docs/caf%C3%A9.md"
    assert doc_id("file:///srv/docs/a.md") == doc_id("file://localhost/srv/docs/a.md")


def test_doc_id_is_blake2b_128_of_normalised_url() -> None:
    expected = hashlib.blake2b(b"http://example.com/", digest_size=16).hexdigest()
    assert doc_id("http://example.com") == expected
    # Pinned: changing the scheme would re-key every document already in Milvus.
    assert doc_id("http://example.com") == "9aba6a18c5a5d94534a3b99c485d4547"


def test_doc_id_same_for_equivalent_urls() -> None:
    a = doc_id("HTTP://Docs.Example.com:80/a/./b/../guide?utm_source=x&v=2&lang=en#top")
    b = doc_id("http://docs.example.com/a/guide?lang=en&v=2")
    assert a == b
    assert len(a) == 32
    assert all(c in "0123456789abcdef" for c in a)


def test_doc_id_differs_for_different_pages() -> None:
    assert doc_id("http://example.com/a") != doc_id("http://example.com/a/")
    assert doc_id("http://example.com/a") != doc_id("https://example.com/a")
    assert doc_id("http://example.com/a?x=1") != doc_id("http://example.com/a?x=2")


def test_doc_id_rejects_bad_urls() -> None:
    with pytest.raises(ValueError):
        doc_id("ftp://example.com/")


def test_chunk_id_format_and_order() -> None:
    did = doc_id("http://example.com/")
    assert chunk_id(did, 0) == f"{did}:00000"
    assert chunk_id(did, 7) == f"{did}:00007"
    assert chunk_id(did, 12345) == f"{did}:12345"
    ids = [chunk_id(did, i) for i in (0, 1, 2, 9, 10, 99, 100, 1000, 99999)]
    assert sorted(ids) == ids  # lexical order is chunk order


@pytest.mark.parametrize("bad", [-1, 100_000, 1.0, "3", True])
def test_chunk_id_rejects_out_of_range(bad: object) -> None:
    with pytest.raises(ValueError):
        chunk_id("abc", bad)  # type: ignore[arg-type]


def test_text_hash() -> None:
    assert text_hash("hello") == hashlib.blake2b(b"hello", digest_size=16).hexdigest()
    cafe = "caf\u00e9"
    assert text_hash(cafe) == hashlib.blake2b(cafe.encode(), digest_size=16).hexdigest()
    assert len(text_hash("")) == 32
    assert text_hash("a") != text_hash("a ")
    assert text_hash("x") == text_hash("x")
    # total on text that came through surrogateescape
    assert len(text_hash("bad \udcff byte")) == 32
