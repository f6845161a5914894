"""Searching the index: embed a query with the pipeline's model and ask Milvus.

Takes its settings rather than reading the environment, so a caller that derived its own
(the demo picks a model) searches with exactly those, and the embedder that answers is the
one that built the collection, or the search says which model to set.
"""

from __future__ import annotations

from streams.errors import ConfigError, RagstreamError
from streams.settings import Settings
from streams.store import Hit, MilvusStore


def search(settings: Settings, query: str, k: int) -> list[Hit]:
    """The ``k`` chunks nearest to ``query``, best first.

    Raises :class:`~streams.errors.StoreUnavailable` when Milvus cannot be opened, a
    :class:`~streams.errors.RagstreamError` when nothing was indexed yet, and a
    :class:`~streams.errors.ConfigError` when ``settings.model`` is not the model the
    collection was built with (its vectors would not be comparable).
    """
    from streams.embedder import Embedder  # heavy (torch): imported only to search

    store = MilvusStore(settings)
    try:
        if store.dim is None:
            raise RagstreamError(
                f"collection {settings.collection!r} at {store.uri} is empty or missing: "
                "publish some URLs and run a worker first"
            )
        embedder = Embedder(settings)
        if embedder.dim != store.dim:
            raise ConfigError(
                f"model {settings.model} gives dimension {embedder.dim} but the collection was "
                f"built with {store.model} (dimension {store.dim}): set RAGSTREAM_MODEL to it"
            )
        return store.search(embedder.encode([query]).dense[0], k)
    finally:
        store.close()
