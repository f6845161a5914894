"""Where each local ragstream process says it runs: ``<home>/run/<name>-<pid>.json``.

A stage process or the HTTP API writes one file when it starts listening (its name, pid
and the address of its ``/metrics`` and probes) and removes it when it exits. ``ragstream
ps``, ``status`` and the bench read them, so nothing needs a port plan: ports are picked
free and found here. A process killed with SIGKILL leaves its file behind; readers keep
only files whose pid is alive (:func:`streams.milvus_lite.pid_alive`).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import time
from pathlib import Path

import orjson

from streams.milvus_lite import pid_alive
from streams.settings import Settings


@dataclasses.dataclass(frozen=True, slots=True)
class RunFile:
    name: str  # fetch, embed, write, api
    pid: int
    address: str  # http://host:port of /metrics, /livez, /readyz
    started: float
    path: Path

    @property
    def metrics_url(self) -> str:
        return f"{self.address}/metrics"


def run_dir(settings: Settings) -> Path:
    return settings.home / "run"


def shown_host(host: str) -> str:
    """The address a local reader connects to: a wildcard listener is reached on loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def write(settings: Settings, name: str, host: str, port: int) -> RunFile:
    """Record this process (atomically) and forget it at exit."""
    path = run_dir(settings) / f"{name}-{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = RunFile(name, os.getpid(), f"http://{shown_host(host)}:{port}", time.time(), path)
    record = {"name": rec.name, "pid": rec.pid, "address": rec.address, "started": rec.started}
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(record))
    tmp.replace(path)
    atexit.register(path.unlink, missing_ok=True)
    return rec


def read(settings: Settings, name: str | None = None) -> list[RunFile]:
    """Live processes' records (those named ``name`` if given), oldest first; files of
    dead processes are removed on the way."""
    out: list[RunFile] = []
    for path in sorted(run_dir(settings).glob("*.json")):
        try:
            obj = orjson.loads(path.read_bytes())
            rec = RunFile(obj["name"], int(obj["pid"]), obj["address"], obj["started"], path)
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # being written, or not ours
        if not pid_alive(rec.pid):
            path.unlink(missing_ok=True)
            continue
        if name is None or rec.name == name:
            out.append(rec)
    return sorted(out, key=lambda r: r.started)
