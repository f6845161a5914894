"""``ragstream search``: embed a query with the pipeline's model and ask Milvus."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from ops.search import search
from streams.settings import Settings
from streams.store import Hit


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("search", help="search the index", description=__doc__)
    p.add_argument("query", help="what to look for")
    p.add_argument("-k", type=int, default=5, help="number of hits (5)")
    p.set_defaults(func=cmd_search)


def format_hit(rank: int, hit: Hit, width: int = 100) -> str:
    words = " ".join(hit.text.split())
    snippet = textwrap.shorten(words, width=width, placeholder=" ...")
    return f"{rank:>2}. {hit.score:.3f}  {hit.url}  [chunk {hit.chunk_index}]\n    {snippet}"


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    hits = search(settings, args.query, args.k)
    if not hits:
        print("no hits")
        return 1
    for i, hit in enumerate(hits, 1):
        print(format_hit(i, hit))
    return 0
