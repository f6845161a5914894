"""The Milvus sink: one bulk upsert (plus one trim delete) per window, and search.

Primary keys are deterministic chunk ids, so writing a window twice (a redelivery after
a crash) leaves Milvus as if it was written once. Milvus Lite opened embedded allows one
process per data directory: while a worker writes, it serves the directory and every
process connects to the served address (``streams.milvus_lite.connect_uri``, see
docs/decisions.md).

What the writer may never do is stop on one message, or move a page backwards:

- Rows that can never be written (NaN/Inf values, another dimension, bad sparse weights)
  are refused before writing (:func:`refusal`); strings are cut to Milvus' limits, which
  a Milvus server counts in UTF-8 bytes (:func:`cut_utf8`).
- Only unavailability is retried (:func:`is_unavailable`); a request Milvus refuses for
  its data is split in halves down to the rows it refuses (:func:`write_splitting`), the
  rest is written and those rows come back to the caller as dead letters.
- Every chunk carries its document's version; the latest version written per document is
  kept in ``<collection>_docs`` (and a bounded cache), and :func:`reduce_window` drops
  messages older than it (a redriven old chunk, or a chunk of a page deleted since).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from streams.errors import BadRequest, SchemaMismatch, StoreUnavailable
from streams.ids import chunk_id, is_doc_id
from streams.messages import Vector
from streams.milvus_lite import connect_kwargs, connect_uri
from streams.settings import Settings

log = logging.getLogger(__name__)

#: VARCHAR limits of the collection, in UTF-8 bytes (what a Milvus server counts).
URL_MAX_BYTES = 2048
TITLE_MAX_BYTES = 512
TEXT_MAX = 65535
HASH_MAX_BYTES = 64
SECTION_MAX_BYTES = 2048  # a heading path; cut (it is shown and matched, never an id)
SOURCE_MAX_BYTES = 1024  # the urls schema allows 256 characters: never cut
MAX_REQUEST_ROWS = 1000  # rows per upsert request
MAX_REQUEST_BYTES = 16 * 2**20  # estimated bytes per request, well under Milvus' 64 MB
SPARSE_MAX_INDEX = 2**32 - 2  # Milvus reserves 2^32-1
LOOKUP_BATCH = 1000  # doc ids per version query
DOCS_SUFFIX = "_docs"

T = TypeVar("T")


# --- pure logic -----------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Window:
    """What one window does to Milvus: rows to upsert, per document the chunk count beyond
    which its chunks are removed and the version to remember, and the stale messages
    that were dropped, each with the newer version that superseded it."""

    rows: dict[str, Vector] = dataclasses.field(default_factory=dict)
    trims: dict[str, int] = dataclasses.field(default_factory=dict)
    versions: dict[str, int] = dataclasses.field(default_factory=dict)
    last: dict[str, Vector] = dataclasses.field(default_factory=dict)
    stale: list[tuple[Vector, int]] = dataclasses.field(default_factory=list)


def reduce_window(vectors: Iterable[Vector], known: Mapping[str, int] | None = None) -> Window:
    """Fold a window's messages, in offset order, into its net effect on Milvus.

    ``known`` holds the version Milvus has for each document. A message older than its
    document's current version (the known one, or a newer one met earlier in the window)
    is stale and dropped: a redriven chunk of an old fetch, or of a page deleted since (a
    delete leaves its version as a tombstone). Equal versions apply, so a redelivered
    window is idempotent; messages without a version (older producers) always apply.
    The latest applied message of a document decides its chunk count; the latest version
    of a chunk wins; rows beyond the final count are not written at all.
    """
    known = known or {}
    win = Window()
    current: dict[str, int] = {}
    for vec in vectors:
        c = vec.chunk
        have = current.get(c.doc_id, known.get(c.doc_id))
        if c.version is not None:
            if have is not None and c.version < have:
                win.stale.append((vec, have))
                continue
            current[c.doc_id] = c.version
            win.versions[c.doc_id] = c.version
        win.trims[c.doc_id] = c.chunk_count
        win.last[c.doc_id] = vec
        if c.op == "upsert":
            assert c.chunk_index is not None
            win.rows[chunk_id(c.doc_id, c.chunk_index)] = vec
    win.rows = {
        k: v for k, v in win.rows.items() if (v.chunk.chunk_index or 0) < win.trims[v.chunk.doc_id]
    }
    return win


def trim_filter(trims: Mapping[str, int]) -> str | None:
    """One boolean expression removing, for every document, the chunks beyond its count."""
    if not trims:
        return None
    by_count: dict[int, list[str]] = {}
    for doc, count in trims.items():
        by_count.setdefault(count, []).append(doc)
    parts = []
    for count, docs in sorted(by_count.items()):
        ids = quoted_ids(sorted(docs))
        parts.append(f"(doc_id in [{ids}] and chunk_index >= {count})")
    return " or ".join(parts)


def quoted_ids(docs: Iterable[str]) -> str:
    """Document ids as the inside of a Milvus ``in [...]`` list.

    A filter is code: an id that is not the 32 hex digits :func:`streams.ids.doc_id` makes
    is refused here (``ValueError``, so the writer dead-letters its message) instead of
    being pasted into the expression. The schemas refuse such ids already; this is the
    second lock on the same door, where the string becomes code.
    """
    out = []
    for doc in docs:
        if not is_doc_id(doc):
            raise ValueError(f"not a document id: {doc[:80]!r}")
        out.append(f'"{doc}"')
    return ", ".join(out)


def cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, on a character boundary.

    A Milvus server counts VARCHAR ``max_length`` in bytes (Milvus Lite in characters), so
    a 180-character CJK title fits 512 characters but not 512 bytes.
    """
    if len(text) * 4 <= max_bytes:  # fast path: no character takes more than 4 bytes
        return text
    raw = text.encode("utf-8", errors="surrogatepass")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", errors="ignore")  # drops a cut last character


def fetched_ms(fetched_at: str | None) -> int:
    """A chunk's ``fetched_at`` (ISO 8601, UTC) as epoch milliseconds, for ``--since``;
    0 (the epoch: older than any ``--since``) when absent or unreadable, so a row is never
    refused for its timestamp."""
    if not fetched_at:
        return 0
    try:
        when = datetime.fromisoformat(fetched_at)
    except ValueError:
        return 0
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return max(0, int(when.timestamp() * 1000))


def row_of(vec: Vector, with_sparse: bool, fields: Container[str] | None = None) -> dict[str, Any]:
    """The Milvus row of a vector, its strings within the collection's byte limits.

    ``fields`` are the collection's fields (``None``: the schema this version creates): a
    collection created by an older ragstream lacks ``section``, ``source`` and
    ``fetched_ms``, and Milvus refuses a row with a field its schema does not have.
    """
    c = vec.chunk
    row: dict[str, Any] = {
        "id": chunk_id(c.doc_id, c.chunk_index or 0),
        "doc_id": c.doc_id,
        "chunk_index": c.chunk_index,
        "url": cut_utf8(c.url, URL_MAX_BYTES),
        "title": cut_utf8(c.title or "", TITLE_MAX_BYTES),
        "text": cut_utf8(c.text or "", TEXT_MAX),
        "text_hash": cut_utf8(c.text_hash or "", HASH_MAX_BYTES),
        "doc_hash": cut_utf8(c.doc_hash or "", HASH_MAX_BYTES),
        "dense": vec.dense,
        "section": cut_utf8(c.section or "", SECTION_MAX_BYTES),
        "source": cut_utf8(c.source or "", SOURCE_MAX_BYTES),
        "fetched_ms": fetched_ms(c.fetched_at),
    }
    if with_sparse:
        row["sparse"] = vec.sparse.as_dict() if vec.sparse is not None else {}
    if fields is not None:
        row = {k: v for k, v in row.items() if k in fields}
    return row


def row_bytes(row: Mapping[str, Any]) -> int:
    """A generous estimate of a row's size in a request (strings, floats, sparse pairs)."""
    size = 64
    for value in row.values():
        if isinstance(value, str):
            size += len(value) * 4 if len(value) > 1024 else len(value.encode("utf-8", "ignore"))
        elif isinstance(value, np.ndarray):
            size += value.nbytes
        elif isinstance(value, dict):
            size += 12 * len(value)
        else:
            size += 8
    return size


def request_batches(
    rows: Sequence[T], sizes: Sequence[int], max_rows: int, max_bytes: int
) -> list[list[T]]:
    """Consecutive batches of at most ``max_rows`` rows and ``max_bytes`` (one row alone
    may be larger: a request of one row is as small as it gets)."""
    out: list[list[T]] = []
    batch: list[T] = []
    used = 0
    for row, size in zip(rows, sizes, strict=True):
        if batch and (len(batch) >= max_rows or used + size > max_bytes):
            out.append(batch)
            batch, used = [], 0
        batch.append(row)
        used += size
    if batch:
        out.append(batch)
    return out


def refusal(vec: Vector, dim: int | None, sparse_field: bool) -> tuple[str, str] | None:
    """Why this vector can never be written to a collection of ``dim`` (``None``: not
    created yet) with or without a sparse field, as ``(error_class, reason)``; ``None``
    when it can. Refused up front, a row like this neither stops nor splits a window.
    """
    if vec.chunk.op != "upsert":
        return None
    dense = vec.dense
    if dense is None:
        return "schema", "an upsert without a dense vector"
    bad = int(np.count_nonzero(~np.isfinite(dense)))
    if bad:
        return "bad_vector", f"dense vector has {bad} NaN/Inf value(s) of {len(dense)}"
    if not np.any(dense):
        return "bad_vector", "dense vector is all zeros (it has no direction to search by)"
    if dim is not None and len(dense) != dim:
        return "schema", str(
            SchemaMismatch(f"dimension {len(dense)} ({vec.model}) != collection's {dim}")
        )
    sp = vec.sparse
    if sp is None:
        if sparse_field:
            return "schema", (
                f"the collection has a sparse field and this vector ({vec.model}) has none: "
                "another model; use another RAGSTREAM_COLLECTION for it"
            )
        return None
    if not sparse_field:
        return None  # the collection keeps no sparse vectors: this one is not written
    values = np.asarray(sp.values, dtype=np.float64)
    if len(values) != len(sp.indices):
        return "schema", "sparse indices and values differ in length"
    if not np.all(np.isfinite(values)):
        return "bad_vector", "sparse vector has NaN/Inf weights"
    if np.any(values < 0):
        return "bad_vector", "sparse vector has negative weights"
    if not np.any(values > 0):
        return "bad_vector", "sparse vector has no positive weight (Milvus refuses it)"
    if any(isinstance(i, bool) or not isinstance(i, int) for i in sp.indices):
        return "schema", "sparse indices must be integers"
    if sp.indices and (min(sp.indices) < 0 or max(sp.indices) > SPARSE_MAX_INDEX):
        return "bad_vector", f"sparse index outside 0..{SPARSE_MAX_INDEX}"
    if len(set(sp.indices)) != len(sp.indices):
        return "bad_vector", "sparse vector repeats an index"
    return None


#: gRPC status codes that mean "not now": Milvus is down, slow or refuses us for now.
_UNAVAILABLE_GRPC = frozenset(
    {
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "CANCELLED",
        "ABORTED",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
    }
)
#: Milvus status codes of the same kind: 2 = service unavailable (pymilvus: connect
#: failed), 8 = rate limit, 9 = quota exceeded / writes denied (e.g. disk full).
_UNAVAILABLE_CODES = frozenset({2, 8, 9})
#: Collection not found (new code 100, legacy 4): dropped under us, recreated on retry;
#: not loaded (101): a restarted Milvus brings collections back released, loaded on retry.
_MISSING_COLLECTION_CODES = frozenset({4, 100, 101})
_UNAVAILABLE_WORDS = ("Retry timeout", "Retry run out", "server unavailable", "not ready")


def _grpc_name(code: object) -> str | None:
    name = getattr(code, "name", None)
    return name if isinstance(name, str) else None


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means Milvus cannot be used now (retry the window later) rather
    than that the request's data was refused (split it and dead-letter the rows).

    Unavailable: connection and timeout errors, gRPC ``UNAVAILABLE``/``DEADLINE_EXCEEDED``
    and kin, a server status that says it is retriable, rate limits and quotas, pymilvus'
    own retries running out, a collection dropped or released under us (a restart). A
    gRPC message over the size limit is the request's fault (``RESOURCE_EXHAUSTED`` with
    "larger than max"): halving helps there. Anything else is taken to be the data's
    fault; :func:`write_splitting` still checks that Milvus answers before it blames a row.
    """
    if isinstance(exc, StoreUnavailable | ConnectionError | TimeoutError):
        return True
    text = str(exc)
    code = getattr(exc, "code", None)
    if callable(code):  # a grpc.RpcError: code() is a grpc.StatusCode
        try:
            code = code()
        except Exception:  # a broken error object: treat as data
            code = None
    name = _grpc_name(code)
    if name is not None:
        if name == "RESOURCE_EXHAUSTED" and "larger than max" in text:
            return False
        return name in _UNAVAILABLE_GRPC
    if type(exc).__name__ in ("ConnectionConfigException", "ConnectError", "FutureTimeoutError"):
        return True
    if getattr(exc, "retriable", False) is True:
        return True
    if isinstance(code, int) and not isinstance(code, bool):
        if code in _UNAVAILABLE_CODES or code in _MISSING_COLLECTION_CODES:
            return True
        compat = getattr(exc, "compatible_code", None)
        if code == 1 and compat in _MISSING_COLLECTION_CODES:
            return True
    return any(w in text for w in _UNAVAILABLE_WORDS)


def write_splitting(
    items: Sequence[T],
    write: Callable[[Sequence[T]], object],
    answers: Callable[[], object] | None = None,
) -> list[tuple[T, Exception]]:
    """Write ``items`` in one call; if the store refuses it for its data, write each half,
    down to the single items it refuses: those come back with their errors, everything
    else is written. Unavailability is raised (the caller retries the whole write: every
    write here is idempotent). With ``k`` bad items among ``n`` this costs about
    ``2 k log2(n)`` calls. ``answers`` is called before any item is blamed and must raise
    when the store does not answer, so an outage that looks like a data error (a server
    dying mid-request) never turns good rows into dead letters.
    """
    refused: list[tuple[T, Exception]] = []

    def go(part: Sequence[T]) -> None:
        try:
            write(part)
        except Exception as exc:
            if is_unavailable(exc):
                raise
            if len(part) == 1:
                refused.append((part[0], exc))
                return
            mid = len(part) // 2
            go(part[:mid])
            go(part[mid:])

    if items:
        go(items)
    if refused and answers is not None:
        answers()
    return refused


class LruVersions:
    """doc_id -> the version Milvus holds (``None``: no version), least recently used
    forgotten first; bounded so that a writer's memory does not grow with the corpus."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: collections.OrderedDict[str, int | None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, doc: object) -> bool:
        return doc in self._data

    def get(self, doc: str) -> int | None:
        self._data.move_to_end(doc)
        return self._data[doc]

    def put(self, doc: str, version: int | None) -> None:
        if self.capacity <= 0:
            return
        self._data[doc] = version
        self._data.move_to_end(doc)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


# --- search: pure logic ---------------------------------------------------------------------

#: How a search ranks: ``hybrid`` fuses every leg the collection has; the others run one leg.
SearchMode = Literal["hybrid", "dense", "sparse", "bm25"]
MODES: tuple[SearchMode, ...] = ("hybrid", "dense", "sparse", "bm25")
#: The legs a search can run: the model's dense vector, its learned sparse vector (BGE-M3)
#: and the BM25 lexical vector Milvus computes from ``text`` (every collection since the
#: hybrid schema).
LEGS = ("dense", "sparse", "bm25")
#: RRF's constant: 60, as in the paper (Cormack et al., 2009) and Milvus' default.
RRF_K = 60
#: Hits each leg contributes to a fusion: deeper than ``k`` so that a chunk ranked well by
#: one leg and just outside ``k`` by another is still fused.
LEG_DEPTH_MIN = 20
LEG_DEPTH_MAX = 1000
#: Fields a hit carries when the collection has them (older collections lack ``section``).
HIT_FIELDS = ("url", "title", "text", "chunk_index", "section")
#: The fields this version creates beyond those of the first schema.
HYBRID_FIELDS = ("section", "source", "fetched_ms", "bm25")


def parse_mode(text: str) -> SearchMode:
    """``text`` as a search mode; ``BadRequest`` (a ``ValueError``) naming the modes."""
    mode = text.strip().lower()
    if mode not in MODES:
        raise BadRequest(f"unknown search mode {text[:40]!r}: use one of {', '.join(MODES)}")
    return mode


def parse_weights(text: str) -> dict[str, float]:
    """``dense=1,sparse=0.5,bm25=1`` as leg weights (each in 0..1, Milvus' range for a
    weighted fusion; a leg left out weighs 1, a leg at 0 is not run)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in LEGS:
            raise BadRequest(
                f"bad weight {part.strip()[:40]!r}: write leg=weight with legs "
                f"{', '.join(LEGS)} (dense=1,bm25=0.5)"
            )
        if name in out:
            raise BadRequest(f"weight of {name} given twice")
        try:
            weight = float(value)
        except ValueError:
            raise BadRequest(f"weight of {name} is not a number: {value.strip()[:40]!r}") from None
        if not 0.0 <= weight <= 1.0:  # also refuses NaN
            raise BadRequest(f"weight of {name} must be within 0..1, got {value.strip()[:40]}")
        out[name] = weight
    if not out:
        raise BadRequest("no weights given: write leg=weight, e.g. dense=1,bm25=0.5")
    if not any(out.values()):
        raise BadRequest("every weight is 0: nothing would be searched")
    return out


def string_literal(value: str) -> str:
    """``value`` as a Milvus filter string literal, double-quoted.

    A filter is code (see :func:`quoted_ids`): a backslash and a double quote are escaped,
    so no value can end the literal and add a clause; control characters are refused
    rather than escaped (no URL, source or heading has one, and Milvus' escapes for them
    differ by version).
    """
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise BadRequest(f"control character in filter value {value[:40]!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def like_prefix(prefix: str) -> str:
    """A ``like`` pattern matching the strings that start with ``prefix``, literally:
    ``%``, ``_`` and ``\\`` are ``like``'s own syntax and are escaped (``\\%``), then the
    whole is a :func:`string_literal`."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return string_literal(escaped + "%")


@dataclasses.dataclass(frozen=True, slots=True)
class Filters:
    """What a search keeps: chunks whose URL starts with ``url_prefix``, whose request came
    from ``source``, fetched at or after ``since_ms`` (epoch milliseconds)."""

    url_prefix: str | None = None
    source: str | None = None
    since_ms: int | None = None

    def fields(self) -> list[str]:
        """The collection fields these filters need."""
        need = []
        if self.url_prefix:
            need.append("url")
        if self.source is not None:
            need.append("source")
        if self.since_ms is not None:
            need.append("fetched_ms")
        return need


def filter_expr(filters: Filters | None) -> str:
    """The Milvus boolean expression of ``filters`` (``""``: everything)."""
    if filters is None:
        return ""
    parts = []
    if filters.url_prefix:
        parts.append(f"url like {like_prefix(filters.url_prefix)}")
    if filters.source is not None:
        parts.append(f"source == {string_literal(filters.source)}")
    if filters.since_ms is not None:
        parts.append(f"fetched_ms >= {int(filters.since_ms)}")
    return " and ".join(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class SearchPlan:
    """The legs a search runs, their weights (``None``: reciprocal-rank fusion), and what
    was asked for and cannot be done on this collection (each a sentence for the user)."""

    mode: SearchMode
    legs: tuple[str, ...]
    weights: tuple[float, ...] | None
    notes: tuple[str, ...]


def plan_search(
    mode: SearchMode,
    available: Container[str],
    weights: Mapping[str, float] | None = None,
    why_missing: Mapping[str, str] | None = None,
) -> SearchPlan:
    """Which legs ``mode`` runs given the legs ``available`` (the collection's fields that
    the query has an input for). A leg the collection lacks falls back (``sparse`` to
    ``bm25``, either to ``dense``) with a note, never an error: a collection created by an
    older ragstream has the dense leg only. ``why_missing`` says why a leg is missing."""
    why = why_missing or {}
    notes: list[str] = []

    def missing(leg: str) -> str:
        return why.get(leg, f"collection has no {leg} field")

    if mode == "dense":
        legs = ["dense"]
    elif mode == "bm25":
        legs = ["bm25"] if "bm25" in available else ["dense"]
        if "bm25" not in available:
            notes.append(f"bm25: {missing('bm25')}; searched dense instead")
    elif mode == "sparse":
        if "sparse" in available:
            legs = ["sparse"]
        elif "bm25" in available:
            legs = ["bm25"]
            notes.append(f"sparse: {missing('sparse')}; searched bm25")
        else:
            legs = ["dense"]
            notes.append(f"sparse: {missing('sparse')}, bm25: {missing('bm25')}; searched dense")
    else:
        legs = ["dense"] + [leg for leg in ("sparse", "bm25") if leg in available]
        if len(legs) == 1:
            notes.append(f"hybrid: {missing('bm25')}; searched dense only")
    fused: tuple[float, ...] | None = None
    if weights:
        for leg in sorted(set(weights) - set(legs)):
            notes.append(f"weight of {leg} ignored: the search does not run that leg")
        kept = [leg for leg in legs if weights.get(leg, 1.0) > 0]
        if not kept:
            raise BadRequest(f"every leg this search runs ({', '.join(legs)}) has weight 0")
        legs = kept
        fused = tuple(weights.get(leg, 1.0) for leg in legs)
    return SearchPlan(mode=mode, legs=tuple(legs), weights=fused, notes=tuple(notes))


def leg_depth(k: int) -> int:
    """Hits each leg of a fusion returns for a final ``k``."""
    return min(max(2 * k, LEG_DEPTH_MIN, k), max(LEG_DEPTH_MAX, k))


# --- Milvus ---------------------------------------------------------------------------------


def _let_pymilvus_import() -> None:
    """pymilvus parses ``MILVUS_URI`` when imported and refuses a Lite path there; ragstream
    has already read it into Settings (where a Lite path is valid), so hide such a value
    from pymilvus."""
    uri = os.environ.get("MILVUS_URI", "")
    if uri and not uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:")):
        os.environ.pop("MILVUS_URI")


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    """One chunk found. ``score``: larger is better, on the scale of the search's ranking
    (cosine for dense, inner product for learned sparse, BM25 for bm25, the fused score
    for a hybrid search); comparable within one search, not across modes."""

    id: str
    score: float
    url: str
    title: str
    text: str
    chunk_index: int
    section: str = ""


@dataclasses.dataclass(slots=True)
class WriteResult:
    """What a window's write did: rows upserted, and what Milvus refused for its data (to
    be dead-lettered): rows as ``(vector, error)``, trims as ``(doc_id, error)``."""

    upserted: int = 0
    refused_rows: list[tuple[Vector, str]] = dataclasses.field(default_factory=list)
    refused_trims: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class MilvusStore:
    """A Milvus collection of chunks, created on the first window with its dimension, and
    its companion ``<collection>_docs`` (doc_id -> version, chunk_count)."""

    def __init__(self, settings: Settings) -> None:
        _let_pymilvus_import()
        from pymilvus import MilvusClient

        self.uri = connect_uri(settings)  # served while a worker runs (streams/milvus_lite.py)
        self.name = settings.collection
        self.docs_name = settings.collection + DOCS_SUFFIX
        self.timeout = settings.write_timeout_s
        if settings.milvus_is_lite:
            Path(settings.milvus_target).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = MilvusClient(self.uri, **connect_kwargs(settings))
        except Exception as exc:
            hint = ""
            if settings.milvus_is_lite and self.uri == settings.milvus_target:
                hint = (
                    " (Milvus Lite opened embedded allows one process per directory and "
                    "another has it open: a `ragstream search`, a notebook? A running worker "
                    "serves it to every process, as does `ragstream milvus up`)"
                )
            raise StoreUnavailable(f"cannot open Milvus at {self.uri}: {exc}{hint}") from exc
        self.dim: int | None = None
        self.sparse: bool = False
        self.model: str | None = None
        self.fields: frozenset[str] = frozenset()
        self._docs_ready = False
        self._recheck = False
        self._versions = LruVersions(settings.write_version_cache)
        if self.client.has_collection(self.name):
            self._read_schema()

    def _read_schema(self) -> None:
        desc = self.client.describe_collection(self.name)
        self.fields = frozenset(f["name"] for f in desc["fields"])
        for f in desc["fields"]:
            if f["name"] == "dense":
                self.dim = int(f["params"]["dim"])
            if f["name"] == "sparse":
                self.sparse = True
        self.model = desc.get("description") or None
        self.client.load_collection(self.name)

    def _reload(self) -> None:
        """After a failure: the collections may have been dropped or recreated meanwhile."""
        self.dim, self.sparse, self.model = None, False, None
        self.fields = frozenset()
        self._docs_ready = False
        self._versions.clear()
        if self.client.has_collection(self.name, timeout=self.timeout):
            self._read_schema()
        self._recheck = False

    def refresh(self) -> None:
        """Read the collection's schema again: a long-lived reader (the search API) that
        opened before the first window was written finds the collection once it exists."""
        self._reload()

    def ensure_collection(self, model: str, dim: int, sparse: bool) -> None:
        if self.dim is not None:
            if dim != self.dim:
                raise SchemaMismatch(
                    f"vector of dimension {dim} ({model}) does not fit collection "
                    f"{self.name!r} (dimension {self.dim}, {self.model}); use another "
                    "RAGSTREAM_COLLECTION for another model"
                )
            return
        from pymilvus import DataType, Function, FunctionType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=32)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("url", DataType.VARCHAR, max_length=URL_MAX_BYTES)
        schema.add_field("title", DataType.VARCHAR, max_length=TITLE_MAX_BYTES)
        # analysed: Milvus derives the bm25 field from it (the lexical leg of every search)
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX, enable_analyzer=True)
        schema.add_field("text_hash", DataType.VARCHAR, max_length=HASH_MAX_BYTES)
        schema.add_field("doc_hash", DataType.VARCHAR, max_length=HASH_MAX_BYTES)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("section", DataType.VARCHAR, max_length=SECTION_MAX_BYTES)
        schema.add_field("source", DataType.VARCHAR, max_length=SOURCE_MAX_BYTES)
        schema.add_field("fetched_ms", DataType.INT64)
        schema.add_field("bm25", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(
            Function(
                name="bm25",
                function_type=FunctionType.BM25,
                input_field_names=["text"],
                output_field_names=["bm25"],
            )
        )
        index = self.client.prepare_index_params()
        index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
        index.add_index("bm25", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        if sparse:
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        self.client.create_collection(
            self.name, schema=schema, index_params=index, description=model
        )
        log.info("created collection %s (%s, dim %d, sparse=%s)", self.name, model, dim, sparse)
        self._read_schema()

    def _ensure_docs(self) -> None:
        """The versions collection. Milvus wants a vector field in every collection: a
        2-dimension placeholder (always zeros, never searched) is the cheapest there is."""
        if self._docs_ready:
            return
        if not self.client.has_collection(self.docs_name, timeout=self.timeout):
            from pymilvus import DataType

            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("doc_id", DataType.VARCHAR, is_primary=True, max_length=32)
            schema.add_field("version", DataType.INT64)
            schema.add_field("chunk_count", DataType.INT64)
            schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=2)
            index = self.client.prepare_index_params()
            index.add_index("placeholder", index_type="AUTOINDEX", metric_type="L2")
            self.client.create_collection(
                self.docs_name,
                schema=schema,
                index_params=index,
                description=f"ragstream: latest version written per document of {self.name}",
            )
            log.info("created collection %s (document versions)", self.docs_name)
        self.client.load_collection(self.docs_name, timeout=self.timeout)
        self._docs_ready = True

    def versions(self, docs: Iterable[str]) -> dict[str, int]:
        """The version Milvus holds for each of ``docs`` that has one (cache first)."""
        try:
            return self._lookup(docs)
        except Exception:
            self._recheck = True  # the next attempt re-reads (and reloads) what exists
            raise

    def _lookup(self, docs: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        missing: list[str] = []
        for doc in sorted(set(docs)):
            if not is_doc_id(doc):
                continue  # never written under such an id (quoted_ids would refuse it)
            if doc in self._versions:
                v = self._versions.get(doc)
                if v is not None:
                    out[doc] = v
            else:
                missing.append(doc)
        if not missing:
            return out
        if self._recheck:
            self._reload()
        if not self._docs_ready and not self.client.has_collection(
            self.docs_name, timeout=self.timeout
        ):
            return out  # nothing was ever versioned here
        self._ensure_docs()
        found: dict[str, int] = {}
        for start in range(0, len(missing), LOOKUP_BATCH):
            part = missing[start : start + LOOKUP_BATCH]
            ids = quoted_ids(part)
            rows = self.client.query(
                self.docs_name,
                filter=f"doc_id in [{ids}]",
                output_fields=["doc_id", "version"],
                timeout=self.timeout,
            )
            found.update({r["doc_id"]: int(r["version"]) for r in rows})
        for doc in missing:
            self._versions.put(doc, found.get(doc))
        return out | found

    def forget_versions(self) -> None:
        """Drop the cache (another writer may have written these documents meanwhile)."""
        self._versions.clear()

    def answers(self) -> None:
        """Raise :class:`StoreUnavailable` unless Milvus answers a cheap call now."""
        try:
            self.client.has_collection(self.name, timeout=self.timeout)
        except Exception as exc:
            raise StoreUnavailable(f"Milvus at {self.uri} does not answer: {exc}") from exc

    def write(self, window: Window) -> WriteResult:
        """Upsert the window's rows, trim its documents, remember their versions.

        Idempotent. Raises only when Milvus is unavailable (the caller retries); what
        Milvus refuses for its data comes back in the result, the rest is written.
        """
        try:
            return self._write(window)
        except Exception as exc:
            self._recheck = True  # the next attempt re-reads what exists
            if is_unavailable(exc):
                raise
            raise StoreUnavailable(f"window write failed, not for a row's data: {exc!r}") from exc

    def _write(self, window: Window) -> WriteResult:
        if self._recheck:
            self._reload()
        result = WriteResult()
        rows = list(window.rows.values())
        if rows:
            first = rows[0]
            self.ensure_collection(
                first.model or "?", int(first.dim or 0), first.sparse is not None
            )
        if self.dim is not None:
            payload = [(v, row_of(v, self.sparse, self.fields)) for v in rows]
            batches = request_batches(
                payload,
                [row_bytes(r) for _, r in payload],
                MAX_REQUEST_ROWS,
                MAX_REQUEST_BYTES,
            )
            for batch in batches:
                refused = write_splitting(
                    batch,
                    lambda part: self.client.upsert(
                        self.name, [r for _, r in part], timeout=self.timeout
                    ),
                    self.answers,
                )
                result.refused_rows.extend((v, str(exc)) for (v, _), exc in refused)
                result.upserted += len(batch) - len(refused)
            trims = sorted(window.trims.items())
            refused_trims = write_splitting(
                trims,
                lambda part: self.client.delete(
                    self.name, filter=trim_filter(dict(part)), timeout=self.timeout
                ),
                self.answers,
            )
            result.refused_trims.extend((doc, str(exc)) for (doc, _), exc in refused_trims)
        if window.versions:
            self._remember(window)
        return result

    def _remember(self, window: Window) -> None:
        self._ensure_docs()
        docs = [
            {
                "doc_id": doc,
                "version": version,
                "chunk_count": window.trims.get(doc, 0),
                "placeholder": [0.0, 0.0],
            }
            for doc, version in sorted(window.versions.items())
        ]
        refused = write_splitting(
            docs,
            lambda part: self.client.upsert(self.docs_name, list(part), timeout=self.timeout),
            self.answers,
        )
        for row, exc in refused:  # cannot happen with validated messages; never silent
            log.error("cannot record version of %s: %r", row["doc_id"], exc)
        bad = {row["doc_id"] for row, _ in refused}
        for doc, version in window.versions.items():
            if doc not in bad:
                self._versions.put(doc, version)

    def count(self) -> int:
        if not self.client.has_collection(self.name):
            return 0
        res = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def legs(self) -> frozenset[str]:
        """The search legs this collection can serve (empty when it does not exist yet)."""
        if self.dim is None:
            return frozenset()
        have = {"dense"}
        if self.sparse:
            have.add("sparse")
        if "bm25" in self.fields:
            have.add("bm25")
        return frozenset(have)

    def plan(
        self,
        mode: SearchMode = "hybrid",
        weights: Mapping[str, float] | None = None,
        *,
        text: bool = True,
        sparse: bool = True,
    ) -> SearchPlan:
        """What :meth:`search` will run for ``mode`` here, with the notes to show the user;
        ``text`` and ``sparse`` say whether the query has a text and a learned sparse vector."""
        have = set(self.legs())
        why: dict[str, str] = {}
        if "bm25" not in have:
            why["bm25"] = (
                f"collection {self.name!r} has no bm25 field (created by an older ragstream; "
                "docs/runbooks.md says how to upgrade)"
            )
        if "sparse" not in have:
            why["sparse"] = f"collection {self.name!r} has no learned sparse field (not BGE-M3)"
        if not text and "bm25" in have:
            have.discard("bm25")
            why["bm25"] = "no query text given"
        if not sparse and "sparse" in have:
            have.discard("sparse")
            why["sparse"] = "the query has no sparse vector (empty after encoding)"
        return plan_search(mode, have, weights, why)

    def search(
        self,
        dense: np.ndarray | None = None,
        k: int = 5,
        *,
        text: str | None = None,
        sparse: Mapping[int, float] | None = None,
        mode: SearchMode = "hybrid",
        weights: Mapping[str, float] | None = None,
        filters: Filters | None = None,
        plan: SearchPlan | None = None,
    ) -> list[Hit]:
        """The ``k`` best chunks, best first (``[]`` when the collection does not exist).

        Legs run with the inputs given: ``dense`` (the query's dense vector, required),
        ``text`` (the query itself, for bm25), ``sparse`` (BGE-M3's query weights). ``mode``
        ``hybrid`` fuses every leg the collection and the inputs allow; without ``text``
        and ``sparse`` it is a dense search, as before hybrid search existed. ``weights``
        (leg -> 0..1) fuse with Milvus' ``WeightedRanker``, else ``RRFRanker(60)``. A leg the
        collection lacks falls back as :meth:`plan` says: its notes are logged, unless the
        caller passes the ``plan`` it made (and shows its notes itself). A filter on a field
        the collection lacks is ``BadRequest``. Milvus away: ``StoreUnavailable``.
        """
        if self.dim is None:
            return []
        if plan is None:
            plan = self.plan(mode, weights, text=bool(text), sparse=bool(sparse))
            for note in plan.notes:
                log.warning("search: %s", note)
        lacking = [f for f in (filters.fields() if filters else []) if f not in self.fields]
        if lacking:
            raise BadRequest(
                f"collection {self.name!r} has no {', '.join(lacking)} field (created by an "
                "older ragstream): it cannot be filtered so; docs/runbooks.md says how to upgrade"
            )
        if "dense" in plan.legs and dense is None:
            raise BadRequest("a dense search needs the query's dense vector")
        expr = filter_expr(filters)
        out_fields = [f for f in HIT_FIELDS if f in self.fields]
        inputs: dict[str, tuple[Any, dict[str, Any]]] = {
            "dense": (np.asarray(dense, dtype=np.float32), {"metric_type": "COSINE"}),
            "sparse": (dict(sparse or {}), {"metric_type": "IP"}),
            "bm25": (text, {"metric_type": "BM25"}),
        }
        try:
            if len(plan.legs) == 1:
                leg = plan.legs[0]
                data, params = inputs[leg]
                res = self.client.search(
                    self.name,
                    data=[data],
                    anns_field=leg,
                    limit=k,
                    filter=expr,
                    output_fields=out_fields,
                    search_params=params,
                    timeout=self.timeout,
                )
            else:
                from pymilvus import AnnSearchRequest, RRFRanker, WeightedRanker

                depth = leg_depth(k)
                reqs = [
                    AnnSearchRequest([inputs[leg][0]], leg, inputs[leg][1], depth, expr=expr)
                    for leg in plan.legs
                ]
                ranker = RRFRanker(RRF_K) if plan.weights is None else WeightedRanker(*plan.weights)
                res = self.client.hybrid_search(
                    self.name, reqs, ranker, limit=k, output_fields=out_fields, timeout=self.timeout
                )
        except Exception as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(f"Milvus at {self.uri} cannot search now: {exc}") from exc
            raise
        # Milvus Lite reports BM25 as a negative distance (best most negative), a server as
        # a positive score: the magnitude is the score either way.
        lexical = plan.legs == ("bm25",)
        return [
            Hit(
                id=h["id"],
                score=abs(float(h["distance"])) if lexical else float(h["distance"]),
                url=h["entity"].get("url", ""),
                title=h["entity"].get("title", ""),
                text=h["entity"].get("text", ""),
                chunk_index=int(h["entity"].get("chunk_index", 0)),
                section=h["entity"].get("section", "") or "",
            )
            for h in res[0]
        ]

    def rows(self, fields: Sequence[str] = ("id", "text_hash")) -> list[dict[str, Any]]:
        """Every row (for tests and audits); iterates so it is not capped by query limits."""
        if not self.client.has_collection(self.name):
            return []
        it = self.client.query_iterator(
            self.name, filter="", output_fields=list(fields), batch_size=1000
        )
        out: list[dict[str, Any]] = []
        while True:
            batch = it.next()
            if not batch:
                it.close()
                return out
            out.extend(batch)

    def close(self) -> None:
        self.client.close()
