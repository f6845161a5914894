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
from collections.abc import Awaitable

import faust
from faust.types import EventT

from agents.common import dead_letter, delivered, fatal
from agents.docstate import DocStates
from agents.extractor import ExtractPool, ExtractUnavailable
from agents.fetcher import Fetcher, FetchFailed
from streams.app import dlq_topic, topic
from streams.chunking import Chunker
from streams.documents import DocState, page_version, plan_update, trim
from streams.embedder import resolve_model_path
from streams.extract import PageRefused
from streams.ids import normalize_url
from streams.messages import DecodeError, decode_url, encode_chunk
from streams.settings import Settings
from streams.topics import CHUNKS, URLS, state_topic

log = logging.getLogger(__name__)
STAGE = "fetch"


def register(app: faust.App, settings: Settings) -> None:
    urls = topic(app, settings, URLS)
    chunks = topic(app, settings, CHUNKS)
    dlq = dlq_topic(app, settings, URLS)
    state_log = topic(app, settings, state_topic(URLS))
    # url -> DocState: validators and chunk hashes, so an unchanged page is not re-embedded.
    docs = DocStates(settings)
    urls_name = settings.topic(URLS)

    @app.on_partitions_assigned.connect
    async def load_states(sender: object, assigned: set, **kwargs: object) -> None:
        await docs.assign(tp.partition for tp in assigned if tp.topic == urls_name)

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
            try:
                req = decode_url(event.message.value)
                url = normalize_url(req.url)
            except (DecodeError, ValueError) as exc:
                cls = getattr(exc, "error_class", "schema")
                await delivered([await dead_letter(dlq, STAGE, event, cls, str(exc))])
                return
            sent: list[Awaitable] = []
            await docs.ready()
            prev = None if req.force else docs.get(url)
            state: DocState | None = prev
            no_text = False
            try:
                if req.delete:
                    out, state = [trim(url, 0)], None
                else:
                    page = await fetcher.fetch(
                        url,
                        etag=prev.etag if prev else None,
                        last_modified=prev.last_modified if prev else None,
                    )
                    if page.not_modified:
                        out = []
                    elif page.gone:
                        log.info("gone (HTTP %d): %s", page.status, url)
                        out, state = [trim(url, 0)], None
                    else:
                        new = await extractor.page_chunks(url, page.body, page.content_type)
                        out = plan_update(url, new, prev, req.force)
                        no_text = not new  # sent as a trim to 0, then dead-lettered
                        state = DocState(
                            doc_hash=new[0].doc_hash if new else "",
                            hashes=tuple(c.text_hash or "" for c in new),
                            etag=page.etag,
                            last_modified=page.last_modified,
                        )
            except FetchFailed as exc:
                sent.append(
                    await dead_letter(
                        dlq, STAGE, event, exc.error_class, str(exc), exc.attempts, url
                    )
                )
                out = []
            except PageRefused as exc:  # not text, or over a bound: streams/extract.py
                sent.append(await dead_letter(dlq, STAGE, event, exc.error_class, str(exc), 1, url))
                out = []
            except ExtractUnavailable:
                raise  # no extraction process starts: the stage is broken, not the page
            except Exception as exc:  # a page that breaks extraction or chunking: a poison
                log.exception("cannot process %s", url)  # message must not stop the stage
                sent.append(await dead_letter(dlq, STAGE, event, "extract", repr(exc), 1, url))
                out = []
            # The page's version: the writer never lets an older one replace a newer one.
            version = page_version(event.message.offset, event.message.timestamp)
            for c in out:
                c = dataclasses.replace(c, version=version)  # noqa: PLW2901
                sent.append(await chunks.send(key=c.key(), value=encode_chunk(c)))
            if no_text and out:
                # After the trim (an emptied page loses its old chunks), made visible.
                sent.append(
                    await dead_letter(
                        dlq, STAGE, event, "no_text", "the page has no text to index", 1, url
                    )
                )
            await delivered(sent)
            log.info("%s: %d chunk messages (offset %d)", url, len(out), event.message.offset)
            # Remember the page only once its chunks are on the broker: a crash before this
            # line re-fetches and re-sends (harmless: same ids), never skips.
            if state != prev or (state is None and docs.get(url) is not None):
                partition = event.message.partition
                docs.record(partition, url, state)
                await delivered(
                    [
                        await state_log.send(
                            key=url.encode(), value=docs.encode(state), partition=partition
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
