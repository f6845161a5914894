"""``publish --crawl``: start crawls inside the stream and follow them to the end.

Starting a crawl is publishing its root as a ``urls`` request that carries the crawl
(``streams/crawl.py``); everything else happens in the fetch workers (reports on
``crawl``, the frontier in ``agents/frontier.py``). Following one is two waits: until the
frontier's summary on ``crawl.state`` says complete (every page it issued was reported:
fetched, unchanged, or failed), then until everything that was published meanwhile is
through every stage (:func:`ops.progress.wait_indexed`), so ``--wait`` returns when the
crawled pages are searchable or dead-lettered. A re-crawl is a new crawl (a new id) of the
same root: unchanged pages cost one conditional GET each (their links come from the
fetch stage's page state), and nothing is re-embedded.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from ops.deadletters import iter_entries
from ops.follow import Baseline
from ops.progress import Snapshot, wait_indexed
from ops.publisher import publish
from streams import kafka
from streams.crawl import Crawl, in_scope
from streams.errors import InvalidTime
from streams.messages import UrlRequest
from streams.settings import Settings
from streams.timeparse import parse_time
from streams.topics import CRAWL, state_topic

#: How often a followed crawl's summary is read.
POLL_S = 0.5


def new_crawl_id(now: datetime | None = None) -> str:
    """Unique, and sortable by start time when read in a log: ``20261207T044501-1a2b3c4d``."""
    when = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")
    return f"{when}-{uuid.uuid4().hex[:8]}"


def interval_s(text: str) -> float:
    """``--every``: a duration (``90s``, ``30m``, ``1h``, ``1d``) in seconds, written as
    ``streams.timeparse`` reads durations; :class:`InvalidTime` for anything else."""
    now = datetime.now(UTC)
    if text.strip()[-1:] not in "smhdw":
        raise InvalidTime(f"{text!r} is not a duration (90s, 30m, 1h, 1d)")
    seconds = (now - parse_time(text, now)).total_seconds()
    if seconds <= 0:
        raise InvalidTime(f"{text!r}: the interval must be longer than 0 seconds")
    return seconds


async def start(settings: Settings, crawls: list[Crawl], source: str = "cli") -> int:
    """Publish each crawl's root (depth 0); returns how many were published."""
    reqs = [UrlRequest(url=c.root, source=source, crawl=c.at(0)) for c in crawls]
    return await publish(settings, reqs)


@dataclasses.dataclass(frozen=True, slots=True)
class Summary:
    """A crawl as its frontier last recorded it (absent until its root was reported)."""

    crawl_id: str
    issued: int = 0
    reported: int = 0
    complete: bool = False


class Watcher:
    """Reads the frontier's summaries from ``crawl.state`` (every partition, without a
    group), keeping the latest of each crawl asked for; poll again for news."""

    def __init__(self, settings: Settings, crawl_ids: list[str]) -> None:
        self.settings = settings
        self.topic = settings.topic(state_topic(CRAWL))
        self.latest = {cid: Summary(cid) for cid in crawl_ids}
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Watcher:
        self._consumer = kafka.consumer(self.settings, auto_offset_reset="earliest")
        with kafka.translated(self.settings, f"reading {self.topic}"):
            await self._consumer.start()
            self._consumer.subscribe([self.topic])  # no group: assigned to every partition
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def poll(self) -> dict[str, Summary]:
        assert self._consumer is not None, "use as async with"
        with kafka.translated(self.settings, f"reading {self.topic}"):
            batches = await self._consumer.getmany(timeout_ms=int(POLL_S * 1000))
        for records in batches.values():
            for rec in records:
                key = (rec.key or b"").decode("utf-8", "replace")
                if key in self.latest and rec.value:
                    obj: dict[str, Any] = orjson.loads(rec.value)
                    self.latest[key] = Summary(
                        key, int(obj["issued"]), int(obj["reported"]), bool(obj["complete"])
                    )
        return dict(self.latest)


@dataclasses.dataclass(frozen=True, slots=True)
class Followed:
    """How the crawls ended: their summaries, the pipeline's counts since the baseline,
    their pages' dead letters by (stage, error_class), and whether time ran out."""

    summaries: dict[str, Summary]
    snapshot: Snapshot | None
    failures: dict[tuple[str, str], int]
    timed_out: bool

    @property
    def pages(self) -> int:
        return sum(s.issued for s in self.summaries.values())


async def follow(
    settings: Settings,
    base: Baseline,
    crawls: list[Crawl],
    on_crawl: Callable[[dict[str, Summary]], None] | None = None,
    on_snapshot: Callable[[Snapshot], None] | None = None,
    timeout_s: float = 3600.0,
) -> Followed:
    """Until every crawl is complete and every page it issued is searchable or
    dead-lettered (or ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    summaries: dict[str, Summary] = {c.id: Summary(c.id) for c in crawls}
    snap: Snapshot | None = None
    timed_out = False
    async with Watcher(settings, [c.id for c in crawls]) as watcher:
        while not all(s.complete for s in summaries.values()):
            if time.monotonic() > deadline:
                timed_out = True
                break
            summaries = await watcher.poll()
            if on_crawl is not None:
                on_crawl(summaries)
            await asyncio.sleep(0)
    if not timed_out:
        issued = sum(s.issued for s in summaries.values())
        left = max(deadline - time.monotonic(), 1.0)
        try:
            snap = await wait_indexed(settings, base.offsets, issued, on_snapshot, left)
        except TimeoutError:
            timed_out = True
    return Followed(summaries, snap, await failures(settings, base, crawls), timed_out)


async def failures(
    settings: Settings, base: Baseline, crawls: list[Crawl]
) -> dict[tuple[str, str], int]:
    """Dead letters since ``base`` about pages in the crawls' scope, by (stage, class)."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    async for entry in iter_entries(settings, since=base.dead):
        letter = entry.letter
        if letter is None or letter.url is None:
            continue
        if any(in_scope(c, letter.url) for c in crawls):
            counts[(letter.stage, letter.error_class)] += 1
    return dict(counts)
