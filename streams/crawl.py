"""Crawl rules, pure: what a crawl is, which URLs belong to it, and a page's links.

A crawl travels inside the stream (``publish --crawl``): each ``urls`` request of a crawl
carries its :class:`Crawl` (the spec and the page's depth), the fetch stage reports each
crawled page's links on the ``crawl`` topic, and the frontier (``agents/frontier.py``)
publishes the new in-scope ones as requests of depth + 1. These rules are the one place
that decides scope and reads links, so the fetch stage, the frontier and the CLI agree.

URLs are deduplicated by :func:`streams.ids.normalize_url` (lowercase scheme and host, no
default port, no fragment, no tracking parameters, sorted query): the same spelling that
gives the page its ``doc_id``, so a page reached by two spellings is fetched once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any
from urllib.parse import urljoin, urlsplit

from selectolax.lexbor import LexborHTMLParser

from streams.ids import normalize_url

__all__ = [
    "Crawl",
    "Links",
    "crawl_url",
    "default_scope",
    "extract_links",
    "in_scope",
    "is_html",
]

#: Links read from one page at most (a hostile page of a million anchors costs no more).
MAX_LINKS = 1000
#: Longest URL followed (the ``urls`` schema's limit).
MAX_URL_CHARS = 8192
#: Characters of links kept from one page in all: a page's report and state stay far
#: under a broker's message limit (1 MB by default) however long its URLs are.
MAX_LINK_CHARS = 256_000
#: Defaults of ``--max-depth`` and ``--max-pages``.
DEFAULT_MAX_DEPTH = 10
DEFAULT_MAX_PAGES = 10_000
#: Most include or exclude globs of one crawl (they travel in every request).
MAX_GLOBS = 32

_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_SNIFF_HTML = re.compile(
    rb"^(?:\xef\xbb\xbf)?\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html)[\s>]", re.I | re.S
)


def crawl_url(url: str) -> str:
    """The crawl's spelling of a URL (its dedup key); ``ValueError`` if not http(s)."""
    return normalize_url(url)


def default_scope(root: str) -> str:
    """Same scheme, host and port, and the root's directory as path prefix:
    ``https://h/docs/index.html`` -> ``https://h/docs/``."""
    parts = urlsplit(crawl_url(root))
    directory = parts.path[: parts.path.rfind("/") + 1] or "/"
    return f"{parts.scheme}://{parts.netloc}{directory}"


@dataclasses.dataclass(frozen=True, slots=True)
class Crawl:
    """A crawl as one of its requests carries it: the spec (same in every request of the
    crawl) and ``depth``, the page's distance in links from ``root``."""

    id: str
    root: str
    scope: str
    depth: int = 0
    max_depth: int = DEFAULT_MAX_DEPTH
    max_pages: int = DEFAULT_MAX_PAGES
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def start(
        cls,
        crawl_id: str,
        root: str,
        *,
        scope: str | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_pages: int = DEFAULT_MAX_PAGES,
        include: tuple[str, ...] | list[str] = (),
        exclude: tuple[str, ...] | list[str] = (),
    ) -> Crawl:
        """A new crawl of ``root`` (normalised); ``scope`` defaults to
        :func:`default_scope`. ``ValueError`` for a root or scope that is not http(s), or
        limits below 0 (depth) and 1 (pages)."""
        root = crawl_url(root)
        if max_depth < 0 or max_pages < 1:
            raise ValueError("--max-depth must be >= 0 and --max-pages >= 1")
        if len(include) + len(exclude) > MAX_GLOBS:
            raise ValueError(f"at most {MAX_GLOBS} include/exclude globs")
        prefix = crawl_url(scope) if scope else default_scope(root)
        return cls(
            id=crawl_id,
            root=root,
            scope=prefix,
            max_depth=max_depth,
            max_pages=max_pages,
            include=tuple(include),
            exclude=tuple(exclude),
        )

    def at(self, depth: int) -> Crawl:
        return dataclasses.replace(self, depth=depth)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "root": self.root,
            "scope": self.scope,
            "depth": self.depth,
            "max_depth": self.max_depth,
            "max_pages": self.max_pages,
        }
        if self.include:
            out["include"] = list(self.include)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Crawl:
        return cls(
            id=str(obj["id"]),
            root=str(obj["root"]),
            scope=str(obj["scope"]),
            depth=int(obj.get("depth", 0)),
            max_depth=int(obj.get("max_depth", DEFAULT_MAX_DEPTH)),
            max_pages=int(obj.get("max_pages", DEFAULT_MAX_PAGES)),
            include=tuple(obj.get("include", ())),
            exclude=tuple(obj.get("exclude", ())),
        )


def in_scope(crawl: Crawl, url: str) -> bool:
    """Whether the normalised ``url`` belongs to ``crawl``: under its scope prefix, matching
    one include glob (when any), no exclude glob. Globs match the whole normalised URL
    (``*`` crosses ``/``), case-sensitively. The root always belongs."""
    if url == crawl.root:
        return True
    if not url.startswith(crawl.scope) or len(url) > MAX_URL_CHARS:
        return False
    if crawl.include and not any(fnmatch.fnmatchcase(url, g) for g in crawl.include):
        return False
    return not any(fnmatch.fnmatchcase(url, g) for g in crawl.exclude)


@dataclasses.dataclass(frozen=True, slots=True)
class Links:
    """A page's out-links (normalised, deduplicated, in document order, at most
    :data:`MAX_LINKS`) and its ``<link rel=canonical>`` (normalised), if any."""

    links: tuple[str, ...] = ()
    canonical: str | None = None


def is_html(content_type: str | None, body: bytes) -> bool:
    """Whether links should be read from this body: an HTML type, or no type and a body
    that starts like HTML (the rule ``streams.extract`` reads pages by)."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime:
        return mime in _HTML_TYPES
    return _SNIFF_HTML.match(body[:1024]) is not None


def _resolve(base: str, href: str) -> str | None:
    href = href.strip()
    if not href or len(href) > MAX_URL_CHARS:
        return None
    try:
        return crawl_url(urljoin(base, href))
    except ValueError:  # mailto:, javascript:, data:, a broken address
        return None


def _rels(value: str | None) -> set[str]:
    return {r.lower() for r in (value or "").split()}


def extract_links(body: bytes | str, base_url: str, max_links: int = MAX_LINKS) -> Links:
    """The links a crawler follows from an HTML page fetched at ``base_url``.

    ``<a href>`` and ``<area href>`` resolved against ``<base href>`` (when present) or
    the page's URL; only http(s); at most ``max_links`` of them and
    :data:`MAX_LINK_CHARS` characters in all. Links marked ``rel=nofollow`` and every link of a page
    whose ``<meta name=robots>`` says ``nofollow`` are not followed: the site asked.
    """
    tree = LexborHTMLParser(body)
    base = base_url
    node = tree.css_first("base[href]")
    if node is not None:
        base = _resolve(base_url, node.attributes.get("href") or "") or base_url
    canonical = None
    for link in tree.css("link[rel][href]"):
        if "canonical" in _rels(link.attributes.get("rel")):
            canonical = _resolve(base, link.attributes.get("href") or "")
            break
    nofollow = any(
        (m.attributes.get("name") or "").strip().lower() in ("robots", "ragstream")
        and "nofollow" in (m.attributes.get("content") or "").lower()
        for m in tree.css("meta[name][content]")
    )
    found: dict[str, None] = {}
    room = MAX_LINK_CHARS
    if not nofollow:
        for a in tree.css("a[href], area[href]"):
            if "nofollow" in _rels(a.attributes.get("rel")):
                continue
            url = _resolve(base, a.attributes.get("href") or "")
            if url is not None and url not in found:
                room -= len(url)
                if room < 0:
                    break
                found[url] = None
                if len(found) >= max_links:
                    break
    return Links(tuple(found), canonical)


# --- the frontier's bookkeeping of one crawl ----------------------------------------------


@dataclasses.dataclass(slots=True)
class Page:
    """A page the crawl issued: its depth, and whether its report came back."""

    depth: int
    reported: bool = False


@dataclasses.dataclass(slots=True)
class Step:
    """What one report does to a crawl: the requests to publish (url, depth), the pages
    whose record changed, and whether the report was news (a second report of a page,
    after a redelivery, changes nothing)."""

    requests: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    changed: list[str] = dataclasses.field(default_factory=list)
    news: bool = False


@dataclasses.dataclass(slots=True)
class CrawlState:
    """One crawl as its frontier knows it: every page issued (its dedup set, bounded by
    ``max_pages``) and which were reported. Complete when every issued page was reported:
    nothing of the crawl is left in flight."""

    crawl: Crawl
    pages: dict[str, Page] = dataclasses.field(default_factory=dict)
    complete: bool = False

    @property
    def issued(self) -> int:
        return len(self.pages)

    @property
    def reported(self) -> int:
        return sum(1 for p in self.pages.values() if p.reported)

    def report(self, url: str, depth: int, links: tuple[str, ...], same_depth: bool) -> Step:
        """Apply the report of ``url`` (fetched at ``depth``) with its ``links``: each new
        one in scope is issued at ``depth + 1`` (``same_depth``: at ``depth``, for a
        canonical link, which is the same page), within ``max_depth`` and ``max_pages``."""
        step = Step()
        if self.complete:
            return step
        page = self.pages.get(url)
        if page is not None and page.reported:
            return step  # a redelivered report: its links were issued the first time
        if page is None:  # the root, published by the CLI, not by this frontier
            page = self.pages[url] = Page(depth)
        page.reported = True
        step.news = True
        step.changed.append(url)
        child = depth if same_depth else depth + 1
        if child <= self.crawl.max_depth:
            for link in links:
                if len(self.pages) >= self.crawl.max_pages:
                    break
                if link in self.pages or not in_scope(self.crawl, link):
                    continue
                self.pages[link] = Page(child)
                step.requests.append((link, child))
                step.changed.append(link)
        self.complete = all(p.reported for p in self.pages.values())
        return step

    def summary(self) -> dict[str, Any]:
        """The crawl's record in the frontier's state topic (what ``--wait`` reads)."""
        return {
            "crawl": self.crawl.at(0).to_json(),
            "issued": self.issued,
            "reported": self.reported,
            "complete": self.complete,
        }
