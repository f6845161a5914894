"""Delivery under faults, on the real broker and Milvus: crashes of each stage at random
points, a broker restart, a Milvus outage, a rebalance. After each, Milvus must hold
exactly what a fault-free run gives: every chunk once, with its text and its vector."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from devtools import kafka_local
from devtools.corpus import CorpusServer, corpus_files, subset
from ops.progress import Snapshot, snapshot
from streams.settings import Settings
from streams.topics import OffsetReader
from tests.helpers import (
    Worker,
    baseline,
    expected_index,
    milvus_rows,
    publish_urls,
    run,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

DOCS = 14


@pytest.fixture(scope="module")
def reference_vectors(django_docs: Path, chunker) -> dict[str, np.ndarray]:
    """text -> vector from the bare model: what a fault-free run writes for each chunk."""
    from streams.embedder import Embedder

    with CorpusServer(django_docs) as server:
        texts = sorted(set(expected_index(chunker, server, docs_for_faults(django_docs)).values()))
    embedder = Embedder(Settings(model="all-MiniLM-L6-v2"))
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(texts), 16):
        batch = texts[i : i + 16]
        out.update(zip(batch, embedder.encode(batch).dense, strict=True))
    return out


def docs_for_faults(django_docs: Path) -> list[Path]:
    return subset(corpus_files(django_docs), DOCS)


def assert_exact_index(
    settings: Settings, expected: dict[str, str], reference: dict[str, np.ndarray]
) -> None:
    rows = milvus_rows(settings, ("id", "text", "dense"))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "a chunk is in Milvus twice"
    assert {r["id"]: r["text"] for r in rows} == expected
    for r in rows:
        cos = float(np.dot(np.asarray(r["dense"], dtype=np.float32), reference[r["text"]]))
        assert cos > 0.999, (r["id"], cos)


def progress_of(stage: str, snap: Snapshot, n_urls: int, n_chunks: int) -> float:
    if stage == "fetch":
        return snap.fetched / n_urls
    if stage == "embed":
        return snap.embedded / n_chunks
    return snap.written / n_chunks


def kill_when(
    settings: Settings,
    base: dict[str, int],
    victim: Worker,
    stage: str,
    fraction: float,
    n_urls: int,
    n_chunks: int,
) -> Snapshot:
    """SIGKILL ``victim`` once ``stage`` has done ``fraction`` of its work.

    One reader polls (connecting anew costs ~1.5 s a poll here, longer than fetching the
    whole corpus takes, so the kill would land after the end)."""

    async def watch() -> Snapshot:
        deadline = time.monotonic() + 240
        async with OffsetReader(settings) as reader:
            while True:
                snap = await snapshot(settings, base, reader=reader)
                if progress_of(stage, snap, n_urls, n_chunks) >= fraction:
                    victim.kill()
                    return snap
                assert victim.alive(), victim.tail()
                assert time.monotonic() < deadline, f"no progress: {snap}\n{victim.tail()}"
                await asyncio.sleep(0.05)

    return run(watch())


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("stage", ["fetch", "embed", "write"])
def test_sigkill_a_stage_at_a_random_point(
    settings: Settings, django_docs: Path, chunker, reference_vectors, stage: str, seed: int
) -> None:
    rng = random.Random(f"{stage}-{seed}")
    fraction = rng.uniform(0.15, 0.75)
    files = docs_for_faults(django_docs)
    # Fetching slowly (2 at a time, 0.4 s each) leaves every stage busy long enough to be hit;
    # small embed pools (16 chunks) make the embed stage's progress move in steps a poll
    # sees: with 128-chunk pools and texts run side by side, CI saw all 279 chunks embedded
    # before a poll saw the fraction (embed-2).
    settings = settings.model_copy(update={"fetch_concurrency": 2, "embed_max_batch": 4})
    with CorpusServer(django_docs, latency_s=0.4) as server:
        expected = expected_index(chunker, server, files)
        base = baseline(settings)
        workers = {s: Worker(settings, stages=s) for s in ("fetch", "embed", "write")}
        try:
            publish_urls(settings, [server.url_of(p) for p in files])
            at = kill_when(
                settings, base, workers[stage], stage, fraction, len(files), len(expected)
            )
            workers[stage] = Worker(settings, stages=stage)
            final = wait_for(settings, base, len(files), timeout_s=300)
        finally:
            for w in workers.values():
                w.stop()
    assert progress_of(stage, at, len(files), len(expected)) < 1.0, "killed after the end"
    assert final.dead == {}
    assert_exact_index(settings, expected, reference_vectors)


def test_broker_restart_mid_ingestion(
    settings: Settings, tmp_path: Path, django_docs: Path, chunker, reference_vectors
) -> None:
    own = settings.model_copy(
        update={"broker": f"127.0.0.1:{kafka_local.free_port()}", "home": tmp_path / "own"}
    )
    kafka_local.up(own)
    files = docs_for_faults(django_docs)
    try:
        with CorpusServer(django_docs, latency_s=0.05) as server:
            expected = expected_index(chunker, server, files)
            base = baseline(own)
            worker = Worker(own)
            try:
                publish_urls(own, [server.url_of(p) for p in files])
                deadline = time.monotonic() + 240
                while run(snapshot(own, base)).written == 0:
                    assert time.monotonic() < deadline and worker.alive(), worker.tail()
                    time.sleep(0.1)
                kafka_local.down(own)
                time.sleep(5)
                kafka_local.up(own)
                final = wait_for(own, base, len(files), worker, timeout_s=300)
            finally:
                worker.stop()
    finally:
        kafka_local.down(own)
    assert final.dead == {}
    assert_exact_index(own, expected, reference_vectors)


def stage_process(worker: Worker, stage: str) -> psutil.Process:
    for child in psutil.Process(worker.proc.pid).children(recursive=True):
        if f"--stage {stage}" in " ".join(child.cmdline()) or (
            "--stage" in child.cmdline() and stage in child.cmdline()
        ):
            return child
    raise AssertionError(f"no {stage} process under {worker.proc.pid}")


def test_milvus_outage_commits_nothing_and_recovers(
    settings: Settings, django_docs: Path, chunker, reference_vectors, milvus_server
) -> None:
    settings = settings.model_copy(
        update={"milvus_uri": milvus_server.uri, "window_rows": 20, "write_backoff_max_s": 2.0}
    )
    files = docs_for_faults(django_docs)
    with CorpusServer(django_docs) as server:
        expected = expected_index(chunker, server, files)
        base = baseline(settings)
        worker = Worker(settings)
        try:
            publish_urls(settings, [server.url_of(p) for p in files])
            deadline = time.monotonic() + 240
            while run(snapshot(settings, base)).written == 0:
                assert time.monotonic() < deadline and worker.alive(), worker.tail()
                time.sleep(0.1)
            milvus_server.stop()
            time.sleep(3)  # a window already past its upsert may still commit
            writer = stage_process(worker, "write")
            before = run(snapshot(settings, base))
            rss = [writer.memory_info().rss]
            for _ in range(30):
                time.sleep(1)
                rss.append(writer.memory_info().rss)
            during = run(snapshot(settings, base))
            # Nothing is committed while nothing can be written, though vectors pile up.
            assert during.written == before.written < len(expected)
            assert during.vectors > during.written
            assert max(rss) - rss[0] < 150 * 2**20, [r // 2**20 for r in rss]
            assert worker.alive()
            milvus_server.start()
            final = wait_for(settings, base, len(files), worker, timeout_s=300)
        finally:
            worker.stop()
    assert final.dead == {}
    assert "retrying" in worker.log.read_text()
    assert_exact_index(settings, expected, reference_vectors)


def test_fetch_worker_joining_and_leaving(
    settings: Settings, django_docs: Path, chunker, reference_vectors
) -> None:
    # One page at a time, one second each: the ingestion outlasts the second worker's start.
    settings = settings.model_copy(update={"fetch_concurrency": 1})
    files = docs_for_faults(django_docs)
    with CorpusServer(django_docs, latency_s=1.0) as server:
        expected = expected_index(chunker, server, files)
        base = baseline(settings)
        workers = [Worker(settings, stages=s) for s in ("fetch", "embed", "write")]
        extra: Worker | None = None
        try:
            publish_urls(settings, [server.url_of(p) for p in files])
            deadline = time.monotonic() + 240
            while run(snapshot(settings, base)).fetched == 0:
                assert time.monotonic() < deadline, workers[0].tail()
                time.sleep(0.1)
            extra = Worker(settings, stages="fetch", log=settings.home / "extra-fetch.log")
            while "urls" not in _assigned(extra):
                assert time.monotonic() < deadline and extra.alive(), extra.tail()
                time.sleep(0.2)
            joined_at = run(snapshot(settings, base))
            time.sleep(2.0)
            extra.stop()  # leaves the group: its partitions go back to the first worker
            final = wait_for(settings, base, len(files), timeout_s=300)
        finally:
            for w in [*workers, *([extra] if extra else [])]:
                w.stop()
    assert 0 < joined_at.fetched < len(files), "the second worker did not join mid-ingestion"
    assert final.fetched == len(files)
    assert final.dead == {}
    assert_exact_index(settings, expected, reference_vectors)


def _assigned(worker: Worker) -> str:
    """The topics of the partitions the worker's consumer was assigned (from its log)."""
    text = worker.log.read_text(errors="replace") if worker.log.exists() else ""
    marker = "Setting newly assigned partitions"
    return text.split(marker, 1)[1][:600] if marker in text else ""
