"""What every stage shares: producing within the broker's size limit and dead-lettering an
event. When an event may be acked (and when the process must exit instead) is the commit
rule of :mod:`agents.checkpoint`.

A message the broker can never take (over ``max.message.bytes``) is not a delivery
failure: exiting would redeliver the same event and fail the same way forever. Its event
is dead-lettered (class ``too_large``) and the stage goes on; :func:`produce` is the one
way stages send.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

import faust
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from faust.types import EventT

from streams import metrics
from streams.errors import ConfigError, TooLarge
from streams.messages import DeadLetter, encode_dead_letter
from streams.retry import HOPS
from streams.settings import Settings
from streams.topics import message_limits

log = logging.getLogger(__name__)

RECORD_MARGIN = 128
"""Bytes kept free under a topic's limit: the estimate below is exact for a one-record
batch, the margin covers what a broker version may count differently."""

SIZE_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError)

Headers = list[tuple[str, bytes]]
"""Kafka record headers, in the form faust's ``send`` takes them."""


# --- headers --------------------------------------------------------------------------------


def header(
    headers: Mapping[str, bytes] | Iterable[tuple[str, bytes]] | None, name: str
) -> bytes | None:
    """One header's value from a Kafka message (Faust gives a list of pairs or a dict)."""
    if not headers:
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    found = None
    for key, value in items:
        if key == name:
            found = value  # the last one wins, as with HTTP
    return found


def header_int(headers: Any, name: str) -> int:
    """A non-negative integer header; 0 when absent or garbled (headers come from anyone)."""
    raw = header(headers, name)
    try:
        return max(int(raw or b"0"), 0)
    except (TypeError, ValueError):
        return 0


def hops_of(event: EventT) -> int:
    return header_int(event.message.headers, HOPS)


def hop_headers(hops: int) -> list[tuple[str, bytes]] | None:
    """The headers that carry a hop count on to the next topic (none for a first pass)."""
    return [(HOPS, str(hops).encode())] if hops > 0 else None


# --- size limits ----------------------------------------------------------------------------


def record_size(key: bytes | None, value: bytes | None, headers: Headers | None = None) -> int:
    """Upper bound of the bytes a one-record batch takes on the wire (what the broker
    compares with ``max.message.bytes`` and the producer with ``max_request_size``)."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers or ()))


class SizeLimits:
    """Per topic, the largest record this process can produce: the smaller of the topic's
    ``max.message.bytes`` and the producer's ``max_request_size``, less a margin. Each
    topic's limit is read from the broker once, at its first use."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self._limits: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def configure(self, settings: Settings) -> None:
        self.settings = settings

    async def of(self, topic: faust.TopicT) -> int:
        name = topic.get_topic_name()
        limit = self._limits.get(name)
        if limit is None:
            async with self._lock:
                if name not in self._limits:
                    if self.settings is None:  # the process' settings, never the environment's
                        raise ConfigError("size limits not configured (agents.app.create_app does)")
                    broker = (await message_limits(self.settings, [name]))[name]
                    producer = int(topic.app.conf.producer_max_request_size)
                    self._limits[name] = min(broker, producer) - RECORD_MARGIN
                    log.info(
                        "message limit of %s: %d bytes (topic/broker %d, producer %d)",
                        name,
                        self._limits[name],
                        broker,
                        producer,
                    )
            limit = self._limits[name]
        return limit

    def set(self, name: str, limit: int) -> None:
        """Override one topic's limit (tests; a stage that learnt better from the broker)."""
        self._limits[name] = limit


LIMITS = SizeLimits()


async def check_size(
    topic: faust.TopicT,
    key: bytes | None,
    value: bytes | None,
    headers: Headers | None = None,
    what: str = "message",
) -> None:
    """Raise :class:`TooLarge` when the record can never be produced to ``topic``."""
    size = record_size(key, value, headers)
    limit = await LIMITS.of(topic)
    if size > limit:
        raise TooLarge(topic.get_topic_name(), size, limit, what)


def _is_size_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:  # Faust wraps aiokafka's errors in ProducerSendError
        if isinstance(seen, SIZE_ERRORS):
            return True
        seen = seen.__cause__
    return False


# --- dead letters and sends -----------------------------------------------------------------


async def dead_letter(
    dlq: faust.TopicT,
    stage: str,
    event: EventT,
    error_class: str,
    error: str,
    attempts: int = 1,
    url: str | None = None,
) -> Awaitable:
    """Send the event's original bytes with the reason; returns the delivery future.

    The envelope copies the message's hop count (header ``ragstream-hops``) so that redrive
    can park a letter that keeps coming back, and never copies more than the dead-letter
    topic takes: a value too big for it is cut, and the envelope says so.
    """
    msg = event.message
    value = msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b"")
    key = msg.key if isinstance(msg.key, bytes | None) else bytes(msg.key)
    hops = header_int(msg.headers, HOPS)
    envelope = DeadLetter(
        stage=stage,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        error_class=error_class,
        error=error,
        attempts=attempts,
        url=url,
        key=key,
        value=value,
        hops=hops,
    )
    headers = hop_headers(hops)
    dkey = key[:4096] if key is not None else None
    room = await LIMITS.of(dlq) - record_size(dkey, b"", headers)
    body = encode_dead_letter(envelope, max_bytes=room)
    log.warning("dead-letter %s %s@%s: %s: %s", stage, msg.topic, msg.offset, error_class, error)
    metrics.DEAD_LETTERS.labels(stage, error_class).inc()
    return await dlq.send(key=dkey, value=body, headers=headers)


class Outcome:
    """One event's dead letter, sent at most once however many of its outputs fail."""

    def __init__(
        self, dlq: faust.TopicT, stage: str, event: EventT, url: str | None = None
    ) -> None:
        self.dlq, self.stage, self.event, self.url = dlq, stage, event, url
        self.letter: asyncio.Future | None = None  # set by the first failure, before it awaits

    async def dead_letter(self, error_class: str, error: str) -> Awaitable:
        """The delivery future of the event's one dead letter (several outputs of one event
        may fail at once: the first sends it, the others get the same future)."""
        if self.letter is None:
            self.letter = asyncio.ensure_future(
                dead_letter(self.dlq, self.stage, self.event, error_class, error, 1, self.url)
            )
        return await self.letter


async def produce(
    topic: faust.TopicT,
    key: bytes | None,
    value: bytes | None,
    outcome: Outcome,
    *,
    headers: Headers | None = None,
    partition: int | None = None,
    what: str = "message",
) -> Awaitable:
    """Send one output of ``outcome.event``; returns a future done when the broker has it,
    or, when it can never be had (over the size limit, checked here and by the broker),
    when the event's dead letter is on the dead-letter topic instead."""
    try:
        await check_size(topic, key, value, headers, what)
    except TooLarge as exc:
        return await outcome.dead_letter(exc.error_class, str(exc))

    async def send() -> Awaitable:
        try:
            return await topic.send(key=key, value=value, headers=headers, partition=partition)
        except Exception as exc:  # the producer's own check (max_request_size)
            if not _is_size_error(exc):
                raise
            return await outcome.dead_letter("too_large", f"{what} refused: {exc!r}")

    first = await send()

    async def settle() -> object:
        try:
            return await first
        except Exception as exc:
            if not _is_size_error(exc):
                raise
        # The broker refused the batch this record was in: another record of that batch
        # may be the big one, so send once more alone before calling this one poison.
        try:
            return await (await send())
        except Exception as exc:
            if not _is_size_error(exc):
                raise
            log.warning("broker refused a %s for its size: %r", what, exc)
            return await (await outcome.dead_letter("too_large", f"broker refused: {exc!r}"))

    return asyncio.ensure_future(settle())
