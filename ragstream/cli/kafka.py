"""``ragstream kafka up|down|status``: the local single-node Kafka broker (no Docker)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from devtools import kafka_local
from streams.settings import Settings

#: Exit status of ``ragstream kafka status`` when no broker runs.
NOT_RUNNING = 3


def register(subparsers: Any) -> None:
    """Add ``kafka`` and its sub-commands to the ``ragstream`` parser."""
    kafka = subparsers.add_parser(
        "kafka",
        help="run a local single-node Apache Kafka broker (KRaft, 127.0.0.1 only)",
        description=(
            "A real Apache Kafka broker for development and tests, without Docker: the jars "
            "come from Maven once (cached in RAGSTREAM_CACHE_DIR), data and log live in "
            "RAGSTREAM_HOME/kafka. With Docker, docker-compose.kafka.yml is the alternative."
        ),
    )
    sub = kafka.add_subparsers(dest="kafka_command", required=True, metavar="ACTION")

    p_up = sub.add_parser("up", help="start the broker (or find it running) and wait until ready")
    p_up.add_argument(
        "--port",
        type=int,
        default=None,
        help="broker port on 127.0.0.1 (default: the port of RAGSTREAM_BROKER, 9092)",
    )
    p_up.add_argument(
        "--wait", type=float, default=60.0, metavar="S", help="seconds to wait for it (60)"
    )
    p_up.set_defaults(func=cmd_up)

    p_down = sub.add_parser("down", help="stop the broker (SIGTERM, SIGKILL after --timeout)")
    p_down.add_argument("--timeout", type=float, default=30.0, metavar="S", help="(30)")
    p_down.set_defaults(func=cmd_down)

    p_status = sub.add_parser("status", help=f"is it running? (exit 0: yes, {NOT_RUNNING}: no)")
    p_status.set_defaults(func=cmd_status)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    t0 = time.monotonic()
    info = kafka_local.up(settings, port=args.port, wait_s=args.wait)
    print(
        f"Kafka {info.version} ready on {info.bootstrap} (pid {info.pid}, "
        f"{time.monotonic() - t0:.1f} s); log: {info.log}",
        file=sys.stderr,
    )
    print(info.bootstrap)  # alone on stdout: RAGSTREAM_BROKER=$(ragstream kafka up)
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    if kafka_local.down(settings, timeout_s=args.timeout):
        print(f"Kafka stopped ({kafka_local.kafka_dir(settings)})")
    else:
        print(f"no Kafka broker was running for {kafka_local.kafka_dir(settings)}")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    info = kafka_local.status(settings)
    if info is None:
        print(f"Kafka: not running ({kafka_local.kafka_dir(settings)})")
        return NOT_RUNNING
    print(
        f"Kafka {info.version}: running, pid {info.pid}, bootstrap {info.bootstrap}, log {info.log}"
    )
    return 0
