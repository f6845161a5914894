"""Crawl rules without I/O: URL spelling, scope, links of a page, the frontier's counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.crawl import (
    MAX_LINKS,
    Crawl,
    CrawlState,
    crawl_url,
    default_scope,
    extract_links,
    in_scope,
    is_html,
)
from streams.errors import DecodeError
from streams.messages import (
    CrawlReport,
    UrlRequest,
    decode_crawl,
    decode_url,
    encode_crawl,
    encode_url,
)


def test_crawl_url_collapses_spellings() -> None:
    a = crawl_url("HTTP://Example.COM:80/docs/a.html?utm_source=x&b=1&fbclid=3#top")
    assert a == "http://example.com/docs/a.html?b=1"
    assert crawl_url("https://example.com:443/") == "https://example.com/"
    with pytest.raises(ValueError):
        crawl_url("mailto:someone@example.com")


def test_default_scope_is_the_roots_directory() -> None:
    assert default_scope("https://h/docs/index.html") == "https://h/docs/"
    assert default_scope("https://h/docs/") == "https://h/docs/"
    assert default_scope("https://h") == "https://h/"
    assert default_scope("http://h:8080/a/b/c?x=1") == "http://h:8080/a/b/"


def test_scope_prefix_host_scheme_and_globs() -> None:
    c = Crawl.start("c1", "https://h/docs/index.html", exclude=["*/private/*"])
    assert in_scope(c, "https://h/docs/a/b.html")
    assert not in_scope(c, "https://h/blog/x.html")  # outside the path prefix
    assert not in_scope(c, "http://h/docs/a.html")  # another scheme
    assert not in_scope(c, "https://other/docs/a.html")  # another host
    assert not in_scope(c, "https://h:8443/docs/a.html")  # another port
    assert not in_scope(c, "https://h/docs/private/k.html")  # excluded
    only = Crawl.start("c2", "https://h/", include=["*.html"], scope="https://h/docs/")
    assert in_scope(only, "https://h/docs/a.html")
    assert not in_scope(only, "https://h/docs/a.txt")
    assert in_scope(only, "https://h/")  # the root always belongs


def test_start_refuses_bad_limits_and_urls() -> None:
    with pytest.raises(ValueError):
        Crawl.start("c", "https://h/", max_pages=0)
    with pytest.raises(ValueError):
        Crawl.start("c", "https://h/", max_depth=-1)
    with pytest.raises(ValueError):
        Crawl.start("c", "ftp://h/")


PAGE = b"""<!doctype html><html><head><base href="/docs/sub/">
<link rel="canonical" href="/docs/canon.html">
<link rel="stylesheet" href="/s.css"></head><body>
<a href="a.html#frag">A</a> <a href="a.html">A again</a> <a href="../b.html?utm_medium=m">B</a>
<a href="mailto:x@y.z">mail</a> <a href="javascript:void(0)">js</a> <a href="">empty</a>
<a href="https://other.example/x">ext</a> <a rel="nofollow" href="/docs/secret.html">nf</a>
<map><area href="/docs/area.html"></map></body></html>"""


def test_extract_links_resolves_dedups_and_skips() -> None:
    found = extract_links(PAGE, "http://127.0.0.1:8000/docs/index.html")
    assert found.canonical == "http://127.0.0.1:8000/docs/canon.html"
    assert found.links == (
        "http://127.0.0.1:8000/docs/sub/a.html",
        "http://127.0.0.1:8000/docs/b.html",
        "https://other.example/x",
        "http://127.0.0.1:8000/docs/area.html",
    )


def test_meta_robots_nofollow_follows_nothing() -> None:
    page = b'<html><head><meta name="robots" content="noindex, NOFOLLOW"></head><a href="/x">x</a>'
    assert extract_links(page, "http://h/").links == ()


def test_links_are_bounded() -> None:
    page = "".join(f'<a href="/p{i}">x</a>' for i in range(MAX_LINKS + 50)).encode()
    assert len(extract_links(page, "http://h/").links) == MAX_LINKS


@given(st.binary(max_size=2000))
def test_extract_links_never_raises(body: bytes) -> None:
    for url in extract_links(body, "http://h/d/").links:
        assert crawl_url(url) == url


def test_is_html() -> None:
    assert is_html("text/html; charset=utf-8", b"")
    assert not is_html("text/plain", b"<html>")
    assert is_html(None, b"<!doctype html><p>")
    assert not is_html(None, b"plain words")


def test_messages_round_trip_and_schema() -> None:
    c = Crawl.start("c1", "http://h/docs/", max_depth=3, max_pages=50, include=["*x*"])
    req = UrlRequest("http://h/docs/a", crawl=c.at(2))
    assert decode_url(encode_url(req)) == req
    assert b'"crawl"' not in encode_url(UrlRequest("http://h/"))
    rep = CrawlReport(c.at(1), "http://h/docs/a", "indexed", ("http://h/docs/b",))
    assert decode_crawl(encode_crawl(rep)) == rep
    with pytest.raises(DecodeError):
        decode_crawl(encode_crawl(rep).replace(b'"indexed"', b'"maybe"'))
    bad = encode_url(req).replace(b'"max_pages":50', b'"max_pages":50,"extra":1')
    with pytest.raises(DecodeError):
        decode_url(bad)


def _state(**kw: int) -> CrawlState:
    return CrawlState(Crawl.start("c", "http://h/", **kw))


def test_frontier_issues_each_page_once_and_completes() -> None:
    s = _state()
    step = s.report(
        "http://h/", 0, ("http://h/a", "http://h/b", "http://x/out", "http://h/"), False
    )
    assert step.requests == [("http://h/a", 1), ("http://h/b", 1)]
    assert not s.complete and (s.issued, s.reported) == (3, 1)
    # a cycle: a links back to the root and to b, both known
    assert s.report("http://h/a", 1, ("http://h/", "http://h/b"), False).requests == []
    again = s.report("http://h/a", 1, ("http://h/c",), False)  # a redelivered report
    assert not again.news and again.requests == []
    s.report("http://h/b", 1, (), False)
    assert s.complete and (s.issued, s.reported) == (3, 3)
    assert s.report("http://h/b", 1, ("http://h/z",), False).requests == []


def test_frontier_limits_depth_and_pages() -> None:
    s = _state(max_depth=1)
    s.report("http://h/", 0, ("http://h/a",), False)
    assert s.report("http://h/a", 1, ("http://h/deep",), False).requests == []
    assert s.complete
    p = _state(max_pages=3)
    step = p.report("http://h/", 0, tuple(f"http://h/{i}" for i in range(10)), False)
    assert len(step.requests) == 2 and p.issued == 3
    c = _state(max_depth=0)  # a canonical link is the same page: same depth
    assert c.report("http://h/", 0, ("http://h/canon",), True).requests == [("http://h/canon", 0)]


def test_links_are_bounded_in_characters() -> None:
    from streams.crawl import MAX_LINK_CHARS

    long = "x" * 4000
    page = "".join(f'<a href="/{i}{long}">x</a>' for i in range(200)).encode()
    links = extract_links(page, "http://h/").links
    assert 0 < sum(map(len, links)) <= MAX_LINK_CHARS < sum(map(len, links)) + 4100


def test_every_is_a_duration() -> None:
    from ops.crawl import interval_s
    from streams.errors import InvalidTime

    assert interval_s("1h") == 3600 and interval_s("90s") == 90 and interval_s("1.5m") == 90
    for bad in ("2026-05-01", "0s", "soon", "5x", ""):
        with pytest.raises(InvalidTime):
            interval_s(bad)


def test_frontier_state_reads_back_from_its_records() -> None:
    """What agents/frontier.py writes to crawl.state gives back the crawl it had."""
    import orjson

    from agents.frontier import _apply, _Loaded, page_key

    s = _state()
    s.report("http://h/", 0, ("http://h/a", "http://h/b"), False)
    records = [
        (page_key("c", u), orjson.dumps({"depth": p.depth, "reported": p.reported}))
        for u, p in s.pages.items()
    ] + [
        (page_key("c", "http://h/gone"), b'{"depth": 1, "reported": false}'),
        (b"c", orjson.dumps(s.summary())),
        (page_key("c", "http://h/gone"), None),  # a tombstone
    ]
    loaded: dict[str, _Loaded] = {}
    for key, value in records:
        _apply(loaded, 3, key, value)
    entry = loaded["c"]
    assert entry.partition == 3 and entry.crawl == s.crawl and not entry.complete
    assert entry.pages == s.pages


def test_page_state_keeps_links_and_never_read_differs_from_none(tmp_path: Path) -> None:
    """A 304 of a crawled page finds its links in its state; a state too big for its topic
    loses them together with its validators, so the next crawl fetches the page whole."""
    import orjson

    from agents.docstate import DocStates
    from streams.documents import DocState
    from streams.settings import Settings

    crawled = DocState(doc_hash="h", hashes=("a",), etag='"e"', links=())
    assert DocState.from_json(crawled.to_json()) == crawled
    assert DocState.from_json(dataclasses.replace(crawled, links=None).to_json()).links is None
    links = tuple(f"http://h/{'x' * 200}/{i}" for i in range(900))
    many = dataclasses.replace(crawled, links=links)
    store = DocStates(Settings(home=tmp_path))
    small = DocState.from_json(orjson.loads(store.encode(many, max_bytes=4000) or b"{}"))
    assert small is not None and small.links is None and small.etag is None
    kept = DocState.from_json(orjson.loads(store.encode(many) or b"{}"))
    assert kept == many
