"""Running stages: one Faust app per process, and a supervisor for several.

``ragstream worker`` runs every stage by default, each in a child process of its own: the
embed stage holds the model (and a GPU context, which must never be forked), the write
stage holds the Milvus connection, and fetchers are cheap and many. A child that exits is
restarted; the children die with the supervisor (Linux parent-death signal), so killing
the worker kills the whole pipeline, as a crash would.

With Milvus Lite (one process per data directory when opened embedded), the supervisor of
a write stage also runs ``milvus-lite server`` on the directory
(:class:`streams.milvus_lite.LiteServer`) and hands the write stage its address: the
writer never locks the directory, so ``ragstream search`` and any pymilvus client read
while it writes. The write stage starts once the server answers, and the server stops
after the stages, so their last writes find it.
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

from streams import kafka, logs
from streams.milvus_lite import LiteServer, lite_dir
from streams.settings import Settings, get_settings
from streams.topics import STAGES, ensure_topics

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def run_stage(settings: Settings, stage: str) -> None:
    """Run one stage in this process until it is stopped (SIGTERM/SIGINT).

    A write stage on an embedded Milvus Lite directory runs under :func:`supervise`
    instead, which serves the directory and gives the stage the served address (so
    ``worker --stages write`` alone serves it too).
    """
    if stage == "write" and settings.milvus_is_lite:
        supervise(settings, [stage])
        return
    import faust

    from agents import telemetry
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
    telemetry.install(app, settings, stage)
    worker = faust.Worker(
        app,
        loglevel="INFO",
        quiet=True,
        redirect_stdouts=False,
        logging_config=logs.logging_config(settings.log_format, logging.INFO, stage),
    )
    worker.execute_from_commandline()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: children outlive a killed supervisor
        pass


def stage_command(stage: str) -> list[str]:
    return [sys.executable, "-m", "agents.supervisor", "--stage", stage]


def refuse_early(settings: Settings) -> None:
    """A secured broker that refuses us (a wrong password, a certificate that does not
    verify) ends the worker with :class:`~streams.errors.KafkaRefused` before any stage
    starts: restarting stages cannot fix a setting, and would hide it in a log. A broker
    that does not answer is waited out by the stages as before."""
    if settings.kafka_security_protocol == "PLAINTEXT":
        return
    cause = asyncio.run(kafka.handshake(settings))
    if cause is not None:
        raise kafka.refused(cause, settings)


def supervise(settings: Settings, stages: list[str], fetchers: int = 1) -> int:
    """Run ``stages`` as child processes; restart any that exits until told to stop.

    The children read ``settings`` from their environment (``Settings.to_env``), so they
    run with the supervisor's settings, not only with what its own environment said.
    """
    refuse_early(settings)
    plan = [s for s in stages for _ in range(fetchers if s == "fetch" else 1)]
    env = {**os.environ, **settings.to_env()}
    data_dir = lite_dir(settings) if "write" in stages else None
    lite = LiteServer(data_dir, preexec_fn=_die_with_parent) if data_dir is not None else None
    served: str | None = None  # the address the write stages were started with
    procs: dict[int, tuple[str, subprocess.Popen]] = {}
    waiting: set[int] = set()  # write slots waiting for the server to answer
    stopping = False

    def stage_env(stage: str) -> dict[str, str]:
        if stage != "write" or served is None:
            return env
        # The served address, never the directory: a writer that fell back to embedded
        # would lock the server (and every reader) out.
        out = {**env, **settings.model_copy(update={"milvus_uri": served}).to_env()}
        out.pop("MILVUS_URI", None)  # it would win over RAGSTREAM_MILVUS_URI
        return out

    def start(slot: int, stage: str) -> None:
        if stage == "write" and lite is not None and served is None:
            waiting.add(slot)
            procs.pop(slot, None)
            return
        procs[slot] = (
            stage,
            subprocess.Popen(
                stage_command(stage), env=stage_env(stage), preexec_fn=_die_with_parent
            ),
        )
        log.info("started %s stage (pid %d)", stage, procs[slot][1].pid)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    def follow_server() -> None:
        nonlocal served
        assert lite is not None
        uri = lite.poll()
        if uri is None:
            return  # down or starting: a running writer waits it out (same port)
        if served is not None and uri != served:
            log.warning("Milvus moved to %s; restarting the write stage", uri)
            for _stage, proc in procs.values():
                if _stage == "write":
                    proc.terminate()
        served = uri
        for slot in sorted(waiting):
            waiting.discard(slot)
            start(slot, plan[slot])

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if lite is not None:
        follow_server()
    for slot, stage in enumerate(plan):
        start(slot, stage)
    restarts: dict[int, float] = {}
    try:
        while not stopping:
            time.sleep(0.5)
            if lite is not None:
                follow_server()
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
    finally:
        if lite is not None:  # after the stages: their last writes need it
            lite.stop()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agents.supervisor")
    parser.add_argument("--stage", required=True, choices=list(STAGES))
    args = parser.parse_args(argv)
    settings = get_settings()
    logs.setup(settings.log_format, logging.INFO, args.stage)
    run_stage(settings, args.stage)


if __name__ == "__main__":
    main()
