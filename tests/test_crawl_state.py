"""The frontier's memory of its crawls, written to and read back from ``crawl.state``."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from agents.frontier import Crawls, page_key
from streams import kafka
from streams.crawl import Crawl, CrawlState
from streams.settings import Settings
from streams.topics import CRAWL, ensure_topics, state_topic

pytestmark = pytest.mark.kafka


def test_a_new_owner_reads_each_crawl_back(settings: Settings) -> None:
    """What a frontier wrote (pages, summaries, tombstones) is what the next owner of the
    partition knows: an open crawl with its pages, a complete one as complete."""
    root = "http://h/docs/"
    open_ = CrawlState(Crawl.start("open", root))
    open_.report(root, 0, (root + "a", root + "b"), False)
    done = CrawlState(Crawl.start("done", root))
    done.report(root, 0, (), False)
    assert done.complete

    def records(state: CrawlState) -> list[tuple[bytes, bytes | None]]:
        cid = state.crawl.id
        out: list[tuple[bytes, bytes | None]] = [
            (page_key(cid, u), orjson.dumps({"depth": p.depth, "reported": p.reported}))
            for u, p in state.pages.items()
        ]
        out.append((cid.encode(), orjson.dumps(state.summary())))
        if state.complete:
            out += [(page_key(cid, u), None) for u in state.pages]
        return out

    async def go() -> Crawls:
        await ensure_topics(settings)
        topic = settings.topic(state_topic(CRAWL))
        async with kafka.started(kafka.producer(settings), settings) as producer:
            for key, value in records(open_) + records(done):
                await producer.send_and_wait(topic, value, key=key, partition=1)
        crawls = Crawls(settings)
        await crawls.assign([0, 1])
        return crawls

    crawls = asyncio.run(go())
    back = crawls.get(1, open_.crawl)
    assert back is not None and back.pages == open_.pages and not back.complete
    again = crawls.get(1, done.crawl)
    assert again is not None and again.complete and again.pages == {}
    assert not again.report(root + "x", 1, (root + "y",), False).news
    assert crawls.get(2, open_.crawl) is None  # a partition it does not own
