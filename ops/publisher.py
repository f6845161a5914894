"""Publishing URL requests to ``urls``: the one publisher, for the CLI and the webhook server.

A request is published when the broker acknowledged it (the producer setup of
:func:`streams.kafka.producer`: ``acks=all``, idempotent), never earlier: ``publish``
returns, and the webhook server answers ``202``, only then. Each message is keyed by its
URL, so every request for one page lands on one partition, in order. A broker that is away
or does not acknowledge is :class:`~streams.errors.KafkaUnavailable`; a server that must come
up without it connects in the background (:meth:`Publisher.connect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streams import kafka
from streams.errors import KafkaUnavailable
from streams.messages import UrlRequest, encode_url
from streams.settings import Settings
from streams.topics import URLS, ensure_topics

log = logging.getLogger(__name__)

#: Messages sent before waiting for their acks (and reporting progress).
BATCH = 500
#: First and longest delay between attempts to connect in the background.
CONNECT_BACKOFF_S = (0.5, 10.0)
#: Seconds :meth:`Publisher.ready` waits for the broker's metadata.
READY_TIMEOUT_S = 3.0


class Publisher:
    """One producer to ``urls`` for as long as it is needed (a command, a server's life).

    ``producer_overrides`` adjust the producer (e.g. its ``request_timeout_ms``); the
    delivery guarantees stay those of :func:`streams.kafka.producer`.
    """

    def __init__(self, settings: Settings, **producer_overrides: Any) -> None:
        self.settings = settings
        self.topic = settings.topic(URLS)
        self.producer: AIOKafkaProducer | None = None
        self.last_error = "not connected yet"
        self._overrides = producer_overrides

    async def start(self) -> None:
        """Create missing topics and connect; :class:`KafkaUnavailable` when the broker is
        away."""
        await ensure_topics(self.settings)
        producer = kafka.producer(self.settings, **self._overrides)
        try:
            with kafka.translated(self.settings, "starting a producer"):
                await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self.producer = producer

    async def connect(self, then: Callable[[], Awaitable[object]] | None = None) -> None:
        """:meth:`start`, then ``then()``, however long the broker takes to be there.

        For a server that must come up (and say it is not ready) while Kafka is away,
        instead of crash-looping: retriable failures are retried with growing delays; one
        that is not (a refusal a person must fix) is logged and tried again at the longest
        delay. ``last_error`` says what failed last. Ready only once ``then`` succeeded.
        """
        first, longest = CONNECT_BACKOFF_S

        def note(exc: BaseException, delay: float) -> None:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("Kafka at %s: %s; retrying in %.1f s", self.settings.broker, exc, delay)

        async def attempt() -> None:
            await self.stop_producer()
            await self.start()
            if then is not None:
                await then()

        while True:
            try:
                await kafka.retrying(
                    f"connecting to publish to {self.topic}",
                    attempt,
                    deadline_s=None,
                    first_delay_s=first,
                    max_delay_s=longest,
                    broker=self.settings.broker,
                    on_retry=note,
                )
            except Exception as exc:  # not retriable: say why, keep the server up
                note(exc, longest)
                log.error(
                    "Kafka at %s refused: %r (retrying in %.0f s)",
                    self.settings.broker,
                    exc,
                    longest,
                )
                await self.stop_producer()
                await asyncio.sleep(longest)
                continue
            self.last_error = ""
            return

    async def stop_producer(self) -> None:
        """Stop the producer, flushing what is in flight."""
        if self.producer is not None:
            producer, self.producer = self.producer, None
            await producer.stop()

    async def stop(self) -> None:
        await self.stop_producer()

    async def ready(self) -> str | None:
        """``None`` when the broker answers a metadata request in time, else why not."""
        if self.producer is None:
            return self.last_error
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self.producer.client.fetch_all_metadata()
        except Exception as exc:  # whatever the cause, not ready
            return f"broker {self.settings.broker} unreachable: {type(exc).__name__}"
        return None

    async def send(
        self,
        requests: Iterable[UrlRequest],
        *,
        timeout_s: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Send every request (keyed by URL) and wait for the acks, every :data:`BATCH`
        messages and at the end; returns how many. :class:`KafkaUnavailable` when not
        connected, or when the acks do not come (within ``timeout_s`` in all, if given):
        some of the requests may then be published, and sending them again is harmless.
        """
        if self.producer is None:
            raise KafkaUnavailable(f"not connected to Kafka ({self.last_error})")
        producer = self.producer
        sent = 0
        try:
            async with asyncio.timeout(timeout_s):
                pending = []
                for req in requests:
                    pending.append(await producer.send(self.topic, encode_url(req), key=req.key()))
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
        except (KafkaError, OSError) as exc:  # TimeoutError included
            raise KafkaUnavailable(
                f"Kafka at {self.settings.broker} did not acknowledge: {type(exc).__name__}"
                f"{f': {exc}' if str(exc) else ''}"
            ) from exc
        return sent


async def publish(
    settings: Settings,
    requests: Iterable[UrlRequest],
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Send every request (keyed by URL) and wait for acks=all; returns how many."""
    publisher = Publisher(settings)
    await publisher.start()
    try:
        return await publisher.send(requests, on_progress=on_progress)
    finally:
        await publisher.stop()
