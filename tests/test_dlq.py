"""``ragstream dlq list|redrive``: the progress record alone, then on the real broker."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ops.deadletters import (
    INVALID,
    METADATA_PREFIX,
    REDRIVE_GROUP,
    Entry,
    Filters,
    Progress,
    list_letters,
    redrive,
)
from ragstream import cli
from ragstream.cli.dlq import format_rows
from streams.kafka import admin
from streams.messages import DeadLetter, UrlRequest, decode_url, encode_dead_letter, encode_url
from streams.settings import Settings
from streams.timeparse import parse_time
from streams.topics import CHUNKS, URLS, VECTORS, dlq, ensure_topics, topic_end_offsets
from tests.helpers import Worker

# --- the progress record (no broker) ------------------------------------------------------


def test_progress_prefix_and_sent_offsets_beyond_it() -> None:
    p = Progress.load(0, "")
    for offset in (2, 3, 5):
        p.mark(offset)
    assert p.base == 0 and p.done == [(2, 4), (5, 6)]
    assert [p.is_done(o) for o in range(7)] == [False, False, True, True, False, True, False]
    assert p.metadata() == METADATA_PREFIX + "2-3,5"

    again = Progress.load(p.base, p.metadata())
    assert (again.base, again.done) == (0, [(2, 4), (5, 6)])

    p.mark(0)
    assert p.base == 1
    p.mark(1)  # closes the gap: the prefix runs through 3
    assert (p.base, p.done, p.metadata()) == (4, [(5, 6)], METADATA_PREFIX + "5")
    p.mark(4)
    assert (p.base, p.done, p.metadata()) == (6, [], "")


def test_progress_advance_fit_and_foreign_metadata() -> None:
    p = Progress.load(10, METADATA_PREFIX + "12-14,20")
    p.advance_to(13)  # the broker deleted everything below 13
    assert (p.base, p.done) == (15, [(20, 21)])

    p = Progress(base=0)
    for offset in range(1, 400, 2):  # every other letter skipped: 200 ranges
        p.mark(offset)
    passed = p.fit(limit=200)
    assert len(p.metadata()) <= 200
    assert passed > 0 and p.base > 0
    assert not p.is_done(p.base)  # the prefix still stops at a skipped letter

    assert Progress.load(7, "written by something else").done == []
    assert Progress.load(7, METADATA_PREFIX + "x-y").base == 7


def test_table_truncates_the_error_to_the_width() -> None:
    letter = DeadLetter(
        stage="embed", topic="chunks", error_class="embed", error="x" * 500, value=b"v"
    )
    entry = Entry("chunks.dlq", 0, 7, "embed", datetime(2026, 5, 1, tzinfo=UTC), letter, b"")
    head, row = format_rows([entry], width=140)
    assert head.startswith("time (UTC)") and "error_class" in head
    assert row.startswith("2026-05-01 00:00:00 embed embed")
    assert row.endswith("…") and len(row) <= 140


# --- on the broker ------------------------------------------------------------------------

OLD = "2020-01-01T00:00:00.000Z"


def run(coro):
    return asyncio.run(coro)


async def produce(settings: Settings, records: list[tuple[str, bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all")
    await producer.start()
    try:
        for topic, key, value in records:
            await (await producer.send(topic, value, key=key))
    finally:
        await producer.stop()


async def read_topic(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes]]:
    """Every (key, value) of a topic, independently of the code under test."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out = []
        deadline = time.monotonic() + 30
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            assert time.monotonic() < deadline, "topic not read to its end in 30 s"
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                out += [(r.key, r.value) for r in records if r.offset < ends[tp]]
        return out
    finally:
        await consumer.stop()


async def committed(settings: Settings, topic: str) -> tuple[int, str]:
    client = admin(settings)
    await client.start()
    try:
        tp = TopicPartition(topic, 0)
        got = await client.list_consumer_group_offsets(
            settings.group(REDRIVE_GROUP), partitions=[tp]
        )
        meta = got.get(tp)
        return (meta.offset, meta.metadata) if meta else (-1, "")
    finally:
        await client.close()


@pytest.fixture
def letters(settings: Settings) -> dict[str, DeadLetter]:
    """Five dead letters over the three dlq topics and one record that is no envelope.

    urls.dlq: 0 old http_status, 1 fetch, 2 decode, 3 junk, 4 fetch; chunks.dlq: 0 embed;
    vectors.dlq: 0 schema.
    """
    run(ensure_topics(settings))
    urls, chunks, vectors = (settings.topic(t) for t in (URLS, CHUNKS, VECTORS))

    def url_letter(url: str, error_class: str, failed_at: str | None = None) -> DeadLetter:
        req = encode_url(UrlRequest(url=url, source="test"))
        extra = {"failed_at": failed_at} if failed_at else {}
        return DeadLetter(
            stage="fetch",
            topic=urls,
            partition=2,
            offset=17,
            error_class=error_class,
            error=f"{error_class} failed for {url}",
            attempts=4,
            url=url,
            key=url.encode(),
            value=req,
            **extra,
        )

    out = {
        "gone": url_letter("https://a.example/gone", "http_status", OLD),
        "fetch1": url_letter("https://a.example/one", "fetch"),
        "decode": DeadLetter(
            stage="fetch",
            topic=urls,
            error_class="decode",
            error="not JSON: unexpected character",
            key=b"bad-key",
            value=b"{not json",
        ),
        "fetch2": url_letter("https://b.example/two", "fetch"),
        "embed": DeadLetter(
            stage="embed",
            topic=chunks,
            error_class="embed",
            error="RuntimeError('boom')",
            key=b"doc-1",
            value=b'{"v":1,"op":"upsert"}',
            url="https://c.example/doc",
        ),
        "schema": DeadLetter(
            stage="write", topic=vectors, error_class="schema", error="dim", value=b"\x00\x01"
        ),
    }
    udlq, cdlq, vdlq = (settings.topic(dlq(t)) for t in (URLS, CHUNKS, VECTORS))
    run(
        produce(
            settings,
            [
                (udlq, b"https://a.example/gone", encode_dead_letter(out["gone"])),
                (udlq, b"https://a.example/one", encode_dead_letter(out["fetch1"])),
                (udlq, b"bad-key", encode_dead_letter(out["decode"])),
                (udlq, None, b"garbage, not an envelope"),
                (udlq, b"https://b.example/two", encode_dead_letter(out["fetch2"])),
                (cdlq, b"doc-1", encode_dead_letter(out["embed"])),
                (vdlq, None, encode_dead_letter(out["schema"])),
            ],
        )
    )
    return out


@pytest.mark.kafka
def test_list_and_filters(settings: Settings, letters: dict[str, DeadLetter]) -> None:
    listing = run(list_letters(settings, Filters()))
    assert listing.matched == 7 and len(listing.entries) == 7
    assert listing.entries[0].letter == letters["gone"]  # oldest first
    assert listing.counts == {
        ("embed", "embed"): 1,
        ("fetch", INVALID): 1,
        ("fetch", "decode"): 1,
        ("fetch", "fetch"): 2,
        ("fetch", "http_status"): 1,
        ("write", "schema"): 1,
    }
    junk = [e for e in listing.entries if e.letter is None]
    assert len(junk) == 1 and junk[0].offset == 3 and junk[0].raw == b"garbage, not an envelope"
    assert junk[0].to_json()["invalid"]

    fetch = run(list_letters(settings, Filters(stages=frozenset({"fetch"}))))
    assert fetch.matched == 5 and {e.stage for e in fetch.entries} == {"fetch"}

    by_class = run(list_letters(settings, Filters(error_classes=frozenset({"fetch"}))))
    assert [e.letter for e in by_class.entries] == [letters["fetch1"], letters["fetch2"]]

    recent = run(list_letters(settings, Filters(since=parse_time("2025-01-01"))))
    assert recent.matched == 6 and letters["gone"] not in [e.letter for e in recent.entries]

    limited = run(list_letters(settings, Filters(), limit=2))
    assert len(limited.entries) == 2 and limited.matched == 7
    assert limited.entries[0].letter == letters["gone"]


@pytest.mark.kafka
def test_list_cli_table(settings: Settings, letters: dict[str, DeadLetter]) -> None:
    env = {**os.environ, **settings.to_env(), "COLUMNS": "160"}
    proc = subprocess.run(
        [sys.executable, "-m", "ragstream.cli", "dlq", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["time", "(UTC)", "stage", "error_class", "att"]
    gone = next(line for line in lines if "https://a.example/gone" in line)
    assert gone.split()[:6] == ["2020-01-01", "00:00:00", "fetch", "http_status", "4"] + [
        "https://a.example/gone"
    ]
    assert any(line.split()[2:4] == ["fetch", "decode"] and "bad-key" in line for line in lines)
    junk = next(line for line in lines if INVALID in line)
    assert "not a dead-letter envelope" in junk
    assert "7 dead letters:" in lines
    counts = {tuple(line.split()[:2]): int(line.split()[2]) for line in lines if line[:2] == "  "}
    assert counts[("fetch", "fetch")] == 2 and counts[("write", "schema")] == 1


@pytest.fixture
def cli_env(settings: Settings, cli_environ: Callable[[Settings], None]) -> Iterator[Settings]:
    """The CLI in this process, reading the test's settings from the environment."""
    cli_environ(settings)
    level = logging.getLogger("aiokafka").level  # the command quietens aiokafka
    yield settings
    logging.getLogger("aiokafka").setLevel(level)


@pytest.mark.kafka
def test_cli_json_and_refusal(
    cli_env: Settings,
    letters: dict[str, DeadLetter],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cli.main(["dlq", "list", "--json", "--error-class", "decode"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    obj = orjson.loads(line)
    assert obj["error_class"] == "decode" and obj["dlq_offset"] == 2
    assert "value_b64" not in obj and base64.b64decode(obj["key_b64"]) == b"bad-key"

    assert cli.main(["dlq", "list", "--json", "--with-value", "--stage", "fetch"]) == 0
    objs = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(objs) == 5
    values = {base64.b64decode(o.get("value_b64") or o["raw_b64"]) for o in objs}
    assert b"{not json" in values and b"garbage, not an envelope" in values

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # not a terminal
    urls_before = run(topic_end_offsets(cli_env, [cli_env.topic(URLS)]))
    assert cli.main(["dlq", "redrive", "--error-class", "fetch"]) == 2
    assert "--yes" in capsys.readouterr().err
    assert run(topic_end_offsets(cli_env, [cli_env.topic(URLS)])) == urls_before

    assert cli.main(["dlq", "redrive", "--error-class", "fetch", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run, nothing sent" in out and f"-> {cli_env.topic(URLS)}: 2" in out
    assert run(topic_end_offsets(cli_env, [cli_env.topic(URLS)])) == urls_before

    assert cli.main(["dlq", "redrive", "--error-class", "fetch", "--yes"]) == 0
    assert f"sent 2 dead letters back: {cli_env.topic(URLS)} 2" in capsys.readouterr().out
    assert len(run(read_topic(cli_env, cli_env.topic(URLS)))) == 2


@pytest.mark.kafka
def test_redrive_sends_original_bytes_once(
    settings: Settings, letters: dict[str, DeadLetter]
) -> None:
    urls, chunks, vectors = (settings.topic(t) for t in (URLS, CHUNKS, VECTORS))
    udlq = settings.topic(dlq(URLS))
    fetch = Filters(error_classes=frozenset({"fetch"}))

    dry = run(redrive(settings, fetch, dry_run=True))
    assert [e.offset for e in dry.letters] == [1, 4] and dry.sent == {}
    declined = run(redrive(settings, fetch, confirm=lambda plan: False))
    assert not declined.confirmed and declined.sent == {}
    assert run(read_topic(settings, urls)) == []
    assert run(committed(settings, udlq))[0] == -1

    asked = []
    first = run(redrive(settings, fetch, confirm=lambda plan: asked.append(plan) or True))
    assert len(asked) == 1 and first.sent == {urls: 2}
    assert first.total("skipped") == 4 and first.total("invalid") == 1
    got = run(read_topic(settings, urls))
    assert sorted(got) == sorted([(letters[k].key, letters[k].value) for k in ("fetch1", "fetch2")])
    # the skipped letter at offset 0 is not consumed; what went beyond it is in the metadata
    assert run(committed(settings, udlq)) == (0, METADATA_PREFIX + "1,3-4")

    second = run(redrive(settings, fetch, confirm=lambda plan: pytest.fail("nothing to ask")))
    assert second.sent == {} and second.letters == [] and second.total("already") == 3
    assert len(run(read_topic(settings, urls))) == 2

    decode = run(redrive(settings, Filters(error_classes=frozenset({"decode"}))))
    assert decode.sent == {urls: 1}
    assert (b"bad-key", b"{not json") in run(read_topic(settings, urls))

    rest = run(redrive(settings, Filters()))
    # the embed letter re-requests its page (its old chunk is not re-applied); the write
    # letter has no url to re-request: refused, with the reason
    assert rest.sent == {urls: 2}
    assert [why for _, why in rest.refused] == [
        "write letters re-request their page, and the letter has no usable url"
    ]
    assert run(read_topic(settings, chunks)) == [] and run(read_topic(settings, vectors)) == []
    got = run(read_topic(settings, urls))
    assert len(got) == 5 and (letters["gone"].key, letters["gone"].value) in got
    again = [decode_url(v) for k, v in got if k == b"https://c.example/doc"]
    assert [(r.url, r.force, r.source) for r in again] == [
        ("https://c.example/doc", True, "redrive")
    ]
    assert run(committed(settings, udlq)) == (5, "")

    last = run(redrive(settings, Filters()))
    assert last.sent == {} and last.total("already") == 0  # all below the committed offsets
    assert last.refused == []  # a refused letter is handled: not offered again
    assert len(run(read_topic(settings, urls))) == 5


@pytest.mark.kafka
def test_malformed_url_request_lands_in_dlq_and_lists_as_decode(settings: Settings) -> None:
    run(ensure_topics(settings))
    udlq = settings.topic(dlq(URLS))
    worker = Worker(settings, stages="fetch")
    try:
        run(produce(settings, [(settings.topic(URLS), b"bad", b"this is { not json")]))
        deadline = time.monotonic() + 180
        while run(topic_end_offsets(settings, [udlq]))[udlq] < 1:
            assert worker.alive(), worker.tail()
            assert time.monotonic() < deadline, f"no dead letter in 180 s:\n{worker.tail()}"
            time.sleep(0.5)
    finally:
        worker.stop()
    listing = run(list_letters(settings, Filters()))
    (entry,) = listing.entries
    assert (entry.stage, entry.error_class) == ("fetch", "decode")
    assert entry.letter.topic == settings.topic(URLS)
    assert (entry.letter.key, entry.letter.value) == (b"bad", b"this is { not json")


def test_the_crawl_frontiers_letters_are_listed_with_the_fetch_stage(unit_settings) -> None:
    """crawl.dlq (unreadable crawl reports) is read by dlq list/redrive and counted by
    status like the stages' own; the frontier runs in the fetch worker."""
    from ops.deadletters import dlq_topics

    crawl_dlq = unit_settings.topic("crawl.dlq")
    assert dlq_topics(unit_settings)[crawl_dlq] == "frontier"
    assert crawl_dlq in dlq_topics(unit_settings, {"fetch"})
    assert crawl_dlq not in dlq_topics(unit_settings, {"embed", "write"})
