"""``ragstream up`` / ``down`` / ``ps``: the local stack (broker, worker, HTTP API) as one unit."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from ops import stack
from streams.settings import Settings


def register(subparsers: Any) -> None:
    p_up = subparsers.add_parser(
        "up",
        help="start the local stack (broker, worker stages, HTTP API), or find it running",
        description=stack.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_up.add_argument("--fetchers", type=int, default=1, metavar="N", help="fetch processes (1)")
    p_up.add_argument("--no-api", action="store_true", help="do not start the HTTP API")
    p_up.add_argument("--api-host", default="127.0.0.1", help="API listen address (%(default)s)")
    p_up.add_argument("--api-port", type=int, default=8088, help="API port (%(default)s)")
    p_up.add_argument(
        "--wait", type=float, default=300.0, metavar="S", help="seconds to wait until ready (300)"
    )
    p_up.set_defaults(func=cmd_up)
    p_down = subparsers.add_parser("down", help="stop what `ragstream up` started")
    p_down.add_argument("--timeout", type=float, default=60.0, metavar="S", help="(60)")
    p_down.set_defaults(func=cmd_down)
    p_ps = subparsers.add_parser(
        "ps", help="what runs: each process with its pid, state, address and metrics URL"
    )
    p_ps.set_defaults(func=cmd_ps)


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


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    stopped = stack.down(settings, timeout_s=args.timeout, note=note)
    if not stopped:
        note("nothing started by `ragstream up` was running")
    return 0


def cmd_ps(args: argparse.Namespace, settings: Settings) -> int:
    print_table(stack.ps(settings))
    return 0


def print_table(rows: list[stack.Proc]) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "PID", "STATE", "ADDRESS", "METRICS"):
        table.add_column(col, no_wrap=col != "STATE")
    for r in rows:
        table.add_row(r.name, str(r.pid) if r.pid else "-", r.state, r.address, r.metrics or "-")
    Console(width=200).print(table)
