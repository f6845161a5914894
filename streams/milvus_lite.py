"""Milvus Lite served to many processes: the discovery file and the ``milvus-lite server``.

Milvus Lite opened embedded locks its data directory: one process at a time. So while a
worker writes, it serves the directory over loopback instead (``milvus-lite server``, a
child of the supervisor) and publishes the address next to it, in ``<dir>.server.json``
(pid, host, port, data_dir). Every process that opens Milvus asks :func:`connect_uri`:
the served ``http://127.0.0.1:PORT`` while a live server answers for this directory,
otherwise the directory itself (embedded, as before). A file is trusted only if its pid
runs a ``milvus-lite server`` on this very directory and its port answers, so a file left
by a killed worker, or copied along with the data, is ignored (and replaced by the next
server): a stale file can cost nothing but a fallback to embedded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streams.errors import ConfigError, StoreUnavailable
from streams.settings import Settings

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SERVER_FILE_SUFFIX = ".server.json"
SERVER_LOG_SUFFIX = ".server.log"
#: What milvus-lite prints when another process has the directory open embedded.
LOCKED_MARK = "DataDirLockedError"
#: Longest wait between two starts of a server that finds the directory locked.
MAX_BACKOFF_S = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class ServerInfo:
    """One ``milvus-lite server`` as its discovery file describes it."""

    pid: int
    host: str
    port: int
    data_dir: str
    owner: str = "worker"  # who started it: "worker" (stops with it) or "milvus up"

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"


def lite_dir(settings: Settings) -> Path | None:
    """The Lite data directory, absolute (the key of the discovery file); ``None`` when
    Milvus is a real server, which needs none of this."""
    if not settings.milvus_is_lite:
        return None
    return Path(settings.milvus_target).expanduser().resolve()


def server_file(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + SERVER_FILE_SUFFIX)


def server_log(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + SERVER_LOG_SUFFIX)


def read_server_file(data_dir: Path) -> ServerInfo | None:
    """The file's claim, unchecked; ``None`` when absent or unreadable (half a file from
    another writer never exists: it is written by rename)."""
    try:
        raw = json.loads(server_file(data_dir).read_text())
        return ServerInfo(
            pid=int(raw["pid"]),
            host=str(raw["host"]),
            port=int(raw["port"]),
            data_dir=str(raw["data_dir"]),
            owner=str(raw.get("owner", "worker")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_server_file(info: ServerInfo) -> None:
    """Atomically (rename), so a reader sees the old file or the new one, never half."""
    path = server_file(Path(info.data_dir))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(info)) + "\n")
    os.replace(tmp, path)


def remove_server_file(info: ServerInfo) -> None:
    """Only if the file still names this server: a successor's file stays."""
    current = read_server_file(Path(info.data_dir))
    if current is not None and current.pid == info.pid:
        server_file(Path(info.data_dir)).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped) counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _runs_server_on(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a ``milvus-lite server`` of ``data_dir``: a pid reused by another
    program must not pass for the server."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid_alive(pid)  # no /proc: trust the pid
    argv = raw.decode(errors="replace").split("\0")
    return "server" in argv and _arg(argv, "--data-dir") == str(data_dir)


def _arg(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def port_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def serves(info: ServerInfo, data_dir: Path) -> bool:
    """Whether the file's server is alive and serves ``data_dir`` now."""
    return (
        info.data_dir == str(data_dir)
        and pid_alive(info.pid)
        and _runs_server_on(info.pid, data_dir)
        and port_answers(info.host, info.port)
    )


def find_server(data_dir: Path) -> ServerInfo | None:
    """The live server of ``data_dir``, or ``None`` (no file, or a stale one)."""
    info = read_server_file(data_dir)
    return info if info is not None and serves(info, data_dir) else None


def connect_uri(settings: Settings) -> str:
    """The URI every process gives pymilvus: a real server's as configured; for Lite, the
    served address while a server answers for the directory, else the directory
    (embedded, one process at a time)."""
    data_dir = lite_dir(settings)
    if data_dir is None:
        return settings.milvus_target
    info = find_server(data_dir)
    return info.uri if info is not None else settings.milvus_target


def connect_kwargs(settings: Settings) -> dict[str, Any]:
    """What every process gives ``MilvusClient`` besides :func:`connect_uri`: for a Milvus
    server, its login (a token, or user and password) and TLS (a CA of our own, a client
    certificate, the name to check); nothing for Milvus Lite, embedded or served here, which
    has no login and speaks plain gRPC on loopback.

    pymilvus trusts a CA given alone as ``server_pem_path`` and sends a client certificate
    only with ``ca_pem_path``; ``secure`` turns TLS on (an ``https://`` URI does as well).
    """
    if settings.milvus_is_lite:
        return {}
    kwargs: dict[str, Any] = {}
    token = settings.milvus_token.get_secret_value()
    if token:
        kwargs["token"] = token
    if settings.milvus_user:
        kwargs["user"] = settings.milvus_user
        kwargs["password"] = settings.milvus_password.get_secret_value()
    if settings.milvus_ca_file or settings.milvus_target.startswith("https://"):
        kwargs["secure"] = True
    if settings.milvus_cert_file:
        kwargs["ca_pem_path"] = settings.milvus_ca_file
        kwargs["client_pem_path"] = settings.milvus_cert_file
        kwargs["client_key_path"] = settings.milvus_key_file
    elif settings.milvus_ca_file:
        kwargs["server_pem_path"] = settings.milvus_ca_file
    if settings.milvus_server_name:
        kwargs["server_name"] = settings.milvus_server_name
    return kwargs


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_command(data_dir: Path, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("milvus-lite")
    prog = [str(exe)] if exe.exists() else [sys.executable, "-m", "milvus_lite"]
    return [*prog, "server", "--data-dir", str(data_dir), "--host", HOST, "--port", str(port)]


def _spawn(
    data_dir: Path, port: int, preexec_fn: Callable[[], None] | None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server; its output goes to ``<dir>.server.log``. Returns the process and
    where this start's output begins in the log (to tell a lock from another failure)."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    logf = server_log(data_dir)
    with open(logf, "ab") as fh:
        offset = fh.tell()
        proc = subprocess.Popen(
            server_command(data_dir, port),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C meant for the worker reaches the stages, and the
            # server, stopped last, outlives their final writes.
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
    return proc, offset


def _log_since(data_dir: Path, offset: int) -> str:
    try:
        with open(server_log(data_dir), "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _stop_proc(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGINT first: milvus-lite drains requests and closes its files on it (SIGTERM
    would kill it mid-write; its writes survive that, but a clean close is cheaper)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LiteServer:
    """The worker's ``milvus-lite server``, driven by :meth:`poll` from the supervisor's
    loop (never blocking it): started, published once it answers, restarted on the same
    port when it dies (a connected writer's client reconnects by itself), and started again
    with backoff while another process has the directory open embedded. A server that is
    already live for the directory (``ragstream milvus up``) is used, not duplicated.
    """

    START_TIMEOUT_S = 60.0

    def __init__(self, data_dir: Path, preexec_fn: Callable[[], None] | None = None) -> None:
        self.data_dir = data_dir
        self.preexec_fn = preexec_fn
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: ServerInfo | None = None  # ours once it answers, or one adopted
        self.adopted = False
        self._log_offset = 0
        self._started_at = 0.0
        self._next_try = 0.0
        self._failures = 0

    @property
    def uri(self) -> str | None:
        return self.info.uri if self.info is not None else None

    def poll(self) -> str | None:
        """Advance; the URI while served, ``None`` while not (yet)."""
        now = time.monotonic()
        if self.proc is not None:
            return self._poll_own(now)
        if self.adopted and self.info is not None:
            if serves(self.info, self.data_dir):
                return self.info.uri
            log.warning("Milvus server %s went away; starting our own", self.info.uri)
            self.info, self.adopted = None, False
        if now < self._next_try:
            return None
        other = find_server(self.data_dir)
        if other is not None:
            self.info, self.adopted = other, True
            log.info(
                "Milvus Lite %s already served at %s (pid %d)", self.data_dir, other.uri, other.pid
            )
            return other.uri
        self.proc, self._log_offset = _spawn(self.data_dir, self.port, self.preexec_fn)
        self._started_at = now
        log.info(
            "starting milvus-lite server for %s on %s:%d (pid %d)",
            self.data_dir,
            HOST,
            self.port,
            self.proc.pid,
        )
        return None

    def _poll_own(self, now: float) -> str | None:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is None:
            if self.info is not None:
                return self.info.uri
            if port_answers(HOST, self.port, timeout_s=0.2):
                self.info = ServerInfo(self.proc.pid, HOST, self.port, str(self.data_dir))
                write_server_file(self.info)
                self._failures = 0
                log.info(
                    "Milvus Lite %s served at %s (%.1f s); clients connect there",
                    self.data_dir,
                    self.info.uri,
                    now - self._started_at,
                )
                return self.info.uri
            if now - self._started_at > self.START_TIMEOUT_S:
                log.warning("milvus-lite server did not answer in %.0f s", self.START_TIMEOUT_S)
                _stop_proc(self.proc, 5)
                rc = self.proc.returncode
            else:
                return None
        # it exited
        if self.info is not None:
            remove_server_file(self.info)
        output = _log_since(self.data_dir, self._log_offset)
        self.proc, self.info = None, None
        self._failures += 1
        wait = min(0.5 * 2 ** (self._failures - 1), MAX_BACKOFF_S)
        self._next_try = now + wait
        if LOCKED_MARK in output:
            log.warning(
                "Milvus Lite %s is open in another process (embedded: a `ragstream search`, "
                "a notebook?); the write stage waits for it; retrying in %.1f s",
                self.data_dir,
                wait,
            )
        else:
            tail = " | ".join(output.strip().splitlines()[-3:])
            log.warning(
                "milvus-lite server exited with %s (%s); restarting in %.1f s (log: %s)",
                rc,
                tail or "no output",
                wait,
                server_log(self.data_dir),
            )
            if self._failures >= 3:  # perhaps the port is taken now: a new one
                self.port = free_port()
        return None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop our server (an adopted one is left to its owner) and remove its file."""
        if self.proc is not None:
            _stop_proc(self.proc, timeout_s)
            log.info("milvus-lite server stopped (%s)", self.data_dir)
        if self.info is not None and not self.adopted:
            remove_server_file(self.info)
        self.proc, self.info = None, None


# --- standalone: ``ragstream milvus up|down|status`` ----------------------------------------


def _require_lite(settings: Settings) -> Path:
    data_dir = lite_dir(settings)
    if data_dir is None:
        raise ConfigError(
            f"Milvus is a server ({settings.milvus_target}): there is no Lite directory to serve"
        )
    return data_dir


def up(settings: Settings, port: int | None = None, wait_s: float = 60.0) -> ServerInfo:
    """Serve the Lite directory until :func:`down`, outliving this process; the live server
    if there is one already."""
    data_dir = _require_lite(settings)
    running = find_server(data_dir)
    if running is not None:
        return running
    chosen = port or free_port()
    proc, offset = _spawn(data_dir, chosen, None)
    info = ServerInfo(proc.pid, HOST, chosen, str(data_dir), owner="milvus up")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = _log_since(data_dir, offset)
            why = (
                "the directory is open in another process (embedded); close it first"
                if LOCKED_MARK in output
                else " | ".join(output.strip().splitlines()[-3:])
            )
            raise StoreUnavailable(f"milvus-lite server for {data_dir} exited: {why}")
        if port_answers(HOST, info.port, timeout_s=0.2):
            write_server_file(info)
            return info
        time.sleep(0.1)
    _stop_proc(proc, 5)
    raise StoreUnavailable(f"milvus-lite server for {data_dir} did not answer in {wait_s:.0f} s")


def status(settings: Settings) -> ServerInfo | None:
    data_dir = _require_lite(settings)
    return find_server(data_dir)


def down(settings: Settings, timeout_s: float = 15.0) -> ServerInfo | None:
    """Stop the server ``up`` started; ``None`` if none runs. A worker's server is the
    worker's: it would start it again, so it is refused here."""
    data_dir = _require_lite(settings)
    info = find_server(data_dir)
    if info is None:
        return None
    if info.owner != "milvus up":
        raise ConfigError(
            f"Milvus Lite {data_dir} is served by a ragstream worker (server pid {info.pid}); "
            "it stops with the worker"
        )
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(info.pid):
        time.sleep(0.1)
    if pid_alive(info.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
    remove_server_file(info)
    return info
