"""Topic names, their creation, and the consumer-group view of progress.

Topics are created explicitly (not by auto-create on first produce) so that their
partition counts are the configured ones: ``chunks`` has one partition by default because
one embed worker per partition is the design.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    GroupCoordinatorNotAvailableError,
    NotCoordinatorError,
    TopicAlreadyExistsError,
)

from streams.settings import Settings

log = logging.getLogger(__name__)

URLS, CHUNKS, VECTORS = "urls", "chunks", "vectors"
STAGES: dict[str, str] = {"fetch": URLS, "embed": CHUNKS, "write": VECTORS}
"""Each stage and the topic it consumes (its consumer group is ``<app_id>-<stage>``)."""


def dlq(topic: str) -> str:
    return f"{topic}.dlq"


def state_topic(topic: str) -> str:
    """Compacted per-key state of the stage consuming ``topic`` (co-partitioned with it)."""
    return f"{topic}.state"


def topic_specs(settings: Settings) -> dict[str, int]:
    """Every topic ragstream uses, with its partition count."""
    specs = {
        settings.topic(URLS): settings.url_partitions,
        settings.topic(CHUNKS): settings.chunk_partitions,
        settings.topic(VECTORS): settings.vector_partitions,
    }
    for name in (URLS, CHUNKS, VECTORS):
        specs[settings.topic(dlq(name))] = 1
    specs[settings.topic(state_topic(URLS))] = settings.url_partitions
    return specs


def topic_config(name: str) -> dict[str, str]:
    if name.endswith(".dlq"):
        return {"retention.ms": "-1"}  # dead letters are kept until dealt with
    if name.endswith(".state"):
        return {"cleanup.policy": "compact"}  # the latest state per key, forever
    return {}


def admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=settings.broker, request_timeout_ms=15000)


async def ensure_topics(settings: Settings) -> None:
    """Create missing topics with their configured partitions (idempotent)."""
    client = admin(settings)
    await client.start()
    try:
        existing = set(await client.list_topics())
        new = [
            NewTopic(
                name,
                num_partitions=n,
                replication_factor=1,
                topic_configs=topic_config(name),
            )
            for name, n in topic_specs(settings).items()
            if name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await client.create_topics(new)
            log.info("created topics %s", ", ".join(t.name for t in new))
    finally:
        await client.close()


@dataclasses.dataclass(frozen=True, slots=True)
class StageLag:
    stage: str
    topic: str
    end: int  # sum of end offsets over partitions
    committed: int  # sum of the group's committed offsets (0 where none)

    @property
    def lag(self) -> int:
        return self.end - self.committed


async def stage_lags(settings: Settings) -> list[StageLag]:
    """Per stage: messages in its topic and how far its group has committed.

    Read in pipeline order (urls, then chunks, then vectors): a fetch commit happens only
    after its chunks were acknowledged by the broker, so when every stage shows lag 0 in
    one pass, everything published before that pass is written.
    """
    client = admin(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
    await client.start()
    await consumer.start()
    try:
        out = []
        for stage, base in STAGES.items():
            topic = settings.topic(base)
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                await consumer._client.force_metadata_update()  # noqa: SLF001
                parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            offsets = await _group_offsets(client, settings.group(stage))
            committed = sum(
                meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0
            )
            ends = await consumer.end_offsets(tps) if tps else {}
            out.append(StageLag(stage, topic, sum(ends.values()), committed))
        return out
    finally:
        await consumer.stop()
        await client.close()


async def _group_offsets(client: AIOKafkaAdminClient, group: str) -> dict:
    """A group's committed offsets; waits out a coordinator that is still loading (a
    fresh broker creates ``__consumer_offsets`` on first use)."""
    for attempt in range(60):
        try:
            return await client.list_consumer_group_offsets(group)
        except (
            GroupCoordinatorNotAvailableError,
            CoordinatorLoadInProgressError,
            NotCoordinatorError,
        ):
            if attempt == 59:
                raise
            await asyncio.sleep(0.5)
    return {}


async def topic_end_offsets(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Sum of end offsets per topic (how many messages were ever written to it)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001
        out = {}
        for topic in topics:
            parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            out[topic] = sum((await consumer.end_offsets(tps)).values()) if tps else 0
        return out
    finally:
        await consumer.stop()
