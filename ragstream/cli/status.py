"""``ragstream status``: each stage's progress and dead letters, from Kafka alone."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from streams.errors import RagstreamError
from streams.settings import get_settings
from streams.topics import CHUNKS, URLS, VECTORS, dlq, stage_lags, topic_end_offsets


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status", help="per stage: messages, committed, lag; dead letters", description=__doc__
    )
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        lags = asyncio.run(asyncio.wait_for(stage_lags(settings), 20))
        dead = asyncio.run(
            topic_end_offsets(settings, [settings.topic(dlq(t)) for t in (URLS, CHUNKS, VECTORS)])
        )
    except (OSError, TimeoutError) as exc:
        raise RagstreamError(f"cannot reach Kafka at {settings.broker}: {exc!r}") from None
    except Exception as exc:
        if type(exc).__name__ == "KafkaConnectionError":
            raise RagstreamError(f"cannot reach Kafka at {settings.broker}") from None
        raise
    print(f"{'stage':<7} {'topic':<20} {'messages':>9} {'done':>9} {'lag':>7}  group")
    for lag in lags:
        print(
            f"{lag.stage:<7} {lag.topic:<20} {lag.end:>9} {lag.committed:>9} {lag.lag:>7}  "
            f"{settings.group(lag.stage)}"
        )
    print("dead letters: " + ", ".join(f"{t} {n}" for t, n in dead.items()))
    return 0
