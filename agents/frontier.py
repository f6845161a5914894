"""The crawl frontier: ``crawl`` reports -> new ``urls`` requests, one owner per crawl.

The fetch stage reports each page of a crawl (its outcome and links) on ``crawl``, keyed
by the crawl id, so all reports of one crawl reach one partition and so one frontier; it
runs in the fetch worker (same Faust app and consumer group), so crawling scales with the
fetch workers. For each report the frontier issues the new in-scope pages
(:class:`streams.crawl.CrawlState`: seen set, ``max_depth``, ``max_pages``) as ``urls``
requests of depth + 1, records what changed on ``crawl.state`` (compacted, co-partitioned
with ``crawl``, read back like :mod:`agents.docstate`), and acks the report only once both
are delivered. A crash in between redelivers the report: already-issued pages may be
requested again (the page is fetched twice, reported twice; the second report changes
nothing), never lost. When every issued page was reported the crawl is complete: its
summary says so (``ops/crawl.py`` follows it) and its page records are deleted.

State records, by key: ``<crawl id>`` -> the summary (spec, issued, reported, complete);
``<crawl id>\\n<url>`` -> ``{"depth", "reported"}`` of one page (a tombstone once complete).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Iterable
from typing import cast

import faust
import orjson
from aiokafka import TopicPartition
from faust.types import TP, EventT

from agents.app import dlq_topic, topic
from agents.checkpoint import Checkpoint, delivered
from agents.common import Outcome, dead_letter, produce
from streams import kafka
from streams.crawl import Crawl, CrawlState, Page
from streams.errors import DecodeError
from streams.messages import UrlRequest, decode_crawl, encode_url
from streams.settings import Settings
from streams.topics import CRAWL, URLS, state_topic

log = logging.getLogger(__name__)
STAGE = "frontier"
#: Where a page's record key splits from its crawl id (never in an id or a URL).
SEP = "\n"
#: ``source`` of the requests the frontier publishes.
SOURCE = "crawl"


def page_key(crawl_id: str, url: str) -> bytes:
    return f"{crawl_id}{SEP}{url}".encode()


@dataclasses.dataclass(slots=True)
class _Loaded:
    """A crawl as read back from its state partition (its spec comes with the summary)."""

    partition: int
    crawl: Crawl | None = None
    pages: dict[str, Page] = dataclasses.field(default_factory=dict)
    complete: bool = False


class Crawls:
    """crawl id -> :class:`CrawlState` for the ``crawl`` partitions this worker owns."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(state_topic(CRAWL))
        self._crawls: dict[str, tuple[int, CrawlState]] = {}
        self._owned: set[int] = set()
        self._ready = asyncio.Event()
        self._ready.set()

    async def ready(self) -> None:
        await self._ready.wait()

    def get(self, partition: int, crawl: Crawl) -> CrawlState | None:
        """The crawl's state (a new one for a crawl not seen yet); ``None`` when the
        partition was revoked meanwhile (its new owner handles the report)."""
        if partition not in self._owned:
            return None
        entry = self._crawls.get(crawl.id)
        if entry is None:
            entry = (partition, CrawlState(crawl.at(0)))
            self._crawls[crawl.id] = entry
        return entry[1]

    def finished(self, crawl_id: str) -> None:
        """A complete crawl needs its pages no more: only that it is complete."""
        entry = self._crawls.get(crawl_id)
        if entry is not None:
            entry[1].pages.clear()

    async def assign(self, partitions: Iterable[int]) -> None:
        wanted = set(partitions)
        self._ready.clear()
        try:
            gone = self._owned - wanted
            if gone:
                self._crawls = {k: e for k, e in self._crawls.items() if e[0] not in gone}
            new = wanted - self._owned
            self._owned = wanted
            if new:
                await self._load(new)
        finally:
            self._ready.set()

    async def _load(self, partitions: set[int]) -> None:
        loaded: dict[str, _Loaded] = {}
        async with kafka.started(kafka.consumer(self.settings), self.settings) as consumer:
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while True:
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                    break
                batches = await consumer.getmany(timeout_ms=1000)
                for tp, records in batches.items():
                    for rec in records:
                        if rec.offset < ends[tp]:
                            _apply(loaded, tp.partition, rec.key or b"", rec.value)
        for crawl_id, entry in loaded.items():
            if entry.crawl is None:
                continue  # pages without a summary: the crawl's next report brings the spec
            state = CrawlState(entry.crawl, {} if entry.complete else entry.pages)
            state.complete = entry.complete
            self._crawls[crawl_id] = (entry.partition, state)
        log.info("crawl state: %d crawls of partitions %s", len(loaded), sorted(partitions))


def _apply(loaded: dict[str, _Loaded], partition: int, key: bytes, value: bytes | None) -> None:
    crawl_id, _, url = key.decode("utf-8", "replace").partition(SEP)
    entry = loaded.setdefault(crawl_id, _Loaded(partition))
    obj = orjson.loads(value) if value else None
    if not url:
        if obj is not None:
            entry.crawl = Crawl.from_json(obj["crawl"])
            entry.complete = bool(obj["complete"])
    elif obj is None:
        entry.pages.pop(url, None)
    else:
        entry.pages[url] = Page(int(obj["depth"]), bool(obj["reported"]))


class Frontier:
    """The frontier's logic without Faust's agent: one report in, its requests and state
    records out, delivered before the report is acked."""

    def __init__(
        self,
        settings: Settings,
        *,
        crawls: Crawls,
        urls: faust.TopicT,
        state_log: faust.TopicT,
        dlq: faust.TopicT,
    ) -> None:
        self.settings = settings
        self.crawls = crawls
        self.urls = urls
        self.state_log = state_log
        self.dlq = dlq

    async def run(self, stream: faust.Stream) -> None:
        s = stream.noack()
        checkpoint = Checkpoint(s.ack, "following a crawl")
        async for event in s.events():
            await checkpoint.commit([event], self.handle(event))

    async def handle(self, event: EventT) -> None:
        try:
            report = decode_crawl(event.message.value)
        except DecodeError as exc:
            await delivered([await dead_letter(self.dlq, STAGE, event, exc.error_class, str(exc))])
            return
        await self.crawls.ready()
        partition = event.message.partition
        state = self.crawls.get(partition, report.crawl)
        if state is None:
            return  # revoked: the partition's new owner reads this report again
        step = state.report(
            report.url, report.crawl.depth, report.links, same_depth=report.outcome == "canonical"
        )
        if not step.news:
            return
        outcome = Outcome(self.dlq, STAGE, event, report.url)
        sent: list[Awaitable] = []
        for url, depth in step.requests:
            req = UrlRequest(url=url, source=SOURCE, crawl=state.crawl.at(depth))
            sent.append(await produce(self.urls, req.key(), encode_url(req), outcome, what="url"))
        crawl_id = state.crawl.id
        for url in step.changed:
            page = state.pages[url]
            value = orjson.dumps({"depth": page.depth, "reported": page.reported})
            sent.append(await self._record(page_key(crawl_id, url), value, partition))
        sent.append(await self._record(crawl_id.encode(), orjson.dumps(state.summary()), partition))
        if state.complete:
            for url in state.pages:  # the summary stays; the pages may be compacted away
                sent.append(await self._record(page_key(crawl_id, url), None, partition))
        await delivered(sent)
        log.info(
            "crawl %s: %s reported, %d new (%d/%d reported)%s",
            crawl_id,
            report.url,
            len(step.requests),
            state.reported,
            state.issued,
            ", complete" if state.complete else "",
        )
        if state.complete:
            self.crawls.finished(crawl_id)

    async def _record(self, key: bytes, value: bytes | None, partition: int) -> Awaitable:
        return await self.state_log.send(key=key, value=value, partition=partition)


def register(app: faust.App, settings: Settings) -> None:
    """Wire the frontier into the fetch stage's ``app``: its agent on ``crawl`` and the
    rebalance signal that loads its crawls' state."""
    crawl = topic(app, settings, CRAWL)
    crawls = Crawls(settings)
    frontier = Frontier(
        settings,
        crawls=crawls,
        urls=topic(app, settings, URLS),
        state_log=topic(app, settings, state_topic(CRAWL)),
        dlq=dlq_topic(app, settings, CRAWL),
    )
    name = settings.topic(CRAWL)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def load_crawls(sender: object, assigned: set[TP], **kwargs: object) -> None:
        await crawls.assign(tp.partition for tp in assigned if tp.topic == name)

    @app.agent(crawl, name="frontier")
    async def follow(stream: faust.StreamT) -> None:
        await frontier.run(cast(faust.Stream, stream))
