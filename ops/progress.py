"""Following an ingestion through the stages, from the consumer groups' committed offsets.

Works across processes and machines, for Milvus Lite or a server: a stage commits only
what it finished (the writer only what Milvus holds), so committed offsets are progress.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from streams.settings import Settings
from streams.topics import CHUNKS, URLS, VECTORS, OffsetReader, dlq


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """Counts since a baseline: messages in each topic and how many each stage finished."""

    urls: int
    fetched: int
    chunks: int
    embedded: int
    vectors: int
    written: int
    dead: dict[str, int]

    @property
    def done(self) -> bool:
        return (
            self.fetched == self.urls
            and self.embedded == self.chunks
            and self.written == self.vectors
        )


async def snapshot_raw(settings: Settings, reader: OffsetReader | None = None) -> dict[str, int]:
    """Raw counts now; pass a ``reader`` when polling, to reuse its connections."""
    if reader is None:
        async with OffsetReader(settings) as own:
            return await snapshot_raw(settings, own)
    lags = {lag.stage: lag for lag in await reader.stage_lags()}
    ends = {
        t: await reader.end(t) for t in (settings.topic(dlq(n)) for n in (URLS, CHUNKS, VECTORS))
    }
    return {
        "urls": lags["fetch"].end,
        "fetched": lags["fetch"].committed,
        "chunks": lags["embed"].end,
        "embedded": lags["embed"].committed,
        "vectors": lags["write"].end,
        "written": lags["write"].committed,
        **{f"dead:{k}": v for k, v in ends.items()},
    }


async def snapshot(
    settings: Settings, base: dict[str, int] | None = None, reader: OffsetReader | None = None
) -> Snapshot:
    raw = await snapshot_raw(settings, reader)
    b = base or {}
    d = {k: raw[k] - b.get(k, 0) for k in raw}
    return Snapshot(
        urls=d["urls"],
        fetched=d["fetched"],
        chunks=d["chunks"],
        embedded=d["embedded"],
        vectors=d["vectors"],
        written=d["written"],
        dead={k.split(":", 1)[1]: v for k, v in d.items() if k.startswith("dead:") and v},
    )


async def wait_indexed(
    settings: Settings,
    base: dict[str, int],
    expected_urls: int,
    on_update: Callable[[Snapshot], None] | None = None,
    timeout_s: float = 3600.0,
    poll_s: float = 1.0,
) -> Snapshot:
    """Until every URL published since ``base`` went through every stage (or timeout)."""
    deadline = time.monotonic() + timeout_s
    async with OffsetReader(settings) as reader:
        while True:
            snap = await snapshot(settings, base, reader)
            if on_update:
                on_update(snap)
            if snap.urls >= expected_urls and snap.done:
                return snap
            if time.monotonic() > deadline:
                raise TimeoutError(f"not indexed after {timeout_s:.0f}s: {snap}")
            await asyncio.sleep(poll_s)
