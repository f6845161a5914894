"""Publishing URL requests to ``urls``: batched, and done only when the broker acked them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaProducer

from streams.messages import UrlRequest, encode_url
from streams.settings import Settings
from streams.topics import URLS, ensure_topics

BATCH = 500


async def publish(
    settings: Settings,
    requests: Iterable[UrlRequest],
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Send every request (keyed by URL) and wait for acks=all; returns how many."""
    await ensure_topics(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.broker,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        request_timeout_ms=30000,
    )
    await producer.start()
    sent = 0
    try:
        pending = []
        name = settings.topic(URLS)
        for req in requests:
            pending.append(await producer.send(name, encode_url(req), key=req.key()))
            if len(pending) >= BATCH:
                await asyncio.gather(*pending)
                sent += len(pending)
                pending.clear()
                if on_progress:
                    on_progress(sent)
        if pending:
            await asyncio.gather(*pending)
            sent += len(pending)
            if on_progress:
                on_progress(sent)
        return sent
    finally:
        await producer.stop()
