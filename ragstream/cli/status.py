"""``ragstream status``: each stage's progress and dead letters, from Kafka alone; and
where Milvus is reached (the address for your own pymilvus client)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ops.status import MilvusWhere, pipeline_status
from streams import kafka
from streams.settings import Settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status", help="per stage: messages, committed, lag; dead letters", description=__doc__
    )
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    with kafka.translated(settings):
        status = asyncio.run(pipeline_status(settings))
    print(f"{'stage':<7} {'topic':<20} {'messages':>9} {'done':>9} {'lag':>7}  group")
    for lag in status.lags:
        print(
            f"{lag.stage:<7} {lag.topic:<20} {lag.end:>9} {lag.committed:>9} {lag.lag:>7}  "
            f"{settings.group(lag.stage)}"
        )
    print("dead letters: " + ", ".join(f"{t} {n}" for t, n in status.dead.items()))
    print(f"milvus: {milvus_line(status.milvus)}")
    return 0


def milvus_line(where: MilvusWhere) -> str:
    if where.served is not None:
        return (
            f"{where.uri} (Milvus Lite {where.lite_dir} served by pid {where.served.pid}; "
            "connect any pymilvus client there)"
        )
    if where.lite_dir is not None:
        return (
            f"{where.uri} (Milvus Lite, not served: one process at a time opens it; a worker "
            "with the write stage, or `ragstream milvus up`, serves it to many)"
        )
    return where.uri
