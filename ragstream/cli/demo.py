"""``ragstream demo``: the whole pipeline on a fresh machine, on the embedded defaults.

Starts the local broker (if none answers), serves the Django docs from a local HTTP
server, runs a worker, publishes the pages, follows them until every chunk is in Milvus,
then searches. Offline: the model is all-MiniLM-L6-v2 from PyPI unless RAGSTREAM_MODEL
says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from devtools import kafka_local
from devtools.corpus import CorpusServer, corpus_files, ensure_django_docs, subset
from ops.progress import Snapshot, snapshot_raw, wait_indexed
from ops.publisher import publish
from streams.errors import RagstreamError
from streams.messages import UrlRequest
from streams.settings import MINILM, Settings, get_settings
from streams.store import MilvusStore
from streams.topics import ensure_topics

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
    p.set_defaults(func=cmd_demo)


def demo_settings() -> Settings:
    settings = get_settings()
    if "model" not in settings.model_fields_set:
        settings = settings.model_copy(update={"model": MINILM})
    # The docs server is on loopback, which the SSRF guard refuses unless allowed: the
    # demo allows exactly that address, the way an intranet user allows theirs.
    allow = ",".join(a for a in (settings.fetch_allow, "127.0.0.1/32") if a)
    return settings.model_copy(update={"fetch_allow": allow})


def broker_answers(bootstrap: str) -> bool:
    """Something listens at the first bootstrap address (a broker the user runs)."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RAGSTREAM_MODEL": settings.model,
            "RAGSTREAM_BROKER": settings.broker,
            "RAGSTREAM_HOME": str(settings.home.resolve()),
            "RAGSTREAM_FETCH_ALLOW": settings.fetch_allow,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def cmd_demo(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    settings = demo_settings()
    t_start = time.perf_counter()
    started_broker = False
    if kafka_local.status(settings) is None and not broker_answers(settings.broker):
        console.print(f"[bold]Starting a local Kafka broker[/] on {settings.broker} ...")
        kafka_local.up(settings)
        started_broker = True
    docs = ensure_django_docs(settings.cache_dir)
    files = corpus_files(docs)
    chosen = files if args.all else subset(files, args.docs)
    console.print(
        f"[bold]Corpus:[/] {len(chosen)} of {len(files)} Django doc pages "
        f"(served on 127.0.0.1 with {args.latency_ms:.0f} ms latency)"
    )
    asyncio.run(ensure_topics(settings))
    base = asyncio.run(snapshot_raw(settings))
    log_path = settings.home / "demo-worker.log"
    settings.home.mkdir(parents=True, exist_ok=True)
    with (
        CorpusServer(docs, latency_s=args.latency_ms / 1000) as server,
        open(log_path, "ab") as log_file,
    ):
        worker = subprocess.Popen(
            [sys.executable, "-m", "ragstream.cli", "worker"],
            env=worker_env(settings),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        console.print(
            f"[bold]Worker[/] pid {worker.pid} (fetch, embed, write; model "
            f"{settings.model}); log: {log_path}"
        )
        try:
            reqs = [UrlRequest(url=server.url_of(p), source="demo") for p in chosen]
            n = asyncio.run(publish(settings, reqs))
            console.print(f"[bold]Published[/] {n} URLs to '{settings.topic('urls')}'")
            snap = follow(settings, base, n, console, worker)
        finally:
            stop(worker)
    elapsed = time.perf_counter() - t_start
    console.print(
        f"[bold green]Indexed[/] {snap.fetched} pages -> {snap.chunks} chunks -> "
        f"{snap.written} vectors in Milvus ({settings.milvus_target}); {elapsed:.0f}s in all"
    )
    store = MilvusStore(settings)
    try:
        console.print(f"Milvus collection '{settings.collection}' holds {store.count()} chunks")
    finally:
        store.close()
    if snap.dead:
        console.print(f"[yellow]Dead letters:[/] {snap.dead} (see `ragstream dlq list`)")
    from ragstream.cli.search import format_hit, search  # noqa: PLC0415

    os.environ["RAGSTREAM_MODEL"] = settings.model
    get_settings.cache_clear()
    console.print(f"\n[bold]Search:[/] {args.query!r}")
    for i, hit in enumerate(search(args.query, 5), 1):
        print(format_hit(i, hit))
    if started_broker and not args.keep_broker:
        kafka_local.down(settings)
    console.print(
        "\n[bold]Try next:[/]\n"
        f'  RAGSTREAM_MODEL={settings.model} ragstream search "your question" -k 5\n'
        "  ragstream kafka up && ragstream worker        # keep a pipeline running\n"
        "  ragstream publish https://example.org/page    # ingest any page\n"
        "  ragstream demo --all                          # the whole corpus (656 pages)"
    )
    return 0


def follow(
    settings: Settings, base: dict[str, int], n: int, console: Console, worker: subprocess.Popen
) -> Snapshot:
    cols = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*cols, console=console) as bar:
        pages = bar.add_task("pages fetched   ", total=n)
        embedded = bar.add_task("chunks embedded ", total=None)
        written = bar.add_task("vectors written ", total=None)

        def update(s: Snapshot) -> None:
            if worker.poll() is not None:
                raise RagstreamError(f"the worker exited ({worker.returncode}); see its log")
            bar.update(pages, completed=s.fetched)
            bar.update(embedded, completed=s.embedded, total=max(s.chunks, 1))
            bar.update(written, completed=s.written, total=max(s.vectors, 1))

        return asyncio.run(wait_indexed(settings, base, n, update))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
