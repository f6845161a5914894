"""``ragstream down``: stop what ``ragstream up`` started (the API, the worker, and the
broker if up started it)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ops import stack
from streams.settings import Settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("down", help="stop what `ragstream up` started")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="(60)")
    p.add_argument("--keep-broker", action="store_true", help="leave the broker running")
    p.set_defaults(func=cmd_down)


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    def note(msg: str) -> None:
        print(msg, file=sys.stderr)

    stopped = stack.down(settings, timeout_s=args.timeout, note=note, keep_broker=args.keep_broker)
    if not stopped:
        note("nothing started by `ragstream up` was running")
    return 0
