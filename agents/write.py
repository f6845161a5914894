"""Window-writer stage: ``vectors`` -> Milvus, one bulk upsert per tumbling window.

A window closes after ``window_rows`` messages or ``window_s`` seconds, whichever comes
first. Its events are acked only after Milvus accepted the whole window; until then the
writer retries with backoff and takes nothing new, so Faust's bounded stream buffer fills
and the consumer pauses: memory stays bounded while Milvus is away. ``stream.take()``
would ack a window even when its write raised (it acks in a ``finally``), hence
``noack_take`` and explicit acks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

import faust
from faust.types import EventT

from agents.common import dead_letter, delivered, fatal
from streams.app import dlq_topic, topic
from streams.messages import DecodeError, Vector, decode_vector
from streams.settings import Settings
from streams.store import MilvusStore, SchemaMismatch, reduce_window
from streams.topics import VECTORS

log = logging.getLogger(__name__)
STAGE = "write"


def register(app: faust.App, settings: Settings) -> None:
    vectors = topic(app, settings, VECTORS)
    dlq = dlq_topic(app, settings, VECTORS)

    @app.agent(vectors, name="write")
    async def write(stream: faust.StreamT) -> None:
        store = await retrying("open Milvus", lambda: MilvusStore(settings), settings)
        async for events in stream.noack_take(settings.window_rows, within=settings.window_s):
            try:
                await write_window(store, list(events))
            except Exception as exc:
                fatal("writing a window failed", exc)
            for event in events:
                await stream.ack(event)

    async def write_window(store: MilvusStore, events: list[EventT]) -> None:
        sent: list[Awaitable] = []
        good: list[tuple[EventT, Vector]] = []
        for event in events:
            try:
                good.append((event, decode_vector(event.message.value)))
            except DecodeError as exc:
                sent.append(await dead_letter(dlq, STAGE, event, exc.error_class, str(exc)))
        misfits = _misfits(store, good)
        for event, vec in good:
            if id(vec) in misfits:
                sent.append(
                    await dead_letter(
                        dlq, STAGE, event, "schema", misfits[id(vec)], 1, vec.chunk.url
                    )
                )
        window = reduce_window(v for _, v in good if id(v) not in misfits)
        t0 = time.perf_counter()
        n = await retrying("write window", lambda: store.write(window), settings)
        await delivered(sent)
        log.info(
            "window: %d messages, %d rows upserted, %d docs trimmed in %.2fs",
            len(events),
            n,
            len(window.trims),
            time.perf_counter() - t0,
        )


def _misfits(store: MilvusStore, good: list[tuple[EventT, Vector]]) -> dict[int, str]:
    """Vectors that can never fit the collection (another dimension): dead letters, not
    retries. The first vector of a new collection decides its dimension."""
    dim = store.dim
    out: dict[int, str] = {}
    for _, vec in good:
        if vec.dense is None:
            continue
        if dim is None:
            dim = vec.dim
        if vec.dim != dim:
            out[id(vec)] = str(
                SchemaMismatch(f"dimension {vec.dim} ({vec.model}) != collection's {dim}")
            )
    return out


async def retrying(what: str, fn, settings: Settings):  # noqa: ANN001, ANN201
    """Run a blocking Milvus call in a thread until it succeeds, backing off meanwhile."""
    delay = 0.5
    attempt = 0
    while True:
        attempt += 1
        try:
            return await asyncio.to_thread(fn)
        except Exception as exc:
            log.warning("%s failed (attempt %d), retrying in %.1fs: %r", what, attempt, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.write_backoff_max_s)
