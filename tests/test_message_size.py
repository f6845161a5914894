"""A message the broker can never take is a dead letter, and the stage goes on; what copies
a payload (dead-letter envelopes, page state) caps what it copies."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from agents.common import record_size
from agents.docstate import DocStates
from devtools.corpus import CorpusServer
from streams.documents import VALIDATOR_MAX_CHARS, DocState
from streams.ids import doc_id, normalize_url, text_hash
from streams.kafka import admin
from streams.messages import (
    Chunk,
    DeadLetter,
    decode_dead_letter,
    encode_chunk,
    encode_dead_letter,
    validator,
)
from streams.settings import Settings
from streams.topics import CHUNKS, URLS, VECTORS, dlq, stage_lags
from tests.helpers import Worker, baseline, milvus_rows, publish_urls, run, wait_for
from tests.test_deadletters import produce, read_dlq
from tests.test_dlq import read_topic

# --- caps (no broker) ---------------------------------------------------------------------


def test_dead_letter_envelope_copies_the_value_whole_or_says_it_cut_it() -> None:
    big = bytes(range(256)) * 400  # 102,400 bytes
    letter = DeadLetter(
        stage="embed", topic="chunks", error_class="too_large", error="e", value=big, key=b"k"
    )
    whole = encode_dead_letter(letter, max_bytes=10_000_000)
    assert decode_dead_letter(whole).value == big and b"value_truncated" not in whole

    cut = encode_dead_letter(letter, max_bytes=5_000)
    assert len(cut) <= 5_000
    assert list(validator("deadletter").iter_errors(orjson.loads(cut))) == []
    back = decode_dead_letter(cut)
    assert back.value_truncated and back.value_size == len(big)
    assert back.value == big[: len(back.value)] and 3_000 < len(back.value) < 5_000

    long_key = encode_dead_letter(
        DeadLetter(
            stage="fetch", topic="urls", error_class="x", error="e", value=b"", key=b"k" * 9000
        )
    )
    assert decode_dead_letter(long_key).key_truncated


def test_page_state_always_fits() -> None:
    state = DocState(
        doc_hash="d" * 32,
        hashes=tuple(text_hash(str(i)) for i in range(50_000)),
        etag='"' + "e" * 5000 + '"',
        last_modified="Tue, 24 Nov 2026 10:00:00 GMT",
        requested_at="2026-11-24T10:00:00.000Z",
    )
    capped = state.capped()
    assert capped.etag is None  # a validator over the cap is dropped, not cut
    assert capped.last_modified == state.last_modified
    assert len(capped.hashes) < len(state.hashes)
    assert len('"' + "e" * (VALIDATOR_MAX_CHARS - 2) + '"') <= VALIDATOR_MAX_CHARS
    docs = DocStates(Settings())
    raw = docs.encode(state, max_bytes=100_000)
    assert len(raw) <= 100_000
    back = DocState.from_json(orjson.loads(raw))
    assert back.requested_at == state.requested_at and back.hashes == ()  # re-embed, whole


def test_record_size_bounds_what_the_broker_counts() -> None:
    small = record_size(b"k", b"v")
    assert small < 100 and record_size(b"k", b"v" * 1000) - small == 999 + 1  # varint grows
    assert record_size(b"k", b"v", [("ragstream-hops", b"2")]) > small


# --- on the broker ------------------------------------------------------------------------


async def create_with_limit(settings: Settings, limits: dict[str, int]) -> None:
    """Create topics with a small max.message.bytes before the stages create them."""
    client = admin(settings)
    await client.start()
    try:
        await client.create_topics(
            [
                NewTopic(name, 1, 1, topic_configs={"max.message.bytes": str(limit)})
                for name, limit in limits.items()
            ]
        )
    finally:
        await client.close()


def lags(settings: Settings) -> dict[str, int]:
    return {x.stage: x.lag for x in run(stage_lags(settings))}


@pytest.mark.kafka
def test_a_page_whose_chunk_is_over_the_topic_limit_is_a_dead_letter(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"fetch_allow": "127.0.0.1/32", "url_partitions": 1})
    run(create_with_limit(s, {s.topic(CHUNKS): 3000}))
    site = tmp_path / "site"
    site.mkdir()
    (site / "big.txt").write_text("internationalization " * 400)  # chunks of ~5 KB
    (site / "small.txt").write_text("A small page behind the big one.\n")
    with CorpusServer(site) as server:
        base = baseline(s)
        worker = Worker(s)
        try:
            big, small = (server.url_of(site / n) for n in ("big.txt", "small.txt"))
            publish_urls(s, [big, small])  # one partition: the small page waits behind
            (letter,) = run(read_dlq(s, URLS, 1, timeout_s=180))
            snap = wait_for(s, base, 2, worker, timeout_s=180)
            assert lags(s) == {"fetch": 0, "embed": 0, "write": 0}
            assert worker.alive()
        finally:
            worker.stop()
    assert (letter.error_class, letter.url) == ("too_large", normalize_url(big))
    assert "over the topic's limit of" in letter.error and s.topic(CHUNKS) in letter.error
    assert snap.written == 1
    assert [r["text"] for r in milvus_rows(s)] == ["A small page behind the big one."]
    assert "exiting so the group redelivers" not in worker.tail(10_000)


@pytest.mark.kafka
def test_a_vector_over_the_topic_limit_is_a_dead_letter_and_its_envelope_is_cut(
    settings: Settings,
) -> None:
    s = settings
    # a vector (384 floats, 2 KB of base64) plus a 2 KB text is over 4,000 bytes; the
    # chunk's dead letter, with the chunk in base64, is over 1,500 and must be cut
    run(create_with_limit(s, {s.topic(VECTORS): 4000, s.topic(dlq(CHUNKS)): 1500}))
    url = normalize_url("http://example.org/doc")
    did = doc_id(url)

    def chunk(i: int, text: str) -> Chunk:
        return Chunk(
            op="upsert",
            doc_id=did,
            url=url,
            chunk_count=2,
            chunk_index=i,
            text=text,
            text_hash=text_hash(text),
            doc_hash="d",
        )

    big = chunk(0, "sprockets and widgets " * 100)
    small = chunk(1, "a small chunk after the big one")
    base = baseline(s)
    worker = Worker(s, stages="embed,write")
    try:
        run(
            produce(
                s, CHUNKS, [(did.encode(), encode_chunk(big)), (did.encode(), encode_chunk(small))]
            )
        )
        (letter,) = run(read_dlq(s, CHUNKS, 1, timeout_s=180))
        deadline = time.monotonic() + 180
        while lags(s) != {"fetch": 0, "embed": 0, "write": 0} or not milvus_rows_ready(s, base):
            assert worker.alive() and time.monotonic() < deadline, worker.tail()
            time.sleep(0.5)
    finally:
        worker.stop()
    assert (letter.error_class, letter.url) == ("too_large", url)
    assert s.topic(VECTORS) in letter.error
    assert letter.value_truncated and letter.value_size == len(encode_chunk(big))
    assert encode_chunk(big).startswith(letter.value)
    assert [r["text"] for r in milvus_rows(s)] == [small.text]
    assert "exiting so the group redelivers" not in worker.tail(10_000)


def milvus_rows_ready(settings: Settings, base: dict[str, int]) -> bool:
    from ops.progress import snapshot

    return run(snapshot(settings, base)).written >= 1


async def lower_limit(settings: Settings, topic: str, limit: int) -> None:
    client = admin(settings)
    await client.start()
    try:
        res = ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(limit)})
        await client.alter_configs([res])
    finally:
        await client.close()


@pytest.mark.kafka
def test_a_message_the_broker_refuses_for_its_size_is_a_dead_letter_too(
    settings: Settings, tmp_path: Path
) -> None:
    """The limit a stage read at its start is stale (an operator lowered it since): the
    broker's refusal is a dead letter, not a crash loop."""
    s = settings.model_copy(update={"url_partitions": 1})
    site = tmp_path / "site"
    site.mkdir()
    (site / "first.txt").write_text("The first page, read while the limit was 1 MB.\n")
    (site / "big.txt").write_text("internationalization " * 400)
    (site / "small.txt").write_text("A small page behind the big one.\n")
    with CorpusServer(site) as server:
        baseline(s)
        worker = Worker(s, stages="fetch")
        try:
            publish_urls(s, [server.url_of(site / "first.txt")])
            deadline = time.monotonic() + 180
            while lags(s)["fetch"] or run(stage_lags(s))[0].end < 1:
                assert worker.alive() and time.monotonic() < deadline, worker.tail()
                time.sleep(0.2)
            run(lower_limit(s, s.topic(CHUNKS), 3000))
            big, small = (server.url_of(site / n) for n in ("big.txt", "small.txt"))
            publish_urls(s, [big, small])
            assert run(read_dlq(s, URLS, 1, timeout_s=180))
            deadline = time.monotonic() + 120
            while lags(s)["fetch"]:
                assert worker.alive() and time.monotonic() < deadline, worker.tail()
                time.sleep(0.2)
        finally:
            worker.stop()
    # one letter for the page, however many of its messages the broker refused
    (letter,) = run(read_dlq(s, URLS, 5, timeout_s=3))
    assert (letter.error_class, letter.url) == ("too_large", normalize_url(big))
    assert "broker refused" in letter.error, letter.error
    sent = b"".join(v for _, v in run(read_topic(s, s.topic(CHUNKS))))
    assert b"A small page behind the big one." in sent  # the page behind went on
    assert "exiting so the group redelivers" not in worker.tail(10_000)
