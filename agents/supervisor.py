"""Running stages: one Faust app per process, and a supervisor for several.

``ragstream worker`` runs every stage by default, each in a child process of its own: the
embed stage holds the model (and a GPU context, which must never be forked), the write
stage holds the Milvus Lite file (one process per file), and fetchers are cheap and
many. A child that exits is restarted; the children die with the supervisor (Linux
parent-death signal), so killing the worker kills the whole pipeline, as a crash would.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

from streams.settings import Settings, get_settings
from streams.topics import STAGES, ensure_topics

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def run_stage(settings: Settings, stage: str) -> None:
    """Run one stage in this process until it is stopped (SIGTERM/SIGINT)."""
    import faust

    from agents.app import create_app

    asyncio.run(ensure_topics(settings))
    if stage != "embed" and settings.io_nice:
        # The embedder is the one stage that should never wait; I/O stages wait on the
        # network anyway and lose nothing by yielding the CPU to it.
        os.nice(settings.io_nice)
    app = create_app(settings, stage)
    # import only the module of the stage this process runs
    if stage == "fetch":
        from agents.fetch import register
    elif stage == "embed":
        from agents.embed import register
    else:
        from agents.write import register
    register(app, settings)
    worker = faust.Worker(app, loglevel="INFO", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: children outlive a killed supervisor
        pass


def stage_command(stage: str) -> list[str]:
    return [sys.executable, "-m", "agents.supervisor", "--stage", stage]


def supervise(settings: Settings, stages: list[str], fetchers: int = 1) -> int:
    """Run ``stages`` as child processes; restart any that exits until told to stop.

    The children read ``settings`` from their environment (``Settings.to_env``), so they
    run with the supervisor's settings, not only with what its own environment said.
    """
    plan = [s for s in stages for _ in range(fetchers if s == "fetch" else 1)]
    env = {**os.environ, **settings.to_env()}
    procs: dict[int, tuple[str, subprocess.Popen]] = {}
    stopping = False

    def start(slot: int, stage: str) -> None:
        procs[slot] = (
            stage,
            subprocess.Popen(stage_command(stage), env=env, preexec_fn=_die_with_parent),
        )
        log.info("started %s stage (pid %d)", stage, procs[slot][1].pid)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot, stage in enumerate(plan):
        start(slot, stage)
    restarts: dict[int, float] = {}
    while not stopping:
        time.sleep(0.5)
        for slot, (stage, proc) in list(procs.items()):
            rc = proc.poll()
            if rc is not None and not stopping:
                wait = 1.0 if time.monotonic() - restarts.get(slot, 0) > 30 else 5.0
                log.warning("%s stage exited with %s; restarting in %.0fs", stage, rc, wait)
                time.sleep(wait)
                restarts[slot] = time.monotonic()
                start(slot, stage)
    for _stage, proc in procs.values():
        proc.terminate()
    deadline = time.monotonic() + 30
    for _stage, proc in procs.values():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agents.supervisor")
    parser.add_argument("--stage", required=True, choices=list(STAGES))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_stage(get_settings(), args.stage)


if __name__ == "__main__":
    main()
