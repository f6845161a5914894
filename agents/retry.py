"""The delay topics' forwarder: sends a delayed ``urls`` request back to ``urls`` when due.

A page whose transient failures outlast its attempts is not dead-lettered at once: the fetch
stage puts its request on ``urls.retry.<n>`` with a not-before time (header
``ragstream-not-before``) and acks it. This forwarder, one per fetch process, in its own
consumer group (``<app_id>-retry``, plain aiokafka, not a Faust agent: a Faust agent that
waits minutes would hold up every rebalance, since Faust drains streams first), reads the
delay topics. Every record of one delay topic waits the same delay, so they fall due in
offset order: a partition whose head is not due yet is paused until it is, and nothing
sleeps while holding a record. Due requests are re-published to ``urls`` under the same key
(so the same partition, the same page state) with their headers, and the delay topic's
offsets are committed only after the broker acknowledged them: a crash re-sends at most
that batch, which the fetch stage absorbs (a page fetched twice changes nothing).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from agents.common import header_int
from streams import kafka
from streams.retry import NOT_BEFORE
from streams.settings import Settings
from streams.topics import RETRY_GROUP, URLS, retry_topics

log = logging.getLogger(__name__)

IDLE_POLL_MS = 500


def now_ms() -> int:
    return int(time.time() * 1000)


class _Forget(ConsumerRebalanceListener):
    """A revoked partition's hold is its new owner's business."""

    def __init__(self, held: dict[TopicPartition, int]) -> None:
        self.held = held

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.held.pop(tp, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        return None


class RetryForwarder:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = list(retry_topics(settings))
        self.target = settings.topic(URLS)
        self.held: dict[TopicPartition, int] = {}  # paused partition -> when its head is due
        self.forwarded = 0

    async def run(self) -> None:
        """Forward due requests until cancelled; a failure restarts the loop after a pause."""
        if not self.topics:
            return
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retry forwarder failed; restarting in 5s")
                self.held.clear()
                await asyncio.sleep(5)

    async def _run(self) -> None:
        s = self.settings
        consumer = kafka.consumer(
            s,
            group_id=s.group(RETRY_GROUP),
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(max(s.session_timeout_s / 5, 0.5) * 1000),
        )
        async with (
            kafka.started(consumer, s) as consumer,
            kafka.started(kafka.producer(s), s) as producer,
        ):
            consumer.subscribe(self.topics, listener=_Forget(self.held))
            while True:
                await self._step(consumer, producer)

    async def _step(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        now = now_ms()
        due = [tp for tp, when in self.held.items() if when <= now]
        for tp in due:
            del self.held[tp]
        assigned = consumer.assignment()
        if due:
            consumer.resume(*(tp for tp in due if tp in assigned))
        wait = IDLE_POLL_MS
        if self.held:
            wait = max(min(wait, min(self.held.values()) - now), 1)
        batch = await consumer.getmany(timeout_ms=wait, max_records=500)
        pending: list[asyncio.Future] = []
        commits: dict[TopicPartition, int] = {}
        for tp, records in batch.items():
            if tp in self.held:
                continue  # paused meanwhile; its records come again after the seek
            for rec in records:
                when = header_int(rec.headers, NOT_BEFORE)
                if when > now_ms():
                    consumer.seek(tp, rec.offset)
                    consumer.pause(tp)
                    self.held[tp] = when
                    break
                headers = [(k, v) for k, v in rec.headers if k != NOT_BEFORE]
                pending.append(
                    await producer.send(self.target, rec.value, key=rec.key, headers=headers)
                )
                commits[tp] = rec.offset + 1
        if pending:
            await asyncio.gather(*pending)
            self.forwarded += len(pending)
            log.info("retry: %d delayed request(s) due, sent back to %s", len(pending), self.target)
        if commits:
            try:
                await consumer.commit(commits)
            except (CommitFailedError, IllegalStateError, KafkaError) as exc:
                # Revoked meanwhile: the new owner forwards them again (harmless repeats).
                log.warning("retry: commit after forwarding failed: %r", exc)
