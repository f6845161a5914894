"""What every stage shares: dead-lettering an event, and dying loudly instead of skipping.

Delivery rule: an event is acked only when its outcome (its output, or its dead letter) is
acknowledged by the broker or written to Milvus. When a stage cannot do either (Kafka or
Milvus failing in a way it cannot wait out), it must not carry on past the event: faust
commits the highest contiguous acked offset and can skip one still in flight (faust
issue #606). So the process exits and the consumer group redelivers from the last commit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Iterable

import faust
from faust.types import EventT

from streams.messages import DeadLetter, encode_dead_letter

log = logging.getLogger(__name__)

EXIT_FATAL = 70


def fatal(message: str, exc: BaseException | None = None) -> None:
    """Stop the process now: redelivery from the last commit is the recovery."""
    log.critical("%s: %r; exiting so the group redelivers from the last commit", message, exc)
    sys.stderr.flush()
    os._exit(EXIT_FATAL)


async def dead_letter(
    dlq: faust.TopicT,
    stage: str,
    event: EventT,
    error_class: str,
    error: str,
    attempts: int = 1,
    url: str | None = None,
) -> Awaitable:
    """Send the event's original bytes with the reason; returns the delivery future."""
    msg = event.message
    value = msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b"")
    key = msg.key if isinstance(msg.key, bytes | None) else bytes(msg.key)
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
    )
    log.warning("dead-letter %s %s@%s: %s: %s", stage, msg.topic, msg.offset, error_class, error)
    return await dlq.send(key=key, value=encode_dead_letter(envelope))


async def delivered(futures: Iterable[Awaitable]) -> None:
    """Wait until the broker acknowledged every message sent (acks=all)."""
    futures = list(futures)
    if futures:
        await asyncio.gather(*futures)
