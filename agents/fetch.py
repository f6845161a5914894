"""Fetch + chunk stage: ``urls`` -> ``chunks``; many pages in flight, acked in order.

Each URL becomes a task (fetch, extract, chunk, produce); tasks run concurrently, but a
URL's event is acked only after its chunks (or its dead letter) were acknowledged by the
broker, and events are acked in offset order, so a committed offset never passes a page
still in flight. Two requests for the same page run one after the other, so its chunks
reach ``chunks`` in request order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable

import faust
from faust.types import EventT

from agents.app import dlq_topic, topic
from agents.checkpoint import delivered, fatal
from agents.common import (
    LIMITS,
    Outcome,
    TooLarge,
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
from streams.chunking import Chunker
from streams.documents import DocState, page_version, plan_update, trim
from streams.errors import DecodeError, ExtractUnavailable, FetchFailed, PageRefused
from streams.ids import normalize_url
from streams.messages import decode_url, encode_chunk
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


def register(app: faust.App, settings: Settings) -> None:
    urls = topic(app, settings, URLS)
    chunks = topic(app, settings, CHUNKS)
    dlq = dlq_topic(app, settings, URLS)
    state_log = topic(app, settings, state_topic(URLS))
    delays = retry_delays(settings)
    retry_out = {n: topic(app, settings, retry_topic(n)) for n in range(1, len(delays) + 1)}
    LIMITS.configure(settings)
    # url -> DocState: validators and chunk hashes, so an unchanged page is not re-embedded.
    docs = DocStates(settings)
    urls_name = settings.topic(URLS)

    @app.on_partitions_assigned.connect
    async def load_states(sender: object, assigned: set, **kwargs: object) -> None:
        await docs.assign(tp.partition for tp in assigned if tp.topic == urls_name)

    @app.task
    async def forward_retries() -> None:
        """Due requests from the delay topics back to ``urls`` (see agents/retry.py)."""
        await RetryForwarder(settings).run()

    @app.agent(urls, name="fetch")
    async def fetch(stream: faust.StreamT) -> None:
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
        fetcher = Fetcher(settings)
        in_order: asyncio.Queue[tuple[EventT, asyncio.Task]] = asyncio.Queue(
            maxsize=settings.fetch_concurrency * 4
        )
        running: dict[str, asyncio.Task] = {}
        gate = asyncio.Semaphore(settings.fetch_concurrency)
        s = stream.noack()

        async def process(event: EventT, before: asyncio.Task | None) -> None:
            if before is not None:
                await asyncio.wait([before])
            async with gate:
                await handle(event)

        async def handle(event: EventT) -> None:
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
            prev = None if req.force else known
            handled_at = newest(known.requested_at if known else None, req.requested_at)
            # The page's version: the writer never lets an older one replace a newer one.
            # Above the one the state remembers, whatever this worker's clock says.
            version = page_version(
                event.message.offset,
                event.message.timestamp,
                after=known.version if known is not None else None,
            )
            # A page deleted or gone keeps an empty state: it remembers the request time.
            gone_state = DocState(doc_hash="", hashes=(), requested_at=handled_at, version=version)
            state: DocState | None = None  # stays None unless the request was handled
            no_text = False
            try:
                if req.delete:
                    out, state = [trim(url, 0)], gone_state
                else:
                    page = await fetcher.fetch(
                        url,
                        etag=prev.etag if prev else None,
                        last_modified=prev.last_modified if prev else None,
                    )
                    if page.not_modified:
                        out = []
                        if prev is not None:
                            state = dataclasses.replace(prev, requested_at=handled_at)
                    elif page.gone:
                        log.info("gone (HTTP %d): %s", page.status, url)
                        out, state = [trim(url, 0)], gone_state
                    else:
                        new = await extractor.page_chunks(url, page.body, page.content_type)
                        out = plan_update(url, new, prev, req.force)
                        no_text = not new  # sent as a trim to 0, then dead-lettered
                        state = DocState(
                            doc_hash=new[0].doc_hash if new else "",
                            hashes=tuple(c.text_hash or "" for c in new),
                            etag=page.etag,
                            last_modified=page.last_modified,
                            requested_at=handled_at,
                            version=version,
                        )
            except FetchFailed as exc:
                out = []
                retry = (
                    next_retry(retries, delays, int(time.time() * 1000))
                    if is_transient(exc)
                    else None
                )
                if retry is not None:
                    log.info("%s: %s; delayed retry %d in %gs", url, exc, retry.n, retry.delay_s)
                    later = [
                        *(hop_headers(hops) or ()),
                        (RETRIES, str(retry.n).encode()),
                        (NOT_BEFORE, str(retry.not_before_ms).encode()),
                    ]
                    sent.append(
                        await produce(
                            retry_out[retry.n],
                            event.message.key,
                            event.message.value,
                            outcome,
                            headers=later,
                            what="delayed request",
                        )
                    )
                else:
                    note = f" (after {retries} delayed retries)" if retries else ""
                    sent.append(
                        await dead_letter(
                            dlq, STAGE, event, exc.error_class, f"{exc}{note}", exc.attempts, url
                        )
                    )
            except PageRefused as exc:  # not text, or over a bound: streams/extract.py
                sent.append(await dead_letter(dlq, STAGE, event, exc.error_class, str(exc), 1, url))
                out = []
            except ExtractUnavailable:
                raise  # no extraction process starts: the stage is broken, not the page
            except Exception as exc:  # a page that breaks extraction or chunking: a poison
                log.exception("cannot process %s", url)  # message must not stop the stage
                sent.append(await dead_letter(dlq, STAGE, event, "extract", repr(exc), 1, url))
                out = []
            # Every message is checked before any is sent: a page with one chunk message the
            # broker can never take is a dead letter as a whole, not half an update.
            carry = hop_headers(hops)
            out = [dataclasses.replace(c, version=version) for c in out]
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
                partition = event.message.partition
                state = state.capped()
                docs.record(partition, url, state)
                key = url.encode()
                room = await LIMITS.of(state_log) - record_size(key, b"")
                await delivered(
                    [
                        await state_log.send(
                            key=key, value=docs.encode(state, room), partition=partition
                        )
                    ]
                )

        async def acker() -> None:
            while True:
                event, task = await in_order.get()
                try:
                    await task
                except Exception as exc:  # Kafka refused our output: do not skip the page
                    fatal(f"fetch of offset {event.message.offset} failed", exc)
                await s.ack(event)

        ack_task = asyncio.create_task(acker())
        try:
            async for event in s.events():
                key = (event.message.key or b"").decode("utf-8", "replace")
                task = asyncio.create_task(process(event, running.get(key)))
                running[key] = task
                task.add_done_callback(
                    lambda t, k=key: running.pop(k, None) if running.get(k) is t else None
                )
                await in_order.put((event, task))
        finally:
            ack_task.cancel()
            await fetcher.aclose()
            await extractor.aclose()
