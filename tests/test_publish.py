"""``ragstream publish``: sitemap parsing and reading (no broker), then a sitemap published
with ``--wait`` through a real pipeline, with one page gone and one that always fails."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gzip
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from devtools.corpus import CorpusServer
from ops.progress import Snapshot
from ops.sitemaps import (
    SitemapError,
    gunzip,
    is_sitemap_ref,
    parse_sitemap,
    read_sitemaps,
)
from ragstream.cli.publish import Failures, parse_urls, split_args, summary_lines
from streams.settings import Settings
from tests.helpers import Worker, expected_index, milvus_rows

NS = "http://www.sitemaps.org/schemas/sitemap/0.9"


def urlset(*locs: str, ns: str | None = NS) -> bytes:
    attr = f' xmlns="{ns}"' if ns else ""
    items = "".join(f"<url><loc>{loc}</loc><lastmod>2026-01-01</lastmod></url>" for loc in locs)
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<urlset{attr}>{items}</urlset>'.encode()


def index(*locs: str) -> bytes:
    items = "".join(f"<sitemap><loc>{loc}</loc></sitemap>" for loc in locs)
    return f'<sitemapindex xmlns="{NS}">{items}</sitemapindex>'.encode()


# --- parsing ------------------------------------------------------------------------------


def test_urlset_with_and_without_namespace() -> None:
    for ns in (NS, None, "http://www.google.com/schemas/sitemap/0.84"):
        sm = parse_sitemap(urlset("https://a.example/1", " https://a.example/2 \n", ns=ns))
        assert sm.kind == "urlset"
        assert sm.locs == ("https://a.example/1", "https://a.example/2")


def test_urlset_ignores_extension_elements_and_decodes_entities() -> None:
    doc = f"""<urlset xmlns="{NS}" xmlns:xhtml="http://www.w3.org/1999/xhtml"
        xmlns:image="http://www.google.com/schemas/sitemap-image/1.1">
      <url>
        <xhtml:link rel="alternate" hreflang="de" href="https://a.example/de/p"/>
        <image:image><image:loc>https://a.example/pic.png</image:loc></image:image>
        <loc>https://a.example/p?a=1&amp;b=2</loc>
      </url>
      <url><loc>   </loc></url>
    </urlset>""".encode()
    assert parse_sitemap(doc).locs == ("https://a.example/p?a=1&b=2",)


def test_sitemap_index() -> None:
    sm = parse_sitemap(index("https://a.example/s1.xml", "https://a.example/s2.xml.gz"))
    assert sm.kind == "sitemapindex"
    assert sm.locs == ("https://a.example/s1.xml", "https://a.example/s2.xml.gz")


def test_gzip_is_recognised_by_its_bytes() -> None:
    assert parse_sitemap(gzip.compress(urlset("https://a.example/z"))).locs == (
        "https://a.example/z",
    )
    with pytest.raises(SitemapError, match="more than 1000 bytes uncompressed"):
        gunzip(gzip.compress(b"x" * 5000), "bomb.xml.gz", max_bytes=1000)
    with pytest.raises(SitemapError, match="broken gzip"):
        parse_sitemap(b"\x1f\x8b\x08\x00garbage", "bad.xml.gz")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello, world", "s.xml: not a sitemap: not XML"),
        (b"<!doctype html><html><body><p>hi<br></body></html>", "not a sitemap: an HTML page"),
        (b"<rss><channel/></rss>", "the root element is <rss>, expected <urlset> or"),
        (b"", "not a sitemap: not XML"),
        (
            b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa">]><urlset>&a;</urlset>',
            "declares XML entities",
        ),
    ],
)
def test_junk_gives_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(SitemapError, match=message):
        parse_sitemap(data, "s.xml")


def test_which_arguments_are_sitemaps() -> None:
    assert is_sitemap_ref("https://a.example/sitemap.xml")
    assert is_sitemap_ref("https://a.example/sitemap_index.XML?page=2")
    assert is_sitemap_ref("https://a.example/s/pages.xml.gz")
    assert is_sitemap_ref("exports/sitemap.xml")
    assert not is_sitemap_ref("https://a.example/page.html")
    assert not is_sitemap_ref("https://a.example/feed?format=.xml")
    ns = argparse.Namespace(
        urls=["https://a.example/p", "-", "https://a.example/sitemap.xml"],
        sitemap=["https://b.example/s.xml.gz"],
    )
    assert split_args(ns) == (
        ["https://a.example/p", "-"],
        ["https://b.example/s.xml.gz", "https://a.example/sitemap.xml"],
    )


def test_parse_urls_keeps_its_behaviour() -> None:
    good, bad = parse_urls(
        iter(["https://a.example/1\n", "# note", "", "ftp://x/y", "https://a.example/1"])
    )
    assert good == ["https://a.example/1"] and bad == ["ftp://x/y"]


# --- reading, with indexes (HTTP mocked) ---------------------------------------------------


def mock_site(pages: dict[str, bytes | int]) -> tuple[httpx.MockTransport, list[str]]:
    """A site whose paths answer with bytes (200) or a status; records requests."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        body = pages.get(request.url.path, 404)
        if isinstance(body, int):
            return httpx.Response(body, content=b"nope")
        return httpx.Response(200, content=body)

    return httpx.MockTransport(handler), seen


def crawl(refs: list[str], pages: dict[str, bytes | int], **kw: object):
    transport, seen = mock_site(pages)
    result = asyncio.run(read_sitemaps(refs, transport=transport, settings=Settings(), **kw))
    return result, seen


def test_index_is_followed_with_gzip_relative_locs_dedupe_and_cycles() -> None:
    site = "https://a.example"
    pages: dict[str, bytes | int] = {
        "/sitemap_index.xml": index(f"{site}/pages.xml.gz", "/more.xml", f"{site}/gone.xml"),
        "/pages.xml.gz": gzip.compress(urlset(f"{site}/1", f"{site}/2")),
        "/more.xml": index(f"{site}/sitemap_index.xml", f"{site}/last.xml"),  # a cycle
        "/last.xml": urlset(f"{site}/2", f"{site}/3", "/4"),
        "/gone.xml": 404,
    }
    result, seen = crawl([f"{site}/sitemap_index.xml"], pages)
    assert result.urls == [f"{site}/1", f"{site}/2", f"{site}/3", f"{site}/4"]
    assert result.errors == [f"{site}/gone.xml: HTTP 404"]
    assert sorted(result.sitemaps) == sorted(
        f"{site}{p}" for p in ("/sitemap_index.xml", "/pages.xml.gz", "/more.xml", "/last.xml")
    )
    assert seen.count("/sitemap_index.xml") == 1  # read once despite the cycle


@pytest.mark.slow  # seconds of real backoff on the 500
def test_depth_limit_and_unreadable_given_sitemap() -> None:
    site = "https://a.example"
    pages: dict[str, bytes | int] = {
        "/i0.xml": index(f"{site}/i1.xml"),
        "/i1.xml": index(f"{site}/s.xml"),
        "/s.xml": urlset(f"{site}/deep"),
        "/broken.xml": 500,
    }
    deep, _ = crawl([f"{site}/i0.xml"], pages, max_depth=2)
    assert deep.urls == [f"{site}/deep"] and deep.errors == []
    shallow, seen = crawl([f"{site}/i0.xml"], pages, max_depth=1)
    assert shallow.urls == []
    assert shallow.errors == [
        f"{site}/i1.xml: sitemap index nested deeper than 1 levels, its 1 sitemaps not read"
    ]
    assert "/s.xml" not in seen
    with pytest.raises(SitemapError, match=r"broken\.xml: HTTP 500"):
        crawl([f"{site}/broken.xml", f"{site}/s.xml"], pages)


def test_local_file_given_by_the_user_but_never_from_the_web(tmp_path: Path) -> None:
    secret = tmp_path / "secret.xml"
    secret.write_bytes(urlset("https://a.example/private"))
    mine = tmp_path / "sitemap.xml"
    mine.write_bytes(index(str(secret), "https://a.example/s.xml"))
    pages: dict[str, bytes | int] = {"/s.xml": index(f"file://{secret}")}
    result, _ = crawl([str(mine)], pages)
    assert result.urls == []  # neither the local path nor file:// URL was read for the web
    assert any("not an http(s) URL" in e for e in result.errors)
    assert len(result.errors) == 2
    direct, _ = crawl([str(secret)], {})
    assert direct.urls == ["https://a.example/private"]
    with pytest.raises(SitemapError, match="cannot read"):
        crawl([str(tmp_path / "missing.xml")], {})


def test_summary_lines() -> None:
    snap = Snapshot(urls=6, fetched=6, chunks=5, embedded=5, vectors=5, written=5, dead={})
    fails = Failures({("fetch", "http_status"): 1}, {("fetch", "http_status"): "u: HTTP 500"}, 0)
    text = "\n".join(summary_lines(6, snap, fails, 3.2, False))
    assert "summary (done after 3.2s): 6 URLs" in text
    assert "pages fetched:   5" in text and "failed:          1" in text
    assert "fetch http_status: 1  (e.g. u: HTTP 500)" in text
    # Two delayed retries came back through urls: 8 messages fetched for 6 URLs.
    retried = dataclasses.replace(snap, urls=8, fetched=8)
    text = "\n".join(summary_lines(6, retried, fails, 3.2, False))
    assert "pages fetched:   5" in text and "failed:          1" in text
    late = Snapshot(urls=6, fetched=2, chunks=3, embedded=1, vectors=1, written=0, dead={})
    text = "\n".join(summary_lines(6, late, Failures({}, {}, 2), 9.0, True))
    assert "TIMED OUT" in text and "still in flight: 4 URLs, 2 chunks, 1 vectors" in text
    assert "failures by reason: none" in text and "2 other dead letters" in text


# --- a sitemap through the real pipeline ----------------------------------------------------

PAGES = {
    "a.txt": "Kafka topics are split into partitions. Each partition is an ordered log.",
    "b.txt": "Milvus stores dense vectors and searches them by cosine similarity.",
    "c.txt": "A sitemap lists the pages of a site so that crawlers find all of them.",
    "docs/d.txt": "Consumer groups commit offsets; a replay moves the committed offsets back.",
}


@pytest.mark.kafka
def test_publish_a_sitemap_and_wait(settings: Settings, tmp_path: Path, chunker) -> None:
    root = tmp_path / "site"
    for name, text in PAGES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n", encoding="utf-8")

    def always_500(handler) -> bool:
        if handler.path == "/broken.txt":
            handler.reply(500, b"boom", "text/plain")
            return True
        return False

    s = settings.model_copy(  # no delayed retries: broken.txt is to be a dead letter at once
        update={"fetch_attempts": 2, "fetch_backoff_s": 0.1, "fetch_retry_delays": ""}
    )
    with CorpusServer(root, hook=always_500) as server:
        base = server.base_url
        files = [root / n for n in PAGES]
        # an index -> a gzipped urlset (3 pages) and a plain one (1 page, one 404, one 500)
        (root / "pages.xml.gz").write_bytes(
            gzip.compress(urlset(*(server.url_of(f) for f in files[:3])))
        )
        (root / "more.xml").write_bytes(
            urlset(server.url_of(files[3]), f"{base}missing.txt", f"{base}broken.txt")
        )
        (root / "sitemap_index.xml").write_bytes(index(f"{base}pages.xml.gz", f"{base}more.xml"))
        expected = expected_index(chunker, server, files)
        worker = Worker(s)
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ragstream.cli",
                    "publish",
                    "--sitemap",
                    f"{base}sitemap_index.xml",
                    "--wait",
                    "--timeout",
                    "300",
                ],
                env={**os.environ, **s.to_env(), "HF_HUB_OFFLINE": "1"},
                capture_output=True,
                text=True,
                timeout=400,
            )
            assert worker.alive(), worker.tail()
        finally:
            worker.stop()
    out = proc.stdout
    assert proc.returncode == 1, (out, proc.stderr, worker.tail())  # 1: a dead letter
    assert "read 3 sitemaps: 6 URLs" in proc.stderr
    assert f"published 6 URLs to {s.topic('urls')}" in out
    assert "summary (done after" in out
    assert "pages fetched:   5" in out  # the 404 page counts: it was handled (deleted)
    assert "failed:          1" in out
    assert f"chunks:          {len(expected) + 1}" in out  # + the 404 page's delete
    assert f"vectors written: {len(expected) + 1}" in out
    assert "failures by reason:\n  fetch http_status: 1" in out
    assert f"(e.g. HTTP 500 for {base}broken.txt)" in out

    rows = milvus_rows(s, ("id", "text"))
    assert {r["id"]: r["text"] for r in rows} == expected
    assert len(rows) == len(expected)
