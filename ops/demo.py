"""The whole pipeline on one machine, for ``ragstream demo``: broker, corpus, worker, follow.

Starts the local broker if none answers, serves the Django docs from a local HTTP server,
runs a worker in a process group of its own, publishes the pages and follows them until
every chunk is in Milvus. The caller prints; :class:`DemoHooks` tell it what happens.

Every step takes the demo's :class:`~streams.settings.Settings` (:func:`demo_settings`):
the worker gets them through its environment (:func:`worker_env`), the search after it
through its argument, so the model the demo picked is the one both use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from devtools import kafka_local
from devtools.corpus import CorpusServer, corpus_files, ensure_django_docs, subset
from ops.progress import Snapshot, snapshot_raw, wait_indexed
from ops.publisher import publish
from streams.errors import RagstreamError
from streams.messages import UrlRequest
from streams.settings import MINILM, Settings
from streams.store import MilvusStore
from streams.topics import ensure_topics


def demo_settings(settings: Settings) -> Settings:
    """The user's settings, with the small embedded model unless they chose one, and the
    loopback address the docs server listens on allowed."""
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
    """The worker's environment: the demo's settings, offline."""
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


def _ignore(*_args: object) -> None:
    pass


@dataclasses.dataclass(slots=True)
class DemoHooks:
    """What the demo tells its caller, step by step (each optional)."""

    broker_starting: Callable[[str], None] = _ignore  # bootstrap address
    corpus: Callable[[int, int], None] = _ignore  # pages chosen, pages in all
    worker_started: Callable[[int, Path], None] = _ignore  # pid, log file
    published: Callable[[int], None] = _ignore  # URLs published
    progress: Callable[[Snapshot, int], None] = _ignore  # snapshot, URLs expected


@dataclasses.dataclass(frozen=True, slots=True)
class DemoResult:
    snap: Snapshot
    elapsed_s: float
    stored: int  # chunks the collection holds afterwards
    started_broker: bool  # the demo started the broker (stop it with kafka_local.down)


def run_demo(
    settings: Settings,
    docs: int | None,
    latency_s: float,
    hooks: DemoHooks | None = None,
) -> DemoResult:
    """Ingest ``docs`` pages of the Django docs (``None``: all of them) end to end.

    Raises :class:`~streams.errors.RagstreamError` if the worker exits before the pages
    are indexed (its log says why). The worker is stopped before this returns.
    """
    hooks = hooks or DemoHooks()
    t_start = time.perf_counter()
    started_broker = False
    if kafka_local.status(settings) is None and not broker_answers(settings.broker):
        hooks.broker_starting(settings.broker)
        kafka_local.up(settings)
        started_broker = True
    root = ensure_django_docs(settings.cache_dir)
    files = corpus_files(root)
    chosen = files if docs is None else subset(files, docs)
    hooks.corpus(len(chosen), len(files))
    asyncio.run(ensure_topics(settings))
    base = asyncio.run(snapshot_raw(settings))
    log_path = settings.home / "demo-worker.log"
    settings.home.mkdir(parents=True, exist_ok=True)
    with CorpusServer(root, latency_s=latency_s) as server, open(log_path, "ab") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "ragstream.cli", "worker"],
            env=worker_env(settings),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        hooks.worker_started(worker.pid, log_path)
        try:
            reqs = [UrlRequest(url=server.url_of(p), source="demo") for p in chosen]
            n = asyncio.run(publish(settings, reqs))
            hooks.published(n)
            snap = follow(settings, base, n, worker, hooks.progress)
        finally:
            stop(worker)
    elapsed = time.perf_counter() - t_start
    store = MilvusStore(settings)
    try:
        stored = store.count()
    finally:
        store.close()
    return DemoResult(snap, elapsed, stored, started_broker)


def follow(
    settings: Settings,
    base: dict[str, int],
    n: int,
    worker: subprocess.Popen,
    on_update: Callable[[Snapshot, int], None] = _ignore,
) -> Snapshot:
    """Until the ``n`` URLs are indexed; a worker that exits first ends the demo."""

    def update(snap: Snapshot) -> None:
        if worker.poll() is not None:
            raise RagstreamError(f"the worker exited ({worker.returncode}); see its log")
        on_update(snap, n)

    return asyncio.run(wait_indexed(settings, base, n, update))


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the worker's process group (its stages), SIGKILL after 45 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
