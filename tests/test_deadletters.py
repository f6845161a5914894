"""Every kind of bad input lands on its stage's dead-letter topic, and the stage goes on."""

from __future__ import annotations

import socket
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from devtools.corpus import CorpusServer
from streams.ids import doc_id, normalize_url, text_hash
from streams.messages import (
    Chunk,
    Vector,
    decode_dead_letter,
    encode_chunk,
    encode_vector,
)
from streams.settings import Settings
from streams.topics import CHUNKS, URLS, VECTORS, dlq
from tests.helpers import Worker, baseline, milvus_rows, publish_urls, run, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.faults]


class Faulty:
    """Request hook: /fail500 always 500, /slow sleeps past the timeout, /truncated sends
    half its declared body; counts attempts per path."""

    def __init__(self, slow_s: float) -> None:
        self.slow_s = slow_s
        self.attempts: dict[str, int] = {}

    def __call__(self, h: BaseHTTPRequestHandler) -> bool:
        path = h.path.split("?")[0]
        self.attempts[path] = self.attempts.get(path, 0) + 1
        if path == "/fail500":
            h.send_response(500)
            h.send_header("Content-Length", "5")
            h.end_headers()
            h.wfile.write(b"oops!")
            return True
        if path == "/slow":
            time.sleep(self.slow_s)
            h.close_connection = True
            return True
        if path == "/truncated":
            h.send_response(200)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Content-Length", "10000")
            h.end_headers()
            h.wfile.write(b"only a part of the body " * 10)
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return True
        return False


async def produce(settings: Settings, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all")
    await p.start()
    try:
        for key, value in items:
            await p.send_and_wait(settings.topic(topic), value, key=key)
    finally:
        await p.stop()


async def read_dlq(settings: Settings, topic: str, n: int, timeout_s: float = 180) -> list:
    c = AIOKafkaConsumer(
        settings.topic(dlq(topic)),
        bootstrap_servers=settings.broker,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await c.start()
    out = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            for records in (await c.getmany(timeout_ms=500)).values():
                out.extend(decode_dead_letter(r.value) for r in records)
        return out
    finally:
        await c.stop()


def test_fetch_stage_dead_letters(settings: Settings, tmp_path: Path, chunker) -> None:
    settings = settings.model_copy(
        # no delayed retries: the transient failures here are to be dead letters at once
        update={
            "fetch_attempts": 3,
            "fetch_backoff_s": 0.05,
            "fetch_timeout_s": 1.0,
            "fetch_retry_delays": "",
        }
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "good.txt").write_text("A good page about sprockets and widgets.")
    (site / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    hook = Faulty(slow_s=3.0)
    with CorpusServer(site, hook=hook) as server:
        base = baseline(settings)
        worker = Worker(settings, stages="fetch,embed,write")
        try:
            run(
                produce(
                    settings,
                    URLS,
                    [
                        (b"k1", b"{not json"),
                        (b"k2", b'{"v": 1, "url": "ftp://example.org/x"}'),
                        (b"k3", b'{"v": 1}'),
                    ],
                )
            )
            bad = [server.base_url + p for p in ("fail500", "slow", "truncated")]
            publish_urls(settings, [*bad, server.base_url + "image.png"])
            publish_urls(settings, [server.url_of(site / "good.txt")])
            letters = run(read_dlq(settings, URLS, 7))
            snap = wait_for(settings, base, 8, worker)
        finally:
            worker.stop()
    by_url = {dl.url or dl.value.decode(errors="replace"): dl for dl in letters}
    classes = sorted(dl.error_class for dl in letters)
    assert classes == sorted(
        ["decode", "schema", "schema", "http_status", "fetch", "fetch", "unsupported_content"]
    ), [(d.error_class, d.error) for d in letters]
    assert by_url[normalize_url(bad[0])].attempts == 3
    assert hook.attempts["/fail500"] == 3
    assert by_url[normalize_url(bad[1])].error_class == "fetch"
    assert "Timeout" in by_url[normalize_url(bad[1])].error
    assert by_url[normalize_url(bad[2])].error_class == "fetch"
    raw = {dl.value for dl in letters}
    assert b"{not json" in raw and b'{"v": 1}' in raw  # the original bytes, unchanged
    assert all(dl.stage == "fetch" and dl.topic == settings.topic(URLS) for dl in letters)
    # ... and the stage went on: the good page is in Milvus.
    assert snap.written == 1
    texts = [r["text"] for r in milvus_rows(settings)]
    assert texts == ["A good page about sprockets and widgets."]


def test_embed_and_write_dead_letters(settings: Settings) -> None:
    url = normalize_url("http://example.org/doc")
    did = doc_id(url)

    def chunk(i: int, text: str) -> Chunk:
        return Chunk(
            op="upsert",
            doc_id=did,
            url=url,
            chunk_count=3,
            chunk_index=i,
            text=text,
            text_hash=text_hash(text),
            doc_hash="d",
        )

    good = chunk(0, "sprockets turn widgets")
    unembeddable = chunk(1, "\u200b\u200b\u200b")  # valid JSON and schema, no readable token
    tail = chunk(2, "the last chunk of the page")
    wrong_dim = Vector(chunk=chunk(2, "x"), model="other", dim=8, dense=np.ones(8, "float32"))
    base = baseline(settings)
    worker = Worker(settings, stages="embed,write")
    try:
        run(
            produce(
                settings,
                CHUNKS,
                [
                    (b"x", b"garbage"),
                    (did.encode(), encode_chunk(good)),
                    (did.encode(), encode_chunk(unembeddable)),
                ],
            )
        )
        chunk_letters = run(read_dlq(settings, CHUNKS, 2))
        # The collection exists (dimension 384) once the good chunk is written; then
        # a vector of another dimension and a malformed one arrive at the writer.
        deadline = time.monotonic() + 120
        while run(snapshot_written(settings, base)) < 1:
            assert time.monotonic() < deadline and worker.alive(), worker.tail()
            time.sleep(0.2)
        run(
            produce(
                settings,
                VECTORS,
                [(did.encode(), encode_vector(wrong_dim)), (b"y", b'{"v": 1, "op": "upsert"}')],
            )
        )
        run(produce(settings, CHUNKS, [(did.encode(), encode_chunk(tail))]))
        vector_letters = run(read_dlq(settings, VECTORS, 2))
        deadline = time.monotonic() + 120
        while run(snapshot_written(settings, base)) < 4:
            assert time.monotonic() < deadline and worker.alive(), worker.tail()
            time.sleep(0.2)
    finally:
        worker.stop()
    assert sorted(d.error_class for d in chunk_letters) == ["decode", "embed"]
    embed_dl = next(d for d in chunk_letters if d.error_class == "embed")
    assert embed_dl.value == encode_chunk(unembeddable)
    assert "no token" in embed_dl.error
    assert sorted(d.error_class for d in vector_letters) == ["schema", "schema"]
    assert any("dimension 8" in d.error for d in vector_letters)
    # The stages went on: the good chunk and the one after the bad vectors are written.
    assert sorted(r["text"] for r in milvus_rows(settings)) == sorted([good.text, tail.text])


async def snapshot_written(settings: Settings, base: dict[str, int]) -> int:
    from ops.progress import snapshot

    return (await snapshot(settings, base)).written


def test_dead_letter_envelope_is_documented_schema() -> None:
    """The envelope the stages write validates against schemas/deadletter.v1.json."""
    import orjson

    from streams.messages import DeadLetter, encode_dead_letter, validator

    raw = encode_dead_letter(
        DeadLetter(stage="embed", topic="chunks", error_class="embed", error="e", value=b"\x00")
    )
    assert list(validator("deadletter").iter_errors(orjson.loads(raw))) == []
    assert decode_dead_letter(raw).value == b"\x00"
