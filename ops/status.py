"""The pipeline at a glance, from Kafka alone: each stage's progress and the dead letters.

Read from the topics' end offsets and the stages' committed offsets, so it needs no worker
and no Milvus, and it answers the same wherever the stages run.
"""

from __future__ import annotations

import asyncio
import dataclasses

from ops.deadletters import dlq_topics
from streams.settings import Settings
from streams.topics import StageLag, stage_lags, topic_end_offsets


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    lags: list[StageLag]  # per stage: messages in its topic, committed, lag
    dead: dict[str, int]  # dead-letter topic -> letters ever written to it


async def pipeline_status(settings: Settings, timeout_s: float = 20.0) -> Status:
    """Each stage's lag and the dead letters per topic; ``TimeoutError`` after ``timeout_s``
    of a broker that accepts connections but does not answer."""
    lags = await asyncio.wait_for(stage_lags(settings), timeout_s)
    dead = await topic_end_offsets(settings, list(dlq_topics(settings)))
    return Status(lags, dead)
