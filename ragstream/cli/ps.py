"""``ragstream ps``: what runs for this home: each process with its pid, state (from its
``/readyz``), address and metrics URL."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from ops import stack
from streams.settings import Settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ps", help="what runs: each process with its pid, state, address and metrics URL"
    )
    p.set_defaults(func=cmd_ps)


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
