"""What the fetch stage sends for a page: ``plan_update`` and ``trim``. No broker, no model.

The rule under test: the messages sent for a page, applied by the writer to what Milvus
held for the previous version, leave exactly the new version, re-embedding only the
chunks whose text changed at their index.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from streams.documents import CHUNKER_VERSION, DocState, DocStateRecord, plan_update, trim
from streams.ids import doc_id, text_hash
from streams.messages import Chunk, Vector
from streams.store import reduce_window

URL = "https://docs.example.org/guide/"
DOC = doc_id(URL)


def chunks(texts: list[str], url: str = URL, version: int | None = None) -> list[Chunk]:
    """The upsert chunks of a page split into ``texts``, as ``page_chunks`` makes them."""
    return [
        Chunk(
            op="upsert",
            doc_id=doc_id(url),
            url=url,
            chunk_count=len(texts),
            chunk_index=i,
            text=t,
            text_hash=text_hash(t),
            doc_hash=text_hash("".join(texts)),
            version=version,
        )
        for i, t in enumerate(texts)
    ]


def state(texts: list[str]) -> DocState:
    """What the fetch stage remembers after sending ``texts``."""
    return DocState(doc_hash=text_hash("".join(texts)), hashes=tuple(text_hash(t) for t in texts))


def sent(out: list[Chunk]) -> list[tuple[str, int | None, int, str | None]]:
    return [(c.op, c.chunk_index, c.chunk_count, c.text) for c in out]


# --- examples ---------------------------------------------------------------------------------


def test_a_first_fetch_sends_every_chunk() -> None:
    new = chunks(["a", "b", "c"])
    assert plan_update(URL, new, None, force=False) == new


def test_an_unchanged_page_sends_nothing() -> None:
    assert plan_update(URL, chunks(["a", "b", "c"]), state(["a", "b", "c"]), force=False) == []


def test_a_changed_chunk_is_sent_alone_with_the_page_count() -> None:
    out = plan_update(URL, chunks(["a", "B", "c"]), state(["a", "b", "c"]), force=False)
    assert sent(out) == [("upsert", 1, 3, "B")]


def test_a_grown_page_sends_its_new_tail() -> None:
    out = plan_update(URL, chunks(["a", "b", "c", "d"]), state(["a", "b"]), force=False)
    assert sent(out) == [("upsert", 2, 4, "c"), ("upsert", 3, 4, "d")]


def test_a_shrunk_page_without_a_changed_chunk_is_one_trim() -> None:
    out = plan_update(URL, chunks(["a", "b"]), state(["a", "b", "c", "d"]), force=False)
    assert out == [trim(URL, 2)]
    assert sent(out) == [("delete", None, 2, None)]


def test_a_shrunk_page_with_a_changed_chunk_trims_through_its_count() -> None:
    """No separate trim: the changed chunk's count (2) tells the writer to drop 2 and 3."""
    out = plan_update(URL, chunks(["a", "B"]), state(["a", "b", "c", "d"]), force=False)
    assert sent(out) == [("upsert", 1, 2, "B")]


def test_a_moved_text_is_sent_at_its_new_index() -> None:
    """Hashes are compared at their index: a chunk inserted at the front shifts all."""
    out = plan_update(URL, chunks(["new", "a", "b"]), state(["a", "b"]), force=False)
    assert sent(out) == [("upsert", 0, 3, "new"), ("upsert", 1, 3, "a"), ("upsert", 2, 3, "b")]


def test_force_resends_an_unchanged_page() -> None:
    new = chunks(["a", "b", "c"])
    assert plan_update(URL, new, state(["a", "b", "c"]), force=True) == new


def test_an_empty_page_loses_all_its_chunks() -> None:
    for prev in (None, state(["a", "b"]), state([])):
        for force in (False, True):
            assert plan_update(URL, [], prev, force) == [trim(URL, 0)]


def test_a_page_empty_before_sends_everything_now() -> None:
    new = chunks(["a"])
    assert plan_update(URL, new, state([]), force=False) == new


def test_a_delete_is_a_trim_to_zero_of_the_normalised_document() -> None:
    gone = trim("HTTPS://Docs.Example.org:443/guide/?utm_source=feed#top", 0, version=7)
    assert gone == Chunk(op="delete", doc_id=DOC, url=gone.url, chunk_count=0, version=7)
    assert (gone.chunk_index, gone.text, gone.text_hash) == (None, None, None)
    assert gone.key() == DOC.encode()  # on the partition of the page's other messages


# --- the property -----------------------------------------------------------------------------

texts = st.lists(st.sampled_from(["a", "b", "c", "é"]), max_size=8)


def milvus_after(before: list[str], messages: list[Chunk]) -> list[str]:
    """The page's chunk texts in a Milvus that held ``before``, once the writer applied
    ``messages`` (one window: upsert its rows, then trim)."""
    rows = dict(enumerate(before))
    window = reduce_window(Vector(chunk=c) for c in messages)
    for vec in window.rows.values():
        assert vec.chunk.chunk_index is not None and vec.chunk.text is not None
        rows[vec.chunk.chunk_index] = vec.chunk.text
    count = window.trims.get(DOC, len(rows))
    rows = {i: t for i, t in rows.items() if i < count}
    assert sorted(rows) == list(range(len(rows))), "a hole in the page's chunks"
    return [rows[i] for i in range(len(rows))]


@given(before=texts, after=texts, force=st.booleans())
def test_the_index_ends_as_the_new_page_sending_only_what_changed(
    before: list[str], after: list[str], force: bool
) -> None:
    out = plan_update(URL, chunks(after), state(before), force)
    assert milvus_after(before, out) == after
    assert all(c.chunk_count == len(after) and c.doc_id == DOC for c in out)
    upserts = [c.chunk_index for c in out if c.op == "upsert"]
    if force:
        assert upserts == list(range(len(after)))
    else:
        changed = [i for i, t in enumerate(after) if i >= len(before) or before[i] != t]
        assert upserts == changed
    # a message is sent only when something must change
    assert (out == []) == (not force and before == after and after != [])


@given(after=texts)
def test_a_first_fetch_fills_an_empty_index(after: list[str]) -> None:
    assert milvus_after([], plan_update(URL, chunks(after), None, force=False)) == after


# --- chunker upgrades ---------------------------------------------------------------------------


def test_a_state_made_by_another_chunker_sends_every_chunk() -> None:
    """Same texts at the same indexes: nothing would be sent, but the state's hashes were
    made by chunker version 1, so the page is re-embedded whole (as with force)."""
    old = dataclasses.replace(state(["a", "b", "c"]), chunker_version=1)
    new = chunks(["a", "b", "c"])
    assert plan_update(URL, new, old, force=False) == new
    assert plan_update(URL, new, state(["a", "b", "c"]), force=False) == []


def test_old_state_records_read_as_chunker_version_1() -> None:
    record = DocStateRecord(doc_hash="h", hashes=["x"], etag='"e"', last_modified=None)
    old = DocState.from_json(record)
    assert old is not None and old.chunker_version == 1 and not old.current
    made = DocState(doc_hash="h", hashes=("x",))
    assert made.chunker_version == CHUNKER_VERSION > 1 and made.current
    assert made.to_json()["chunker_version"] == CHUNKER_VERSION
    assert DocState.from_json(made.to_json()) == made
