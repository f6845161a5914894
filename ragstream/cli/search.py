"""``ragstream search``: embed a query with the pipeline's model and ask Milvus.

Hybrid by default: the model's dense vector, BGE-M3's learned sparse vector when the
collection has one, and BM25 on the chunk text, fused by reciprocal rank (RRF, k=60).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any

import orjson

from ops.search import MAX_K, search
from streams.settings import Settings
from streams.store import LEGS, MODES, Hit, parse_mode, parse_weights
from streams.timeparse import parse_time


def _k(text: str) -> int:
    k = int(text)
    if not 1 <= k <= MAX_K:
        raise ValueError(text)
    return k


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("search", help="search the index", description=__doc__)
    p.add_argument("query", help="what to look for")
    p.add_argument("-k", type=_k, default=5, help=f"number of hits, 1..{MAX_K} (5)")
    p.add_argument(
        "--mode",
        type=parse_mode,
        default="hybrid",
        help=f"{', '.join(MODES)} (default hybrid: dense + sparse legs fused by RRF; sparse: "
        "BGE-M3's learned sparse vector, else BM25; bm25: exact words and identifiers)",
    )
    p.add_argument(
        "--weights",
        type=parse_weights,
        metavar="LEG=W,...",
        help=f"fuse by weighted score instead of RRF; legs {', '.join(LEGS)}, each 0..1, a leg "
        "left out weighs 1, a leg at 0 is not run (e.g. dense=1,bm25=0.5)",
    )
    p.add_argument("--url-prefix", metavar="PREFIX", help="only URLs starting with PREFIX")
    p.add_argument("--source", help="only pages requested by SOURCE (cli, webhook, sitemap...)")
    p.add_argument(
        "--since",
        type=parse_time,
        metavar="WHEN",
        help="only chunks fetched since WHEN: 2h, 7d, or an ISO 8601 time (as dlq --since)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the hits")
    p.set_defaults(func=cmd_search)


def format_hit(rank: int, hit: Hit, width: int = 100) -> str:
    words = " ".join(hit.text.split())
    snippet = textwrap.shorten(words, width=width, placeholder=" ...")
    where = f"  [{hit.section}]" if hit.section else f"  [chunk {hit.chunk_index}]"
    return f"{rank:>2}. {hit.score:.3f}  {hit.url}{where}\n    {snippet}"


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    result = search(
        settings,
        args.query,
        args.k,
        mode=args.mode,
        weights=args.weights,
        url_prefix=args.url_prefix,
        source=args.source,
        since=args.since,
    )
    for note in result.notes:
        print(f"ragstream: note: {note}", file=sys.stderr)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result.as_json()) + b"\n")
        sys.stdout.flush()
    elif result.hits:
        for i, hit in enumerate(result.hits, 1):
            print(format_hit(i, hit))
    else:
        print("no hits")
    return 0 if result.hits else 1
