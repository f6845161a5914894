"""``ragstream demo``: the whole pipeline on a fresh machine, on the embedded defaults.

Brings the local stack up (`ragstream up`: the broker if none answers, the worker), serves
the Django docs from a local HTTP server, publishes the pages, follows them until every
chunk is in Milvus, takes down what it started (unless --keep), then searches. Offline: the
model is all-MiniLM-L6-v2 from PyPI unless RAGSTREAM_MODEL says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ops.demo import DemoHooks, demo_settings, run_demo
from ops.progress import Snapshot
from ops.search import search
from ragstream.cli.search import format_hit
from streams.settings import Settings

DEFAULT_DOCS = 150
QUERY = "How do I write a custom template filter?"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="ingest the Django docs end to end and search them", description=__doc__
    )
    p.add_argument("--all", action="store_true", help="ingest every page (656), not a subset")
    p.add_argument(
        "--docs",
        type=int,
        default=DEFAULT_DOCS,
        help=f"pages in the subset ({DEFAULT_DOCS}, about 3 minutes on 2 cores)",
    )
    p.add_argument(
        "--latency-ms",
        type=float,
        default=50.0,
        help="latency the local docs server adds per request (50)",
    )
    p.add_argument("--query", default=QUERY, help="the sample search")
    p.add_argument(
        "--keep-broker",
        action="store_true",
        help="leave a broker the demo started running afterwards",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the whole stack running afterwards (`ragstream ps`, `ragstream down`)",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    console = Console(stderr=True)
    settings = demo_settings(settings)
    bars: list[Progress] = []  # shown from the publish until the pages are indexed
    tasks: dict[str, Any] = {}

    def corpus(chosen: int, total: int) -> None:
        console.print(
            f"[bold]Corpus:[/] {chosen} of {total} Django doc pages "
            f"(served on 127.0.0.1 with {args.latency_ms:.0f} ms latency)"
        )

    def worker_started(pid: int, log_path: Path) -> None:
        console.print(
            f"[bold]Worker[/] pid {pid} (fetch, embed, write; model "
            f"{settings.model}); log: {log_path}"
        )

    def published(n: int) -> None:
        console.print(f"[bold]Published[/] {n} URLs to '{settings.topic('urls')}'")
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        bar = Progress(*cols, TimeElapsedColumn(), console=console)
        tasks["pages"] = bar.add_task("pages fetched   ", total=n)
        tasks["embedded"] = bar.add_task("chunks embedded ", total=None)
        tasks["written"] = bar.add_task("vectors written ", total=None)
        bar.start()
        bars.append(bar)

    def progress(s: Snapshot, _n: int) -> None:
        bar = bars[-1]
        bar.update(tasks["pages"], completed=s.fetched)
        bar.update(tasks["embedded"], completed=s.embedded, total=max(s.chunks, 1))
        bar.update(tasks["written"], completed=s.written, total=max(s.vectors, 1))

    hooks = DemoHooks(
        step=lambda what: console.print(f"[bold]Stack:[/] {what}"),
        corpus=corpus,
        worker_started=worker_started,
        published=published,
        progress=progress,
    )
    try:
        result = run_demo(
            settings,
            None if args.all else args.docs,
            args.latency_ms / 1000,
            hooks,
            keep=args.keep,
            keep_broker=args.keep_broker,
        )
    finally:
        for bar in bars:
            bar.stop()
    snap = result.snap
    console.print(
        f"[bold green]Indexed[/] {snap.fetched} pages -> {snap.chunks} chunks -> "
        f"{snap.written} vectors in Milvus ({settings.milvus_target}); "
        f"{result.elapsed_s:.0f}s in all"
    )
    console.print(f"Milvus collection '{settings.collection}' holds {result.stored} chunks")
    if snap.dead:
        console.print(f"[yellow]Dead letters:[/] {snap.dead} (see `ragstream dlq list`)")
    console.print(f"\n[bold]Search:[/] {args.query!r}")
    for i, hit in enumerate(search(settings, args.query, 5).hits, 1):
        print(format_hit(i, hit))
    if result.kept:
        console.print(
            "\n[bold]The stack keeps running:[/] `ragstream ps`; stop it with `ragstream down`"
        )
    console.print(
        "\n[bold]Try next:[/]\n"
        f'  RAGSTREAM_MODEL={settings.model} ragstream search "your question" -k 5\n'
        "  ragstream up && ragstream ps                  # keep a pipeline running\n"
        "  ragstream publish https://example.org/page    # ingest any page\n"
        "  ragstream demo --all                          # the whole corpus (656 pages)"
    )
    return 0
