"""``ragstream search``: embed a query with the pipeline's model and ask Milvus."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from streams.errors import RagstreamError, StoreUnavailable
from streams.settings import get_settings
from streams.store import Hit, MilvusStore


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("search", help="search the index", description=__doc__)
    p.add_argument("query", help="what to look for")
    p.add_argument("-k", type=int, default=5, help="number of hits (5)")
    p.set_defaults(func=cmd_search)


def search(query: str, k: int) -> list[Hit]:
    from streams.embedder import Embedder  # noqa: PLC0415 - heavy import, only here

    settings = get_settings()
    try:
        store = MilvusStore(settings)
    except StoreUnavailable as exc:
        raise RagstreamError(str(exc)) from None
    try:
        if store.dim is None:
            raise RagstreamError(
                f"collection {settings.collection!r} at {store.uri} is empty or missing: "
                "publish some URLs and run a worker first"
            )
        embedder = Embedder(settings)
        if embedder.dim != store.dim:
            raise RagstreamError(
                f"model {settings.model} gives dimension {embedder.dim} but the collection was "
                f"built with {store.model} (dimension {store.dim}): set RAGSTREAM_MODEL to it"
            )
        return store.search(embedder.encode([query]).dense[0], k)
    finally:
        store.close()


def format_hit(rank: int, hit: Hit, width: int = 100) -> str:
    words = " ".join(hit.text.split())
    snippet = textwrap.shorten(words, width=width, placeholder=" ...")
    return f"{rank:>2}. {hit.score:.3f}  {hit.url}  [chunk {hit.chunk_index}]\n    {snippet}"


def cmd_search(args: argparse.Namespace) -> int:
    hits = search(args.query, args.k)
    if not hits:
        print("no hits")
        return 1
    for i, hit in enumerate(hits, 1):
        print(format_hit(i, hit))
    return 0
