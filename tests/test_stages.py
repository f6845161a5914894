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
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.errors import KafkaTimeoutError

import agents.checkpoint as checkpoint
from agents.checkpoint import Checkpoint, InOrder
from agents.common import LIMITS
from agents.write import WindowWriter
from streams.ids import doc_id, text_hash
from streams.messages import (
    Chunk,
    Vector,
    decode_dead_letter,
    encode_vector,
)
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
