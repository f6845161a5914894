"""SIGKILL the worker mid-ingestion, restart it: Milvus ends with exactly the right rows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devtools.corpus import CorpusServer, corpus_files, subset
from ops.progress import snapshot
from streams.settings import Settings
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


def test_sigkill_mid_ingestion_loses_and_duplicates_nothing(
    settings: Settings, django_docs: Path, chunker
) -> None:
    # Small pools (16 chunks), so vectors reach Milvus window by window and the kill lands
    # mid-way: with 128-chunk pools and the int8 backend (3x torch) two pools could share
    # the first committed window, and 266 chunks were written before a poll saw half.
    settings = settings.model_copy(update={"embed_max_batch": 4})
    files = subset(corpus_files(django_docs), 24)
    with CorpusServer(django_docs, latency_s=0.05) as server:
        expected = expected_index(chunker, server, files)
        base = baseline(settings)
        worker = Worker(settings)
        try:
            publish_urls(settings, [server.url_of(p) for p in files])
            # Kill once some windows are in Milvus but well before the end.
            deadline = time.monotonic() + 240
            while True:
                snap = run(snapshot(settings, base))
                if snap.written > 0 and snap.written < len(expected) // 2:
                    break
                assert snap.written < len(expected), "ingestion finished before the kill"
                assert time.monotonic() < deadline, f"no progress: {snap}\n{worker.tail()}"
                assert worker.alive(), worker.tail()
                time.sleep(0.2)
            worker.kill()
            killed_at = snap
            worker = Worker(settings)
            final = wait_for(settings, base, len(files), worker, timeout_s=300)
        finally:
            worker.stop()
    assert 0 < killed_at.written < len(expected)
    assert final.dead == {}
    rows = milvus_rows(settings, ("id", "text"))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(expected)
    assert {r["id"]: r["text"] for r in rows} == expected
