"""Searching the index: embed a query with the pipeline's model and ask Milvus.

Takes its settings rather than reading the environment, so a caller that derived its own
(the demo picks a model) searches with exactly those, and the embedder that answers is the
one that built the collection, or the search says which model to set.

One :class:`Searcher` serves the CLI (one query), the Python API (``ragstream.Index``) and
the HTTP route (``GET /v1/search``), so the three return the same hits for the same query:
they differ only in how long the model and the Milvus client stay open. Both are opened on
the first search that needs them, so a process that may search (the webhook server) starts
without a model, and a ``bm25`` search never loads one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from streams.errors import BadRequest, ConfigError, RagstreamError, StoreUnavailable
from streams.settings import Settings
from streams.store import (
    Filters,
    Hit,
    MilvusStore,
    SearchMode,
    filter_expr,
    parse_mode,
    parse_weights,
)
from streams.timeparse import parse_time, to_epoch_ms

if TYPE_CHECKING:
    from streams.embedder import Embedder

log = logging.getLogger(__name__)

#: Longest query accepted, in characters: the model reads a few hundred tokens at most, and
#: an HTTP caller must not make the tokenizer chew megabytes.
MAX_QUERY_CHARS = 2000
#: Most hits one search returns (Milvus allows far more; a RAG prompt wants a handful).
MAX_K = 100
#: Longest ``url_prefix`` or ``source`` accepted (a URL is at most 2048 bytes in the index).
MAX_FILTER_CHARS = 2048


@dataclasses.dataclass(frozen=True, slots=True)
class SearchResult:
    """The hits, best first, and how they were found: the mode asked for, the legs that
    ran (``dense``, ``sparse``, ``bm25``) and what could not be done as asked (notes)."""

    query: str
    mode: SearchMode
    legs: tuple[str, ...]
    notes: tuple[str, ...]
    hits: list[Hit]

    def as_json(self) -> dict[str, Any]:
        """The JSON shape of ``ragstream search --json`` and ``GET /v1/search``."""
        return {
            "query": self.query,
            "mode": self.mode,
            "legs": list(self.legs),
            "notes": list(self.notes),
            "hits": [dataclasses.asdict(h) for h in self.hits],
        }


def check_query(query: str, k: int) -> str:
    """``query`` stripped, or ``BadRequest`` when it is empty or longer than
    :data:`MAX_QUERY_CHARS`, or ``k`` outside 1..:data:`MAX_K`."""
    if not isinstance(query, str) or not query.strip():
        raise BadRequest("empty query")
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(f"query is {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be an integer within 1..{MAX_K}, got {k!r}")
    return query.strip()


def make_filters(
    url_prefix: str | None = None, source: str | None = None, since: str | datetime | None = None
) -> Filters:
    """The filters of a search from what a person writes: ``since`` in the syntax of
    ``dlq --since`` (``2h``, ``7d``, an ISO 8601 time; :mod:`streams.timeparse`)."""
    for name, value in (("url_prefix", url_prefix), ("source", source)):
        if value is not None and len(value) > MAX_FILTER_CHARS:
            raise BadRequest(f"{name} is longer than {MAX_FILTER_CHARS} characters")
    since_ms = None
    if since is not None:
        when = since if isinstance(since, datetime) else parse_time(since)
        since_ms = to_epoch_ms(when)
    filters = Filters(url_prefix=url_prefix or None, source=source, since_ms=since_ms)
    filter_expr(filters)  # refuses what cannot be a filter (control characters) up front
    return filters


class SearchOptions(TypedDict, total=False):
    """The keyword arguments of :meth:`Searcher.search` (meanings and defaults there), for
    the callers that pass them through (:func:`search`, ``ragstream.Index``)."""

    mode: str
    weights: Mapping[str, float] | str | None
    url_prefix: str | None
    source: str | None
    since: str | datetime | None


class Searcher:
    """The model and the Milvus client, opened on first use and kept across searches;
    thread-safe (the HTTP route searches from worker threads). ``close()`` or ``with``."""

    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self._embedder = embedder
        self._store: MilvusStore | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def _open_store(self) -> MilvusStore:
        """The store, its collection read; reopened after an outage, and re-read while the
        collection does not exist yet (a worker may create it meanwhile)."""
        with self._lock:
            if self._store is None:
                self._store = MilvusStore(self.settings)
            store = self._store
            if store.dim is None:
                try:
                    store.refresh()
                except Exception as exc:
                    self._drop_store()
                    raise StoreUnavailable(f"Milvus at {store.uri} does not answer: {exc}") from exc
            if store.dim is None:
                raise RagstreamError(
                    f"collection {self.settings.collection!r} at {store.uri} is empty or "
                    "missing: publish some URLs and run a worker first"
                )
            return store

    def _drop_store(self) -> None:
        if self._store is not None:
            try:
                self._store.close()
            except Exception as exc:  # closing a broken client: nothing more to do
                log.debug("closing Milvus client: %r", exc)
            self._store = None

    def embedder(self) -> Embedder:
        """The model, loaded once (seconds, and torch's memory) on the first search that
        needs it."""
        with self._lock:
            if self._embedder is None:
                from streams.embedder import Embedder  # heavy (torch): imported only to search

                self._embedder = Embedder(self.settings)
            return self._embedder

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        mode: str = "hybrid",
        weights: Mapping[str, float] | str | None = None,
        url_prefix: str | None = None,
        source: str | None = None,
        since: str | datetime | None = None,
    ) -> SearchResult:
        """The ``k`` chunks best matching ``query``, best first.

        ``mode``: ``hybrid`` (dense + learned sparse + BM25, fused by reciprocal rank),
        ``dense``, ``sparse`` (learned when the collection has it, else BM25) or ``bm25``;
        ``weights`` (``{"dense": 1, "bm25": 0.5}`` or ``"dense=1,bm25=0.5"``, each 0..1)
        fuse by weighted score instead. Filters: ``url_prefix`` (literal), ``source`` (the
        ``urls`` request's), ``since`` (fetched at or after; ``2h``, ``7d``, ISO 8601).

        Raises ``BadRequest`` for bad arguments or a filter the collection cannot serve,
        :class:`~streams.errors.StoreUnavailable` when Milvus cannot be reached, a
        :class:`~streams.errors.RagstreamError` when nothing was indexed yet, and a
        :class:`~streams.errors.ConfigError` when ``settings.model`` is not the model the
        collection was built with (its vectors would not be comparable).
        """
        query = check_query(query, k)
        chosen = parse_mode(mode)
        if isinstance(weights, str):
            weights = parse_weights(weights)
        elif weights is not None:
            weights = parse_weights(",".join(f"{leg}={w}" for leg, w in weights.items()))
        filters = make_filters(url_prefix, source, since)
        store = self._open_store()
        try:
            plan = store.plan(chosen, weights)
            dense = sparse = None
            if {"dense", "sparse"} & set(plan.legs):
                embedder = self.embedder()
                if embedder.dim != store.dim:
                    raise ConfigError(
                        f"model {self.settings.model} gives dimension {embedder.dim} but the "
                        f"collection was built with {store.model} (dimension {store.dim}): set "
                        "RAGSTREAM_MODEL to it"
                    )
                enc = embedder.encode([query])
                dense = enc.dense[0]
                sparse = enc.sparse[0] if enc.sparse else None
            plan = store.plan(chosen, weights, sparse=bool(sparse) or not store.sparse)
            hits = store.search(dense, k, text=query, sparse=sparse, filters=filters, plan=plan)
        except StoreUnavailable:
            with self._lock:
                self._drop_store()  # reopened by the next search
            raise
        return SearchResult(query=query, mode=chosen, legs=plan.legs, notes=plan.notes, hits=hits)


def search(
    settings: Settings, query: str, k: int = 5, **options: Unpack[SearchOptions]
) -> SearchResult:
    """One search with a model and a client opened for it (the CLI): see :meth:`Searcher.search`."""
    with Searcher(settings) as searcher:
        return searcher.search(query, k, **options)
