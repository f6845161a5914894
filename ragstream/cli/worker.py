"""``ragstream worker``: run the pipeline's stages (all by default, each in its process)."""

from __future__ import annotations

import argparse
from typing import Any

from agents.supervisor import run_stage, supervise
from streams.errors import RagstreamError
from streams.settings import Settings
from streams.topics import STAGES


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "worker",
        help="run the pipeline stages (fetch, embed, write)",
        description=(
            "Run stages of the pipeline. Each stage runs in a process of its own under this "
            "supervisor, which restarts a stage that exits. Run fetchers, the embedder and the "
            "writer on different machines with --stages."
        ),
    )
    p.add_argument(
        "--stages",
        default="fetch,embed,write",
        help="comma-separated subset of fetch,embed,write (default: all)",
    )
    p.add_argument("--fetchers", type=int, default=1, help="fetch processes to run (1)")
    p.set_defaults(func=cmd_worker)


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise RagstreamError(
            f"unknown stage(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(STAGES)}"
        )
    return list(dict.fromkeys(stages))


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    stages = parse_stages(args.stages)
    if args.fetchers < 1:
        raise RagstreamError("--fetchers must be at least 1")
    if len(stages) == 1 and (stages[0] != "fetch" or args.fetchers == 1):
        run_stage(settings, stages[0])
        return 0
    return supervise(settings, stages, fetchers=args.fetchers)
