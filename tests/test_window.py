"""What one window does to Milvus (``reduce_window``) and the trim it sends (``trim_filter``),
as properties over whole page histories. No broker, no Milvus: Milvus is a dict here.

``tests/test_store.py`` has the hand-picked examples; here hypothesis makes the histories:
pages that change, grow, shrink and are deleted, their messages interleaved across pages,
cut into windows anywhere, redelivered, and old messages redriven late. Whatever it makes,
Milvus must end holding exactly the latest version of every page.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.documents import DocState, plan_update, trim
from streams.errors import DecodeError
from streams.ids import doc_id, text_hash
from streams.messages import Chunk, Vector, decode_vector, encode_vector
from streams.store import Window, reduce_window, trim_filter
from tests.test_documents import chunks

URLS = ["https://a.example/one", "https://a.example/two"]

#: One page version: its chunk texts, or None for a delete (or a page gone).
Version = list[str] | None


def page_messages(url: str, history: list[Version]) -> list[list[Chunk]]:
    """The messages the fetch stage sends for each version of a page, in order, stamped
    with increasing versions as ``agents/fetch.py`` does."""
    out: list[list[Chunk]] = []
    prev: DocState | None = None
    for n, texts in enumerate(history, start=1):
        version = n * 10
        if texts is None:
            sent, prev = [trim(url, 0)], DocState(doc_hash="", hashes=())
        else:
            sent = plan_update(url, chunks(texts, url), prev, force=False)
            prev = DocState(doc_hash="", hashes=tuple(text_hash(t) for t in texts))
        out.append([dataclasses.replace(c, version=version) for c in sent])
    return out


class Milvus:
    """The collection and its ``_docs`` versions, as ``MilvusStore.write`` changes them:
    the window's rows upserted, then each document trimmed to its count."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], str] = {}
        self.versions: dict[str, int] = {}

    def write(self, window: Window) -> None:
        for vec in window.rows.values():
            assert vec.chunk.chunk_index is not None and vec.chunk.text is not None
            self.rows[(vec.chunk.doc_id, vec.chunk.chunk_index)] = vec.chunk.text
        self.rows = {
            (doc, i): t
            for (doc, i), t in self.rows.items()
            if doc not in window.trims or i < window.trims[doc]
        }
        self.versions.update(window.versions)

    def page(self, url: str) -> list[str]:
        doc = doc_id(url)
        held = {i: t for (d, i), t in self.rows.items() if d == doc}
        assert sorted(held) == list(range(len(held))), f"a hole in {url}: {sorted(held)}"
        return [held[i] for i in range(len(held))]


texts = st.lists(st.sampled_from(["a", "b", "c"]), max_size=5)
histories = st.lists(st.one_of(st.none(), texts), min_size=1, max_size=4)


@st.composite
def streams_of(draw: st.DrawFn) -> tuple[dict[str, list[Version]], list[Chunk]]:
    """Histories of two pages and one stream of their messages: each page's in its order
    (one Kafka partition per page), the pages interleaved, old messages redriven late."""
    pages = {url: draw(histories) for url in URLS}
    queues = {
        url: [c for batch in page_messages(url, h) for c in batch] for url, h in pages.items()
    }
    stream: list[Chunk] = []
    while any(queues.values()):
        url = draw(st.sampled_from([u for u in URLS if queues[u]]))
        stream.append(queues[url].pop(0))
        if draw(st.integers(0, 4)) == 0:  # a dead letter of this page redriven now
            same = [c for c in stream if c.doc_id == doc_id(url)]
            stream.append(draw(st.sampled_from(same)))
    return pages, stream


def last_page(history: list[Version]) -> list[str]:
    return history[-1] or []


@given(streams_of(), st.data())
def test_milvus_ends_with_the_latest_version_of_every_page(
    case: tuple[dict[str, list[Version]], list[Chunk]], data: st.DataObject
) -> None:
    pages, stream = case
    milvus = Milvus()
    start = 0
    while start < len(stream):
        end = data.draw(st.integers(start + 1, len(stream)), label="window end")
        window = reduce_window((Vector(chunk=c) for c in stream[start:end]), milvus.versions)
        for vec, newer in window.stale:
            assert vec.chunk.version is not None and vec.chunk.version < newer
        milvus.write(window)
        if data.draw(st.booleans(), label="redelivered"):  # written, crashed before commit
            milvus.write(
                reduce_window((Vector(chunk=c) for c in stream[start:end]), milvus.versions)
            )
        start = end
    for url, history in pages.items():
        assert milvus.page(url) == last_page(history)
        sent = [c.version or 0 for c in stream if c.doc_id == doc_id(url)]
        assert milvus.versions.get(doc_id(url)) == (max(sent) if sent else None)


@given(streams_of())
def test_one_window_or_one_message_per_window_is_the_same(
    case: tuple[dict[str, list[Version]], list[Chunk]],
) -> None:
    pages, stream = case
    whole, single = Milvus(), Milvus()
    whole.write(reduce_window((Vector(chunk=c) for c in stream), whole.versions))
    for c in stream:
        single.write(reduce_window([Vector(chunk=c)], single.versions))
    assert whole.rows == single.rows and whole.versions == single.versions


def upsert(index: int, count: int, version: int | None, text: str) -> Vector:
    url = URLS[0]
    return Vector(
        chunk=Chunk(
            op="upsert",
            doc_id=doc_id(url),
            url=url,
            chunk_count=count,
            chunk_index=index,
            text=text,
            text_hash=text_hash(text),
            version=version,
        )
    )


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 4), st.one_of(st.none(), st.integers(1, 3))),
        min_size=1,
        max_size=12,
    ).map(lambda xs: [(i, max(i + 1, n), v) for i, n, v in xs])
)
def test_one_row_per_chunk_id_from_the_newest_message(
    specs: list[tuple[int, int, int | None]],
) -> None:
    """Per chunk id, the row written is the last message of the highest version seen so
    far; the count is the last applied message's; no row lies beyond it."""
    msgs = [upsert(i, n, v, text=f"m{k}") for k, (i, n, v) in enumerate(specs)]
    win = reduce_window(msgs)
    applied, current = [], None
    for m in msgs:
        v = m.chunk.version
        if v is not None and current is not None and v < current:
            continue
        current = v if v is not None else current
        applied.append(m)
    expected_count = applied[-1].chunk.chunk_count
    assert win.trims == {doc_id(URLS[0]): expected_count}
    newest: dict[int, Vector] = {}
    for m in applied:
        assert m.chunk.chunk_index is not None
        newest[m.chunk.chunk_index] = m
    kept = {i: m.chunk.text for i, m in newest.items() if i < expected_count}
    assert {v.chunk.chunk_index: v.chunk.text for v in win.rows.values()} == kept
    assert len(win.stale) == len(msgs) - len(applied)


# --- trim_filter ------------------------------------------------------------------------------

CLAUSE = re.compile(r'\(doc_id in \[((?:"[0-9a-f]{32}"(?:, )?)+)\] and chunk_index >= (\d+)\)')
doc_ids = st.text("0123456789abcdef", min_size=32, max_size=32)


def parse_filter(expr: str) -> dict[str, int]:
    """The trims a filter deletes, read back; fails on anything but the expected shape."""
    out: dict[str, int] = {}
    clauses = expr.split(" or ")
    for clause in clauses:
        m = CLAUSE.fullmatch(clause)
        assert m, f"unexpected clause {clause!r}"
        for doc in re.findall(r'"([0-9a-f]{32})"', m.group(1)):
            assert doc not in out, f"{doc} in two clauses"
            out[doc] = int(m.group(2))
    counts = [int(CLAUSE.fullmatch(c).group(2)) for c in clauses]  # type: ignore[union-attr]
    assert counts == sorted(set(counts)), "one clause per count, in order"
    return out


@given(st.dictionaries(doc_ids, st.integers(0, 99_999), max_size=20))
def test_trim_filter_deletes_exactly_each_documents_tail(trims: dict[str, int]) -> None:
    expr = trim_filter(trims)
    if not trims:
        assert expr is None
    else:
        assert expr is not None and parse_filter(expr) == trims


@pytest.mark.parametrize(
    "hostile",
    [
        'a" or doc_id != "',  # closes the literal: would delete every row
        "a" * 31 + '"',
        "a" * 31 + "\\",
        "A" * 32,  # another spelling of a hex id: another document
        "a" * 32 + "\n",
        "a" * 33,
        "",
    ],
)
def test_a_hostile_doc_id_never_reaches_a_filter(hostile: str) -> None:
    """The first lock: a message whose doc_id is not 32 lowercase hex digits is refused
    when decoded, before any window (``trim_filter`` refuses it too: the test below)."""
    message = Vector(chunk=Chunk(op="delete", doc_id=hostile, url=URLS[0], chunk_count=0))
    with pytest.raises(DecodeError, match="doc_id"):
        decode_vector(encode_vector(message))
    good = dataclasses.replace(message.chunk, doc_id=doc_id(URLS[0]))
    assert decode_vector(encode_vector(Vector(chunk=good))).chunk == good


@pytest.mark.parametrize("hostile", ['a" or doc_id != "', "A" * 32, "a" * 32 + "\n", ""])
def test_a_filter_refuses_what_is_not_a_doc_id(hostile: str) -> None:
    """The second lock: were the schema ever loosened, the filter still is not code."""
    good = doc_id(URLS[0])
    assert trim_filter({good: 3}) == f'(doc_id in ["{good}"] and chunk_index >= 3)'
    with pytest.raises(ValueError, match="not a document id"):
        trim_filter({good: 3, hostile: 0})
