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
from streams.crawl import in_scope
from streams.documents import DocState, page_version, plan_update, trim
from streams.errors import (
    DecodeError,
    ExtractUnavailable,
    FetchFailed,
    PageRefused,
    TooLarge,
)
from streams.ids import normalize_url
from streams.messages import (
    Chunk,
    CrawlOutcome,
    CrawlReport,
    UrlRequest,
    decode_url,
    encode_chunk,
    encode_crawl,
)
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
from streams.topics import CHUNKS, CRAWL, URLS, retry_delays, retry_topic, state_topic

log = logging.getLogger(__name__)
STAGE = "fetch"

#: What a crawl's page reports: its outcome and the links to follow.
Found = tuple[CrawlOutcome, tuple[str, ...]]


class FetchStage:
    """The fetch stage's logic, without Faust: ``urls`` events -> chunk messages.

    Collaborators come in: ``fetcher`` (a :class:`Fetcher`: ``fetch``), ``extractor`` (an
    :class:`ExtractPool`: ``page_chunks``), ``docs`` (the pages' :class:`DocStates`), the
    topics ``chunks``, ``dlq`` (dead letters of ``urls``), ``state_log`` (where ``docs`` is
    kept), ``retry_out`` (the delay topic of each delayed retry, by its number) and
    ``crawl`` (where a crawl's page is reported to the frontier, ``agents/frontier.py``).
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
        crawl: faust.TopicT | None = None,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.extractor = extractor
        self.docs = docs
        self.chunks = chunks
        self.dlq = dlq
        self.state_log = state_log
        self.retry_out = retry_out
        self.crawl = crawl
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
            # The newer request had this page fetched: its crawl still hears of it.
            await delivered([await self._report(req, url, Outcome(dlq, STAGE, event, url), known)])
            return
        handled_at = newest(known.requested_at if known else None, req.requested_at)
        # The page's version: the writer never lets an older one replace a newer one.
        # Above the one the state remembers, whatever this worker's clock says.
        version = page_version(
            event.message.offset,
            event.message.timestamp,
            after=known.version if known is not None else None,
        )
        found: Found | None = ("failed", ())  # what a crawl hears of the page
        try:
            out, state, no_text, found = await self._update(req, url, known, handled_at, version)
        except FetchFailed as exc:
            retry = await self._retry_or_give_up(event, url, exc, hops, retries, outcome)
            sent.append(retry[0])
            out, state, no_text = [], None, False
            found = None if retry[1] else found  # a delayed retry is reported when it ends
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
        if found is not None and req.crawl is not None:
            if outcome.letter is not None:
                found = ("failed", ())
            sent.append(await self._report(req, url, outcome, found=found))
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
    ) -> tuple[list[Chunk], DocState | None, bool, Found]:
        """What the request does to the page: its chunk messages, the page's new state
        (``None``: leave it as it is), whether the page has no text (sent as a trim to
        0, then dead-lettered) and what its crawl (if any) hears. Raises what fetching or
        extracting the page raises."""
        prev = None if req.force else known
        # A page deleted or gone keeps an empty state: it remembers the request time.
        gone_state = DocState(doc_hash="", hashes=(), requested_at=handled_at, version=version)
        if req.delete:
            return [trim(url, 0)], gone_state, False, ("failed", ())
        # Validators only for a page chunked by this chunker: after an upgrade a 304 would
        # leave it on the old chunks (plan_update re-sends every chunk of such a page);
        # for a crawl, only when the state knows the page's links (a 304 has none).
        validators = prev if prev is not None and prev.current else None
        if req.crawl is not None and validators is not None and validators.links is None:
            validators = None
        page = await self.fetcher.fetch(
            url,
            etag=validators.etag if validators else None,
            last_modified=validators.last_modified if validators else None,
        )
        if page.not_modified:
            keep = dataclasses.replace(prev, requested_at=handled_at) if prev else None
            return [], keep, False, _remembered(keep)
        if page.gone:
            log.info("gone (HTTP %d): %s", page.status, url)
            return [trim(url, 0)], gone_state, False, ("failed", ())
        crawl = req.crawl
        found = None
        if crawl is None:
            new = await self.extractor.page_chunks(url, page.body, page.content_type)
        else:
            new, found = await self.extractor.page(
                url, page.body, page.content_type, links=True, base_url=page.url
            )
        links = found.links if found is not None else None
        canonical = found.canonical if found is not None else None
        if crawl is None or canonical == url or not in_scope(crawl, canonical or ""):
            canonical = None
        state = DocState(
            doc_hash=(new[0].doc_hash or "") if new and canonical is None else "",
            hashes=tuple(c.text_hash or "" for c in new) if canonical is None else (),
            etag=page.etag,
            last_modified=page.last_modified,
            requested_at=handled_at,
            version=version,
            links=links,
            canonical=canonical,
        )
        if canonical is not None:
            # Another URL is this page's: it is indexed there, not here (nor twice).
            log.info("%s: canonical is %s", url, canonical)
            return [trim(url, 0)], state, False, ("canonical", (canonical,))
        return plan_update(url, new, prev, req.force), state, not new, ("indexed", links or ())

    async def _retry_or_give_up(
        self,
        event: EventT,
        url: str,
        exc: FetchFailed,
        hops: int,
        retries: int,
        outcome: Outcome,
    ) -> tuple[Awaitable, bool]:
        """A delayed retry of a transient failure while retries are left, else a dead
        letter; returns its delivery future and whether it is a retry."""
        retry = (
            next_retry(retries, self.delays, int(time.time() * 1000)) if is_transient(exc) else None
        )
        if retry is None:
            note = f" (after {retries} delayed retries)" if retries else ""
            letter = await dead_letter(
                self.dlq, STAGE, event, exc.error_class, f"{exc}{note}", exc.attempts, url
            )
            return letter, False
        log.info("%s: %s; delayed retry %d in %gs", url, exc, retry.n, retry.delay_s)
        later = [
            *(hop_headers(hops) or ()),
            (RETRIES, str(retry.n).encode()),
            (NOT_BEFORE, str(retry.not_before_ms).encode()),
        ]
        sent = await produce(
            self.retry_out[retry.n],
            event.message.key,
            event.message.value,
            outcome,
            headers=later,
            what="delayed request",
        )
        return sent, True

    async def _report(
        self,
        req: UrlRequest,
        url: str,
        outcome: Outcome,
        known: DocState | None = None,
        found: Found | None = None,
    ) -> Awaitable:
        """Tell the crawl of ``req`` (if any) what became of the page: ``found``, or the
        links ``known`` remembers. Sent before the event is acked, like its chunks."""
        if req.crawl is None or self.crawl is None:
            return _done()
        outcome_, links = found if found is not None else _remembered(known)
        report = CrawlReport(req.crawl, url, outcome_, links)
        return await produce(
            self.crawl, report.key(), encode_crawl(report), outcome, what="crawl report"
        )

    async def _remember(self, partition: int, url: str, state: DocState) -> None:
        """Record the page's state here and on its compacted topic (same partition)."""
        state = state.capped()
        self.docs.record(partition, url, state)
        key = url.encode()
        room = await LIMITS.of(self.state_log) - record_size(key, b"")
        value = self.docs.encode(state, room)
        await delivered([await self.state_log.send(key=key, value=value, partition=partition)])


def _remembered(state: DocState | None) -> Found:
    """What a crawl hears of a page it did not read now (a 304): what its state keeps."""
    if state is None:
        return "unchanged", ()
    if state.canonical is not None:
        return "canonical", (state.canonical,)
    return "unchanged", state.links or ()


def _done() -> Awaitable:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def _forget(running: dict[str, asyncio.Task], key: str, task: asyncio.Task) -> None:
    """A page's task is done: the next request for it need not wait (unless newer)."""
    if running.get(key) is task:
        del running[key]


def register(app: faust.App, settings: Settings) -> None:
    """Wire the fetch stage into ``app``: its agent on ``urls``, the delayed-retry
    forwarder, the rebalance signal that loads the pages' states, and the crawl
    frontier (``agents/frontier.py``), which the fetch workers run."""
    from agents import frontier

    frontier.register(app, settings)
    urls = topic(app, settings, URLS)
    crawl = topic(app, settings, CRAWL)
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
            crawl=crawl,
        )
        try:
            # faust hands an agent a Stream; its decorator is typed for StreamT
            await stage.run(cast(faust.Stream, stream))
        finally:
            await fetcher.aclose()
            await extractor.aclose()
