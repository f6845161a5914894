"""Publish-to-searchable latency, followed from Kafka alone.

Only the writer may open a Milvus Lite file while the pipeline runs, so "searchable" is
read from the writer's consumer group instead: the writer commits a ``vectors`` offset only
after the window holding it is in Milvus. A chunk is searchable once the writer's committed
offset on its partition has passed its vector; a page, once every one of its vectors has
been seen on ``vectors`` and passed. Pure bookkeeping here; the Kafka reading is in
``pipeline``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class DocProgress:
    """What ``vectors`` has shown of one page since it was published."""

    count: int | None = None  # the page's chunk count, from its latest message
    seen: set[int] = dataclasses.field(default_factory=set)
    partition: int = -1
    last_offset: int = -1
    offsets: dict[int, int] = dataclasses.field(default_factory=dict)  # chunk -> its vector

    @property
    def complete(self) -> bool:
        """Every chunk of the page has a vector on the topic (or the page has none)."""
        if self.count is None:
            return False
        return self.count == 0 or len(self.seen) >= self.count


class SearchableTracker:
    """Per page: when its publish was acknowledged, and when it became searchable."""

    def __init__(self, doc_ids: dict[str, str]) -> None:
        """``doc_ids``: doc_id -> URL of every page followed (others are ignored)."""
        self.url_of = dict(doc_ids)
        self.progress: dict[str, DocProgress] = {d: DocProgress() for d in doc_ids}
        self.acked: dict[str, float] = {}
        self.searchable: dict[str, float] = {}
        self.chunk_searchable: dict[tuple[str, int], float] = {}  # (url, index) -> when

    def published(self, url: str, at: float) -> None:
        self.acked[url] = at

    def vector(
        self,
        doc_id: str,
        op: str,
        chunk_index: int | None,
        chunk_count: int,
        partition: int,
        offset: int,
    ) -> None:
        """One message on ``vectors`` (upserts carry an index; a trim carries only a count)."""
        p = self.progress.get(doc_id)
        if p is None:
            return
        p.count = chunk_count
        if op == "upsert" and chunk_index is not None and chunk_index < chunk_count:
            p.seen.add(chunk_index)
            p.offsets[chunk_index] = offset
        p.partition = partition
        p.last_offset = max(p.last_offset, offset)

    def committed(self, offsets: dict[int, int], at: float) -> int:
        """The writer's committed offset per ``vectors`` partition, read at ``at``; returns
        how many pages became searchable with it."""
        n = 0
        for doc, p in self.progress.items():
            url = self.url_of[doc]
            committed = offsets.get(p.partition, -1)
            for index, offset in p.offsets.items():
                if committed > offset:
                    self.chunk_searchable.setdefault((url, index), at)
            if url in self.searchable or not p.complete or p.last_offset < 0:
                continue
            if committed > p.last_offset:
                self.searchable[url] = at
                n += 1
        return n

    @property
    def done(self) -> bool:
        return len(self.searchable) == len(self.url_of)

    def latencies(self) -> dict[str, float]:
        """Seconds from publish ack to searchable, per URL that has both."""
        return {
            url: self.searchable[url] - self.acked[url]
            for url in self.searchable
            if url in self.acked
        }

    def chunk_latencies(self) -> list[float]:
        """Seconds from publish ack to searchable, per chunk of a page that has an ack: a
        page is searchable progressively, its first chunks before its last."""
        return [
            at - self.acked[url]
            for (url, _index), at in self.chunk_searchable.items()
            if url in self.acked
        ]
