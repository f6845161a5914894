"""The write stage against poison: bad vectors are dead letters, never a stop; rows Milvus
refuses are found by splitting the window; nothing moves a page backwards. Real broker,
real Milvus (Lite, embedded or served by `milvus-lite server`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from ops.progress import snapshot
from streams.ids import chunk_id, doc_id, normalize_url, text_hash
from streams.messages import Chunk, DeadLetter, Vector, encode_vector, pack_f32
from streams.settings import Settings
from streams.store import TEXT_MAX, TITLE_MAX_BYTES, MilvusStore, reduce_window
from streams.topics import VECTORS
from tests.helpers import Worker, baseline, milvus_rows, run
from tests.test_deadletters import produce, read_dlq

DIM = 4
ONES8 = np.ones(8, "float32")


def url_of(name: str) -> str:
    return normalize_url(f"http://example.org/{name}")


def vector(
    name: str,
    i: int = 0,
    count: int = 1,
    text: str | None = None,
    version: int | None = None,
    dense: np.ndarray | None = None,
    title: str | None = None,
    op: str = "upsert",
    url: str | None = None,
) -> Vector:
    u = url or url_of(name)
    text = text if text is not None else f"{name} chunk {i}"
    chunk = Chunk(
        op=op,  # type: ignore[arg-type]
        doc_id=doc_id(u),
        url=u,
        chunk_count=count,
        chunk_index=i if op == "upsert" else None,
        text=text if op == "upsert" else None,
        text_hash=text_hash(text) if op == "upsert" else None,
        doc_hash=text_hash(name) if op == "upsert" else None,
        title=title,
        version=version,
    )
    if op != "upsert":
        return Vector(chunk=chunk)
    d = np.array([1, 0.5, 0.25, i + 1], "float32") if dense is None else dense
    return Vector(chunk=chunk, model="test-model", dim=DIM, dense=d)


def raw(v: Vector, **changes: object) -> tuple[bytes, bytes]:
    """The message's key and value, with JSON fields changed after encoding (what a
    foreign producer or a corrupted redrive could send)."""
    obj = orjson.loads(encode_vector(v))
    obj.update(changes)
    return v.chunk.doc_id.encode(), orjson.dumps(obj)


def msg(v: Vector) -> tuple[bytes, bytes]:
    return v.chunk.doc_id.encode(), encode_vector(v)


def wait_written(
    settings: Settings, base: dict[str, int], n: int, worker: Worker, timeout_s: float = 60
) -> float:
    """Until the write stage committed ``n`` vectors messages (lag 0); returns seconds."""
    t0 = time.monotonic()
    while True:
        snap = run(snapshot(settings, base))
        if snap.written >= n and snap.vectors == snap.written:
            return time.monotonic() - t0
        assert worker.alive(), f"write stage died:\n{worker.tail()}"
        assert time.monotonic() - t0 < timeout_s, (
            f"written {snap.written}/{n} (vectors {snap.vectors}) after {timeout_s}s:\n"
            + worker.tail()
        )
        time.sleep(0.3)


def strict_collection(settings: Settings, url_max: int) -> None:
    """The collection the writer would create, but with a much shorter ``url`` field: a
    row with a longer URL passes every check of ours and is refused by Milvus itself."""
    from pymilvus import DataType

    store = MilvusStore(settings)
    try:
        c = store.client
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=32)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("url", DataType.VARCHAR, max_length=url_max)
        schema.add_field("title", DataType.VARCHAR, max_length=512)
        schema.add_field("text", DataType.VARCHAR, max_length=65535)
        schema.add_field("text_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("doc_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=DIM)
        index = c.prepare_index_params()
        index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
        c.create_collection(
            settings.collection, schema=schema, index_params=index, description="test-model"
        )
    finally:
        store.close()


@pytest.mark.kafka
@pytest.mark.faults
def test_writer_poison_matrix(settings: Settings, milvus_server) -> None:
    """Each poison followed by a good vector: good rows written, poisons dead-lettered
    within 60 s with their reason, the stage never stops and its lag reaches 0."""
    settings = settings.model_copy(update={"milvus_uri": milvus_server.uri})
    strict_collection(settings, url_max=64)
    long_url = url_of("refused-by-milvus-" + "x" * 80)  # 100+ bytes: over the field's 64
    cjk = vector("cjk", title="漢" * 180, text="字" * 30_000)  # 540 / 90,000 UTF-8 bytes
    poisons: list[tuple[str, tuple[bytes, bytes]]] = [
        ("bad_vector", msg(vector("nan", dense=np.array([1, math.nan, 0, 0], "float32")))),
        ("bad_vector", msg(vector("inf", dense=np.array([math.inf, 0, 0, 0], "float32")))),
        ("schema", raw(vector("float-index", i=1, count=2), chunk_index=1.0)),
        ("schema", raw(vector("big-index", count=100_000), chunk_index=100_000)),
        ("schema", raw(vector("newline"), doc_id=doc_id(url_of("newline")) + "\n")),
        ("schema", raw(vector("float-version", version=1), version=1.0)),
        ("schema", raw(vector("dim8"), model={"name": "other", "dim": 8}, dense=pack_f32(ONES8))),
        ("milvus_rejected", msg(vector("long-url", url=long_url))),
    ]
    # Versioned, so the versions collection is written on the served Milvus too.
    goods = [vector(f"good{n}", version=1_000 + n) for n in range(len(poisons) + 1)]
    items: list[tuple[bytes, bytes]] = [msg(goods[0])]
    for (_, poison), good in zip(poisons, goods[1:], strict=True):
        items += [poison, msg(good)]
    items.append(msg(cjk))
    base = baseline(settings)
    worker = Worker(settings, stages="write")
    try:
        t0 = time.monotonic()
        run(produce(settings, VECTORS, items))
        took = wait_written(settings, base, len(items), worker, timeout_s=90)
        letters: list[DeadLetter] = run(read_dlq(settings, VECTORS, len(poisons), 30))
        assert time.monotonic() - t0 < 60 + 10, "dead letters took too long"
        assert took < 60
        rows = {r["id"]: r for r in milvus_rows(settings, ("id", "text", "title", "url"))}
        store = MilvusStore(settings)  # served: readable while the worker runs
        try:
            versions = store.versions(v.chunk.doc_id for v in goods)
        finally:
            store.close()
        assert worker.alive(), worker.tail()
        assert "retrying" not in worker.log.read_text()  # no data error was retried
    finally:
        worker.stop()
    by_value = {dl.value: dl for dl in letters}
    assert len(letters) == len(poisons), [(d.error_class, d.error) for d in letters]
    for expected, (_, value) in poisons:
        assert value in by_value, expected
        assert by_value[value].error_class == expected, by_value[value].error
        assert by_value[value].stage == "write"
    rejected = next(d for d in letters if d.error_class == "milvus_rejected")
    assert "url" in rejected.error and rejected.url == long_url
    assert "NaN" in by_value[poisons[0][1][1]].error
    # Every good row, and the CJK one cut to the byte limits a Milvus server applies.
    want = {chunk_id(v.chunk.doc_id, 0) for v in [*goods, cjk]}
    assert set(rows) == want
    assert versions == {v.chunk.doc_id: v.chunk.version for v in goods}
    crow = rows[chunk_id(cjk.chunk.doc_id, 0)]
    assert len(crow["title"].encode()) <= TITLE_MAX_BYTES and crow["title"] == "漢" * 170
    assert len(crow["text"].encode()) <= TEXT_MAX and crow["text"].startswith("字" * 100)


@pytest.mark.kafka
@pytest.mark.faults
def test_stale_versions_never_move_a_page_backwards(settings: Settings) -> None:
    """v2 of a page written, then a redelivered v1 (across a writer restart, so the
    version comes from Milvus, not from memory): Milvus keeps v2. A page deleted at v3
    ignores a stale v2 upsert. Unversioned messages still apply."""
    a, b, c = "page-a", "page-b", "page-c"
    a2 = [vector(a, i, 2, text=f"a v2 #{i}", version=2_000) for i in range(2)]
    a1 = [vector(a, i, 3, text=f"a v1 #{i}", version=1_000) for i in range(3)]
    b1 = vector(b, 0, 1, text="b v1", version=1_000)
    b_del = vector(b, op="delete", count=0, version=3_000)
    b2 = vector(b, 0, 1, text="b v2 (stale)", version=2_000)
    c_new = vector(c, 0, 1, text="c unversioned")
    base = baseline(settings)
    worker = Worker(settings, stages="write")
    try:
        run(produce(settings, VECTORS, [msg(v) for v in [*a2, b1]]))
        wait_written(settings, base, 3, worker)
    finally:
        worker.stop()
    worker = Worker(settings, stages="write")  # a new process: no version in memory
    try:
        stale = [*a1, b_del, b2, c_new]
        run(produce(settings, VECTORS, [msg(v) for v in stale]))
        wait_written(settings, base, 3 + len(stale), worker)
        # In one window too: a newer version followed by an older one.
        d = "page-d"
        d_msgs = [vector(d, 0, 1, text="d v5", version=5_000)]
        d_msgs += [vector(d, i, 2, text=f"d v4 #{i}", version=4_000) for i in range(2)]
        run(produce(settings, VECTORS, [msg(v) for v in d_msgs]))
        wait_written(settings, base, 3 + len(stale) + 3, worker)
        assert worker.alive()
        log = worker.log.read_text()
    finally:
        worker.stop()
    texts = {r["id"]: r["text"] for r in milvus_rows(settings)}
    did = {n: doc_id(url_of(n)) for n in (a, b, c, "page-d")}
    assert texts == {
        chunk_id(did[a], 0): "a v2 #0",
        chunk_id(did[a], 1): "a v2 #1",
        chunk_id(did[c], 0): "c unversioned",
        chunk_id(did["page-d"], 0): "d v5",
    }
    assert "stale" in log
    assert run(read_dlq(settings, VECTORS, 1, timeout_s=3)) == []  # superseded, not broken
    store = MilvusStore(settings)
    try:
        assert store.versions(did.values()) == {
            did[a]: 2_000,
            did[b]: 3_000,
            did["page-d"]: 5_000,
        }
    finally:
        store.close()


def test_store_writes_the_rest_of_a_refused_window_and_keeps_versions(tmp_path: Path) -> None:
    """MilvusStore alone on Milvus Lite: a row Milvus refuses comes back, the others are
    written, versions survive a reopen (no broker)."""
    settings = Settings(home=tmp_path / "home", collection="strict")
    strict_collection(settings, url_max=64)
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_all()  # the worker-to-be must be able to open it
    good = [vector(f"good{n}", version=10) for n in range(5)]
    bad = vector("bad", url=url_of("y" * 100), version=10)
    store = MilvusStore(settings)
    try:
        result = store.write(reduce_window([good[0], good[1], bad, *good[2:]]))
        assert result.upserted == 5
        assert [v.chunk.url for v, _ in result.refused_rows] == [bad.chunk.url]
        assert "url" in result.refused_rows[0][1]
        assert store.versions([good[0].chunk.doc_id]) == {good[0].chunk.doc_id: 10}
    finally:
        store.close()
    server_manager_instance.release_all()
    store = MilvusStore(settings)
    try:
        docs = [v.chunk.doc_id for v in good] + [doc_id(url_of("never"))]
        assert store.versions(docs) == {v.chunk.doc_id: 10 for v in good}
        assert len(store.rows()) == 5
        # The tombstone: deleting at v11, then a stale v10 upsert.
        gone = good[0]
        store.write(reduce_window([vector("good0", op="delete", count=0, version=11)]))
        store.forget_versions()
        known = store.versions([gone.chunk.doc_id])
        win = reduce_window([gone], known)
        assert win.rows == {} and win.stale == [(gone, 11)]
        assert len(store.rows()) == 4
    finally:
        store.close()
