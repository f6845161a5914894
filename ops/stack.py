"""The local stack as one unit: ``ragstream up``, ``down`` and ``ps``.

``up`` starts what is missing and leaves what runs alone, so it can be run again at any
time (idempotent): the local broker (only when ``RAGSTREAM_BROKER`` is on this machine
and nothing answers there; a broker the user runs is used as it is), the worker (its
stages, each in a process of its own, and with Milvus Lite the ``milvus-lite server`` it
supervises), and the HTTP API. Both run detached, in sessions of their own, logging to
``<home>/logs/``; their pids are in ``<home>/run/stack.json``. It returns once every stage
and the API answer ``/readyz``, or raises with the log's tail.

``ps`` lists what runs from the records each part leaves (the broker's pid file, the Lite
discovery file, :mod:`streams.runfiles`), asking each stage's ``/readyz``; ``down`` stops
what ``up`` started, the API first (no request accepted into a pipeline that stops), the
broker last, and only if ``up`` started it.

The API needs a webhook secret (an unsigned endpoint lets anyone fill the index): when
none is set, ``up`` makes one, kept in ``<home>/webhook.secret`` (mode 0600), and hands
it to the API through its environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson

from devtools import kafka_local
from streams import runfiles
from streams.errors import RagstreamError, Unavailable
from streams.milvus_lite import find_server, lite_dir, pid_alive
from streams.settings import Settings

#: What ``up`` waits for: every stage, then the API.
PARTS = ("fetch", "embed", "write", "api")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclasses.dataclass(frozen=True, slots=True)
class Proc:
    """One row of ``ragstream ps``."""

    name: str
    pid: int | None
    state: str  # ready, starting: <why>, running, not running, no answer
    address: str  # where clients reach it
    metrics: str  # its /metrics URL, or "" when it has none


@dataclasses.dataclass(frozen=True, slots=True)
class StackFile:
    worker: int | None = None
    api: int | None = None
    api_address: str | None = None
    broker_started: bool = False


def _stack_path(settings: Settings) -> Path:
    return runfiles.run_dir(settings) / "stack.json"


def read_stack(settings: Settings) -> StackFile:
    try:
        obj = orjson.loads(_stack_path(settings).read_bytes())
        return StackFile(**obj)
    except (OSError, orjson.JSONDecodeError, TypeError):
        return StackFile()


def _write_stack(settings: Settings, stack: StackFile) -> None:
    path = _stack_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(dataclasses.asdict(stack)))
    tmp.replace(path)


def logs_dir(settings: Settings) -> Path:
    return settings.home / "logs"


def _ours(pid: int | None, needle: str) -> bool:
    """``pid`` runs and is a ``ragstream <needle>`` (a reused pid is not ours)."""
    if pid is None or not pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the record
    return needle.encode() in argv and any(b"ragstream" in a for a in argv)


def probe(address: str, path: str = "/readyz", timeout_s: float = 2.0) -> str:
    """``ready``, ``starting: <why>`` (503), or ``no answer``."""
    try:
        with urllib.request.urlopen(f"{address}{path}", timeout=timeout_s) as resp:
            return "ready" if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        why = exc.read(200).decode("utf-8", "replace").strip()
        with contextlib.suppress(ValueError):
            why = str(orjson.loads(why).get("error") or why)
        return f"starting: {why}" if exc.code == 503 else f"HTTP {exc.code}"
    except (OSError, ValueError):
        return "no answer"


def broker_answers(bootstrap: str) -> bool:
    """Something listens at the first bootstrap address (a broker the user runs)."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def broker_is_local(settings: Settings) -> bool:
    host = settings.broker.split(",")[0].rpartition(":")[0]
    return host in LOCAL_HOSTS


def ps(settings: Settings) -> list[Proc]:
    """What runs for this home, in pipeline order."""
    rows: list[Proc] = []
    broker = kafka_local.status(settings)
    if broker is not None:
        rows.append(Proc("kafka", broker.pid, "running", broker.bootstrap, ""))
    else:
        answers = broker_answers(settings.broker)
        rows.append(Proc("kafka", None, "running" if answers else "no answer", settings.broker, ""))
    data_dir = lite_dir(settings)
    if data_dir is not None:
        served = find_server(data_dir)
        if served is not None:
            rows.append(Proc("milvus", served.pid, "running", served.uri, ""))
        else:
            rows.append(Proc("milvus", None, "not served", str(data_dir), ""))
    else:
        rows.append(Proc("milvus", None, "external", settings.milvus_target, ""))
    stack = read_stack(settings)
    if _ours(stack.worker, "worker"):
        rows.append(Proc("worker", stack.worker, "running", "(supervisor)", ""))
    order = {name: i for i, name in enumerate(PARTS)}
    for rec in sorted(runfiles.read(settings), key=lambda r: (order.get(r.name, 9), r.started)):
        rows.append(Proc(rec.name, rec.pid, probe(rec.address), rec.address, rec.metrics_url))
    return rows


def _spawn(settings: Settings, argv: list[str], log_name: str, env: dict[str, str]) -> int:
    logs = logs_dir(settings)
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / log_name, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ragstream.cli", *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the shell that ran `ragstream up`
        )
    return proc.pid


def webhook_secret(settings: Settings) -> str:
    """The configured secret, else the one ``up`` keeps in ``<home>/webhook.secret``."""
    if settings.webhook_secret:
        return settings.webhook_secret
    path = settings.home / "webhook.secret"
    with contextlib.suppress(OSError):
        kept = path.read_text().strip()
        if kept:
            return kept
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    made = secrets.token_hex(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(made + "\n")
    return made


def up(
    settings: Settings,
    *,
    fetchers: int = 1,
    api: bool = True,
    api_host: str = "127.0.0.1",
    api_port: int = 8088,
    wait_s: float = 300.0,
    note: Callable[[str], None] = lambda _msg: None,
    extra_env: dict[str, str] | None = None,
) -> list[Proc]:
    """Start what is not running, wait until all of it is ready; returns ``ps``.
    ``extra_env``: more environment for the processes it starts (the demo runs offline)."""
    stack = read_stack(settings)
    broker_started = stack.broker_started
    if (
        kafka_local.status(settings) is None
        and broker_is_local(settings)
        and not broker_answers(settings.broker)
    ):
        note(f"starting Kafka on {settings.broker}")
        kafka_local.up(settings, wait_s=min(wait_s, 120.0))
        broker_started = True
    env = {**os.environ, **settings.to_env(), **(extra_env or {})}
    worker = stack.worker
    if not _ours(worker, "worker"):
        note(f"starting the worker ({fetchers} fetcher{'s' if fetchers != 1 else ''})")
        worker = _spawn(settings, ["worker", "--fetchers", str(fetchers)], "worker.log", env)
    api_pid, api_address = stack.api, stack.api_address
    if api and not _ours(api_pid, "webhooks"):
        secret_env = {**env, "RAGSTREAM_WEBHOOK_SECRET": webhook_secret(settings)}
        note(f"starting the HTTP API on {api_host}:{api_port}")
        api_pid = _spawn(
            settings,
            ["webhooks", "--host", api_host, "--port", str(api_port)],
            "api.log",
            secret_env,
        )
        api_address = f"http://{runfiles.shown_host(api_host)}:{api_port}"
    _write_stack(settings, StackFile(worker, api_pid if api else None, api_address, broker_started))
    want = {"fetch": fetchers, "embed": 1, "write": 1, **({"api": 1} if api else {})}
    return _wait_ready(settings, want, worker, api_pid if api else None, wait_s, note)


def _wait_ready(
    settings: Settings,
    want: dict[str, int],
    worker: int | None,
    api_pid: int | None,
    wait_s: float,
    note: Callable[[str], None],
) -> list[Proc]:
    deadline = time.monotonic() + wait_s
    last = ""
    while True:
        rows = ps(settings)
        ready = {
            name: sum(1 for r in rows if r.name == name and r.state == "ready") for name in want
        }
        missing = [f"{name} ({ready[name]}/{n})" for name, n in want.items() if ready[name] < n]
        if not missing:
            return rows
        for pid, log_name in ((worker, "worker.log"), (api_pid, "api.log")):
            if pid is not None and not pid_alive(pid):
                raise RagstreamError(
                    f"{log_name.removesuffix('.log')} exited during start-up; "
                    f"{logs_dir(settings) / log_name}:\n{_tail(logs_dir(settings) / log_name)}"
                )
        status = "waiting for " + ", ".join(missing)
        if status != last:
            note(status)
            last = status
        if time.monotonic() > deadline:
            raise Unavailable(
                f"not ready after {wait_s:g}s: {', '.join(missing)}; logs in {logs_dir(settings)}"
            )
        time.sleep(0.5)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(pid: int | None, needle: str, timeout_s: float) -> bool:
    if not _ours(pid, needle):
        return False
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # its own session: the group is its children too
    return True


def running(settings: Settings) -> bool:
    """Whether a worker started by ``up`` runs for this home."""
    return _ours(read_stack(settings).worker, "worker")


def down(
    settings: Settings,
    timeout_s: float = 60.0,
    note: Callable[[str], None] = lambda _m: None,
    keep_broker: bool = False,
) -> list[str]:
    """Stop what ``up`` started: the API, the worker (its stages and Lite server go with
    it), then the broker if ``up`` started it (and not ``keep_broker``). Returns what was
    stopped."""
    stack = read_stack(settings)
    stopped: list[str] = []
    if _stop(stack.api, "webhooks", timeout_s):
        stopped.append("api")
        note("stopped the HTTP API")
    if _stop(stack.worker, "worker", timeout_s):
        stopped.append("worker")
        note("stopped the worker")
    if stack.broker_started and not keep_broker and kafka_local.down(settings, timeout_s=timeout_s):
        stopped.append("kafka")
        note("stopped Kafka")
    _stack_path(settings).unlink(missing_ok=True)
    return stopped
