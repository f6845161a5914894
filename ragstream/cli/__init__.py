"""The `ragstream` command: one sub-command per module, each registering itself.

Each ``ragstream/cli/<verb>.py`` module exposes ``register(subparsers)``; adding a command is
adding a module and one line in ``COMMANDS``. Modules here parse and print only: the work
is done by the libraries in ``ops/``, ``agents/`` and ``streams/``.

Two things happen here and nowhere else, so that every verb behaves alike:

- the settings are read from the environment once (:func:`load_settings`) and handed to
  the verb's function as ``func(args, settings)``; the libraries take them as a parameter;
- the exception tree of ``streams/errors.py`` becomes one line on stderr and an exit
  status (:func:`exit_status`, the table in ``EXIT_STATUSES``). Anything outside the tree
  is a bug, and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import pydantic

from streams import logs
from streams.errors import ConfigError, RagstreamError, Unavailable
from streams.settings import Settings, get_settings

COMMANDS = [
    "ragstream.cli.kafka",
    "ragstream.cli.milvus",
    "ragstream.cli.publish",
    "ragstream.cli.worker",
    "ragstream.cli.search",
    "ragstream.cli.up",
    "ragstream.cli.down",
    "ragstream.cli.ps",
    "ragstream.cli.demo",
    "ragstream.cli.status",
    "ragstream.cli.webhooks",
    "ragstream.cli.replay",
    "ragstream.cli.dlq",
]

EXIT_ERROR = 2
"""A :class:`RagstreamError` that needs a person: a configuration, argument or input that
cannot work as it is (argparse uses 2 for usage errors too)."""

EXIT_UNAVAILABLE = 69
"""An :class:`Unavailable` service (Kafka, Milvus): running again later may work.
``EX_UNAVAILABLE`` of sysexits.h, so a supervisor or a script can tell waiting from fixing."""

EXIT_INTERRUPTED = 130

EXIT_STATUSES = f"""\
exit status:
  0    done
  1    done in part: some input skipped or dead-lettered, no hits, not confirmed
  {EXIT_ERROR}    error: a usage, configuration or input error (one line on stderr)
  3    publish --wait timed out; kafka status: no broker running; milvus status: none served
  {EXIT_UNAVAILABLE}   unavailable: Kafka or Milvus cannot be reached (try again later)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragstream",
        description="Keep a Milvus vector index in step with web pages, through Kafka.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def load_settings() -> Settings:
    """The environment's settings; a value that does not validate is a :class:`ConfigError`
    naming its variable, not a pydantic traceback."""
    try:
        return get_settings()
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"RAGSTREAM_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid setting {problems}") from None


def exit_status(exc: RagstreamError) -> int:
    """The exit status of a failure of the tree: waiting may heal an :class:`Unavailable`;
    everything else needs someone to change something."""
    return EXIT_UNAVAILABLE if isinstance(exc, Unavailable) else EXIT_ERROR


def one_line(exc: RagstreamError) -> str:
    """The message on one line (a script greps it); the class's summary if it has none."""
    text = " ".join(str(exc).split())
    return text or (type(exc).__doc__ or type(exc).__name__).strip().splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logs.setup("text", level)  # until the settings say otherwise (they may not load)
    try:
        settings = load_settings()
        if settings.log_format != "text":
            logs.setup(settings.log_format, level)
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RagstreamError as exc:
        print(f"ragstream: error: {one_line(exc)}", file=sys.stderr)
        return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
