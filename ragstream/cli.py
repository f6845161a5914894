"""The `ragstream` command: one sub-command per module, each registering itself.

Each ``ragstream/cmd_*.py`` module exposes ``register(subparsers)``; adding a command is
adding a module and one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ragstream.errors import RagstreamError

COMMANDS = [
    "ragstream.cmd_kafka",
    "ragstream.cmd_publish",
    "ragstream.cmd_worker",
    "ragstream.cmd_search",
    "ragstream.cmd_demo",
    "ragstream.cmd_status",
    "ragstream.cmd_webhooks",
    "ragstream.cmd_replay",
    "ragstream.cmd_dlq",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragstream",
        description="Keep a Milvus vector index in step with web pages, through Kafka.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # libraries that narrate their start-up at INFO
        for name in ("faiss", "faiss.loader", "milvus_lite", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except RagstreamError as exc:
        print(f"ragstream: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
