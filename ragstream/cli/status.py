"""``ragstream status``: each stage's progress and dead letters, from Kafka alone; the live
figures of the stages running here (rates, busy fraction, freshness p50/p99, from their
/metrics); and where Milvus is reached (the address for your own pymilvus client).
``--watch`` refreshes it."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from rich.console import Console

from ops.status import Live, MilvusWhere, Reading, Status, live, pipeline_status, read_metrics
from streams import kafka
from streams.settings import Settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status", help="per stage: messages, committed, lag; dead letters", description=__doc__
    )
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="seconds between readings (2)"
    )
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    interval = max(args.interval, 0.2)
    first = read_metrics(settings)
    if not args.watch:
        if first.processes:
            time.sleep(min(interval, 1.0))  # a second reading gives rates and busy time
        with kafka.translated(settings):
            status = asyncio.run(pipeline_status(settings))
        print("\n".join(report(settings, status, live(read_metrics(settings), first))))
        return 0
    console = Console()
    before: Reading | None = None
    while True:
        with kafka.translated(settings):
            status = asyncio.run(pipeline_status(settings))
        now = read_metrics(settings)
        lines = report(settings, status, live(now, before))
        before = now
        console.clear()
        console.print("\n".join(lines), highlight=False, markup=False)
        time.sleep(interval)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def report(settings: Settings, status: Status, figures: Live) -> list[str]:
    lines = [f"{'stage':<7} {'topic':<20} {'messages':>9} {'done':>9} {'lag':>7}  group"]
    for lag in status.lags:
        lines.append(
            f"{lag.stage:<7} {lag.topic:<20} {lag.end:>9} {lag.committed:>9} {lag.lag:>7}  "
            f"{settings.group(lag.stage)}"
        )
    lines.append("dead letters: " + ", ".join(f"{t} {n}" for t, n in status.dead.items()))
    if figures.processes:
        if figures.rates is not None:
            rates = ", ".join(f"{stage} {r:.1f}/s" for stage, r in figures.rates.items())
            busy = "-" if figures.busy is None else f"{figures.busy:.0%}"
            lines.append(f"rates: {rates}; embedder busy {busy}")
        lines.append(
            f"freshness: page p50 {_s(figures.fresh_p50)} p99 {_s(figures.fresh_p99)}; "
            f"chunk p50 {_s(figures.chunk_p50)} p99 {_s(figures.chunk_p99)} "
            f"(from {figures.processes} local process{'es' if figures.processes != 1 else ''}' "
            "/metrics)"
        )
    else:
        lines.append("live figures: no stage process runs here (`ragstream ps`)")
    lines.append(f"milvus: {milvus_line(status.milvus)}")
    return lines


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
