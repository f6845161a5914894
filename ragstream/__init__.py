"""ragstream: keep a Milvus index in step with web pages, through Kafka.

Operations live here (CLI, the local broker, the demo, the worker supervisor); the Faust
app, messages and pure logic live in :mod:`streams`; the three stages in :mod:`agents`.

For RAG applications, :class:`Index` searches what the pipeline indexed::

    from ragstream import Index

    with Index() as index:                      # settings from the environment, read once
        for hit in index.search("how do I read a file", k=5):
            print(hit.score, hit.url, hit.section, hit.text[:80])

Importing this package stays cheap (the CLI imports it for every verb): the search library,
pymilvus and torch are imported on the first :meth:`Index.search`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Unpack

if TYPE_CHECKING:
    from ops.search import Searcher, SearchOptions, SearchResult
    from streams.settings import Settings
    from streams.store import Hit

__version__ = "0.1.0"
__all__ = ["Hit", "Index", "SearchResult", "__version__"]


class Index:
    """The index a ragstream pipeline keeps, for searching from Python.

    Reads its settings from the environment once (``RAGSTREAM_MODEL``, ``MILVUS_URI``,
    ``RAGSTREAM_COLLECTION``...) unless given ``settings``; opens the model and the Milvus
    client on the first search and keeps them open until :meth:`close` (or the end of a
    ``with`` block), so each later search costs one encode and one Milvus call. Safe to
    share between threads. Returns the same hits as ``ragstream search`` and
    ``GET /v1/search`` for the same arguments.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        if settings is None:
            from streams.settings import get_settings

            settings = get_settings()
        self.settings = settings
        self._searcher: Searcher | None = None

    def _get(self) -> Searcher:
        if self._searcher is None:
            from ops.search import Searcher

            self._searcher = Searcher(self.settings)
        return self._searcher

    def search(self, query: str, k: int = 5, **options: Unpack[SearchOptions]) -> list[Hit]:
        """The ``k`` chunks best matching ``query``, best first (:class:`Hit`: ``.url``,
        ``.text``, ``.section``, ``.title``, ``.score``, ``.chunk_index``, ``.id``).
        Arguments as :meth:`search_result`."""
        return self.search_result(query, k, **options).hits

    def search_result(
        self, query: str, k: int = 5, **options: Unpack[SearchOptions]
    ) -> SearchResult:
        """The hits with how they were found (legs run, fallback notes).

        ``mode``: ``hybrid`` (default), ``dense``, ``sparse`` or ``bm25``; ``weights``
        (``{"dense": 1, "bm25": 0.5}``) fuse by weighted score instead of reciprocal rank;
        ``url_prefix``, ``source`` and ``since`` (``"2h"``, ``"7d"``, ISO 8601 or a
        datetime) filter (:meth:`ops.search.Searcher.search`). Errors are
        :mod:`streams.errors`' (``BadRequest``, ``StoreUnavailable``...), all
        ``RagstreamError``.
        """
        return self._get().search(query, k, **options)

    def close(self) -> None:
        if self._searcher is not None:
            self._searcher.close()
            self._searcher = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def __getattr__(name: str) -> Any:
    """``ragstream.Hit`` and ``ragstream.SearchResult``, imported when first asked for."""
    if name == "Hit":
        from streams.store import Hit

        return Hit
    if name == "SearchResult":
        from ops.search import SearchResult

        return SearchResult
    raise AttributeError(f"module 'ragstream' has no attribute {name!r}")
