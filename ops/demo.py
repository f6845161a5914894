"""The whole pipeline on one machine, for ``ragstream demo``: stack, corpus, publish, follow.

Brings the local stack up (:mod:`ops.stack`: the broker if none answers, the worker),
serves the Django docs from a local HTTP server, publishes the pages and follows them
until every chunk is in Milvus, then takes down what it started (a stack that ran before
the demo keeps running). The caller prints; :class:`DemoHooks` tell it what happens.

Every step takes the demo's :class:`~streams.settings.Settings` (:func:`demo_settings`):
the worker gets them through its environment (:func:`worker_env`), the search after it
through its argument, so the model the demo picked is the one both use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from devtools.corpus import CorpusServer, corpus_files, ensure_django_docs, subset
from ops import stack
from ops.progress import Snapshot, snapshot_raw, wait_indexed
from ops.publisher import publish
from streams.errors import RagstreamError
from streams.messages import UrlRequest
from streams.milvus_lite import pid_alive
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


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of the processes the demo starts: its settings, offline."""
    return {**settings.to_env(), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _ignore(*_args: object) -> None:
    pass


@dataclasses.dataclass(slots=True)
class DemoHooks:
    """What the demo tells its caller, step by step (each optional)."""

    step: Callable[[str], None] = _ignore  # what the stack is doing (starting Kafka...)
    corpus: Callable[[int, int], None] = _ignore  # pages chosen, pages in all
    worker_started: Callable[[int, Path], None] = _ignore  # pid, log file
    published: Callable[[int], None] = _ignore  # URLs published
    progress: Callable[[Snapshot, int], None] = _ignore  # snapshot, URLs expected


@dataclasses.dataclass(frozen=True, slots=True)
class DemoResult:
    snap: Snapshot
    elapsed_s: float
    stored: int  # chunks the collection holds afterwards
    kept: bool  # the stack still runs afterwards (it ran before, or keep was asked)


def run_demo(
    settings: Settings,
    docs: int | None,
    latency_s: float,
    hooks: DemoHooks | None = None,
    keep: bool = False,
    keep_broker: bool = False,
) -> DemoResult:
    """Ingest ``docs`` pages of the Django docs (``None``: all of them) end to end.

    Raises :class:`~streams.errors.RagstreamError` if the worker exits before the pages
    are indexed (its log says why). What the demo started is stopped before this returns,
    unless ``keep`` (everything) or ``keep_broker`` (the broker) asks otherwise.
    """
    hooks = hooks or DemoHooks()
    t_start = time.perf_counter()
    root = ensure_django_docs(settings.cache_dir)
    files = corpus_files(root)
    chosen = files if docs is None else subset(files, docs)
    hooks.corpus(len(chosen), len(files))
    was_running = stack.running(settings)
    with CorpusServer(root, latency_s=latency_s) as server:
        try:
            stack.up(settings, api=False, note=hooks.step, extra_env=worker_env(settings))
            worker = stack.read_stack(settings).worker
            assert worker is not None
            hooks.worker_started(worker, stack.logs_dir(settings) / "worker.log")
            asyncio.run(ensure_topics(settings))
            base = asyncio.run(snapshot_raw(settings))
            reqs = [UrlRequest(url=server.url_of(p), source="demo") for p in chosen]
            n = asyncio.run(publish(settings, reqs))
            hooks.published(n)
            snap = follow(settings, base, n, worker, hooks.progress)
        finally:
            if not (was_running or keep):
                stack.down(settings, keep_broker=keep_broker, note=hooks.step)
    elapsed = time.perf_counter() - t_start
    store = MilvusStore(settings)
    try:
        stored = store.count()
    finally:
        store.close()
    return DemoResult(snap, elapsed, stored, was_running or keep)


def follow(
    settings: Settings,
    base: dict[str, int],
    n: int,
    worker: int,
    on_update: Callable[[Snapshot, int], None] = _ignore,
) -> Snapshot:
    """Until the ``n`` URLs are indexed; a worker that exits first ends the demo."""

    def update(snap: Snapshot) -> None:
        if not pid_alive(worker):
            raise RagstreamError("the worker exited; see its log")
        on_update(snap, n)

    return asyncio.run(wait_indexed(settings, base, n, update))
