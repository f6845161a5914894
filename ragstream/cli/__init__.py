"""The `ragstream` command: one sub-command per module, each registering itself.

Each ``ragstream/cli/<verb>.py`` module exposes ``register(subparsers)``; adding a command is
adding a module and one line in ``COMMANDS``. Modules here parse and print only: the work
is done by the libraries in ``ops/``, ``agents/`` and ``streams/``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from streams.errors import RagstreamError

COMMANDS = [
    "ragstream.cli.kafka",
    "ragstream.cli.publish",
    "ragstream.cli.worker",
    "ragstream.cli.search",
    "ragstream.cli.demo",
    "ragstream.cli.status",
    "ragstream.cli.webhooks",
    "ragstream.cli.replay",
    "ragstream.cli.dlq",
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
