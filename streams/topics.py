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


class OffsetReader:
    """One admin client and one consumer for reading group and end offsets repeatedly:
    following progress polls often, and connecting anew for every poll costs more CPU than
    the work it watches on a small machine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admin = admin(settings)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.broker, enable_auto_commit=False
        )

    async def __aenter__(self) -> OffsetReader:
        await self.admin.start()
        try:
            await self.consumer.start()
        except BaseException:
            await self.admin.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()
        await self.admin.close()

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        parts = self.consumer.partitions_for_topic(topic)
        if parts is None:
            await self.consumer._client.force_metadata_update()  # noqa: SLF001
            parts = self.consumer.partitions_for_topic(topic) or set()
        return [TopicPartition(topic, p) for p in sorted(parts)]

    async def end(self, topic: str) -> int:
        """Messages ever written to ``topic`` (the sum of its partitions' end offsets)."""
        tps = await self._partitions(topic)
        return sum((await self.consumer.end_offsets(tps)).values()) if tps else 0

    async def committed(self, group: str, topic: str) -> int:
        """Sum of ``group``'s committed offsets on ``topic`` (0 where none)."""
        offsets = await _group_offsets(self.admin, group)
        return sum(m.offset for tp, m in offsets.items() if tp.topic == topic and m.offset > 0)

    async def stage_lags(self) -> list[StageLag]:
        """Per stage: messages in its topic and how far its group has committed.

        Read in pipeline order (urls, then chunks, then vectors): a fetch commit happens
        only after its chunks were acknowledged by the broker, so when every stage shows lag
        0 in one pass, everything published before that pass is written.
        """
        out = []
        for stage, base in STAGES.items():
            topic = self.settings.topic(base)
            committed = await self.committed(self.settings.group(stage), topic)
            out.append(StageLag(stage, topic, await self.end(topic), committed))
        return out


async def stage_lags(settings: Settings) -> list[StageLag]:
    async with OffsetReader(settings) as reader:
        return await reader.stage_lags()


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
    async with OffsetReader(settings) as reader:
        return {topic: await reader.end(topic) for topic in topics}
