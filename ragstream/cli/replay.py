"""``ragstream replay``: make a stage process messages again, by resetting its offsets.

Prints the plan (per partition: current -> new offset, messages to reprocess), refuses
while the stage's workers are running, and applies only after ``--yes`` or a typed
confirmation. See docs/runbooks.md for when to use it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from ops.replay import (
    Plan,
    Target,
    apply_plan,
    describe_group,
    format_plan,
    parse_datetime,
    read_plan,
)
from streams import kafka
from streams.errors import RagstreamError
from streams.settings import Settings
from streams.topics import STAGES

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  ragstream replay --stage fetch --to-earliest --dry-run
  ragstream replay --stage embed --to-datetime 2026-05-01T14:30:00Z --yes
  ragstream replay --stage write --shift-by -500 --partition 0

Stop the stage's workers first: a group with live members is refused (exit status 2).
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay",
        help="reprocess messages: reset a stage's consumer-group offsets",
        description=(
            "Reset a stage's consumer-group offsets so it processes messages again. Prints "
            "the plan first; refuses while the stage's workers run; applies after --yes or "
            "a typed confirmation. See docs/runbooks.md."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage", required=True, choices=list(STAGES), help="the stage to replay")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-earliest", action="store_true", help="the oldest message still kept")
    to.add_argument(
        "--to-datetime",
        metavar="ISO8601",
        help="the first message at or after this time: ISO 8601 (no zone = UTC) or a "
        "duration back from now (30m, 2h, 7d)",
    )
    to.add_argument(
        "--shift-by", type=int, metavar="N", help="N messages from the current offset (-N: back)"
    )
    to.add_argument("--to-offset", type=_offset, metavar="N", help="this absolute offset")
    p.add_argument(
        "--partition",
        type=_offset,
        action="append",
        metavar="P",
        help="only this partition (repeatable; default: all)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--yes", "-y", action="store_true", help="apply without asking")
    p.set_defaults(func=cmd_replay)


def _offset(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def target_of(args: argparse.Namespace) -> Target:
    if args.to_earliest:
        return Target("earliest")
    if args.to_datetime is not None:
        return Target("datetime", parse_datetime(args.to_datetime))
    if args.shift_by is not None:
        return Target("shift", args.shift_by)
    return Target("offset", args.to_offset)


def confirm(plan: Plan) -> bool:
    if not sys.stdin.isatty():
        raise RagstreamError(
            "not resetting offsets without confirmation: stdin is not a terminal; "
            "pass --yes to apply (or --dry-run to only see the plan)"
        )
    answer = input(f"Reset group {plan.group} to these offsets? [y/N] ")
    return answer.strip().lower() in {"y", "yes"}


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    target = target_of(args)
    with kafka.translated(settings):
        plan = asyncio.run(read_plan(settings, args.stage, target, args.partition))
        info = asyncio.run(describe_group(settings, plan.group))
    for line in format_plan(plan):
        print(line)
    if args.dry_run:
        if not info.idle:
            print(f"note: {info.busy_message(args.stage)}")
        print("dry run: nothing changed")
        return 0
    if not info.idle:
        raise RagstreamError(info.busy_message(args.stage))
    if not plan.changes:
        print("nothing to change: the group already resumes at these offsets")
        return 0
    if not args.yes and not confirm(plan):
        print("aborted: nothing changed")
        return 1
    held = asyncio.run(apply_plan(settings, plan))
    log.info(
        "replay %s: group %s reset to %s (%s)",
        plan.stage,
        plan.group,
        target.describe(),
        ", ".join(f"{plan.topic}[{p}]={o}" for p, o in sorted(held.items())),
    )
    print(
        f"reset group {plan.group}: {len(held)} partition{'s' if len(held) != 1 else ''} "
        f"committed; {plan.reprocess} message{'s' if plan.reprocess != 1 else ''} to reprocess"
        + (f", {plan.skipped} skipped" if plan.skipped else "")
        + f". Start the {plan.stage} workers to replay."
    )
    return 0
