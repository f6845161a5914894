"""Embed stage: ``chunks`` -> ``vectors``; one model in memory, fed continuously.

One consumer per ``chunks`` partition. The agent gathers a pool of chunks (by count or
time) and starts a task for it at once: the task decodes and tokenizes its pool while the
previous pool's task still holds the model (tokenization is not on the model's critical
path), then takes the model in arrival order and runs its token-budget batches (in a
thread: torch and ONNX Runtime release the GIL, so heartbeats, commits and the next
pool's gathering go on). Each batch's vectors are sent as soon as it is encoded, so a
page's first chunks become searchable without waiting for its last; a pool's events are
acked once the broker has all its vectors (the commit rule of :mod:`agents.checkpoint`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import cast

import faust
import numpy as np
from faust.types import EventT

from agents.app import dlq_topic, topic
from agents.checkpoint import Checkpoint, InOrder, delivered
from agents.common import Outcome, dead_letter, hop_headers, hops_of, produce
from agents.telemetry import set_ready
from streams import metrics
from streams.batching import plan_batches
from streams.embedder import Embedder, Prepared
from streams.errors import DecodeError
from streams.messages import Chunk, Sparse, Vector, decode_chunk, encode_vector
from streams.settings import Settings
from streams.topics import CHUNKS, VECTORS

log = logging.getLogger(__name__)
STAGE = "embed"


class EmbedStats:
    """Busy time of the model, for the log line (the metrics count the same)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.busy_s = 0.0
        self.texts = 0
        self.tokens = 0


class EmbedStage:
    """The embed stage's logic, without Faust: pools of ``chunks`` events -> ``vectors``.

    ``embedder`` is the model (an :class:`Embedder`: ``tokenize``, ``encode_ids``,
    ``n_special``, ``name``, ``dim``), ``vectors`` the output topic, ``dlq`` the
    dead-letter topic of ``chunks``.
    """

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        vectors: faust.TopicT,
        dlq: faust.TopicT,
        stats: EmbedStats | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.vectors = vectors
        self.dlq = dlq
        self.stats = stats or EmbedStats()
        self._pools: InOrder | None = None
        self._model = asyncio.Lock()  # FIFO: pools take the model in the order gathered
        self._last_log = 0.0

    async def run(self, stream: faust.Stream) -> None:
        """Gather pool after pool; one is encoded while the next is tokenized and a third
        gathered, and each pool's events are acked once its vectors (or dead letters) are
        delivered."""
        pool = self.settings.embed_max_batch * 4
        checkpoint = Checkpoint(stream.ack, "embedding a pool")
        async with InOrder(checkpoint, in_flight=1) as pools:
            self._pools = pools
            async for events in stream.noack_take(pool, within=self.settings.embed_gather_s):
                pool_events = list(events)
                task = asyncio.create_task(self.encode_pool(pool_events))
                try:
                    await pools.add(pool_events, task)
                except BaseException:  # stopped or revoked while waiting for room
                    task.cancel()
                    raise

    async def encode_pool(self, events: list[EventT]) -> None:
        """Embed one pool; return once each event's vector or dead letter is delivered."""
        dlq, settings, stats, embedder = self.dlq, self.settings, self.stats, self.embedder
        decoded: list[Chunk | None] = []
        sent: list[Awaitable] = []
        for event in events:
            try:
                decoded.append(decode_chunk(event.message.value))
            except DecodeError as exc:
                decoded.append(None)
                sent.append(await dead_letter(dlq, STAGE, event, exc.error_class, str(exc)))
        upserts = {i: c for i, c in enumerate(decoded) if c is not None and c.op == "upsert"}
        todo = list(upserts)
        results: dict[int, Vector | Exception] = {}
        held = held_back(decoded)
        early: set[int] = set()  # sent with their batch
        if todo:
            texts = [upserts[i].text or "" for i in todo]
            ids = await asyncio.to_thread(embedder.tokenize, texts)
            lengths = [len(x) for x in ids]
            for b, n in enumerate(lengths):
                if n <= embedder.n_special:  # e.g. only zero-width or control characters
                    results[todo[b]] = ValueError("text has no token the model can read")
            plan = [
                [b for b in batch if todo[b] not in results]
                for batch in plan_batches(
                    lengths, settings.embed_batch_tokens, settings.embed_max_batch
                )
            ]
            plan = [batch for batch in plan if batch]
            async with self._model:
                async for batch, prepared in self._prepared_ahead(plan, ids):
                    idx = [todo[b] for b in batch]
                    done = await self.encode_batch(
                        [upserts[i] for i in idx], idx, [ids[b] for b in batch], prepared
                    )
                    results.update(done)
                    stats.tokens += sum(lengths[b] for b in batch)
                    for i in idx:  # progressively: this batch's pages need not wait
                        if i not in held:
                            sent.append(await self._send(events[i], upserts[i], done[i]))
                            early.add(i)
        for i, (event, chunk) in enumerate(zip(events, decoded, strict=True)):
            if chunk is None or i in early:
                continue  # undecodable (dead-lettered above), or sent with its batch
            vec: Vector | Exception = Vector(chunk=chunk) if chunk.op == "delete" else results[i]
            sent.append(await self._send(event, chunk, vec))
        await delivered(sent)
        self._log_stats()

    async def _prepared_ahead(
        self, plan: list[list[int]], ids: list[list[int]]
    ) -> AsyncIterator[tuple[list[int], Prepared]]:
        """The batches of ``plan``, each padded (and on a GPU copied) while the one before
        it runs: the model never waits for the host between two batches."""
        embedder = self.embedder

        def ahead(k: int) -> asyncio.Task[Prepared]:
            return asyncio.ensure_future(
                asyncio.to_thread(embedder.prepare, [ids[b] for b in plan[k]])
            )

        task = ahead(0) if plan else None
        try:
            for k, batch in enumerate(plan):
                assert task is not None
                prepared = await task
                task = ahead(k + 1) if k + 1 < len(plan) else None
                yield batch, prepared
        finally:
            if task is not None and not task.done():
                task.cancel()

    async def _send(self, event: EventT, chunk: Chunk, vec: Vector | Exception) -> Awaitable:
        """The event's vector, or its dead letter when the model could not embed it."""
        if isinstance(vec, Exception):
            return await dead_letter(self.dlq, STAGE, event, "embed", repr(vec), 1, chunk.url)
        out = Outcome(self.dlq, STAGE, event, chunk.url)  # over the size limit: dead letter
        hops = hop_headers(hops_of(event))
        return await produce(self.vectors, chunk.key(), encode_vector(vec), out, headers=hops)

    async def encode_batch(
        self,
        batch: list[Chunk],
        idx: list[int],
        ids: list[list[int]],
        prepared: Prepared | None = None,
    ) -> dict[int, Vector | Exception]:
        """One encode call (of ``prepared``, ``ids`` made ready ahead, if given); if it
        fails, each text alone, so one bad text costs one."""
        embedder, stats = self.embedder, self.stats
        t0 = time.perf_counter()
        try:
            if prepared is not None:
                out = await asyncio.to_thread(embedder.encode_prepared, prepared)
            else:
                out = await asyncio.to_thread(embedder.encode_ids, ids)
            encoded = [
                (c, out.dense[j], out.sparse[j] if out.sparse else None)
                for j, c in enumerate(batch)
            ]
        except Exception as exc:
            if len(batch) == 1:
                log.warning("cannot embed chunk of %s: %r", batch[0].url, exc)
                return {idx[0]: exc}
            res: dict[int, Vector | Exception] = {}
            for c, i, one in zip(batch, idx, ids, strict=True):
                res.update(await self.encode_batch([c], [i], [one]))
            return res
        finally:
            took = time.perf_counter() - t0
            stats.busy_s += took
            metrics.EMBED_BUSY.inc(took)
        tokens = sum(len(x) for x in ids)
        stats.texts += len(batch)
        metrics.ENCODE_SECONDS.observe(took)
        metrics.ENCODE_BATCH_TEXTS.observe(len(batch))
        metrics.ENCODE_BATCH_TOKENS.observe(tokens)
        metrics.ENCODE_TEXTS.inc(len(batch))
        metrics.ENCODE_TOKENS.inc(tokens)
        return {
            i: Vector(
                chunk=c,
                model=embedder.name,
                dim=embedder.dim,
                dense=dense,
                sparse=Sparse(list(sp), _f32(sp.values())) if sp is not None else None,
            )
            for i, (c, dense, sp) in zip(idx, encoded, strict=True)
        }

    def _log_stats(self) -> None:
        """Cumulative, every 2 s and whenever no pool waits: for a person reading the log
        (the same figures are metrics: ``ragstream_embed_busy_seconds_total``...)."""
        now = time.perf_counter()
        idle = self._pools is None or self._pools.pending == 0
        if now - self._last_log >= 2.0 or idle:
            stats = self.stats
            log.info(
                "embed stats: busy_s=%.3f texts=%d tokens=%d",
                stats.busy_s,
                stats.texts,
                stats.tokens,
            )
            self._last_log = now


def register(app: faust.App, settings: Settings) -> None:
    """Wire the embed stage into ``app``: its agent on ``chunks``."""
    chunks = topic(app, settings, CHUNKS)
    vectors = topic(app, settings, VECTORS)
    dlq = dlq_topic(app, settings, CHUNKS)
    stats = EmbedStats()

    @app.agent(chunks, name="embed")
    async def embed(stream: faust.StreamT) -> None:
        set_ready("loading the model")
        embedder = await asyncio.to_thread(Embedder, settings)
        set_ready()
        # faust hands an agent a Stream; its decorator is typed for StreamT
        await EmbedStage(settings, embedder, vectors, dlq, stats).run(cast(faust.Stream, stream))


def held_back(chunks: Sequence[Chunk | None]) -> set[int]:
    """Positions in a pool whose vectors are sent at the pool's end, in offset order,
    rather than with their batch.

    Batches run longest text first, so sending with the batch reorders a pool. That is
    harmless between the chunks of one update of a page (distinct rows), not between two
    updates of the same page, or an update and a trim: the writer orders those by version,
    and a message without one (an older producer) only by its offset. So a page keeps its
    offset order when the pool holds a trim of it, two versions of it, or one chunk of it
    twice.
    """
    seen: dict[str, set[tuple[int | None, int | None]]] = {}
    keep_order: set[str] = set()
    for c in chunks:
        if c is None:
            continue
        if c.op != "upsert":
            keep_order.add(c.doc_id)
            continue
        mine = seen.setdefault(c.doc_id, set())
        if (c.version, c.chunk_index) in mine or any(v != c.version for v, _ in mine):
            keep_order.add(c.doc_id)
        mine.add((c.version, c.chunk_index))
    return {i for i, c in enumerate(chunks) if c is not None and c.doc_id in keep_order}


def _f32(values: Iterable[float]) -> np.ndarray:
    return np.fromiter(values, dtype=np.float32)
