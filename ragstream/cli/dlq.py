"""``ragstream dlq list|redrive``: look at dead letters, and send them back once fixed."""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import shutil
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import orjson

from ops.deadletters import (
    INVALID,
    Entry,
    Filters,
    Listing,
    RedriveResult,
    list_letters,
    redrive,
)
from streams import kafka
from streams.errors import RagstreamError
from streams.settings import Settings
from streams.timeparse import parse_time
from streams.topics import STAGES

T = TypeVar("T")

REDRIVE_HELP = """\
Send the original key and value of matching dead letters back to the topic they came from
(acks=all). A chunks or vectors letter is not re-applied (its content may be older than the
index): it re-requests its page instead (a forced urls request for its url; refused, with
the reason, when it has none). Each message sent back carries a hop count; a letter already
redriven RAGSTREAM_DLQ_MAX_REDRIVES times is parked: listed, never sent again.

Progress is kept in the consumer group <app_id>-dlq-redrive, committed only after the
broker acknowledged the re-sent messages, so running redrive again sends only letters that
were not sent before. Letters the filters skip are NOT consumed: they stay
available to a later redrive with other filters (the group's committed offset stops at the
first skipped letter; the letters sent past it are recorded in the commit's metadata).
Records that are not valid dead-letter envelopes can never be sent and are passed. After a
crash between the broker's acknowledgement and the commit, at most one batch is sent again.
Committed offsets expire after the broker's offsets.retention.minutes (7 days by default)
without a commit; every redrive that is not a dry run re-commits its position.

examples:
  ragstream dlq redrive --stage fetch --error-class fetch --dry-run
  ragstream dlq redrive --error-class embed --since 2h --yes
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "dlq",
        help="list dead letters, or send them back to their topic (redrive)",
        description="Dead letters: what a stage could not process, with the reason and bytes.",
    )
    sub = p.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    ls = sub.add_parser(
        "list",
        help="list dead letters (read-only, oldest first)",
        description=(
            "List dead letters from the beginning of the dead-letter topics to their current "
            "end, without a consumer group (nothing is committed), then counts by stage and "
            "error class."
        ),
    )
    _filters(ls)
    ls.add_argument("--limit", type=_positive, help="show at most N letters (counts cover all)")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.add_argument(
        "--with-value", action="store_true", help="with --json: include value_b64 (the bytes)"
    )
    ls.set_defaults(func=cmd_list)

    rd = sub.add_parser(
        "redrive",
        help="send matching dead letters back to their original topic",
        description=REDRIVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _filters(rd)
    rd.add_argument("--dry-run", action="store_true", help="show what would be sent; send nothing")
    rd.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    rd.set_defaults(func=cmd_redrive)


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stage",
        action="append",
        choices=list(STAGES),
        help="only this stage's dead letters (repeatable)",
    )
    p.add_argument(
        "--error-class",
        action="append",
        metavar="C",
        help="only this error class: decode, schema, fetch, http_status, embed, ... (repeatable)",
    )
    p.add_argument(
        "--since",
        type=_since,
        metavar="T",
        help="only letters that failed at or after T: ISO 8601 (naive = UTC) or 30m, 2h, 7d",
    )


def _since(text: str) -> Any:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return n


def filters_of(args: argparse.Namespace) -> Filters:
    return Filters(
        stages=frozenset(args.stage or ()),
        error_classes=frozenset(args.error_class or ()),
        since=args.since,
    )


def _run(settings: Settings, coro: Coroutine[Any, Any, T]) -> T:
    """Run a Kafka coroutine; a missing topic or an unreachable broker is one line."""
    try:
        with kafka.translated(settings):
            return asyncio.run(coro)
    except LookupError as exc:
        raise RagstreamError(f"Kafka at {settings.broker}: {exc}") from None


# --- list ---------------------------------------------------------------------------------


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def format_rows(
    entries: list[Entry], width: int = 120, max_redrives: int | None = None
) -> list[str]:
    """The table: time, stage, error class, attempts, URL or key, the error (truncated);
    a parked letter's error starts with ``[parked after N redrives]``."""
    subject_w = min(max([len(e.subject) for e in entries] + [10]), 60)
    head = f"{'time (UTC)':<19} {'stage':<5} {'error_class':<19} {'att':>3} "
    error_w = max(width - len(head) - subject_w - 1, 40)
    lines = [head + f"{'url or key':<{subject_w}} error"]
    for e in entries:
        when = e.time.strftime("%Y-%m-%d %H:%M:%S")
        attempts = str(e.letter.attempts) if e.letter else "-"
        error = e.letter.error if e.letter else f"not a dead-letter envelope: {e.problem}"
        if e.letter and e.parked(max_redrives):
            error = f"[parked after {e.letter.hops} redrives] {error}"
        lines.append(
            f"{when:<19} {e.stage:<5} {_cut(e.error_class, 19):<19} {attempts:>3} "
            f"{_cut(e.subject, subject_w):<{subject_w}} {_cut(error, error_w)}"
        )
    return lines


def format_counts(listing: Listing) -> list[str]:
    shown = len(listing.entries)
    total = listing.matched
    head = f"{total} dead letter{'s' if total != 1 else ''}"
    if shown < total:
        head += f" (showing {shown})"
    lines = [head + (":" if total else "")]
    for (stage, error_class), n in listing.counts.items():
        note = "  (records that are not dead-letter envelopes)" if error_class == INVALID else ""
        lines.append(f"  {stage:<5} {error_class:<19} {n:>7}{note}")
    if listing.parked:
        lines.append(
            f"  {listing.parked} parked: redriven too often, `dlq redrive` will not send them again"
        )
    return lines


def _quiet(args: argparse.Namespace) -> None:
    """aiokafka logs every assignment at INFO: noise for a command that prints a report."""
    if not getattr(args, "verbose", False):
        logging.getLogger("aiokafka").setLevel(logging.WARNING)


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    _quiet(args)
    listing = _run(settings, list_letters(settings, filters_of(args), args.limit))
    if args.json:
        for e in listing.entries:
            obj = e.to_json(args.with_value, settings.dlq_max_redrives)
            sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
        sys.stdout.flush()
        return 0
    width = shutil.get_terminal_size((120, 24)).columns
    if listing.entries:
        print("\n".join(format_rows(listing.entries, width, settings.dlq_max_redrives)))
        print()
    print("\n".join(format_counts(listing)))
    return 0


# --- redrive ------------------------------------------------------------------------------


def describe_plan(result: RedriveResult) -> list[str]:
    n = len(result.letters)
    lines = [f"{n} dead letter{'s' if n != 1 else ''} to send back:"]
    lines += [f"  -> {topic}: {count}" for topic, count in result.targets.items()]
    skipped, already, invalid = (result.total(f) for f in ("skipped", "already", "invalid"))
    if skipped:
        lines.append(f"  {skipped} not matching the filters (left for a later redrive)")
    if already:
        lines.append(f"  {already} handled by an earlier redrive (not sent again)")
    if invalid:
        lines.append(f"  {invalid} not valid dead-letter envelopes (cannot be sent; passed)")
    if result.parked:
        lines.append(
            f"  {len(result.parked)} parked: redriven too often already (not sent; "
            "still listed by `dlq list`)"
        )
    reasons = collections.Counter(why for _, why in result.refused)
    for why, n in sorted(reasons.items()):
        lines.append(f"  {n} refused: {why}")
    return lines


def _confirm_interactive(yes: bool) -> Any:
    def confirm(result: RedriveResult) -> bool:
        if yes:
            return True
        print("\n".join(describe_plan(result)))
        answer = input(f"Send {len(result.letters)} message(s) back? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    return confirm


def cmd_redrive(args: argparse.Namespace, settings: Settings) -> int:
    _quiet(args)
    if not (args.yes or args.dry_run or sys.stdin.isatty()):
        raise RagstreamError("redrive sends messages; confirm with --yes (stdin is not a terminal)")
    result = _run(
        settings,
        redrive(
            settings,
            filters_of(args),
            dry_run=args.dry_run,
            confirm=_confirm_interactive(args.yes),
        ),
    )
    if args.dry_run:
        if result.letters:
            print("\n".join(format_rows(result.letters, shutil.get_terminal_size().columns)))
            print()
        print("dry run, nothing sent; " + "\n".join(describe_plan(result)))
        return 0
    if result.letters and not result.confirmed:
        print("nothing sent")
        return 1
    total = sum(result.sent.values())
    parts = ", ".join(f"{topic} {n}" for topic, n in sorted(result.sent.items()))
    if total:
        print(f"sent {total} dead letter{'s' if total != 1 else ''} back: {parts}")
    else:
        print("nothing to send")
    notes = [line for line in describe_plan(result)[1:] if not line.startswith("  ->")]
    print("\n".join(notes) if notes else "  no other dead letters waiting")
    if result.passed_over:
        print(
            f"warning: passed over {result.passed_over} skipped letters to keep the progress "
            "record within the broker's metadata limit; they will not be offered again",
            file=sys.stderr,
        )
    return 0
