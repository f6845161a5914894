"""The stages' logic and the commit rule, without a broker, Milvus or a running Faust app.

Events, topics, streams, the store, the fetcher, the extractor and the embedder are fakes:
a topic's ``send`` returns a future the test resolves (the broker's acknowledgement), a
stream records what was acked. What the fault tests prove end to end (kills, outages)
rests on the rule checked here: an event is acked only once its outputs are delivered,
in offset order, and a failed delivery stops the process instead of acking.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError

import agents.checkpoint as checkpoint
from agents.checkpoint import Checkpoint, InOrder
from agents.common import LIMITS
from agents.embed import EmbedStage, held_back
from agents.fetch import FetchStage
from agents.fetcher import Page
from agents.write import WindowWriter
from streams.documents import CHUNKER_VERSION, DocState
from streams.embedder import Encoded
from streams.errors import FetchFailed
from streams.ids import doc_id, text_hash
from streams.messages import (
    Chunk,
    UrlRequest,
    Vector,
    decode_chunk,
    decode_dead_letter,
    decode_vector,
    encode_chunk,
    encode_url,
    encode_vector,
)
from streams.retry import RETRIES
from streams.settings import Settings
from streams.store import WriteResult

# --- fakes ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Message:
    key: bytes | None
    value: bytes | None
    offset: int
    partition: int = 0
    topic: str = "in"
    headers: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    timestamp: float = 0.0


@dataclasses.dataclass
class Event:
    message: Message


def events_of(
    values: Iterable[bytes | None], topic: str = "in", keys: Sequence[bytes] | None = None
) -> list[Event]:
    return [
        Event(Message(keys[i] if keys else b"k", value, offset=i, topic=topic))
        for i, value in enumerate(values)
    ]


class Topic:
    """A topic whose ``send`` returns the delivery future, as Faust's does.

    ``hold``: the futures stay pending until :meth:`deliver`; ``fail``: they fail as a
    broker that never answers would.
    """

    def __init__(self, name: str, *, hold: bool = False, fail: bool = False) -> None:
        self.name, self.hold, self.fail = name, hold, fail
        self.sent: list[dict[str, Any]] = []
        self.futures: list[asyncio.Future[object]] = []
        LIMITS.set(name, 1_000_000)

    def get_topic_name(self) -> str:
        return self.name

    async def send(self, **record: Any) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.sent.append(record)
        self.futures.append(future)
        if self.fail:
            future.set_exception(KafkaTimeoutError())
        elif not self.hold:
            future.set_result(len(self.sent) - 1)
        return future

    def deliver(self, i: int) -> None:
        self.futures[i].set_result(i)

    def values(self) -> list[bytes]:
        return [r["value"] for r in self.sent]

    def letters(self) -> list[Any]:
        return [decode_dead_letter(v) for v in self.values()]


class Stream:
    """What a stage reads: batches (``noack_take``) or events (``noack().events()``); acks
    are recorded. After the last item it waits a moment for the acks still to come."""

    def __init__(self, items: Sequence[Any], linger_s: float = 0.5) -> None:
        self.items = list(items)
        self.linger_s = linger_s
        self.acked: list[int] = []

    async def ack(self, event: Event) -> bool:
        self.acked.append(event.message.offset)
        return True

    def noack(self) -> Stream:
        return self

    async def _items(self) -> AsyncIterator[Any]:
        for item in self.items:
            yield item
            await asyncio.sleep(0)
        await asyncio.sleep(self.linger_s)

    def events(self) -> AsyncIterator[Event]:
        return self._items()

    def noack_take(self, max_: int, within: float) -> AsyncIterator[list[Event]]:
        return self._items()


class Fatal(Exception):
    """Raised by the patched :func:`agents.checkpoint.fatal` instead of exiting."""


@pytest.fixture
def fatal(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def fake(message: str, exc: BaseException | None = None) -> None:
        calls.append(message)
        raise Fatal(message)

    monkeypatch.setattr(checkpoint, "fatal", fake)
    return calls


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """No broker: these tests never reach one (the conftest fixture would start one)."""
    return Settings(home=tmp_path / "home", topic_prefix="unit.", write_backoff_max_s=0.01)


def run(coro: Awaitable[Any]) -> Any:
    async def go() -> Any:
        return await asyncio.wait_for(coro, 10)

    return asyncio.run(go())


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


# --- the checkpoint -------------------------------------------------------------------------


def test_checkpoint_acks_in_offset_order_only_after_delivery() -> None:
    out = Topic("unit.out", hold=True)
    stream = Stream([])

    async def unit(event: Event) -> None:
        await checkpoint.delivered([await out.send(key=None, value=b"%d" % event.message.offset)])

    async def go() -> None:
        events = events_of([b"0", b"1", b"2"])
        async with InOrder(Checkpoint(stream.ack, "test"), in_flight=8) as pending:
            for event in events:
                await pending.add([event], asyncio.create_task(unit(event)))
            await asyncio.sleep(0.05)
            assert len(out.sent) == 3 and stream.acked == []  # sent, not delivered: no ack
            out.deliver(2)
            await asyncio.sleep(0.05)
            assert stream.acked == []  # 2 is delivered, but 0 and 1 are still in flight
            out.deliver(0)
            await asyncio.sleep(0.05)
            assert stream.acked == [0]
            out.deliver(1)
            await pending.join()
            assert stream.acked == [0, 1, 2]

    run(go())


def test_checkpoint_exits_instead_of_acking_when_delivery_fails(fatal: list[str]) -> None:
    out = Topic("unit.out", fail=True)
    stream = Stream([])

    async def unit() -> None:
        await checkpoint.delivered([await out.send(key=None, value=b"x")])

    events = events_of([b"0", b"1"])
    with pytest.raises(Fatal):
        run(Checkpoint(stream.ack, "test").commit(events, unit()))
    assert stream.acked == [] and fatal == ["test failed (2 events, in[0]@0..1)"]


def test_in_order_stops_at_the_failed_unit(fatal: list[str]) -> None:
    good, bad = Topic("unit.good"), Topic("unit.bad", fail=True)
    stream = Stream([])

    async def unit(topic: Topic) -> None:
        await checkpoint.delivered([await topic.send(key=None, value=b"x")])

    async def go() -> None:
        events = events_of([b"0", b"1", b"2"])
        pending = InOrder(Checkpoint(stream.ack, "test"), in_flight=8)
        for event, topic in zip(events, [good, bad, good], strict=True):
            await pending.add([event], asyncio.create_task(unit(topic)))
        with pytest.raises(Fatal):
            await pending.run()

    run(go())
    assert stream.acked == [0] and len(fatal) == 1  # 2 was delivered, but never acked


def test_in_order_cancels_started_work_it_leaves_uncommitted() -> None:
    """Leaving the block (stopped, partitions revoked) drops what is not committed: a unit
    already running stops spending the model or the network on events that stay unacked."""
    stream = Stream([])
    gate = asyncio.Event()

    async def go() -> list[bool]:
        async def held() -> None:
            await gate.wait()

        tasks = [asyncio.create_task(held()) for _ in range(3)]
        async with InOrder(Checkpoint(stream.ack, "test"), in_flight=8) as pending:
            for event, task in zip(events_of([b"0", b"1", b"2"]), tasks, strict=True):
                await pending.add([event], task)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0)
        return [t.cancelled() for t in tasks[1:]]

    assert run(go()) == [True, True] and stream.acked == []


# --- the writer -----------------------------------------------------------------------------


def make_chunk(i: int, text: str | None = None) -> Chunk:
    """Chunk 0 of a one-chunk page ``doc<i>``, as the fetch stage sends it."""
    url = f"https://site.test/doc{i}"
    text = f"text {i}" if text is None else text
    return Chunk(
        op="upsert",
        doc_id=doc_id(url),
        url=url,
        chunk_count=1,
        chunk_index=0,
        text=text,
        text_hash=text_hash(text),
        doc_hash=text_hash(text),
    )


def vector_bytes(i: int, dense: list[float] | None = None) -> bytes:
    chunk = make_chunk(i)
    values = np.asarray(dense if dense is not None else [1.0, 2.0, 3.0, float(i + 1)], "f4")
    return encode_vector(Vector(chunk=chunk, model="m", dim=len(values), dense=values))


class Store:
    """Milvus as the writer sees it; ``fail``: every write raises that."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.dim: int | None = None
        self.sparse = False
        self.fail = fail
        self.rows: list[Vector] = []

    def versions(self, docs: Iterable[str]) -> dict[str, int]:
        return {}

    def write(self, window: Any) -> WriteResult:
        if self.fail is not None:
            raise self.fail
        self.rows.extend(window.rows.values())
        return WriteResult(upserted=len(window.rows))


def test_writer_dead_letters_a_bad_vector_and_writes_the_rest(settings: Settings) -> None:
    dlq = Topic("unit.vectors.dlq")
    store = Store()
    nan = vector_bytes(1, [1.0, float("nan"), 0.0, 1.0])
    events = events_of([vector_bytes(0), nan, b"not json", vector_bytes(3)], topic="vectors")
    run(WindowWriter(settings, store, dlq).write_window(events))
    assert sorted(v.chunk.url[-4:] for v in store.rows) == ["doc0", "doc3"]
    letters = sorted(dlq.letters(), key=lambda d: d.offset)
    assert [(d.offset, d.error_class) for d in letters] == [(1, "bad_vector"), (2, "decode")]
    assert letters[0].value == nan and letters[0].stage == "write"


def test_writer_acks_a_window_once_written(settings: Settings) -> None:
    store = Store()
    stream = Stream([events_of([vector_bytes(0), vector_bytes(1)], topic="vectors")])
    run(WindowWriter(settings, store, Topic("unit.vectors.dlq")).run(stream))
    assert len(store.rows) == 2 and stream.acked == [0, 1]


def test_writer_commits_each_window_right_after_acking_it(settings: Settings) -> None:
    """Written is committed at once, not at the next commit tick: lag, progress and the
    bench's freshness count a page as written when it is."""
    store, commits = Store(), []
    windows = [
        events_of([vector_bytes(0), vector_bytes(1)], topic="vectors"),
        [Event(Message(b"k", vector_bytes(2), offset=2, topic="vectors"))],
    ]
    stream = Stream(windows)

    async def commit() -> bool:
        commits.append(list(stream.acked))
        return True

    run(WindowWriter(settings, store, Topic("unit.vectors.dlq"), commit=commit).run(stream))
    assert commits == [[0, 1], [0, 1, 2]]


def test_writer_exits_when_milvus_fails(settings: Settings, fatal: list[str]) -> None:
    store = Store(fail=RuntimeError("not a data error, not unavailability either"))
    stream = Stream([events_of([vector_bytes(0)], topic="vectors")])
    with pytest.raises(Fatal):
        run(WindowWriter(settings, store, Topic("unit.vectors.dlq")).run(stream))
    assert stream.acked == [] and fatal[0].startswith("writing a window failed")


def test_writer_exits_when_a_dead_letter_is_not_delivered(
    settings: Settings, fatal: list[str]
) -> None:
    store = Store()
    stream = Stream([events_of([b"not json", vector_bytes(1)], topic="vectors")])
    dlq = Topic("unit.vectors.dlq", fail=True)
    with pytest.raises(Fatal):
        run(WindowWriter(settings, store, dlq).run(stream))
    assert stream.acked == [] and len(dlq.sent) == 1


# --- the embed stage ------------------------------------------------------------------------


class Embedder:
    """A model that reads one token per word and refuses any text with the word "poison"."""

    name, dim, n_special = "fake", 4, 2

    def __init__(self) -> None:
        self.calls: list[int] = []

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[101, *(666 if w == "poison" else 7 for w in t.split()), 102] for t in texts]

    def encode_ids(self, ids: Sequence[list[int]]) -> Encoded:
        self.calls.append(len(ids))
        if any(666 in x for x in ids):
            raise RuntimeError("the model chokes on this text")
        dense = np.asarray([[1.0, 0.0, 0.0, float(len(x))] for x in ids], "f4")
        return Encoded(dense=dense, sparse=None)

    def prepare(self, ids: Sequence[list[int]]) -> Any:
        return list(ids)

    def encode_prepared(self, prepared: Any) -> Encoded:
        return self.encode_ids(prepared)


class LookaheadEmbedder(Embedder):
    """Encodes batch k only once batch k+1 was prepared (unless k is the last of
    ``batches``, or 2 s passed): the stage must prepare ahead, as the GPU needs (the copy
    of the next batch overlaps this one)."""

    def __init__(self, batches: int) -> None:
        super().__init__()
        self.batches = batches
        self.log: list[str] = []
        self.prepares = self.encodes = 0

    def prepare(self, ids: Sequence[list[int]]) -> Any:
        self.log.append(f"prepare {self.prepares}")
        self.prepares += 1
        return list(ids)

    def encode_prepared(self, prepared: Any) -> Encoded:
        want = min(self.encodes + 2, self.batches)
        deadline = time.monotonic() + 2
        while self.prepares < want and time.monotonic() < deadline:
            time.sleep(0.005)
        self.log.append(f"encode {self.encodes}")
        self.encodes += 1
        return self.encode_ids(prepared)


def test_embed_dead_letters_an_undecodable_chunk_and_embeds_the_rest(settings: Settings) -> None:
    vectors, dlq = Topic("unit.vectors"), Topic("unit.chunks.dlq")
    trim = Chunk(
        op="delete",
        doc_id=doc_id("https://site.test/gone"),
        url="https://site.test/gone",
        chunk_count=0,
    )
    values = [
        encode_chunk(make_chunk(0, "one two three")),
        b'{"v": 1, "op": "upsert"}',
        encode_chunk(make_chunk(2, "poison here")),
        encode_chunk(make_chunk(3, "   ")),  # no word: nothing the model can read
        encode_chunk(make_chunk(4, "four")),
        encode_chunk(trim),
    ]
    stage = EmbedStage(settings, Embedder(), vectors, dlq)
    run(stage.encode_pool(events_of(values, topic="chunks")))
    out = [decode_vector(v) for v in vectors.values()]
    assert [v.chunk.url[-4:] for v in out] == ["doc0", "doc4", "gone"]  # in offset order
    assert out[0].dense is not None and out[0].dense[3] == 5.0 and out[0].model == "fake"
    assert out[2].dense is None  # a trim passes through without the model
    letters = sorted(dlq.letters(), key=lambda d: d.offset)
    assert [(d.offset, d.error_class) for d in letters] == [
        (1, "schema"),
        (2, "embed"),
        (3, "embed"),
    ]
    assert letters[0].value == values[1] and letters[0].stage == "embed"
    assert stage.stats.texts == 2


class GatedEmbedder(Embedder):
    """Holds its second encode call until ``release`` is set (from the test's loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def encode_ids(self, ids: Sequence[list[int]]) -> Encoded:
        if self.calls:
            assert self.release.wait(5), "never released"
        return super().encode_ids(ids)


def test_embed_sends_each_batch_as_it_is_encoded(settings: Settings) -> None:
    """A page's first chunks do not wait for the pool's last batch (freshness)."""
    settings = settings.model_copy(update={"embed_max_batch": 2})
    vectors, model = Topic("unit.vectors"), GatedEmbedder()
    pool = events_of([encode_chunk(make_chunk(i, "w " * (9 - i))) for i in range(4)], "chunks")
    stage = EmbedStage(settings, model, vectors, Topic("unit.chunks.dlq"))

    async def go() -> None:
        running = asyncio.create_task(stage.encode_pool(pool))
        await until(lambda: len(model.calls) == 1 and len(vectors.sent) == 2)
        await asyncio.sleep(0.05)
        assert len(vectors.sent) == 2 and not running.done()  # batch 2 is still encoding
        model.release.set()
        await running

    run(go())
    assert [decode_vector(v).chunk.url[-4:] for v in vectors.values()] == [
        "doc0",
        "doc1",
        "doc2",
        "doc3",
    ]  # longest first: here offset order too


def test_embed_prepares_the_next_batch_while_one_runs(settings: Settings) -> None:
    settings = settings.model_copy(update={"embed_max_batch": 1})
    model, vectors = LookaheadEmbedder(batches=3), Topic("unit.vectors")
    stage = EmbedStage(settings, model, vectors, Topic("unit.chunks.dlq"))
    pool = events_of([encode_chunk(make_chunk(i, "w " * (5 - i))) for i in range(3)], "chunks")
    run(stage.encode_pool(pool))
    assert len(vectors.sent) == 3
    # each batch but the first was prepared before the one before it was encoded
    assert model.log == ["prepare 0", "prepare 1", "encode 0", "prepare 2", "encode 1", "encode 2"]


def test_embed_keeps_offset_order_within_a_page_updated_twice_in_a_pool(
    settings: Settings,
) -> None:
    """Two versions of a page (or a page and its trim) in one pool leave in offset order,
    although batches run longest first: the writer orders unversioned messages by offset."""
    settings = settings.model_copy(update={"embed_max_batch": 1})
    old, new = make_chunk(1, "short"), make_chunk(1, "a much longer text of the same page")
    values = [encode_chunk(c) for c in (old, make_chunk(2, "x y z w v"), new)]
    vectors = Topic("unit.vectors")
    stage = EmbedStage(settings, Embedder(), vectors, Topic("unit.chunks.dlq"))
    run(stage.encode_pool(events_of(values, topic="chunks")))
    assert [decode_vector(v).chunk.text for v in vectors.values()] == [
        "x y z w v",  # another page: sent with its batch
        "short",
        "a much longer text of the same page",
    ]


def test_held_back_only_pages_whose_order_matters() -> None:
    one = [make_chunk(1), make_chunk(2)]
    assert held_back(one) == set()
    page = [dataclasses.replace(make_chunk(1), chunk_index=i, version=7) for i in range(3)]
    assert held_back([*page, None]) == set()  # chunks of one update: distinct rows
    newer = dataclasses.replace(page[0], version=8)
    assert held_back([*page, newer, make_chunk(2)]) == {0, 1, 2, 3}
    trim = Chunk(op="delete", doc_id=page[0].doc_id, url=page[0].url, chunk_count=1)
    assert held_back([page[0], make_chunk(2), trim]) == {0, 2}
    twice = [make_chunk(1), make_chunk(1)]  # no version: two updates, told apart by offset
    assert held_back(twice) == {0, 1}


def test_embed_acks_a_pool_once_its_vectors_are_delivered(settings: Settings) -> None:
    vectors = Topic("unit.vectors", hold=True)
    pool = events_of([encode_chunk(make_chunk(i)) for i in range(3)], topic="chunks")
    stream = Stream([pool], linger_s=0.3)
    stage = EmbedStage(settings, Embedder(), vectors, Topic("unit.chunks.dlq"))

    async def go() -> None:
        running = asyncio.create_task(stage.run(stream))
        await until(lambda: len(vectors.sent) == 3)
        await asyncio.sleep(0.05)
        assert stream.acked == []  # produced, not yet acknowledged by the broker
        for i in range(3):
            vectors.deliver(i)
        await running
        assert stream.acked == [0, 1, 2]

    run(go())


def test_embed_exits_when_its_vectors_are_not_delivered(
    settings: Settings, fatal: list[str]
) -> None:
    pool = events_of([encode_chunk(make_chunk(i)) for i in range(2)], topic="chunks")
    stream = Stream([pool], linger_s=0.3)
    stage = EmbedStage(
        settings, Embedder(), Topic("unit.vectors", fail=True), Topic("unit.chunks.dlq")
    )
    run(stage.run(stream))
    assert stream.acked == [] and fatal and fatal[0].startswith("embedding a pool failed")


# --- the fetch stage ------------------------------------------------------------------------

PAGE = b"first paragraph\n\nsecond paragraph\n\nthird paragraph"


class Fetcher:
    """Pages by URL (a :class:`Page`, or an exception to raise); a URL with a gate waits
    for it, so a test decides which page finishes first."""

    def __init__(self, pages: dict[str, Page | Exception]) -> None:
        self.pages = pages
        self.gates: dict[str, asyncio.Event] = {}
        self.asked: list[tuple[str, str | None]] = []

    async def fetch(
        self, url: str, etag: str | None = None, last_modified: str | None = None
    ) -> Page:
        self.asked.append((url, etag))
        if url in self.gates:
            await self.gates[url].wait()
        page = self.pages[url]
        if isinstance(page, Exception):
            raise page
        return page


class Extractor:
    """One chunk per paragraph (the real one chunks by the model's tokens)."""

    async def page_chunks(self, url: str, body: bytes, content_type: str | None) -> list[Chunk]:
        text = body.decode()
        parts = [p for p in text.split("\n\n") if p.strip()]
        return [
            Chunk(
                op="upsert",
                doc_id=doc_id(url),
                url=url,
                chunk_count=len(parts),
                chunk_index=i,
                text=p,
                text_hash=text_hash(p),
                doc_hash=text_hash(text),
            )
            for i, p in enumerate(parts)
        ]


class Docs:
    """The pages' states, in memory (the real one is loaded from a compacted topic)."""

    def __init__(self, states: dict[str, DocState] | None = None) -> None:
        self.states = dict(states or {})

    async def ready(self) -> None:
        return None

    def get(self, url: str) -> DocState | None:
        return self.states.get(url)

    def record(self, partition: int, url: str, state: DocState | None) -> None:
        if state is not None:
            self.states[url] = state

    def encode(self, state: DocState | None, max_bytes: int | None = None) -> bytes | None:
        return orjson.dumps(state.to_json()) if state is not None else None


@dataclasses.dataclass
class FetchRig:
    stage: FetchStage
    fetcher: Fetcher
    docs: Docs
    chunks: Topic
    dlq: Topic
    state_log: Topic
    retry: Topic


def fetch_rig(
    settings: Settings,
    pages: dict[str, Page | Exception],
    states: dict[str, DocState] | None = None,
    hold: bool = False,
) -> FetchRig:
    fetcher, docs = Fetcher(pages), Docs(states)
    chunks, dlq = Topic("unit.chunks", hold=hold), Topic("unit.urls.dlq")
    state_log, retry = Topic("unit.urls.state"), Topic("unit.urls.retry.1")
    stage = FetchStage(
        settings,
        fetcher=fetcher,
        extractor=Extractor(),
        docs=docs,
        chunks=chunks,
        dlq=dlq,
        state_log=state_log,
        retry_out={1: retry},
    )
    return FetchRig(stage, fetcher, docs, chunks, dlq, state_log, retry)


def url_events(
    urls: Sequence[str | bytes], requested_at: str = "2026-01-01T00:00:00Z"
) -> list[Event]:
    values = [
        u if isinstance(u, bytes) else encode_url(UrlRequest(url=u, requested_at=requested_at))
        for u in urls
    ]
    keys = [u if isinstance(u, bytes) else UrlRequest(url=u).key() for u in urls]
    return events_of(values, topic="urls", keys=keys)


def page(url: str, body: bytes = PAGE, status: int = 200) -> Page:
    return Page(url=url, status=status, body=body, content_type="text/plain", etag='"v1"')


A, B = "https://site.test/a", "https://site.test/b"


def test_fetch_dead_letters_a_bad_request(settings: Settings) -> None:
    rig = fetch_rig(settings, {})
    bad = url_events([b"not json", encode_url(UrlRequest(url="ftp://site.test/x"))])
    for event in bad:
        run(rig.stage.handle(event))
    letters = rig.dlq.letters()
    assert [(d.offset, d.error_class) for d in letters] == [(0, "decode"), (1, "schema")]
    assert letters[0].value == b"not json" and letters[0].stage == "fetch"
    assert rig.chunks.sent == [] and rig.fetcher.asked == []


def test_fetch_turns_a_page_into_chunk_messages(settings: Settings) -> None:
    rig = fetch_rig(settings, {A: page(A)})
    run(rig.stage.handle(url_events([A])[0]))
    sent = [decode_chunk(v) for v in rig.chunks.values()]
    assert [c.text for c in sent] == ["first paragraph", "second paragraph", "third paragraph"]
    assert all(c.version is not None and c.chunk_count == 3 for c in sent)
    assert rig.chunks.sent[0]["key"] == doc_id(A).encode()
    state = rig.docs.get(A)  # remembered, here and on the state topic, once sent
    assert state is not None and state.etag == '"v1"' and len(state.hashes) == 3
    assert [r["key"] for r in rig.state_log.sent] == [A.encode()]
    assert rig.dlq.sent == []


def test_fetch_sends_no_chunk_for_an_unchanged_page(settings: Settings) -> None:
    rig = fetch_rig(settings, {A: page(A)})
    run(rig.stage.handle(url_events([A])[0]))
    first = len(rig.chunks.sent)
    run(rig.stage.handle(url_events([A], requested_at="2026-01-02T00:00:00Z")[0]))
    assert first == 3 and len(rig.chunks.sent) == 3  # same text: nothing to re-embed
    assert rig.fetcher.asked[-1] == (A, '"v1"')  # asked with the validator it had


def test_fetch_sends_nothing_for_a_page_not_modified(settings: Settings) -> None:
    known = DocState(doc_hash="h", hashes=("x",), etag='"v1"', requested_at="2026-01-01T00:00:00Z")
    rig = fetch_rig(settings, {A: page(A, b"", status=304)}, states={A: known})
    run(rig.stage.handle(url_events([A])[0]))
    assert rig.chunks.sent == [] and rig.dlq.sent == [] and rig.state_log.sent == []


def test_fetch_sends_a_transient_failure_to_its_delayed_retry(settings: Settings) -> None:
    rig = fetch_rig(settings, {A: FetchFailed("http_status", "HTTP 503", 3, transient=True)})
    run(rig.stage.handle(url_events([A])[0]))
    assert rig.chunks.sent == [] and rig.dlq.sent == [] and len(rig.retry.sent) == 1
    assert (RETRIES, b"1") in rig.retry.sent[0]["headers"]


def test_fetch_acks_in_offset_order_once_chunks_are_delivered(settings: Settings) -> None:
    rig = fetch_rig(settings, {A: page(A), B: page(B)}, hold=True)
    rig.fetcher.gates[A] = asyncio.Event()  # page A (offset 0) is slow
    stream = Stream(url_events([A, B]), linger_s=1.0)

    async def go() -> None:
        running = asyncio.create_task(rig.stage.run(stream))
        await until(lambda: len(rig.chunks.sent) == 3)  # B's chunks, sent
        for i in range(3):
            rig.chunks.deliver(i)
        await asyncio.sleep(0.05)
        assert stream.acked == []  # B is done, but A, before it, is not
        rig.fetcher.gates[A].set()
        await until(lambda: len(rig.chunks.sent) == 6)
        await asyncio.sleep(0.05)
        assert stream.acked == []  # A's chunks are sent, not yet delivered
        for i in range(3, 6):
            rig.chunks.deliver(i)
        await running
        assert stream.acked == [0, 1]

    run(go())


def test_fetch_exits_when_chunks_are_not_delivered(settings: Settings, fatal: list[str]) -> None:
    rig = fetch_rig(settings, {A: page(A)})
    rig.chunks.fail = True
    stream = Stream(url_events([A]), linger_s=0.3)
    run(rig.stage.run(stream))
    assert stream.acked == [] and fatal and fatal[0].startswith("fetching a page failed")
    assert rig.docs.get(A) is None  # not remembered either: the redelivery fetches it again


def test_fetch_after_a_chunker_upgrade_refetches_whole_and_re_embeds(settings: Settings) -> None:
    """A state made by chunker version 1 (a record without the field): no validators (a 304
    would keep the old chunks) and every chunk sent, though the texts did not change."""
    texts = ["first paragraph", "second paragraph", "third paragraph"]
    old = DocState.from_json(
        {
            "doc_hash": text_hash(PAGE.decode()),
            "hashes": [text_hash(t) for t in texts],
            "etag": '"v1"',
            "last_modified": None,
            "requested_at": "2025-12-01T00:00:00Z",
        }
    )
    assert old is not None and old.chunker_version == 1
    rig = fetch_rig(settings, {A: page(A)}, states={A: old})
    run(rig.stage.handle(url_events([A])[0]))
    assert rig.fetcher.asked == [(A, None)]
    assert [decode_chunk(v).text for v in rig.chunks.values()] == texts
    state = rig.docs.get(A)
    assert state is not None and state.chunker_version == CHUNKER_VERSION and state.current
    # From then on, the page is unchanged: validators again, nothing re-sent.
    run(rig.stage.handle(url_events([A], requested_at="2026-01-02T00:00:00Z")[0]))
    assert rig.fetcher.asked[-1] == (A, '"v1"') and len(rig.chunks.sent) == 3


def test_fetch_copies_the_request_source_into_each_chunk(settings: Settings) -> None:
    rig = fetch_rig(settings, {A: page(A)})
    request = UrlRequest(url=A, source="webhook", requested_at="2026-01-01T00:00:00Z")
    run(rig.stage.handle(url_events([encode_url(request)])[0]))
    assert {decode_chunk(v).source for v in rig.chunks.values()} == {"webhook"}
