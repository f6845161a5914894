"""The fetch stage's memory of pages, kept in a compacted topic, co-partitioned with urls.

Why not a Faust Table: with a changelog-backed table, a fetch worker restarted after
SIGKILL sometimes never resumed its ``urls`` partitions after table recovery (observed with
faust-streaming 0.15.3; see docs/decisions.md). This store does the same job with plain
aiokafka: state for page U lives on partition p of ``urls.state``, where p is the ``urls``
partition U arrives on; when a worker is assigned p it reads that partition from the start
before it handles any page of p, and when p is revoked it forgets it, so its memory is
never stale.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable

import orjson
from aiokafka import TopicPartition

from streams import kafka
from streams.documents import DocState
from streams.settings import Settings
from streams.topics import URLS, state_topic

log = logging.getLogger(__name__)


class DocStates:
    """url -> DocState for the ``urls`` partitions this worker owns."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(state_topic(URLS))
        self._states: dict[str, tuple[int, DocState]] = {}
        self._owned: set[int] = set()
        self._ready = asyncio.Event()
        self._ready.set()

    async def ready(self) -> None:
        """Wait while a rebalance is loading state."""
        await self._ready.wait()

    def get(self, url: str) -> DocState | None:
        entry = self._states.get(url)
        return entry[1] if entry is not None else None

    def owns(self, partition: int) -> bool:
        return partition in self._owned

    def record(self, partition: int, url: str, state: DocState | None) -> None:
        """Remember locally (the caller also sends it to the topic)."""
        if partition not in self._owned:
            return  # revoked meanwhile: its new owner reads the topic
        if state is None:
            self._states.pop(url, None)
        else:
            self._states[url] = (partition, state)

    def encode(self, state: DocState | None, max_bytes: int | None = None) -> bytes | None:
        """The state record, within the caps of :class:`DocState` and ``max_bytes``: when
        even that is too big, the chunk hashes go (the page is re-embedded whole next
        time), then its links, so a state record always fits its topic."""
        if state is None:
            return None
        state = state.capped()
        raw = orjson.dumps(state.to_json())
        if max_bytes is not None and len(raw) > max_bytes:
            log.warning(
                "page state of %d bytes > %d: dropping its chunk hashes", len(raw), max_bytes
            )
            raw = orjson.dumps(dataclasses.replace(state, hashes=()).to_json())
            if len(raw) > max_bytes:  # a re-crawl then fetches the page whole for its links
                raw = orjson.dumps(
                    dataclasses.replace(
                        state, hashes=(), links=None, etag=None, last_modified=None
                    ).to_json()
                )
        return raw

    async def assign(self, partitions: Iterable[int]) -> None:
        """Own exactly ``partitions``: forget the others, load the new ones."""
        wanted = set(partitions)
        self._ready.clear()
        try:
            gone = self._owned - wanted
            if gone:
                self._states = {u: e for u, e in self._states.items() if e[0] not in gone}
            new = wanted - self._owned
            self._owned = wanted
            if new:
                await self._load(new)
        finally:
            self._ready.set()

    async def _load(self, partitions: set[int]) -> None:
        async with kafka.started(kafka.consumer(self.settings), self.settings) as consumer:
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            loaded = 0
            while True:
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                    break
                batches = await consumer.getmany(timeout_ms=1000)
                for tp, records in batches.items():
                    for rec in records:
                        if rec.offset >= ends[tp]:
                            continue
                        url = rec.key.decode() if rec.key else ""
                        state = DocState.from_json(orjson.loads(rec.value)) if rec.value else None
                        if state is None:
                            self._states.pop(url, None)
                        else:
                            self._states[url] = (tp.partition, state)
                        loaded += 1
            log.info("page state: read %d records of partitions %s", loaded, sorted(partitions))
