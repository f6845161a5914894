"""Sitemaps (the sitemaps.org protocol) to page URLs: a pure parser and an async reader.

A site publishes its pages as ``<urlset>`` files, often many of them listed in a
``<sitemapindex>``, often gzipped (``.xml.gz``). The parser turns one document into its
``<loc>`` values; the reader follows indexes (to a depth limit, each sitemap once, so a
cycle ends) and returns every page URL once, in document order. Parsing is stdlib
``xml.etree``: documents that declare entities are refused outright (a sitemap never needs
one), and decompression is capped, so a hostile file cannot blow up memory. Sitemaps on
the web are read through the fetch stage's ``Fetcher``: the same SSRF guard (a sitemap
entry pointing inside the network is refused), redirect cap, size and time bounds and
politeness (robots.txt, rate limits) as every page.
"""

from __future__ import annotations

import asyncio
import dataclasses
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import urljoin, urlsplit
from xml.etree import ElementTree as ET

import httpx

from agents.fetcher import Fetcher
from streams.errors import FetchFailed, SitemapError
from streams.settings import Settings

#: The protocol allows 50 MB uncompressed per file; a little slack, then refuse.
MAX_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 3
GZIP_MAGIC = b"\x1f\x8b"

Kind = Literal["urlset", "sitemapindex"]


@dataclasses.dataclass(frozen=True, slots=True)
class Sitemap:
    """One parsed document: page URLs (``urlset``) or sitemap URLs (``sitemapindex``)."""

    kind: Kind
    locs: tuple[str, ...]


@dataclasses.dataclass(slots=True)
class Crawl:
    """What reading a set of sitemaps found: page URLs (deduplicated, in order), the
    sitemaps read, and the nested ones that failed (the caller warns and goes on)."""

    urls: list[str] = dataclasses.field(default_factory=list)
    sitemaps: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)


def is_sitemap_ref(ref: str) -> bool:
    """Whether a command-line argument names a sitemap (by its path, not its query)."""
    path = urlsplit(ref.strip()).path.lower()
    return path.endswith((".xml", ".xml.gz"))


def gunzip(data: bytes, source: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes, decompressed when they are gzip (magic bytes, whatever the name says)."""
    if not data.startswith(GZIP_MAGIC):
        return data
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise SitemapError(f"{source}: broken gzip data ({exc})") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise SitemapError(f"{source}: more than {max_bytes} bytes uncompressed")
    if not inflater.eof:
        raise SitemapError(f"{source}: broken gzip data (truncated)")
    return out


def _local(tag: object) -> str:
    """An element's name without its namespace (sitemaps come with, without, or with the
    old Google namespace; ``<xhtml:link>`` or ``<image:image>`` children are ignored)."""
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def parse_sitemap(data: bytes, source: str = "sitemap") -> Sitemap:
    """Parse a ``<urlset>`` or ``<sitemapindex>`` document (gzip or not) into its locs."""
    data = gunzip(data, source)
    if b"<!ENTITY" in data:
        raise SitemapError(f"{source}: declares XML entities; a sitemap never needs them")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        head = data[:200].lstrip().lower()
        what = "an HTML page" if head.startswith((b"<!doctype html", b"<html")) else "not XML"
        raise SitemapError(f"{source}: not a sitemap: {what} ({exc})") from None
    root_name = _local(root.tag)
    kind: Kind
    if root_name == "urlset":
        kind = "urlset"
    elif root_name == "sitemapindex":
        kind = "sitemapindex"
    else:
        raise SitemapError(
            f"{source}: not a sitemap: the root element is <{root_name}>, "
            "expected <urlset> or <sitemapindex>"
        )
    entry = "url" if kind == "urlset" else "sitemap"
    locs = []
    for item in root:
        if _local(item.tag) != entry:
            continue
        for child in item:
            if _local(child.tag) == "loc" and child.text and child.text.strip():
                locs.append(child.text.strip())
                break
    return Sitemap(kind, tuple(locs))


def _is_http(ref: str) -> bool:
    return urlsplit(ref).scheme.lower() in ("http", "https")


def _read_file(ref: str, max_bytes: int) -> bytes:
    path = Path(ref[7:] if urlsplit(ref).scheme.lower() == "file" else ref)
    try:
        if path.stat().st_size > max_bytes:
            raise SitemapError(f"{ref}: larger than {max_bytes} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise SitemapError(f"{ref}: cannot read: {exc.strerror or exc}") from None


async def _read(fetcher: Fetcher, ref: str, max_bytes: int, local_ok: bool) -> bytes:
    """The raw bytes of a sitemap: over HTTP(S), or a local file (handy for exports) when
    the user named it; a sitemap from the web never makes us read a local file."""
    if not _is_http(ref):
        if not local_ok:
            raise SitemapError(f"{ref}: not an http(s) URL")
        return await asyncio.to_thread(_read_file, ref, max_bytes)
    try:
        page = await fetcher.fetch(ref)  # Content-Encoding gzip is undone (and capped) there
    except FetchFailed as exc:
        if exc.error_class == "http_status" and exc.status is not None:
            raise SitemapError(f"{ref}: HTTP {exc.status}") from None
        if exc.error_class == "too_large":
            raise SitemapError(f"{ref}: larger than {max_bytes} bytes") from None
        raise SitemapError(f"{ref}: {exc.error_class}: {exc}") from None
    if page.status != 200:
        raise SitemapError(f"{ref}: HTTP {page.status}")
    return page.body


async def read_sitemaps(
    refs: list[str],
    max_depth: int = MAX_DEPTH,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout_s: float = 30.0,
    concurrency: int = 8,
    max_bytes: int = MAX_BYTES,
    on_sitemap: Callable[[str, int], None] | None = None,
    settings: Settings,
) -> Crawl:
    """Every page URL the sitemaps ``refs`` list, following sitemap indexes.

    ``refs`` themselves must be readable sitemaps (else ``SitemapError``: the user named
    them). A nested sitemap that fails, or an index deeper than ``max_depth`` levels below
    a given one, is an entry in ``Crawl.errors`` and the rest goes on. ``on_sitemap(ref,
    n_urls)`` is called after each sitemap read (progress for big sites). ``settings``
    give the fetch policy: allow list, retries, politeness.
    """
    crawl = Crawl()
    seen_urls: dict[str, None] = {}
    visited: set[str] = set()
    gate = asyncio.Semaphore(concurrency)
    fetch_settings = settings.model_copy(
        update={
            "fetch_timeout_s": timeout_s,
            "fetch_max_bytes": max_bytes,
            "fetch_concurrency": max(concurrency, 1),
        }
    )
    fetcher = Fetcher(fetch_settings, transport=transport)
    try:

        async def one(ref: str, local_ok: bool) -> Sitemap:
            async with gate:
                return parse_sitemap(await _read(fetcher, ref, max_bytes, local_ok), ref)

        level = [r.strip() for r in dict.fromkeys(refs) if r.strip()]
        depth = 0
        while level:
            visited.update(level)
            results = await asyncio.gather(
                *(one(r, depth == 0) for r in level), return_exceptions=True
            )
            children: list[str] = []
            for ref, result in zip(level, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, SitemapError):
                        raise result
                    if depth == 0:
                        raise result
                    crawl.errors.append(str(result))
                    continue
                crawl.sitemaps.append(ref)
                locs = [urljoin(ref, x) for x in result.locs] if _is_http(ref) else result.locs
                if result.kind == "urlset":
                    for loc in locs:
                        seen_urls.setdefault(loc, None)
                elif depth >= max_depth:
                    crawl.errors.append(
                        f"{ref}: sitemap index nested deeper than {max_depth} levels, "
                        f"its {len(locs)} sitemaps not read"
                    )
                else:
                    children.extend(c for c in locs if c not in visited)
                if on_sitemap is not None:
                    on_sitemap(ref, len(seen_urls))
            level = list(dict.fromkeys(children))
            depth += 1
    finally:
        await fetcher.aclose()
    crawl.urls = list(seen_urls)
    return crawl
