"""Fetch + chunk stage: ``urls`` -> ``chunks``; many pages in flight, acked in order.

Each URL becomes a task (fetch, extract, chunk, produce); tasks run concurrently, but a
URL's event is acked only after its chunks (or its dead letter) were acknowledged by the
broker, and events are acked in offset order, so a committed offset never passes a page
still in flight (:class:`agents.checkpoint.InOrder`). Two requests for the same page run
one after the other, so its chunks reach ``chunks`` in request order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import cast

import faust
from faust.types import TP, EventT

from agents.app import dlq_topic, topic
from agents.checkpoint import Checkpoint, InOrder, delivered
from agents.common import (
    LIMITS,
    Outcome,
    check_size,
    dead_letter,
    header_int,
    hop_headers,
    produce,
    record_size,
)
from agents.docstate import DocStates
from agents.extractor import ExtractPool
from agents.fetcher import Fetcher
from agents.retry import RetryForwarder
from agents.telemetry import set_ready
from streams.chunking import Chunker
from streams.documents import DocState, page_version, plan_update, trim
from streams.errors import (
    DecodeError,
    ExtractUnavailable,
    FetchFailed,
    PageRefused,
    TooLarge,
)
from streams.ids import normalize_url
from streams.messages import Chunk, UrlRequest, decode_url, encode_chunk
from streams.model import resolve_model_path
from streams.retry import (
    HOPS,
    NOT_BEFORE,
    RETRIES,
    is_transient,
    newest,
    next_retry,
    superseded,
)
from streams.settings import Settings
from streams.topics import CHUNKS, URLS, retry_delays, retry_topic, state_topic

log = logging.getLogger(__name__)
STAGE = "fetch"


class FetchStage:
    """The fetch stage's logic, without Faust: ``urls`` events -> chunk messages.

    Collaborators come in: ``fetcher`` (a :class:`Fetcher`: ``fetch``), ``extractor`` (an
    :class:`ExtractPool`: ``page_chunks``), ``docs`` (the pages' :class:`DocStates`), the
    topics ``chunks``, ``dlq`` (dead letters of ``urls``), ``state_log`` (where ``docs`` is
    kept) and ``retry_out`` (the delay topic of each delayed retry, by its number).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        fetcher: Fetcher,
        extractor: ExtractPool,
        docs: DocStates,
        chunks: faust.TopicT,
        dlq: faust.TopicT,
        state_log: faust.TopicT,
        retry_out: Mapping[int, faust.TopicT],
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.extractor = extractor
        self.docs = docs
        self.chunks = chunks
        self.dlq = dlq
        self.state_log = state_log
        self.retry_out = retry_out
        self.delays = retry_delays(settings)

    async def run(self, stream: faust.Stream) -> None:
        """Handle up to ``fetch_concurrency`` pages at once; ack them in offset order, each
        once its chunks (or dead letter) are delivered. Two requests for one page (one
        key) run one after the other, so its chunks reach ``chunks`` in request order."""
        concurrency = self.settings.fetch_concurrency
        running: dict[str, asyncio.Task] = {}
        gate = asyncio.Semaphore(concurrency)
        s = stream.noack()
        checkpoint = Checkpoint(s.ack, "fetching a page")
        async with InOrder(checkpoint, in_flight=concurrency * 4) as pages:
            async for event in s.events():
                key = (event.message.key or b"").decode("utf-8", "replace")
                task = asyncio.create_task(self._after(running.get(key), gate, event))
                running[key] = task
                task.add_done_callback(functools.partial(_forget, running, key))
                await pages.add([event], task)

    async def _after(
        self, before: asyncio.Task | None, gate: asyncio.Semaphore, event: EventT
    ) -> None:
        if before is not None:
            await asyncio.wait([before])
        async with gate:
            await self.handle(event)

    async def handle(self, event: EventT) -> None:
        """One ``urls`` event; returns once its outcome (chunk messages, a delayed retry or
        a dead letter, then the page's new state) is delivered."""
        docs, dlq, chunks = self.docs, self.dlq, self.chunks
        headers = event.message.headers
        hops, retries = header_int(headers, HOPS), header_int(headers, RETRIES)
        try:
            req = decode_url(event.message.value)
            url = normalize_url(req.url)
        except (DecodeError, ValueError) as exc:
            cls = getattr(exc, "error_class", "schema")
            await delivered([await dead_letter(dlq, STAGE, event, cls, str(exc))])
            return
        outcome = Outcome(dlq, STAGE, event, url)
        sent: list[Awaitable] = []
        await docs.ready()
        known = docs.get(url)
        if retries and known is not None and superseded(req.requested_at, known.requested_at):
            log.info(
                "%s: delayed retry %d (requested %s) superseded by a request of %s",
                url,
                retries,
                req.requested_at,
                known.requested_at,
            )
            return
        handled_at = newest(known.requested_at if known else None, req.requested_at)
        # The page's version: the writer never lets an older one replace a newer one.
        # Above the one the state remembers, whatever this worker's clock says.
        version = page_version(
            event.message.offset,
            event.message.timestamp,
            after=known.version if known is not None else None,
        )
        try:
            out, state, no_text = await self._update(req, url, known, handled_at, version)
        except FetchFailed as exc:
            sent.append(await self._retry_or_give_up(event, url, exc, hops, retries, outcome))
            out, state, no_text = [], None, False
        except PageRefused as exc:  # not text, or over a bound: streams/extract.py
            sent.append(await dead_letter(dlq, STAGE, event, exc.error_class, str(exc), 1, url))
            out, state, no_text = [], None, False
        except ExtractUnavailable:
            raise  # no extraction process starts: the stage is broken, not the page
        except Exception as exc:  # a page that breaks extraction or chunking: a poison
            log.exception("cannot process %s", url)  # message must not stop the stage
            sent.append(await dead_letter(dlq, STAGE, event, "extract", repr(exc), 1, url))
            out, state, no_text = [], None, False
        # Every message is checked before any is sent: a page with one chunk message the
        # broker can never take is a dead letter as a whole, not half an update.
        carry = hop_headers(hops)
        out = [
            dataclasses.replace(
                c,
                version=version,
                source=req.source if c.op == "upsert" else None,
                requested_at=req.requested_at,
            )
            for c in out
        ]
        encoded = [(c.key(), encode_chunk(c)) for c in out]
        try:
            for key, value in encoded:
                await check_size(chunks, key, value, carry, "chunk message")
        except TooLarge as exc:
            sent.append(await outcome.dead_letter(exc.error_class, str(exc)))
            encoded, state = [], None
        for key, value in encoded:
            sent.append(
                await produce(chunks, key, value, outcome, headers=carry, what="chunk message")
            )
        if no_text and encoded:
            # After the trim (an emptied page loses its old chunks), made visible.
            sent.append(
                await dead_letter(
                    dlq, STAGE, event, "no_text", "the page has no text to index", 1, url
                )
            )
        await delivered(sent)
        log.info("%s: %d chunk messages (offset %d)", url, len(encoded), event.message.offset)
        # Remember the page only once its chunks are on the broker: a crash before this
        # line re-fetches and re-sends (harmless: same ids), never skips.
        if outcome.letter is None and state is not None and state != known:
            await self._remember(event.message.partition, url, state)

    async def _update(
        self,
        req: UrlRequest,
        url: str,
        known: DocState | None,
        handled_at: str | None,
        version: int,
    ) -> tuple[list[Chunk], DocState | None, bool]:
        """What the request does to the page: its chunk messages, the page's new state
        (``None``: leave it as it is) and whether the page has no text (sent as a trim to
        0, then dead-lettered). Raises what fetching or extracting the page raises."""
        prev = None if req.force else known
        # A page deleted or gone keeps an empty state: it remembers the request time.
        gone_state = DocState(doc_hash="", hashes=(), requested_at=handled_at, version=version)
        if req.delete:
            return [trim(url, 0)], gone_state, False
        # Validators only for a page chunked by this chunker: after an upgrade a 304 would
        # leave it on the old chunks (plan_update re-sends every chunk of such a page).
        validators = prev if prev is not None and prev.current else None
        page = await self.fetcher.fetch(
            url,
            etag=validators.etag if validators else None,
            last_modified=validators.last_modified if validators else None,
        )
        if page.not_modified:
            keep = dataclasses.replace(prev, requested_at=handled_at) if prev else None
            return [], keep, False
        if page.gone:
            log.info("gone (HTTP %d): %s", page.status, url)
            return [trim(url, 0)], gone_state, False
        new = await self.extractor.page_chunks(url, page.body, page.content_type)
        state = DocState(
            doc_hash=(new[0].doc_hash or "") if new else "",
            hashes=tuple(c.text_hash or "" for c in new),
            etag=page.etag,
            last_modified=page.last_modified,
            requested_at=handled_at,
            version=version,
        )
        return plan_update(url, new, prev, req.force), state, not new

    async def _retry_or_give_up(
        self,
        event: EventT,
        url: str,
        exc: FetchFailed,
        hops: int,
        retries: int,
        outcome: Outcome,
    ) -> Awaitable:
        """A delayed retry of a transient failure while retries are left, else a dead
        letter; returns its delivery future."""
        retry = (
            next_retry(retries, self.delays, int(time.time() * 1000)) if is_transient(exc) else None
        )
        if retry is None:
            note = f" (after {retries} delayed retries)" if retries else ""
            return await dead_letter(
                self.dlq, STAGE, event, exc.error_class, f"{exc}{note}", exc.attempts, url
            )
        log.info("%s: %s; delayed retry %d in %gs", url, exc, retry.n, retry.delay_s)
        later = [
            *(hop_headers(hops) or ()),
            (RETRIES, str(retry.n).encode()),
            (NOT_BEFORE, str(retry.not_before_ms).encode()),
        ]
        return await produce(
            self.retry_out[retry.n],
            event.message.key,
            event.message.value,
            outcome,
            headers=later,
            what="delayed request",
        )

    async def _remember(self, partition: int, url: str, state: DocState) -> None:
        """Record the page's state here and on its compacted topic (same partition)."""
        state = state.capped()
        self.docs.record(partition, url, state)
        key = url.encode()
        room = await LIMITS.of(self.state_log) - record_size(key, b"")
        value = self.docs.encode(state, room)
        await delivered([await self.state_log.send(key=key, value=value, partition=partition)])


def _forget(running: dict[str, asyncio.Task], key: str, task: asyncio.Task) -> None:
    """A page's task is done: the next request for it need not wait (unless newer)."""
    if running.get(key) is task:
        del running[key]


def register(app: faust.App, settings: Settings) -> None:
    """Wire the fetch stage into ``app``: its agent on ``urls``, the delayed-retry
    forwarder, and the rebalance signal that loads the pages' states."""
    urls = topic(app, settings, URLS)
    chunks = topic(app, settings, CHUNKS)
    dlq = dlq_topic(app, settings, URLS)
    state_log = topic(app, settings, state_topic(URLS))
    delays = retry_delays(settings)
    retry_out = {n: topic(app, settings, retry_topic(n)) for n in range(1, len(delays) + 1)}
    # url -> DocState: validators and chunk hashes, so an unchanged page is not re-embedded.
    docs = DocStates(settings)
    urls_name = settings.topic(URLS)

    # mypy matches no function to mode 0.7.1's SignalHandlerT, not even its own form
    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def load_states(sender: object, assigned: set[TP], **kwargs: object) -> None:
        await docs.assign(tp.partition for tp in assigned if tp.topic == urls_name)

    @app.task
    async def forward_retries() -> None:
        """Due requests from the delay topics back to ``urls`` (see agents/retry.py)."""
        await RetryForwarder(settings).run()

    @app.agent(urls, name="fetch")
    async def fetch(stream: faust.StreamT) -> None:
        set_ready("loading the tokenizer")
        chunker = await asyncio.to_thread(
            Chunker.from_model,
            resolve_model_path(settings.model),
            settings.chunk_tokens,
            settings.chunk_overlap,
            max_chars=settings.chunk_max_chars,
            max_bytes=settings.chunk_max_bytes,
        )
        # Extraction + chunking run in child processes killed past extract_deadline_s.
        extractor = ExtractPool(settings, chunker)
        await extractor.start()
        set_ready()
        fetcher = Fetcher(settings)
        stage = FetchStage(
            settings,
            fetcher=fetcher,
            extractor=extractor,
            docs=docs,
            chunks=chunks,
            dlq=dlq,
            state_log=state_log,
            retry_out=retry_out,
        )
        try:
            # faust hands an agent a Stream; its decorator is typed for StreamT
            await stage.run(cast(faust.Stream, stream))
        finally:
            await fetcher.aclose()
            await extractor.aclose()
