"""``ragstream milvus up|down|status``: serve the Milvus Lite directory to many processes.

A worker with the write stage serves it by itself while it runs; ``up`` is for reading
(``ragstream search``, a notebook's pymilvus client) side by side with no worker, or
before one starts: the worker then uses that server instead of starting its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from streams import milvus_lite
from streams.settings import Settings

#: Exit status of ``ragstream milvus status`` when no server serves the directory.
NOT_RUNNING = 3


def register(subparsers: Any) -> None:
    """Add ``milvus`` and its sub-commands to the ``ragstream`` parser."""
    milvus = subparsers.add_parser(
        "milvus",
        help="serve the Milvus Lite directory over loopback (many processes at once)",
        description=__doc__,
    )
    sub = milvus.add_subparsers(dest="milvus_command", required=True, metavar="ACTION")
    p_up = sub.add_parser("up", help="start `milvus-lite server` (or find it running)")
    p_up.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: free)")
    p_up.add_argument(
        "--wait", type=float, default=60.0, metavar="S", help="seconds to wait for it (60)"
    )
    p_up.set_defaults(func=cmd_up)
    p_down = sub.add_parser("down", help="stop the server `up` started")
    p_down.set_defaults(func=cmd_down)
    p_status = sub.add_parser("status", help=f"is it served? (exit 0: yes, {NOT_RUNNING}: no)")
    p_status.set_defaults(func=cmd_status)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    info = milvus_lite.up(settings, port=args.port, wait_s=args.wait)
    print(
        f"Milvus Lite {info.data_dir} served (pid {info.pid}, by {info.owner}); "
        f"log: {milvus_lite.server_log(Path(info.data_dir))}",
        file=sys.stderr,
    )
    print(info.uri)  # alone on stdout: MILVUS_URI=$(ragstream milvus up)
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    info = milvus_lite.down(settings)
    if info is None:
        print(f"no Milvus Lite server was running for {milvus_lite.lite_dir(settings)}")
    else:
        print(f"Milvus Lite server stopped (pid {info.pid}, {info.data_dir})")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    info = milvus_lite.status(settings)
    if info is None:
        print(f"Milvus Lite {milvus_lite.lite_dir(settings)}: not served (opened embedded)")
        return NOT_RUNNING
    print(f"Milvus Lite {info.data_dir}: served at {info.uri}, pid {info.pid}, by {info.owner}")
    return 0
