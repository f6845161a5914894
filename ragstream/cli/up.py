"""``ragstream up``: the local stack (broker, worker stages, HTTP API) as one unit, started
or found running; ``ragstream down`` stops it, ``ragstream ps`` lists it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ops import stack
from ragstream.cli.ps import print_table
from streams.settings import Settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "up",
        help="start the local stack (broker, worker stages, HTTP API), or find it running",
        description=stack.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--fetchers", type=int, default=1, metavar="N", help="fetch processes (1)")
    p.add_argument("--no-api", action="store_true", help="do not start the HTTP API")
    p.add_argument("--api-host", default="127.0.0.1", help="API listen address (%(default)s)")
    p.add_argument("--api-port", type=int, default=8088, help="API port (%(default)s)")
    p.add_argument(
        "--wait", type=float, default=300.0, metavar="S", help="seconds to wait until ready (300)"
    )
    p.set_defaults(func=cmd_up)


def note(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    rows = stack.up(
        settings,
        fetchers=args.fetchers,
        api=not args.no_api,
        api_host=args.api_host,
        api_port=args.api_port,
        wait_s=args.wait,
        note=note,
    )
    print_table(rows)
    note(f"logs: {stack.logs_dir(settings)}; stop with `ragstream down`")
    return 0
