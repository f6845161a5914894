"""The fetch stage's and the frontier's crawl logic without Kafka: fakes from test_stages."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from agents.fetch import FetchStage
from agents.fetcher import Page
from agents.frontier import Crawls, Frontier, page_key
from streams.crawl import Crawl, Links, extract_links
from streams.documents import DocState
from streams.errors import FetchFailed
from streams.messages import (
    Chunk,
    CrawlReport,
    UrlRequest,
    decode_chunk,
    decode_crawl,
    decode_url,
    encode_crawl,
    encode_url,
)
from streams.settings import Settings
from tests.test_stages import Docs, Extractor, Fetcher, Topic, events_of, run


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """No broker: these tests never reach one."""
    return Settings(home=tmp_path / "home", topic_prefix="unit.")


class CrawlExtractor(Extractor):
    """test_stages' extractor, plus links read by the real rule (as the child does)."""

    def __init__(self) -> None:
        self.bases: list[str] = []

    async def page(
        self,
        url: str,
        body: bytes,
        content_type: str | None,
        *,
        links: bool = False,
        base_url: str | None = None,
    ) -> tuple[list[Chunk], Links | None]:
        self.bases.append(base_url or url)
        found = extract_links(body, base_url or url) if links else None
        return await self.page_chunks(url, body, content_type), found


ROOT = "https://site.test/docs/"
CRAWL = Crawl.start("c1", ROOT)
HTML = (
    b'<html><head><link rel="canonical" href="{canon}"></head><body>'
    b'<p>words</p><a href="a.html">a</a> <a href="/other/x">x</a></body></html>'
)


def html(canon: str = "") -> bytes:
    return HTML.replace(b"{canon}", canon.encode())


def rig(
    settings: Settings, pages: dict[str, Any], states: dict[str, DocState] | None = None
) -> tuple[FetchStage, Fetcher, Docs, Topic, Topic, CrawlExtractor]:
    fetcher, docs, extractor = Fetcher(pages), Docs(states), CrawlExtractor()
    chunks, crawl = Topic("unit.chunks"), Topic("unit.crawl")
    stage = FetchStage(
        settings,
        fetcher=fetcher,  # type: ignore[arg-type]
        extractor=extractor,  # type: ignore[arg-type]
        docs=docs,  # type: ignore[arg-type]
        chunks=chunks,  # type: ignore[arg-type]
        dlq=Topic("unit.urls.dlq"),  # type: ignore[arg-type]
        state_log=Topic("unit.urls.state"),  # type: ignore[arg-type]
        retry_out={1: Topic("unit.urls.retry.1")},  # type: ignore[dict-item]
        crawl=crawl,  # type: ignore[arg-type]
    )
    return stage, fetcher, docs, chunks, crawl, extractor


def handle(stage: FetchStage, url: str, crawl: Crawl | None = CRAWL) -> None:
    req = UrlRequest(url=url, crawl=crawl)
    run(stage.handle(events_of([encode_url(req)], topic="urls", keys=[req.key()])[0]))


def reports(topic: Topic) -> list[CrawlReport]:
    return [decode_crawl(v) for v in topic.values()]


def page(url: str, body: bytes, status: int = 200) -> Page:
    return Page(url=url, status=status, body=body, content_type="text/html", etag='"v1"')


def test_a_crawled_page_reports_its_links_and_keeps_them(settings: Settings) -> None:
    # /docs/ redirected to /docs/index/: relative links resolve where the redirect ended
    stage, _, docs, chunks, crawl, extractor = rig(settings, {ROOT: page(ROOT + "index/", html())})
    handle(stage, ROOT)
    (report,) = reports(crawl)
    assert report.outcome == "indexed" and report.crawl == CRAWL
    assert report.links == (ROOT + "index/a.html", "https://site.test/other/x")
    assert extractor.bases == [ROOT + "index/"]
    assert chunks.values() and docs.states[ROOT].links == report.links


def test_a_page_that_is_not_a_crawls_reports_nothing(settings: Settings) -> None:
    stage, _, docs, chunks, crawl, _ = rig(settings, {ROOT: page(ROOT, html())})
    handle(stage, ROOT, crawl=None)
    assert crawl.values() == [] and chunks.values()
    assert docs.states[ROOT].links is None


def test_a_canonical_page_is_indexed_under_its_canonical_url_only(settings: Settings) -> None:
    dup = ROOT + "dup.html"
    stage, _, docs, chunks, crawl, _ = rig(settings, {dup: page(dup, html("/docs/a.html"))})
    handle(stage, dup)
    (report,) = reports(crawl)
    assert (report.outcome, report.links) == ("canonical", (ROOT + "a.html",))
    sent = [decode_chunk(v) for v in chunks.values()]
    assert [(c.op, c.chunk_count) for c in sent] == [("delete", 0)]
    assert docs.states[dup].canonical == ROOT + "a.html"
    # an out-of-scope canonical is ignored: the page is indexed as itself
    other = ROOT + "b.html"
    stage, _, _, chunks, crawl, _ = rig(settings, {other: page(other, html("https://x.test/"))})
    handle(stage, other)
    assert reports(crawl)[0].outcome == "indexed"
    assert all(decode_chunk(v).op == "upsert" for v in chunks.values())


def test_a_304_reports_the_links_its_state_kept(settings: Settings) -> None:
    known = DocState(doc_hash="h", hashes=("x",), etag='"v1"', links=(ROOT + "a.html",))
    canon = DocState(doc_hash="", hashes=(), etag='"v1"', links=(), canonical=ROOT + "a.html")
    dup = ROOT + "dup.html"
    stage, fetcher, _, chunks, crawl, _ = rig(
        settings,
        {ROOT: page(ROOT, b"", status=304), dup: page(dup, b"", status=304)},
        {ROOT: known, dup: canon},
    )
    handle(stage, ROOT)
    handle(stage, dup)
    assert fetcher.asked == [(ROOT, '"v1"'), (dup, '"v1"')]
    got = [(r.outcome, r.links) for r in reports(crawl)]
    assert got == [("unchanged", (ROOT + "a.html",)), ("canonical", (ROOT + "a.html",))]
    assert chunks.values() == []


def test_a_crawl_fetches_whole_a_page_whose_links_were_never_read(settings: Settings) -> None:
    indexed = DocState(doc_hash="h", hashes=("x",), etag='"v1"')  # published, not crawled
    stage, fetcher, _, _, crawl, _ = rig(settings, {ROOT: page(ROOT, html())}, {ROOT: indexed})
    handle(stage, ROOT)
    assert fetcher.asked == [(ROOT, None)]
    assert reports(crawl)[0].links


def test_a_failed_page_is_reported_so_the_crawl_ends(settings: Settings) -> None:
    refused = FetchFailed("robots_disallowed", "disallowed")
    stage, _, _, _, crawl, _ = rig(settings, {ROOT: refused})
    handle(stage, ROOT)
    assert [(r.outcome, r.links) for r in reports(crawl)] == [("failed", ())]


# --- the frontier -------------------------------------------------------------------------


def frontier(settings: Settings) -> tuple[Frontier, Topic, Topic]:
    crawls = Crawls(settings)
    run(crawls.assign([]))
    crawls._owned = {0}  # what a rebalance gives it; nothing to load
    urls, state = Topic("unit.urls"), Topic("unit.crawl.state")
    f = Frontier(
        settings,
        crawls=crawls,
        urls=urls,  # type: ignore[arg-type]
        state_log=state,  # type: ignore[arg-type]
        dlq=Topic("unit.crawl.dlq"),  # type: ignore[arg-type]
    )
    return f, urls, state


def report_event(report: CrawlReport, offset: int = 0) -> Any:
    event = events_of([encode_crawl(report)], topic="crawl", keys=[report.key()])[0]
    event.message.offset = offset
    return event


def test_the_frontier_issues_new_pages_and_records_them(settings: Settings) -> None:
    f, urls, state = frontier(settings)
    links = (ROOT + "a.html", ROOT + "b.html", "https://x.test/", ROOT + "a.html")
    root = CrawlReport(CRAWL, ROOT, "indexed", links)
    run(f.handle(report_event(root)))
    reqs = [decode_url(v) for v in urls.values()]
    assert [(r.url, r.crawl.depth if r.crawl else None) for r in reqs] == [
        (ROOT + "a.html", 1),
        (ROOT + "b.html", 1),
    ]
    records = {r["key"]: r["value"] for r in state.sent}
    assert orjson.loads(records[b"c1"])["issued"] == 3
    assert orjson.loads(records[page_key("c1", ROOT + "a.html")]) == {
        "depth": 1,
        "reported": False,
    }
    run(f.handle(report_event(root, 1)))  # redelivered: nothing more
    assert len(urls.values()) == 2
    for url in (ROOT + "a.html", ROOT + "b.html"):
        run(f.handle(report_event(CrawlReport(CRAWL.at(1), url, "failed"))))
    summary = orjson.loads([r["value"] for r in state.sent if r["key"] == b"c1"][-1])
    assert summary["complete"] and summary["reported"] == 3
    tombstones = {r["key"] for r in state.sent if r["value"] is None}
    assert tombstones == {page_key("c1", u) for u in (ROOT, ROOT + "a.html", ROOT + "b.html")}


def test_the_frontier_dead_letters_a_report_it_cannot_read(settings: Settings) -> None:
    f, urls, _ = frontier(settings)
    run(f.handle(events_of([b"{}"], topic="crawl")[0]))
    assert urls.values() == [] and len(f.dlq.sent) == 1  # type: ignore[attr-defined]


def test_reports_wait_for_a_rebalance_to_load(settings: Settings) -> None:
    f, urls, _ = frontier(settings)
    f.crawls._ready.clear()

    async def go() -> None:
        task = asyncio.create_task(
            f.handle(report_event(CrawlReport(CRAWL, ROOT, "indexed", (ROOT + "a",))))
        )
        await asyncio.sleep(0.05)
        assert not task.done()
        f.crawls._ready.set()
        await task

    run(go())
    assert len(urls.values()) == 1
