"""``ragstream publish``: URLs from arguments, a file, or stdin, onto the ``urls`` topic."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterator
from typing import Any

from ragstream.errors import RagstreamError
from ragstream.publisher import publish
from streams.ids import normalize_url
from streams.messages import UrlRequest
from streams.settings import get_settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "publish",
        help="publish URLs to ingest (arguments, --file, or - for stdin)",
        description="Publish URLs to the urls topic and wait until the broker acknowledged them.",
    )
    p.add_argument("urls", nargs="*", help="URLs; '-' reads one URL per line from stdin")
    p.add_argument("--file", "-f", action="append", default=[], help="file with one URL a line")
    p.add_argument("--source", default="cli", help="recorded as the request's source")
    p.add_argument("--force", action="store_true", help="re-embed even if unchanged")
    p.add_argument("--delete", action="store_true", help="remove these pages from the index")
    p.set_defaults(func=cmd_publish)


def read_urls(args: argparse.Namespace) -> Iterator[str]:
    for u in args.urls:
        if u == "-":
            yield from sys.stdin
        else:
            yield u
    for path in args.file:
        try:
            with open(path, encoding="utf-8") as fh:
                yield from fh
        except OSError as exc:
            raise RagstreamError(f"cannot read {path}: {exc.strerror}") from None


def parse_urls(lines: Iterator[str]) -> tuple[list[str], list[str]]:
    """Valid URLs (deduplicated, in order) and the lines that are not http(s) URLs."""
    good: dict[str, None] = {}
    bad: list[str] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            normalize_url(line)
        except ValueError:
            bad.append(line)
            continue
        good[line] = None
    return list(good), bad


def cmd_publish(args: argparse.Namespace) -> int:
    settings = get_settings()
    urls, bad = parse_urls(read_urls(args))
    for line in bad:
        print(f"skipped (not an http(s) URL): {line}", file=sys.stderr)
    if not urls:
        raise RagstreamError("no URLs to publish (give URLs, --file FILE, or - for stdin)")
    reqs = (
        UrlRequest(url=u, source=args.source, force=args.force, delete=args.delete) for u in urls
    )
    n = asyncio.run(publish(settings, reqs))
    print(
        f"published {n} URL{'s' if n != 1 else ''} to {settings.topic('urls')} on {settings.broker}"
    )
    return 1 if bad else 0
