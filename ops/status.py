"""The pipeline at a glance, from Kafka alone: each stage's progress and the dead letters.

Read from the topics' end offsets and the stages' committed offsets, so it needs no worker
and no Milvus, and it answers the same wherever the stages run. Where Milvus is reached
comes from the settings and the Lite discovery file, without connecting to it: a user's
own pymilvus client needs that address, and it changes while a worker serves Lite.
"""

from __future__ import annotations

import asyncio
import dataclasses

from ops.deadletters import dlq_topics
from streams.milvus_lite import ServerInfo, connect_uri, find_server, lite_dir
from streams.settings import Settings
from streams.topics import StageLag, stage_lags, topic_end_offsets


@dataclasses.dataclass(frozen=True, slots=True)
class MilvusWhere:
    uri: str  # what a pymilvus client connects to now
    lite_dir: str | None  # the Milvus Lite directory, if Milvus is Lite
    served: ServerInfo | None  # the milvus-lite server serving it, if one runs


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    lags: list[StageLag]  # per stage: messages in its topic, committed, lag
    dead: dict[str, int]  # dead-letter topic -> letters ever written to it
    milvus: MilvusWhere


def milvus_where(settings: Settings) -> MilvusWhere:
    """The address every ragstream process would use now (``connect_uri``), and the server
    behind it when Lite is served."""
    data_dir = lite_dir(settings)
    served = find_server(data_dir) if data_dir is not None else None
    return MilvusWhere(
        connect_uri(settings), str(data_dir) if data_dir is not None else None, served
    )


async def pipeline_status(settings: Settings, timeout_s: float = 20.0) -> Status:
    """Each stage's lag and the dead letters per topic; ``TimeoutError`` after ``timeout_s``
    of a broker that accepts connections but does not answer."""
    lags = await asyncio.wait_for(stage_lags(settings), timeout_s)
    dead = await topic_end_offsets(settings, list(dlq_topics(settings)))
    return Status(lags, dead, milvus_where(settings))
