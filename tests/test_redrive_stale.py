"""Redrive never moves a page backwards, and never loops: a chunks letter re-requests its
page instead of re-applying old content; a letter redriven too often is parked."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from devtools.corpus import CorpusServer
from ops.deadletters import Filters, list_letters, redrive
from ragstream.cli.dlq import format_rows
from streams.documents import page_chunks
from streams.ids import chunk_id, normalize_url
from streams.messages import DeadLetter, decode_url, encode_chunk, encode_dead_letter
from streams.settings import Settings
from streams.topics import CHUNKS, URLS, dlq, stage_lags
from tests.helpers import Worker, baseline, milvus_rows, publish_urls, run, wait_for
from tests.test_deadletters import read_dlq
from tests.test_dlq import produce as produce_to

TEXT = "text/plain; charset=utf-8"


async def records(settings: Settings, topic: str) -> list:
    """Every record of a topic (with headers), read without a group."""
    c = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
    await c.start()
    try:
        await c._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        out = []
        deadline = time.monotonic() + 30
        while any([await c.position(tp) < ends[tp] for tp in tps]):
            assert time.monotonic() < deadline
            for tp, recs in (await c.getmany(timeout_ms=500)).items():
                out += [r for r in recs if r.offset < ends[tp]]
        return out
    finally:
        await c.stop()


def hops(record) -> int:
    return int(dict(record.headers).get("ragstream-hops", b"0"))


@pytest.mark.kafka
def test_redriving_an_old_chunk_letter_leaves_the_page_at_its_latest_version(
    settings: Settings, tmp_path: Path, chunker, milvus_server
) -> None:
    # a Milvus server: the test reads the index while the worker writes it
    s = settings.model_copy(update={"fetch_allow": "127.0.0.1/32", "milvus_uri": milvus_server.uri})
    site = tmp_path / "site"
    site.mkdir()
    page = site / "page.txt"
    v1, v2 = "Version one of the page, about sprockets.", "Version two, about widgets."
    with CorpusServer(site) as server:
        url = normalize_url(server.url_of(page))
        # v1 failed at the embed stage (say, out of GPU memory): its chunk is a dead letter
        (old,) = page_chunks(url, v1.encode(), TEXT, chunker)
        letter = DeadLetter(
            stage="embed",
            topic=s.topic(CHUNKS),
            error_class="embed",
            error="RuntimeError('CUDA out of memory')",
            url=url,
            key=old.key(),
            value=encode_chunk(old),
        )
        base = baseline(s)
        run(produce_to(s, [(s.topic(dlq(CHUNKS)), old.key(), encode_dead_letter(letter))]))
        # ... then the page changed to v2, and v2 was indexed
        page.write_text(v2)
        expected = {
            chunk_id(c.doc_id, c.chunk_index): c.text
            for c in page_chunks(url, v2.encode(), TEXT, chunker)
        }
        worker = Worker(s)
        try:
            publish_urls(s, [url])
            wait_for(s, base, 1, worker)
            assert {r["id"]: r["text"] for r in milvus_rows(s)} == expected
            # the cause is fixed; the operator redrives everything
            result = run(redrive(s, Filters()))
            assert result.sent == {s.topic(URLS): 1}, result
            wait_for(s, base, 2, worker)
        finally:
            worker.stop()
    assert {r["id"]: r["text"] for r in milvus_rows(s)} == expected
    # the letter re-requested its page (forced, hop 1); the old chunk was not re-applied
    requests = run(records(s, s.topic(URLS)))
    assert len(requests) == 2
    req = decode_url(requests[-1].value)
    assert (req.url, req.force, req.source, hops(requests[-1])) == (url, True, "redrive", 1)
    chunks = run(records(s, s.topic(CHUNKS)))
    assert v1 not in b"".join(r.value for r in chunks).decode()
    assert hops(chunks[-1]) == 1  # the hop count travels with the page's messages


@pytest.mark.kafka
def test_a_letter_that_keeps_failing_is_parked_after_n_redrives(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"fetch_allow": "127.0.0.1/32", "dlq_max_redrives": 2})
    site = tmp_path / "site"
    site.mkdir()

    def forbid(h) -> bool:
        h.reply(403, b"no", "text/plain")
        return True

    with CorpusServer(site, hook=forbid) as server:
        url = normalize_url(server.base_url + "secret")
        baseline(s)
        worker = Worker(s, stages="fetch")
        try:
            publish_urls(s, [url])
            assert len(run(read_dlq(s, URLS, 1))) == 1
            for n in (1, 2):  # two redrives: each sends it back, and it fails again
                result = run(redrive(s, Filters()))
                assert result.sent == {s.topic(URLS): 1} and result.parked == [], result
                assert len(run(read_dlq(s, URLS, n + 1))) == n + 1, worker.tail()
            third = run(redrive(s, Filters()))
            fourth = run(redrive(s, Filters()))
            deadline = time.monotonic() + 60  # the stage commits what it handled
            while run(stage_lags(s))[0].lag:
                assert time.monotonic() < deadline and worker.alive(), worker.tail()
                time.sleep(0.2)
        finally:
            worker.stop()
    letters = run(read_dlq(s, URLS, 3, timeout_s=5))
    assert [(d.hops, d.url, d.error_class) for d in letters] == [
        (n, url, "http_status") for n in (0, 1, 2)
    ]
    # the third letter was redriven twice already: parked, not sent; not offered again
    assert third.sent == {} and [e.letter.hops for e in third.parked] == [2]
    assert fourth.sent == {} and fourth.parked == []
    listing = run(list_letters(s, Filters()))
    assert listing.matched == 3 and listing.parked == 1
    rows = format_rows(listing.entries, 200, s.dlq_max_redrives)
    assert ["[parked after 2 redrives]" in row for row in rows[1:]] == [False, False, True]
