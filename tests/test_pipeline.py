"""End to end on the real broker and Milvus Lite: URLs in, searchable chunks out."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pytest

from devtools.corpus import CorpusServer, corpus_files, subset
from streams.settings import Settings
from tests.helpers import (
    Worker,
    baseline,
    expected_index,
    milvus_rows,
    publish_urls,
    wait_for,
)

pytestmark = pytest.mark.kafka

HTML = b"""<!doctype html><html><head><title>Widgets guide</title></head><body>
<nav><a href="/">Home</a> | <a href="/about">About us</a></nav>
<main><h1>Widgets guide</h1><p>A widget is a small gadget that frobnicates sprockets.</p>
<p>To calibrate a widget, turn the knurled knob until the sprocket hums.</p></main>
<footer>Copyright 2026 Widget Corp. All rights reserved.</footer></body></html>"""


@pytest.fixture
def site(tmp_path: Path, django_docs: Path) -> Path:
    """A small site: six Django pages (text) and one HTML page with boilerplate."""
    root = tmp_path / "site"
    for src in subset(corpus_files(django_docs), 6):
        dst = root / src.relative_to(django_docs)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    (root / "widgets.html").write_bytes(HTML)
    return root


def test_urls_become_searchable_chunks(settings: Settings, site: Path, chunker) -> None:
    files = corpus_files(site) + [site / "widgets.html"]
    with CorpusServer(site) as server:
        expected = expected_index(chunker, server, files)
        base = baseline(settings)
        worker = Worker(settings)
        try:
            assert publish_urls(settings, [server.url_of(p) for p in files]) == len(files)
            snap = wait_for(settings, base, len(files), worker)
        finally:
            worker.stop()
    assert snap.dead == {}, snap
    assert snap.written == len(expected)

    rows = milvus_rows(settings, ("id", "text"))
    texts = collections.Counter(r["text"] for r in rows)
    assert len(rows) == len(expected)
    assert {r["id"]: r["text"] for r in rows} == expected
    assert all(texts[t] == 1 for t in expected.values() if list(expected.values()).count(t) == 1)
    html_rows = [r["text"] for r in rows if "sprocket" in r["text"]]
    assert html_rows and all("Copyright" not in t and "About us" not in t for t in html_rows)

    from streams.embedder import Embedder
    from streams.store import MilvusStore

    embedder = Embedder(settings)
    store = MilvusStore(settings)
    try:
        probe_ids = sorted(expected)[:: max(len(expected) // 5, 1)]
        for cid in probe_ids:
            hits = store.search(embedder.encode([expected[cid]]).dense[0], k=3)
            assert hits[0].id == cid, (cid, hits[0])
            assert hits[0].score > 0.99
    finally:
        store.close()


def test_second_embed_write_pair_replays_chunks_into_a_new_collection(
    settings: Settings, site: Path, chunker, milvus_server
) -> None:
    """Runbook 2: a second embed+write pair with its own groups, vectors topic and
    collection, reading the live chunks topic, rebuilds the whole index."""
    settings = settings.model_copy(update={"milvus_uri": milvus_server.uri})
    files = corpus_files(site)[:3]
    with CorpusServer(site) as server:
        expected = expected_index(chunker, server, files)
        base = baseline(settings)
        worker = Worker(settings)
        try:
            publish_urls(settings, [server.url_of(p) for p in files])
            wait_for(settings, base, len(files), worker)
        finally:
            worker.stop()
    v2 = settings.model_copy(
        update={
            "app_id": settings.app_id + "v2",
            "topic_prefix": "v2." + settings.topic_prefix,
            "chunks_topic": settings.topic("chunks"),
            "collection": "ragstream_v2",
        }
    )
    base2 = baseline(v2)
    pair = Worker(v2, stages="embed,write")
    try:
        snap = wait_for(v2, {**base2, "chunks": 0}, 0, pair)
    finally:
        pair.stop()
    assert snap.written == len(expected)
    assert {r["id"]: r["text"] for r in milvus_rows(v2)} == expected
    assert {r["id"]: r["text"] for r in milvus_rows(settings)} == expected
