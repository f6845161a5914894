"""``ragstream publish``: URLs from arguments, files, stdin or sitemaps, onto ``urls``.

With ``--wait`` it then follows the published URLs through every stage (from the stages'
committed offsets, so it works with workers anywhere) until each one is searchable or
dead-lettered, and prints a summary with the failures by reason, read back from the
dead-letter topics.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ops import crawl as ops_crawl
from ops.follow import Baseline, Failures, failures_since, follow
from ops.github import list_repo, listing_requests
from ops.localfiles import expand, is_local_path
from ops.progress import Snapshot
from ops.publisher import publish
from ops.sitemaps import MAX_DEPTH, is_sitemap_ref, read_sitemaps
from streams import kafka
from streams.crawl import DEFAULT_MAX_DEPTH, DEFAULT_MAX_PAGES, Crawl
from streams.errors import ConfigError, RagstreamError
from streams.github import parse_repo
from streams.ids import normalize_url
from streams.messages import UrlRequest
from streams.settings import Settings

#: Above this many URLs, publishing shows a progress bar.
HANDFUL = 10
#: Exit status when --wait gave up before every URL was through (2 is a usage error).
EXIT_TIMEOUT = 3

EPILOG = """\
examples:
  ragstream publish https://docs.python.org/3/tutorial/index.html
  ragstream publish --file urls.txt
  ragstream publish --sitemap https://example.org/sitemap.xml --wait --timeout 1800
  ragstream publish https://example.org/sitemap_index.xml        # *.xml(.gz): a sitemap
  ragstream publish ./docs     # files on disk, as file:// URLs (see RAGSTREAM_FETCH_ALLOW)
  ragstream publish --github django/django --ref main --glob 'docs/**/*.txt' --wait
  ragstream publish --crawl https://example.org/docs/ --max-pages 500 --wait

exit status: 0 all done; 1 some URLs were skipped, unreadable or dead-lettered;
2 usage error; 3 --wait timed out; 69 Kafka cannot be reached.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "publish",
        help="publish URLs to ingest (arguments, --file, - for stdin, --sitemap)",
        description="Publish URLs to the urls topic and wait until the broker acknowledged "
        "them; with --wait, until they are searchable.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "urls",
        nargs="*",
        help="URLs; '-' reads one URL per line from stdin; one ending in .xml or .xml.gz is "
        "read as a sitemap; a file or directory on disk publishes its files (file:// URLs, "
        "allowed by a file:///dir entry in RAGSTREAM_FETCH_ALLOW)",
    )
    p.add_argument("--file", "-f", action="append", default=[], help="file with one URL a line")
    p.add_argument(
        "--sitemap",
        action="append",
        default=[],
        metavar="URL",
        help="a sitemap or sitemap index (repeatable; gzip too; a local file works)",
    )
    p.add_argument(
        "--sitemap-depth",
        type=int,
        default=MAX_DEPTH,
        metavar="N",
        help=f"follow sitemap indexes this many levels deep ({MAX_DEPTH})",
    )
    p.add_argument(
        "--github",
        metavar="OWNER/REPO",
        help="publish a GitHub repository's files (raw URLs), listed through the REST API "
        "(GITHUB_TOKEN, RAGSTREAM_GITHUB_API); rate limits are waited out",
    )
    p.add_argument(
        "--ref", help="with --github: branch, tag or commit (default: the default branch)"
    )
    p.add_argument(
        "--glob",
        action="append",
        default=[],
        metavar="GLOB",
        help="with --github: paths to publish, e.g. 'docs/**/*.txt' (repeatable; default "
        "RAGSTREAM_GITHUB_GLOBS)",
    )
    p.add_argument("--source", default="cli", help="recorded as the request's source")
    p.add_argument("--force", action="store_true", help="re-embed even if unchanged")
    p.add_argument("--delete", action="store_true", help="remove these pages from the index")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the URLs until each is searchable or dead-lettered, then summarise",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="with --wait: give up after S seconds (exit status 3)",
    )
    add_crawl_arguments(p)
    p.set_defaults(func=cmd_publish)


def split_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Positional arguments that are plain URLs (or '-'), and the sitemaps: every
    ``--sitemap`` plus arguments whose path ends in ``.xml`` / ``.xml.gz``."""
    plain = [u for u in args.urls if u == "-" or not is_sitemap_ref(u)]
    maps = list(args.sitemap) + [u for u in args.urls if u != "-" and is_sitemap_ref(u)]
    return plain, maps


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


# --- summarising -------------------------------------------------------------------------


def summary_lines(
    n_urls: int, snap: Snapshot, failures: Failures, elapsed_s: float, timed_out: bool
) -> list[str]:
    """The summary printed after ``--wait``: counts since the baseline, failures by reason."""
    failed = failures.failed_urls("fetch")
    head = "TIMED OUT" if timed_out else "done"
    # Delayed retries come back through ``urls``, so the fetch stage's message count can
    # exceed the URLs published: once done, every URL was either fetched or failed.
    fetched = n_urls if not timed_out else min(snap.fetched, n_urls)
    lines = [
        f"summary ({head} after {elapsed_s:.1f}s): {n_urls} URLs",
        f"  pages fetched:   {max(fetched - failed, 0)}",
        f"  failed:          {failed}",
        f"  chunks:          {snap.chunks}",
        f"  vectors written: {snap.written}",
    ]
    if timed_out:
        lines.append(
            f"  still in flight: {max(snap.urls - snap.fetched, 0)} URLs, "
            f"{max(snap.chunks - snap.embedded, 0)} chunks, "
            f"{max(snap.vectors - snap.written, 0)} vectors"
        )
    if failures.counts:
        lines.append("failures by reason:")
        for (stage, cls), n in sorted(failures.counts.items()):
            lines.append(f"  {stage} {cls}: {n}  (e.g. {failures.examples[(stage, cls)]})")
    else:
        lines.append("failures by reason: none")
    if failures.other:
        lines.append(f"  ({failures.other} other dead letters meanwhile, not about these URLs)")
    return lines


def _bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


async def run(
    settings: Settings,
    urls: list[str],
    args: argparse.Namespace,
    console: Console,
    requests: list[UrlRequest] | None = None,
) -> int:
    """Publish (and with ``--wait`` follow) ``urls``, or ``requests`` ready made (their URLs
    are ``urls``); returns the exit status part."""
    reqs = requests or (
        UrlRequest(url=u, source=args.source, force=args.force, delete=args.delete) for u in urls
    )
    base = await Baseline.take(settings) if args.wait else None
    t0 = time.monotonic()
    if len(urls) > HANDFUL:
        with _bars(console) as bar:
            task = bar.add_task("published       ", total=len(urls))
            n = await publish(settings, reqs, lambda k: bar.update(task, completed=k))
    else:
        n = await publish(settings, reqs)
    print(
        f"published {n} URL{'s' if n != 1 else ''} to {settings.topic('urls')} on {settings.broker}"
    )
    if base is None:
        return 0
    with _bars(console) as bar:
        pages = bar.add_task("pages fetched   ", total=n)
        embedded = bar.add_task("chunks embedded ", total=None)
        written = bar.add_task("vectors written ", total=None)

        def update(s: Snapshot) -> None:
            bar.update(pages, completed=min(s.fetched, n))
            bar.update(embedded, completed=s.embedded, total=s.chunks or None)
            bar.update(written, completed=s.written, total=s.vectors or None)

        snap, timed_out = await follow(settings, base, n, update, timeout_s=args.timeout)
    failures = await failures_since(settings, base.dead, urls)
    for line in summary_lines(n, snap, failures, time.monotonic() - t0, timed_out):
        print(line)
    if timed_out:
        return EXIT_TIMEOUT
    return 1 if failures.total else 0


def publish_github(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    """``--github``: list the repository (waiting out rate limits), then publish."""
    if args.urls or args.file or args.sitemap:
        raise ConfigError("--github publishes a repository alone: give URLs in another run")
    repo = parse_repo(args.github)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # the waits are printed instead

    def say(message: str) -> None:
        print(message, file=sys.stderr)

    listing = asyncio.run(list_repo(settings, repo, args.ref, args.glob or None, say=say))
    print(
        f"listed {repo}@{listing.ref} ({listing.commit[:12]}): {len(listing.files)} of "
        f"{listing.blobs} files match, {listing.requests} API requests, "
        f"{listing.waited_s:.0f}s waited for rate limits",
        file=sys.stderr,
    )
    requests = listing_requests(settings, listing, force=args.force, delete=args.delete, say=say)
    if not requests:
        raise RagstreamError(f"no file of {repo}@{listing.ref} matches the globs")
    urls = [r.url for r in requests]
    with kafka.translated(settings):
        status = asyncio.run(run(settings, urls, args, console, requests))
    return max(status, 1 if len(requests) < len(listing.files) else 0)


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    if args.crawl:
        return cmd_crawl(args, settings)
    console = Console(stderr=True)
    if args.github:
        return publish_github(args, settings, console)
    args.urls, sitemaps = split_args(args)
    local = [u for u in args.urls if is_local_path(u)]
    args.urls = [u for u in args.urls if u not in local]
    lines = list(read_urls(args))
    if local:
        found = expand(local, settings.fetch_policy)
        print(
            f"found {len(found.urls)} files in {', '.join(local)} ({found.skipped} passed over)",
            file=sys.stderr,
        )
        lines.extend(found.urls)
    status = 0
    if sitemaps:
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per sitemap
        crawl = asyncio.run(
            read_sitemaps(sitemaps, max_depth=args.sitemap_depth, settings=settings)
        )
        for error in crawl.errors:
            print(f"sitemap skipped: {error}", file=sys.stderr)
        print(
            f"read {len(crawl.sitemaps)} sitemap{'s' if len(crawl.sitemaps) != 1 else ''}: "
            f"{len(crawl.urls)} URLs",
            file=sys.stderr,
        )
        lines.extend(crawl.urls)
        status = 1 if crawl.errors else 0
    urls, bad = parse_urls(iter(lines))
    for line in bad:
        print(f"skipped (not an http(s) URL): {line}", file=sys.stderr)
    if not urls:
        raise RagstreamError(
            "no URLs to publish (give URLs, --file FILE, - for stdin, or --sitemap URL)"
        )
    if bad:
        status = 1
    with kafka.translated(settings):
        return max(asyncio.run(run(settings, urls, args, console)), status)


# --- crawling (publish --crawl): ops/crawl.py starts and follows, streams/crawl.py rules ---


def add_crawl_arguments(p: Any) -> None:
    """The crawl options of ``publish`` (``--crawl`` and what shapes the crawl)."""
    g = p.add_argument_group("crawling (the fetch workers follow the links)")
    g.add_argument(
        "--crawl",
        action="append",
        default=[],
        metavar="URL",
        help="crawl from URL: its pages' links in scope are fetched too (repeatable)",
    )
    g.add_argument(
        "--scope",
        metavar="PREFIX",
        help="follow only URLs starting with PREFIX (default: the root's scheme, host, "
        "port and directory)",
    )
    g.add_argument(
        "--max-depth",
        type=int,
        default=DEFAULT_MAX_DEPTH,
        metavar="N",
        help=f"follow links at most N hops from the root ({DEFAULT_MAX_DEPTH})",
    )
    g.add_argument(
        "--max-pages",
        type=int,
        default=DEFAULT_MAX_PAGES,
        metavar="N",
        help=f"fetch at most N pages per crawl ({DEFAULT_MAX_PAGES})",
    )
    g.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="follow only URLs matching one such glob (on the whole URL; repeatable)",
    )
    g.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="never follow URLs matching the glob (on the whole URL; repeatable)",
    )
    g.add_argument(
        "--every",
        metavar="DURATION",
        help="crawl again each DURATION (30m, 1h, 1d) until interrupted; unchanged pages "
        "cost one conditional GET each",
    )


def crawls_of(args: argparse.Namespace) -> list[Crawl]:
    """One new crawl (a fresh id) per ``--crawl`` root."""
    out = []
    for root in args.crawl:
        try:
            out.append(
                Crawl.start(
                    ops_crawl.new_crawl_id(),
                    root,
                    scope=args.scope,
                    max_depth=args.max_depth,
                    max_pages=args.max_pages,
                    include=args.include,
                    exclude=args.exclude,
                )
            )
        except ValueError as exc:
            raise RagstreamError(f"--crawl {root}: {exc}") from None
    return out


def crawl_summary_lines(followed: ops_crawl.Followed, elapsed_s: float) -> list[str]:
    head = "TIMED OUT" if followed.timed_out else "done"
    snap = followed.snapshot
    lines = [f"crawl summary ({head} after {elapsed_s:.1f}s):"]
    for s in followed.summaries.values():
        state = "complete" if s.complete else "in progress"
        lines.append(f"  {s.crawl_id}: {s.issued} pages, {s.reported} fetched, {state}")
    if snap is not None:
        lines.append(f"  chunks: {snap.chunks}, vectors written: {snap.written}")
    if followed.failures:
        lines.append("pages not indexed, by reason:")
        for (stage, cls), n in sorted(followed.failures.items()):
            lines.append(f"  {stage} {cls}: {n}")
    return lines


async def _crawl_once(
    settings: Settings, args: argparse.Namespace, crawls: list[Crawl], console: Console
) -> int:
    base = await Baseline.take(settings) if args.wait else None
    t0 = time.monotonic()
    await ops_crawl.start(settings, crawls, args.source)
    for c in crawls:
        print(f"crawl {c.id}: {c.root} (scope {c.scope}, depth <= {c.max_depth})")
    if base is None:
        return 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        pages = bar.add_task("pages fetched   ", total=None)
        written = bar.add_task("vectors written ", total=None)

        def on_crawl(summaries: dict[str, ops_crawl.Summary]) -> None:
            issued = sum(s.issued for s in summaries.values())
            done = sum(s.reported for s in summaries.values())
            bar.update(pages, completed=done, total=issued or None)

        def on_snapshot(s: Snapshot) -> None:
            bar.update(written, completed=s.written, total=s.vectors or None)

        followed = await ops_crawl.follow(
            settings, base, crawls, on_crawl, on_snapshot, timeout_s=args.timeout
        )
    for line in crawl_summary_lines(followed, time.monotonic() - t0):
        print(line)
    if followed.timed_out:
        return EXIT_TIMEOUT
    # A page robots.txt keeps out is the crawl obeying the site, not a failure.
    return 1 if any(cls != "robots_disallowed" for _, cls in followed.failures) else 0


def cmd_crawl(args: argparse.Namespace, settings: Settings) -> int:
    """``publish --crawl``: start (and with ``--wait`` follow) the crawls; with
    ``--every``, again each interval until interrupted."""
    console = Console(stderr=True)
    every = ops_crawl.interval_s(args.every) if args.every else None
    crawls_of(args)  # check the arguments before anything is published
    while True:
        started = time.monotonic()
        with kafka.translated(settings):
            status = asyncio.run(_crawl_once(settings, args, crawls_of(args), console))
        if every is None:
            return status
        time.sleep(max(every - (time.monotonic() - started), 0.0))
