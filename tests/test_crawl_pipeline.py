"""A crawl end to end: a local site of a few hundred linked pages, crawled inside the stream
by a real worker, then crawled again; Milvus and the server's request log are the judges."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from devtools.corpus import CorpusHandler, CorpusServer
from ops import crawl as ops_crawl
from ops.follow import Baseline
from ragstream.cli import main as cli_main
from streams.crawl import Crawl
from streams.documents import page_chunks
from streams.ids import chunk_id, normalize_url
from streams.settings import Settings
from tests.helpers import Worker, milvus_rows

pytestmark = pytest.mark.kafka

N_PAGES = 300


def page(n: int, body_links: list[str], extra_head: str = "") -> str:
    links = "".join(f'<li><a href="{h}">link</a></li>' for h in body_links)
    return (
        f"<!doctype html><html><head><title>Page {n}</title>{extra_head}</head><body>"
        f"<main><h1>Page {n}</h1><p>Page number {n} tells of gadget model {n * 7919} and "
        f"its sprocket count {n * 31}.</p><ul>{links}</ul></main></body></html>"
    )


def build_site(root: Path) -> set[str]:
    """``/docs/``: an index and N_PAGES pages in a binary tree, each also linking back up
    (cycles), to the index with a fragment and tracking parameters, to another host, to
    ``/outside/`` (out of scope) and to mail; ``/docs/private/`` is disallowed by
    robots.txt; ``/docs/dup.html`` names ``p1.html`` its canonical URL. Returns the paths
    a crawl of ``/docs/index.html`` must index."""
    docs = root / "docs"
    (docs / "private").mkdir(parents=True)
    (root / "outside").mkdir()
    (root / "robots.txt").write_text("User-agent: *\nDisallow: /docs/private/\n")
    (root / "outside" / "o.html").write_text(page(-1, ["/docs/p0.html"]))
    (docs / "private" / "secret.html").write_text(page(-2, ["../p5.html"]))
    (docs / "dup.html").write_text(
        page(-3, ["p7.html"], '<link rel="canonical" href="/docs/p1.html">')
    )
    (docs / "index.html").write_text(
        page(
            -4,
            [
                "p0.html",
                "dup.html",
                "private/secret.html",
                "/outside/o.html",
                "https://example.invalid/elsewhere.html",
                "mailto:someone@example.invalid",
                "p2.html#section?x",
                "p2.html?utm_source=crawl&fbclid=1",
            ],
        )
    )
    for n in range(N_PAGES):
        kids = [f"p{k}.html" for k in (2 * n + 1, 2 * n + 2) if k < N_PAGES]
        up = [f"p{(n - 1) // 2}.html"] if n else []
        extra = [
            "index.html#top",
            "index.html?utm_medium=x",
            "/outside/o.html",
            "https://example.invalid/x",
        ]
        (docs / f"p{n}.html").write_text(page(n, kids + up + extra))
    return {"/docs/index.html", *(f"/docs/p{n}.html" for n in range(N_PAGES))}


class Log:
    """Requests per path, and those with validators (conditional GETs)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gets: collections.Counter[str] = collections.Counter()
        self.conditional: collections.Counter[str] = collections.Counter()

    def hook(self, handler: CorpusHandler) -> bool:
        path = urlsplit(handler.path).path
        with self.lock:
            self.gets[path] += 1
            if handler.headers.get("If-None-Match") or handler.headers.get("If-Modified-Since"):
                self.conditional[path] += 1
        return False  # served as usual

    def reset(self) -> None:
        with self.lock:
            self.gets.clear()
            self.conditional.clear()


def crawl_once(settings: Settings, root: str, timeout_s: float = 600) -> ops_crawl.Followed:
    async def go() -> ops_crawl.Followed:
        base = await Baseline.take(settings)
        crawl = Crawl.start(ops_crawl.new_crawl_id(), root, max_depth=20)
        await ops_crawl.start(settings, [crawl], "test")
        return await ops_crawl.follow(settings, base, [crawl], timeout_s=timeout_s)

    return asyncio.run(go())


def test_crawl_indexes_in_scope_pages_once_and_recrawl_costs_one_304_each(
    settings: Settings, tmp_path: Path, chunker
) -> None:
    site = tmp_path / "site"
    wanted = build_site(site)
    log = Log()
    with CorpusServer(site, hook=log.hook) as server:
        root = server.base_url + "docs/index.html"
        worker = Worker(settings)
        try:
            first = crawl_once(settings, root)
        finally:
            worker.stop()
        assert not first.timed_out, (first, worker.tail())
        (summary,) = first.summaries.values()
        # every allowed in-scope page, the canonical duplicate and the disallowed page
        assert summary.complete and summary.issued == len(wanted) + 2 == summary.reported
        assert first.failures == {("fetch", "robots_disallowed"): 1}
        fetched = {p for p in log.gets if p != "/robots.txt"}
        assert fetched == wanted | {"/docs/dup.html"}
        assert all(log.gets[p] == 1 for p in fetched), log.gets.most_common(3)

        rows = milvus_rows(settings, ("id", "text", "url"))
        expected: dict[str, str] = {}
        for path in sorted(wanted):
            url = normalize_url(server.base_url.rstrip("/") + path)
            body = (site / path.lstrip("/")).read_bytes()
            for c in page_chunks(url, body, "text/html; charset=utf-8", chunker):
                expected[chunk_id(c.doc_id, c.chunk_index)] = c.text
        assert len(rows) == len(expected)
        assert {r["id"]: r["text"] for r in rows} == expected
        assert {urlsplit(r["url"]).path for r in rows} == wanted

        # Again, from a restarted worker: one conditional GET per page, all 304, nothing
        # new to embed.
        log.reset()
        not_modified = server.not_modified
        worker = Worker(settings)
        try:
            again = crawl_once(settings, root)
        finally:
            worker.stop()
        assert not again.timed_out, (again, worker.tail())
        (summary,) = again.summaries.values()
        assert summary.complete and summary.issued == len(wanted) + 2
        pages = {p for p in log.gets if p != "/robots.txt"}
        assert pages == wanted | {"/docs/dup.html"}
        assert all(log.gets[p] == 1 == log.conditional[p] for p in pages)
        assert server.not_modified - not_modified == len(pages)
        assert again.snapshot is not None and again.snapshot.chunks == 0
        assert again.snapshot.written == 0
    assert len(milvus_rows(settings, ("id",))) == len(expected)


def test_a_crawl_survives_its_worker_killed_midway_and_the_cli_follows_a_recrawl(
    settings: Settings,
    tmp_path: Path,
    cli_environ: Callable[[Settings], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGKILL the worker while the crawl is in flight: a new worker finishes it (the
    frontier's state and the pages' states come back from their topics), every page is
    indexed once; then ``publish --crawl --wait`` re-crawls: 304s only, exit status 0."""
    site = tmp_path / "site"
    wanted = build_site(site)
    log = Log()
    with CorpusServer(site, latency_s=0.05, hook=log.hook) as server:
        root = server.base_url + "docs/index.html"
        crawl = Crawl.start(ops_crawl.new_crawl_id(), root, max_depth=20)
        base = asyncio.run(Baseline.take(settings))
        worker = Worker(settings)
        try:
            asyncio.run(ops_crawl.start(settings, [crawl], "test"))
            deadline = time.monotonic() + 300
            while sum(log.gets.values()) < 60:
                assert worker.alive() and time.monotonic() < deadline, worker.tail()
                time.sleep(0.1)
            worker.kill()
            killed_at = sum(log.gets.values())
            worker = Worker(settings)
            followed = asyncio.run(ops_crawl.follow(settings, base, [crawl], timeout_s=600))
        finally:
            worker.stop()
        assert killed_at < len(wanted), "the crawl ended before the kill"
        assert not followed.timed_out, followed
        (summary,) = followed.summaries.values()
        assert summary.complete and summary.issued == len(wanted) + 2
        assert {p for p in log.gets if p != "/robots.txt"} == wanted | {"/docs/dup.html"}
        rows = milvus_rows(settings, ("id", "url"))
        per_page = collections.Counter(urlsplit(r["url"]).path for r in rows)
        assert set(per_page) == wanted
        assert len(rows) == len({r["id"] for r in rows})

        log.reset()
        cli_environ(settings)
        worker = Worker(settings)
        try:
            status = cli_main(["publish", "--crawl", root, "--max-depth", "20", "--wait"])
        finally:
            worker.stop()
        out = capsys.readouterr().out
        assert status == 0, out
        assert f"{len(wanted) + 2} pages, {len(wanted) + 2} fetched, complete" in out
        assert "robots_disallowed: 1" in out and "chunks: 0, vectors written: 0" in out
        pages = {p for p in log.gets if p != "/robots.txt"}
        assert pages == wanted | {"/docs/dup.html"}
        assert all(log.gets[p] == 1 == log.conditional[p] for p in pages), log.gets
