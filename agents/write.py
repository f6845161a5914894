"""Window-writer stage: ``vectors`` -> Milvus, one bulk upsert per tumbling window.

A window closes after ``window_rows`` messages or ``window_s`` seconds, whichever comes
first. Its events are acked only after Milvus accepted the window; while Milvus is
unavailable the writer retries with backoff and takes nothing new, so Faust's bounded
stream buffer fills and the consumer pauses: memory stays bounded while Milvus is away.
``stream.take()`` would ack a window even when its write raised (it acks in a
``finally``), hence ``noack_take`` and the commit rule of :mod:`agents.checkpoint`.

A message never stops the stage: one that cannot be decoded, or whose vector can never be
written (NaN/Inf, another dimension), is dead-lettered before the write; a row Milvus
refuses for its data is found by splitting the request and dead-lettered
(``milvus_rejected``) while the rest of the window is written. A message older than the
version Milvus holds for its document is dropped (superseded, not broken: logged and
counted, not dead-lettered), so nothing moves a page backwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

import faust
from faust.types import TP, EventT

from agents.app import dlq_topic, topic
from agents.checkpoint import Checkpoint, delivered
from agents.common import dead_letter
from agents.telemetry import set_ready
from streams import metrics
from streams.errors import DecodeError
from streams.messages import Vector, decode_vector
from streams.settings import Settings
from streams.store import MilvusStore, is_unavailable, reduce_window, refusal
from streams.topics import VECTORS

log = logging.getLogger(__name__)
STAGE = "write"
REJECTED = "milvus_rejected"

R = TypeVar("R")


class WriteStats:
    """Running totals for the log: what was written, refused and superseded."""

    def __init__(self) -> None:
        self.upserted = 0
        self.dead = 0
        self.stale = 0


class WindowWriter:
    """The writer's logic, without Faust: one window of ``vectors`` events -> Milvus.

    ``store`` is the Milvus collection (a :class:`MilvusStore`), ``dlq`` the dead-letter
    topic of ``vectors`` (anything with Faust's ``send`` and ``get_topic_name``).
    """

    def __init__(
        self,
        settings: Settings,
        store: MilvusStore,
        dlq: faust.TopicT,
        stats: WriteStats | None = None,
        commit: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.dlq = dlq
        self.stats = stats or WriteStats()
        self.commit = commit  # the consumer's commit, run after each window (Checkpoint)
        # (requested_at, chunk_index, chunk_count) of the rows the last window upserted
        self._written: list[tuple[str | None, int | None, int]] = []

    async def run(self, stream: faust.Stream) -> None:
        """Write window after window; each window's events are acked once it is written."""
        checkpoint = Checkpoint(stream.ack, "writing a window", self.commit)
        settings = self.settings
        async for events in stream.noack_take(settings.window_rows, within=settings.window_s):
            window = list(events)
            await checkpoint.commit(window, self.write_window(window))
            # Searchable and acked: the end of the freshness of what this window wrote.
            per_chunk, per_page = metrics.freshness_samples(self._written, time.time())
            self._written = []
            for age in per_chunk:
                metrics.CHUNK_FRESHNESS.observe(age)
            for age in per_page:
                metrics.FRESHNESS.observe(age)

    async def write_window(self, events: list[EventT]) -> None:
        """Write one window; return once its rows are in Milvus and its dead letters on the
        broker. Raises when Milvus fails other than by refusing a row's data."""
        store, dlq, settings, stats = self.store, self.dlq, self.settings, self.stats
        sent: list[Awaitable] = []
        good: list[tuple[EventT, Vector]] = []
        for event in events:
            try:
                good.append((event, decode_vector(event.message.value)))
            except DecodeError as exc:
                sent.append(await dead_letter(dlq, STAGE, event, exc.error_class, str(exc)))
        refused = _refusals(store, good)
        accepted: list[tuple[EventT, Vector]] = []
        for event, vec in good:
            if id(vec) in refused:
                cls, why = refused[id(vec)]
                sent.append(await dead_letter(dlq, STAGE, event, cls, why, 1, vec.chunk.url))
            else:
                accepted.append((event, vec))
        event_of = {id(vec): event for event, vec in accepted}
        versioned = {v.chunk.doc_id for _, v in accepted if v.chunk.version is not None}
        known: dict[str, int] = {}
        if versioned:
            known = await retrying(
                "read document versions",
                lambda: store.versions(versioned),
                settings,
                everything=True,
            )
        window = reduce_window((v for _, v in accepted), known)
        for vec, newer in window.stale:
            c = vec.chunk
            what = f"chunk {c.chunk_index}" if c.op == "upsert" else f"trim to {c.chunk_count}"
            log.info(
                "stale: %s of %s at version %s < %s: dropped (superseded)",
                what,
                c.url,
                c.version,
                newer,
            )
        t0 = time.perf_counter()
        result = await retrying("write window", lambda: store.write(window), settings)
        metrics.WINDOW_SECONDS.observe(time.perf_counter() - t0)
        metrics.WINDOW_ROWS.observe(len(events))
        metrics.ROWS_WRITTEN.inc(result.upserted)
        rejected = {id(vec) for vec, _ in result.refused_rows}
        self._written = [
            (v.chunk.requested_at, v.chunk.chunk_index, v.chunk.chunk_count)
            for v in window.rows.values()
            if id(v) not in rejected
        ]
        if result.refused_rows or result.refused_trims:
            metrics.MILVUS_ERRORS.labels("rejected").inc(
                len(result.refused_rows) + len(result.refused_trims)
            )
        for vec, error in result.refused_rows:
            sent.append(
                await dead_letter(dlq, STAGE, event_of[id(vec)], REJECTED, error, 1, vec.chunk.url)
            )
        for doc, error in result.refused_trims:
            last = window.last[doc]
            sent.append(
                await dead_letter(
                    dlq, STAGE, event_of[id(last)], REJECTED, f"trim: {error}", 1, last.chunk.url
                )
            )
        await delivered(sent)
        stats.upserted += result.upserted
        stats.stale += len(window.stale)
        stats.dead += len(sent)
        log.info(
            "window: %d messages, %d rows upserted, %d docs trimmed, %d dead-lettered, "
            "%d stale dropped in %.2fs (totals: %d upserted, %d dead-lettered, %d stale)",
            len(events),
            result.upserted,
            len(window.trims),
            len(sent),
            len(window.stale),
            time.perf_counter() - t0,
            stats.upserted,
            stats.dead,
            stats.stale,
        )


def register(app: faust.App, settings: Settings) -> None:
    """Wire the writer into ``app``: its agent on ``vectors``, and the rebalance signal."""
    vectors = topic(app, settings, VECTORS)
    dlq = dlq_topic(app, settings, VECTORS)
    stats = WriteStats()
    opened: list[MilvusStore] = []

    # mypy matches no function to mode 0.7.1's SignalHandlerT, not even its own form
    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def forget_versions(sender: object, assigned: set[TP], **kwargs: object) -> None:
        # Another writer may have written these partitions' documents meanwhile: its
        # versions are in Milvus, not in this process' cache.
        for store in opened:
            store.forget_versions()

    @app.agent(vectors, name="write")
    async def write(stream: faust.StreamT) -> None:
        set_ready("opening Milvus")
        store = await retrying(
            "open Milvus", lambda: MilvusStore(settings), settings, everything=True
        )
        opened.append(store)
        set_ready()
        # faust hands an agent a Stream; its decorator is typed for StreamT
        writer = WindowWriter(settings, store, dlq, stats, commit=app.consumer.commit)
        await writer.run(cast(faust.Stream, stream))


def _refusals(store: MilvusStore, good: list[tuple[EventT, Vector]]) -> dict[int, tuple[str, str]]:
    """Vectors that can never be written, by ``id()``: ``(error_class, reason)``. They are
    dead letters, not retries. The first writable vector of a new collection decides its
    dimension and whether it has a sparse field, as ``MilvusStore.ensure_collection`` will.
    """
    dim, sparse = store.dim, store.sparse
    out: dict[int, tuple[str, str]] = {}
    for _, vec in good:
        why = refusal(vec, dim, sparse if dim is not None else vec.sparse is not None)
        if why is not None:
            out[id(vec)] = why
        elif dim is None and vec.dense is not None:
            dim, sparse = len(vec.dense), vec.sparse is not None
    return out


async def retrying(
    what: str, fn: Callable[[], R], settings: Settings, everything: bool = False
) -> R:
    """Run a blocking Milvus call in a thread until it succeeds, backing off meanwhile.

    Only unavailability is waited out, unless ``everything`` (opening Milvus, reading
    versions: no message is to blame there). Anything else is raised: the callers split
    and dead-letter data errors before they get here.
    """
    delay = 0.5
    attempt = 0
    while True:
        attempt += 1
        try:
            return await asyncio.to_thread(fn)
        except Exception as exc:
            if not everything and not is_unavailable(exc):
                raise
            metrics.MILVUS_ERRORS.labels("unavailable").inc()
            log.warning(
                "%s failed (attempt %d), retrying in %.1fs: %s",
                what,
                attempt,
                delay,
                str(exc) or repr(exc),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.write_backoff_max_s)
