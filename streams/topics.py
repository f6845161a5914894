"""Topic names, their creation, and the consumer-group view of progress.

Topics are created explicitly (not by auto-create on first produce) so that their
partition counts are the configured ones: ``chunks`` has one partition by default because
one embed worker per partition is the design.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import OffsetAndMetadata

from streams import kafka
from streams.settings import Settings

log = logging.getLogger(__name__)

URLS, CHUNKS, VECTORS = "urls", "chunks", "vectors"
#: The fetch stage's reports of crawled pages (keyed by crawl id), read by the frontier
#: (``agents/frontier.py``), which keeps each crawl's state in ``crawl.state``.
CRAWL = "crawl"
#: Delivery ids the webhook server has answered (compacted; read back at its startup).
DELIVERIES = "webhooks.deliveries"
#: How long the deliveries topic keeps a record: a day more than ``webhook_dedup_s`` may be.
DELIVERIES_RETENTION_MS = 8 * 86_400_000
STAGES: dict[str, str] = {"fetch": URLS, "embed": CHUNKS, "write": VECTORS}
"""Each stage and the topic it consumes (its consumer group is ``<app_id>-<stage>``)."""

RETRY_GROUP = "retry"
"""``settings.group(RETRY_GROUP)`` forwards due requests from the delay topics to ``urls``."""

BROKER_DEFAULT_MAX_BYTES = 1_048_588
"""Kafka's default ``message.max.bytes``: the limit assumed when the broker does not say."""

DAY_MS = 86_400_000


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
    # Crawls scale with the fetch workers: as many partitions as urls, state co-partitioned.
    specs[settings.topic(CRAWL)] = settings.url_partitions
    specs[settings.topic(state_topic(CRAWL))] = settings.url_partitions
    specs[settings.topic(dlq(CRAWL))] = 1
    specs[settings.topic(DELIVERIES)] = 1  # read whole at startup: one partition, in order
    for name in retry_topics(settings):
        specs[name] = settings.url_partitions
    return specs


def retry_delays(settings: Settings) -> list[float]:
    """``fetch_retry_delays`` as seconds, in order (empty: no delayed retries)."""
    return [float(x) for x in settings.fetch_retry_delays.split(",") if x.strip()]


def retry_topic(n: int) -> str:
    """The delay topic of the ``n``-th delayed retry (1-based) of a ``urls`` request."""
    return f"{URLS}.retry.{n}"


def retry_topics(settings: Settings) -> dict[str, float]:
    """Full name of each delay topic -> its delay in seconds."""
    return {
        settings.topic(retry_topic(i)): delay
        for i, delay in enumerate(retry_delays(settings), start=1)
    }


def topic_config(name: str, settings: Settings | None = None) -> dict[str, str]:
    if name.endswith(".dlq"):
        return {"retention.ms": "-1"}  # dead letters are kept until dealt with
    if name.endswith(".state"):
        return {"cleanup.policy": "compact"}  # the latest state per key, forever
    delay = retry_topics(settings).get(name) if settings is not None else None
    if delay is not None:
        # A request waits here for its delay: kept a week past it, so a fetch stage that
        # was stopped meanwhile still finds its retries when it comes back.
        return {"retention.ms": str(int(delay * 1000) + 7 * DAY_MS)}
    if name.endswith(DELIVERIES):  # each id once, and only for as long as it can matter
        return {
            "cleanup.policy": "compact,delete",
            "retention.ms": str(DELIVERIES_RETENTION_MS),
            "segment.ms": "3600000",
        }
    return {}


async def message_limits(settings: Settings, topics: list[str]) -> dict[str, int]:
    """The largest record batch the broker accepts on each topic, in bytes.

    A topic's ``max.message.bytes`` (which already falls back to the broker's
    ``message.max.bytes``); for a topic the broker does not describe, the broker's
    ``message.max.bytes``; failing that, Kafka's default. Read once when a stage starts: a
    produce over the limit can never succeed, so the stage dead-letters it instead.
    """
    async with kafka.started(kafka.admin(settings), settings) as client:
        out: dict[str, int] = {}
        broker_max = BROKER_DEFAULT_MAX_BYTES
        try:
            cluster = await client.describe_cluster()
            node = min(b["node_id"] for b in cluster["brokers"])
            res = ConfigResource(ConfigResourceType.BROKER, str(node), {"message.max.bytes": None})
            broker_max = _config_value(await client.describe_configs([res]), "message.max.bytes")
        except Exception as exc:  # an old or locked-down broker: assume Kafka's default
            log.warning(
                "cannot read the broker's message.max.bytes (%r); assuming %d", exc, broker_max
            )
        wanted = [
            ConfigResource(ConfigResourceType.TOPIC, t, {"max.message.bytes": None}) for t in topics
        ]
        try:
            responses = await client.describe_configs(wanted) if wanted else []
        except Exception as exc:
            log.warning("cannot read topics' max.message.bytes (%r)", exc)
            responses = []
        for response in responses:
            for error, _msg, _type, name, entries in response.resources:
                for key, value, *_ in entries if not error else ():
                    if key == "max.message.bytes" and str(value).isdigit():
                        out[name] = int(value)
        return {t: out.get(t, broker_max) for t in topics}


def _config_value(responses: list, key: str) -> int:
    for response in responses:
        for error, _msg, _type, _name, entries in response.resources:
            for name, value, *_ in entries if not error else ():
                if name == key and str(value).isdigit():
                    return int(value)
    return BROKER_DEFAULT_MAX_BYTES


async def ensure_topics(settings: Settings) -> None:
    """Create missing topics with their configured partitions (idempotent)."""
    async with kafka.started(kafka.admin(settings), settings) as client:
        existing = set(await client.list_topics())
        new = [
            NewTopic(
                name,
                num_partitions=n,
                replication_factor=settings.topic_replicas,
                topic_configs=topic_config(name, settings),
            )
            for name, n in topic_specs(settings).items()
            if name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                kafka.created(await client.create_topics(new), settings)
            log.info("created topics %s", ", ".join(t.name for t in new))


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
    the work it watches on a small machine. A topic's partitions are looked up once (again
    after :data:`PARTITIONS_MAX_AGE_S`), and until it has some, at every read, so a topic
    created meanwhile is seen at once."""

    #: How long a topic's known partitions are trusted (aiokafka's metadata age).
    PARTITIONS_MAX_AGE_S = 300.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admin: AIOKafkaAdminClient  # both made on entering: none is left unstarted
        self.consumer: AIOKafkaConsumer
        self._known: dict[str, tuple[float, list[TopicPartition]]] = {}
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> OffsetReader:
        async with contextlib.AsyncExitStack() as stack:
            self.admin = await stack.enter_async_context(
                kafka.started(kafka.admin(self.settings), self.settings)
            )
            self.consumer = await stack.enter_async_context(
                kafka.started(kafka.consumer(self.settings), self.settings)
            )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        at, tps = self._known.get(topic, (0.0, []))
        if not tps or time.monotonic() - at > self.PARTITIONS_MAX_AGE_S:
            with kafka.translated(self.settings, f"listing the partitions of {topic}"):
                tps = await kafka.partitions(self.admin, [topic])
            self._known[topic] = (time.monotonic(), tps)
        return tps

    async def end(self, topic: str) -> int:
        """Messages ever written to ``topic`` (the sum of its partitions' end offsets)."""
        tps = await self._partitions(topic)
        if not tps:
            return 0
        with kafka.translated(self.settings, f"reading the end offsets of {topic}"):
            return sum((await self.consumer.end_offsets(tps)).values())

    async def committed(self, group: str, topic: str) -> int:
        """Sum of ``group``'s committed offsets on ``topic`` (0 where none)."""
        offsets = await group_offsets(self.settings, self.admin, group)
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
            end = 0
            if stage == "fetch":
                # A request waiting in a delay topic is not done: it comes back to urls.
                # Each commit is read before the end of the topic its messages go to (the
                # delay topics' group before urls' end, urls' group before the delay
                # topics' ends), so a request moving between them is always seen somewhere.
                names = set(retry_topics(self.settings))
                if names:
                    offsets = await group_offsets(
                        self.settings, self.admin, self.settings.group(RETRY_GROUP)
                    )
                    committed += sum(
                        m.offset for tp, m in offsets.items() if tp.topic in names and m.offset > 0
                    )
                    for name in names:
                        end += await self.end(name)
            end += await self.end(topic)
            out.append(StageLag(stage, topic, end, committed))
        return out


async def stage_lags(settings: Settings) -> list[StageLag]:
    async with OffsetReader(settings) as reader:
        return await reader.stage_lags()


async def group_offsets(
    settings: Settings, client: AIOKafkaAdminClient, group: str
) -> dict[TopicPartition, OffsetAndMetadata]:
    """A group's committed offsets; waits out a coordinator that is still loading (a fresh
    broker creates ``__consumer_offsets`` on first use), as long as the broker says so."""
    return await kafka.retrying(
        f"reading the offsets of group {group}",
        lambda: client.list_consumer_group_offsets(group),
        broker=settings.broker,
    )


async def topic_end_offsets(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Sum of end offsets per topic (how many messages were ever written to it)."""
    async with OffsetReader(settings) as reader:
        return {topic: await reader.end(topic) for topic in topics}
