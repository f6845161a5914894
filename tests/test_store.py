"""The writer's pure logic: folding a window (with versions), trims, rows within Milvus'
byte limits, what is refused before writing, what counts as unavailability, and splitting
a refused request down to its bad rows. No broker, no Milvus."""

from __future__ import annotations

import math

import grpc
import numpy as np
import orjson
import pytest
from pymilvus.exceptions import (
    DataNotMatchException,
    MilvusException,
    ParamError,
)

from streams.documents import page_version, trim
from streams.ids import chunk_id, doc_id
from streams.messages import (
    Chunk,
    DecodeError,
    Sparse,
    Vector,
    decode_chunk,
    decode_vector,
    encode_chunk,
    encode_vector,
)
from streams.store import (
    TEXT_MAX,
    TITLE_MAX_BYTES,
    URL_MAX_BYTES,
    LruVersions,
    StoreUnavailable,
    cut_utf8,
    is_unavailable,
    reduce_window,
    refusal,
    request_batches,
    row_of,
    trim_filter,
    write_splitting,
)

URL = "http://example.org/page"
DOC = doc_id(URL)


def vec(
    i: int | None,
    count: int,
    version: int | None = None,
    op: str = "upsert",
    doc: str = DOC,
    text: str = "t",
    dense: np.ndarray | None = None,
    sparse: Sparse | None = None,
) -> Vector:
    chunk = Chunk(
        op=op,  # type: ignore[arg-type]
        doc_id=doc,
        url=URL,
        chunk_count=count,
        chunk_index=i if op == "upsert" else None,
        text=text if op == "upsert" else None,
        text_hash="ab" if op == "upsert" else None,
        doc_hash="cd" if op == "upsert" else None,
        version=version,
    )
    if op != "upsert":
        return Vector(chunk=chunk)
    d = np.ones(4, "float32") if dense is None else dense
    return Vector(chunk=chunk, model="m", dim=len(d), dense=d, sparse=sparse)


def rows_of(win) -> dict[str, int | None]:
    return {k: v.chunk.version for k, v in win.rows.items()}


# --- reduce_window --------------------------------------------------------------------------


def test_reduce_without_versions_is_last_wins_and_trims() -> None:
    win = reduce_window([vec(0, 3), vec(1, 3), vec(2, 3), vec(0, 2, text="new")])
    assert sorted(win.rows) == [chunk_id(DOC, 0), chunk_id(DOC, 1)]
    assert win.rows[chunk_id(DOC, 0)].chunk.text == "new"
    assert win.trims == {DOC: 2}
    assert win.versions == {} and win.stale == []


def test_reduce_drops_a_message_older_than_the_stored_version() -> None:
    """A redelivered (or redriven) v1 after v2 was written: dropped, not applied."""
    old = [vec(0, 5, version=1), vec(4, 5, version=1)]
    win = reduce_window(old, {DOC: 2})
    assert win.rows == {} and win.trims == {} and win.versions == {}
    assert win.stale == [(v, 2) for v in old]


def test_reduce_applies_equal_versions_for_idempotent_redelivery() -> None:
    msgs = [vec(0, 2, version=7), vec(1, 2, version=7)]
    win = reduce_window(msgs, {DOC: 7})
    assert rows_of(win) == {chunk_id(DOC, 0): 7, chunk_id(DOC, 1): 7}
    assert win.trims == {DOC: 2} and win.versions == {DOC: 7} and win.stale == []


def test_reduce_drops_an_older_version_met_later_in_the_same_window() -> None:
    """v2 (a shrunk page: chunk 1 changed, count 2) then a redriven v1 of the whole page
    (count 5): v1 must neither overwrite chunk 1 nor resurrect chunks 2..4."""
    v2 = vec(1, 2, version=2, text="v2")
    v1 = [vec(i, 5, version=1, text="v1") for i in range(5)]
    win = reduce_window([v2, *v1])
    assert rows_of(win) == {chunk_id(DOC, 1): 2}
    assert win.trims == {DOC: 2}
    assert win.versions == {DOC: 2}
    assert win.stale == [(v, 2) for v in v1]


def test_reduce_newer_version_in_window_keeps_unchanged_chunks_of_the_older() -> None:
    """v1 then v2 in one window: v2 sends only changed chunks, so v1's others stay."""
    win = reduce_window([vec(0, 3, version=1), vec(1, 3, version=1), vec(1, 2, version=2)])
    assert rows_of(win) == {chunk_id(DOC, 0): 1, chunk_id(DOC, 1): 2}
    assert win.trims == {DOC: 2} and win.versions == {DOC: 2}


def test_reduce_delete_is_a_tombstone_for_older_chunks() -> None:
    """A page deleted at v5: a redriven chunk of v3 is dropped, in the window and after."""
    win = reduce_window([vec(None, 0, version=5, op="delete"), vec(0, 1, version=3)])
    assert win.rows == {} and win.trims == {DOC: 0} and win.versions == {DOC: 5}
    assert [(v.chunk.version, newer) for v, newer in win.stale] == [(3, 5)]
    later = reduce_window([vec(0, 1, version=3)], {DOC: 5})
    assert later.rows == {} and later.trims == {}
    again = reduce_window([vec(0, 1, version=6)], {DOC: 5})  # fetched again: back it comes
    assert rows_of(again) == {chunk_id(DOC, 0): 6}


def test_reduce_unversioned_messages_apply_as_before() -> None:
    win = reduce_window([vec(0, 1)], {DOC: 9})
    assert rows_of(win) == {chunk_id(DOC, 0): None}
    assert win.trims == {DOC: 1} and win.versions == {}


def test_reduce_documents_are_independent() -> None:
    other = doc_id("http://example.org/other")
    win = reduce_window([vec(0, 1, version=1, doc=other), vec(0, 1, version=1)], {DOC: 2})
    assert list(win.rows) == [chunk_id(other, 0)]
    assert win.versions == {other: 1}
    assert win.last[other].chunk.doc_id == other


# --- trim_filter ----------------------------------------------------------------------------


def test_trim_filter_groups_documents_by_count() -> None:
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    assert trim_filter({}) is None
    assert trim_filter({b: 3, a: 3, c: 0}) == (
        f'(doc_id in ["{c}"] and chunk_index >= 0) or '
        f'(doc_id in ["{a}", "{b}"] and chunk_index >= 3)'
    )


# --- strings within Milvus' byte limits -----------------------------------------------------


def test_cut_utf8_cuts_bytes_on_a_character_boundary() -> None:
    assert cut_utf8("abc", 2) == "ab"
    assert cut_utf8("é" * 3, 5) == "éé"  # 2 bytes each: the third would be cut in half
    assert cut_utf8("😀x", 3) == ""  # a 4-byte character never half-kept
    assert cut_utf8("short", 512) == "short"


def test_row_of_fits_a_server_that_counts_bytes() -> None:
    """A 180-character CJK title is 540 UTF-8 bytes: under 512 characters (what Milvus
    Lite checks) but over 512 bytes (what a Milvus server checks)."""
    v = vec(0, 1)
    chunk = Chunk(
        **{
            **{f: getattr(v.chunk, f) for f in v.chunk.__dataclass_fields__},
            "title": "漢" * 180,
            "text": "字" * 30_000,
            "url": "http://example.org/" + "é" * 2000,
        }
    )
    row = row_of(Vector(chunk=chunk, model="m", dim=4, dense=v.dense), with_sparse=False)
    assert len(row["title"].encode()) <= TITLE_MAX_BYTES and row["title"] == "漢" * 170
    assert len(row["text"].encode()) <= TEXT_MAX and row["text"] == "字" * (TEXT_MAX // 3)
    assert len(row["url"].encode()) <= URL_MAX_BYTES
    assert row["id"] == chunk_id(DOC, 0)


# --- refused before writing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dense", "sparse", "dim", "sparse_field", "expected"),
    [
        (np.array([1, math.nan, 0, 0], "float32"), None, 4, False, "bad_vector"),
        (np.array([1, math.inf, 0, 0], "float32"), None, 4, False, "bad_vector"),
        (np.zeros(4, "float32"), None, 4, False, "bad_vector"),
        (np.ones(8, "float32"), None, 4, False, "schema"),
        (np.ones(4, "float32"), None, 4, True, "schema"),
        (
            np.ones(4, "float32"),
            Sparse([1], np.array([math.nan], "float32")),
            4,
            True,
            "bad_vector",
        ),
        (np.ones(4, "float32"), Sparse([1], np.array([-0.5], "float32")), 4, True, "bad_vector"),
        (np.ones(4, "float32"), Sparse([1, 1], np.ones(2, "float32")), 4, True, "bad_vector"),
        (np.ones(4, "float32"), Sparse([2**32 - 1], np.ones(1, "float32")), 4, True, "bad_vector"),
        (np.ones(4, "float32"), Sparse([], np.ones(0, "float32")), 4, True, "bad_vector"),
        (np.ones(4, "float32"), Sparse([3], np.zeros(1, "float32")), 4, True, "bad_vector"),
    ],
)
def test_refusal_of_vectors_that_can_never_be_written(
    dense: np.ndarray, sparse: Sparse | None, dim: int, sparse_field: bool, expected: str
) -> None:
    why = refusal(vec(0, 1, dense=dense, sparse=sparse), dim, sparse_field)
    assert why is not None and why[0] == expected, why


def test_refusal_passes_good_vectors_and_trims() -> None:
    good = np.array([0.5, -0.5, 0, 0], "float32")
    assert refusal(vec(0, 1, dense=good), 4, False) is None
    assert refusal(vec(0, 1, dense=good), None, False) is None  # a new collection
    sp = Sparse([0, 2**32 - 2], np.array([0.1, 0.0], "float32"))
    assert refusal(vec(0, 1, dense=good, sparse=sp), 4, True) is None
    bad_sp = Sparse([1], np.array([math.nan], "float32"))
    assert refusal(vec(0, 1, dense=good, sparse=bad_sp), 4, False) is None  # not written
    assert refusal(vec(None, 0, op="delete"), 4, True) is None
    assert "dimension 8" in refusal(vec(0, 1, dense=np.ones(8, "float32")), 4, False)[1]  # type: ignore[index]


# --- unavailability vs data -----------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"<{self._code}: {self._details}>"


@pytest.mark.parametrize(
    "exc",
    [
        # What pymilvus raised here against a stopped `milvus-lite server`:
        MilvusException(2, "Fail connecting to server on 127.0.0.1:1, server unavailable"),
        # pymilvus' own retries exhausted on UNAVAILABLE (code is a grpc.StatusCode):
        MilvusException(grpc.StatusCode.UNAVAILABLE, "[upsert_rows] Retry run out of 75"),
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"),
        FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        MilvusException(8, "rate limit exceeded"),
        MilvusException(9, "memory quota exhausted, writes denied"),
        MilvusException(1, "service not ready", retriable=True),
        MilvusException(100, "collection not found[collection=x]"),
        MilvusException(101, "Collection 'x' is in state 'released'; call load() first"),
        StoreUnavailable("cannot open"),
        ConnectionRefusedError(),
        TimeoutError(),
    ],
)
def test_unavailability_is_retried(exc: BaseException) -> None:
    assert is_unavailable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        # What Milvus Lite raised here for rows it refuses:
        MilvusException(6, "VARCHAR field 'title' value length 17 exceeds max_length=16"),
        MilvusException(6, "sparse vector field 'sparse': sparse weight must be non-negative"),
        DataNotMatchException(message="{n} field should be a int64, but got a float"),
        ParamError(message="sparse vector value must not be NaN"),
        # A Milvus server's answers for bad input:
        MilvusException(1100, "length of varchar field text exceeds max length"),
        MilvusException(1, "Unexpected error, message=<could not convert>"),
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"),
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad"),
        ValueError("could not convert"),
    ],
)
def test_data_errors_are_split_not_retried(exc: BaseException) -> None:
    assert not is_unavailable(exc)


# --- splitting a refused request ------------------------------------------------------------


class FakeStore:
    """Refuses any request holding a bad item (as Milvus refuses a whole upsert for one
    row); can go down after some calls."""

    def __init__(self, bad: set[int], down_after: int | None = None) -> None:
        self.bad, self.down_after = bad, down_after
        self.written: list[int] = []
        self.calls = 0
        self.up = True

    def write(self, items: list[int]) -> None:
        self.calls += 1
        if self.down_after is not None and self.calls > self.down_after:
            self.up = False
        if not self.up:
            raise MilvusException(2, "Fail connecting to server, server unavailable")
        refused = [i for i in items if i in self.bad]
        if refused:
            raise MilvusException(6, f"row {refused[0]} refused")
        self.written.extend(items)

    def answers(self) -> None:
        if not self.up:
            raise StoreUnavailable("down")


def test_split_writes_the_rest_and_returns_the_bad_rows() -> None:
    store = FakeStore(bad={3, 77, 78, 999})
    items = list(range(1000))
    refused = write_splitting(items, store.write, store.answers)
    assert sorted(i for i, _ in refused) == [3, 77, 78, 999]
    assert "row 77 refused" in str(dict(refused)[77])
    assert sorted(store.written) == [i for i in items if i not in store.bad]
    assert store.calls <= 2 * 4 * 10 + 1  # about 2 k log2(n), not n


def test_split_of_a_clean_request_is_one_call() -> None:
    store = FakeStore(bad=set())
    assert write_splitting(list(range(50)), store.write, store.answers) == []
    assert store.calls == 1
    assert write_splitting([], store.write, store.answers) == [] and store.calls == 1


def test_split_raises_unavailability_instead_of_blaming_rows() -> None:
    store = FakeStore(bad={5}, down_after=3)
    with pytest.raises(MilvusException) as err:
        write_splitting(list(range(64)), store.write, store.answers)
    assert is_unavailable(err.value)


def test_split_asks_whether_the_store_answers_before_blaming() -> None:
    """A server dying mid-request can fail a call with an error that looks like data;
    if the store does not answer afterwards, no row is blamed."""

    def flaky(items: list[int]) -> None:
        raise MilvusException(1, "Unexpected error, message=<stream removed>")

    def answers() -> None:
        raise StoreUnavailable("down")

    with pytest.raises(StoreUnavailable):
        write_splitting([1, 2, 3], flaky, answers)


def test_request_batches_bound_rows_and_bytes() -> None:
    items = list(range(10))
    assert request_batches(items, [1] * 10, 4, 100) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert request_batches(items, [30] * 10, 100, 100) == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
        [9],
    ]
    assert request_batches([1, 2], [500, 1], 10, 100) == [[1], [2]]  # one big row alone


# --- versions -------------------------------------------------------------------------------


def test_version_cache_is_bounded_lru() -> None:
    cache = LruVersions(2)
    cache.put("a", 1)
    cache.put("b", None)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    off = LruVersions(0)
    off.put("a", 1)
    assert "a" not in off


def test_page_version_grows_with_time_and_offset() -> None:
    v1 = page_version(41, None, now_s=1_700_000_000.000)
    v2 = page_version(42, None, now_s=1_700_000_000.000)
    v3 = page_version(7, None, now_s=1_700_000_000.001)
    assert v1 < v2 < v3 < 2**63
    # A fetch worker whose clock lags behind the message's timestamp uses the latter.
    assert page_version(7, 1_700_000_005.0, now_s=1_700_000_000.0) > v3


def test_trim_and_chunks_carry_the_version() -> None:
    t = trim(URL, 0, version=12)
    assert t.version == 12
    assert decode_chunk(encode_chunk(t)).version == 12
    v = vec(0, 1, version=2**62)
    assert decode_vector(encode_vector(v)).chunk.version == 2**62
    assert decode_vector(encode_vector(vec(0, 1))).chunk.version is None  # older producers


# --- exact schemas --------------------------------------------------------------------------


def _raw_vector(**changes: object) -> bytes:
    obj = orjson.loads(encode_vector(vec(1, 2, version=5)))
    obj.update(changes)
    return orjson.dumps(obj)


@pytest.mark.parametrize(
    "changes",
    [
        {"chunk_index": 1.0},
        {"chunk_count": 2.0},
        {"chunk_index": 100_000},
        {"chunk_count": 100_001},
        {"chunk_index": -1},
        {"version": 5.0},
        {"version": 2**63},
        {"version": -1},
        {"doc_id": DOC + "\n"},
        {"doc_id": DOC.upper()},
        {"text_hash": "ab\n"},
        {"text_hash": "x" * 65},
        {"model": {"name": "m", "dim": 4.0}},
        {"model": {"name": "m", "dim": 40_000}},
        {"sparse": {"indices": [2**32 - 1], "values": ""}},
        {"sparse": {"indices": [1.0], "values": ""}},
        {"url": ""},
    ],
)
def test_vectors_schema_is_exact(changes: dict[str, object]) -> None:
    decode_vector(_raw_vector())  # the unchanged message passes
    with pytest.raises(DecodeError) as err:
        decode_vector(_raw_vector(**changes))
    assert err.value.error_class == "schema"


@pytest.mark.parametrize(
    "changes",
    [{"chunk_index": 1.0}, {"chunk_index": 100_000}, {"doc_id": DOC + "\n"}, {"version": 1.5}],
)
def test_chunks_schema_is_exact(changes: dict[str, object]) -> None:
    obj = orjson.loads(encode_chunk(vec(1, 2, version=5).chunk))
    decode_chunk(orjson.dumps(obj))
    obj.update(changes)
    with pytest.raises(DecodeError) as err:
        decode_chunk(orjson.dumps(obj))
    assert err.value.error_class == "schema"


def test_page_version_stays_above_the_remembered_one_whatever_the_clock() -> None:
    """A fetch worker whose clock runs behind must still give a page a newer version than
    the one its state remembers (else the writer would drop the page's new content)."""
    remembered = page_version(5, None, now_s=1_700_000_100.0)
    lagging = page_version(9, None, now_s=1_700_000_000.0, after=remembered)
    assert lagging == remembered + 1
    ahead = page_version(9, None, now_s=1_700_000_200.0, after=remembered)
    assert ahead == page_version(9, None, now_s=1_700_000_200.0)
