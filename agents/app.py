"""The Faust app of one stage.

One Faust app (and so one consumer group, ``<app_id>-<stage>``) per stage: stages scale,
restart and replay independently, and an offset reset of one stage touches no other.
Values travel as raw bytes; stages decode with :mod:`streams.messages` so that a bad
message becomes a dead letter rather than a crash inside a deserializer.
"""

from __future__ import annotations

import faust

from agents.common import LIMITS
from streams import kafka
from streams.settings import Settings
from streams.topics import STAGES, dlq


def create_app(settings: Settings, stage: str) -> faust.App:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    datadir = settings.home / "faust" / stage
    datadir.mkdir(parents=True, exist_ok=True)
    LIMITS.configure(settings)  # every stage sends within the broker's size limits
    return faust.App(
        settings.group(stage),
        **kafka.faust_broker(settings),
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=1,
        topic_replication_factor=settings.topic_replicas,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(settings.session_timeout_s / 5, 0.5),
        broker_rebalance_timeout=max(settings.session_timeout_s * 3, 30.0),
        broker_commit_interval=settings.commit_interval_s,
        broker_max_poll_interval=600.0,
        producer_acks=-1,
        stream_buffer_maxsize=max(settings.window_rows * 2, 1024),
        web_enabled=settings.web_port > 0,
        web_port=settings.web_port or 6066,
        web_bind="127.0.0.1",
        datadir=str(datadir),
    )


def topic(app: faust.App, settings: Settings, name: str) -> faust.TopicT:
    return app.topic(settings.topic(name), key_serializer="raw", value_serializer="raw")


def dlq_topic(app: faust.App, settings: Settings, name: str) -> faust.TopicT:
    return topic(app, settings, dlq(name))
