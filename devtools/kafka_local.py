"""A real single-node Apache Kafka broker, managed by ragstream itself (no Docker).

``ragstream kafka up`` fetches the broker's jars once with Maven (``kafka-pom.xml`` next to
this file: ``org.apache.kafka:kafka_2.13`` and its runtime dependencies, plus Log4j 2), formats
a KRaft storage directory once, and starts ``java -cp 'libs/*' kafka.Kafka server.properties``
detached, as broker and controller in one process bound to 127.0.0.1 only.

Layout::

    <cache_dir>/kafka-<version>/libs/      the jars, shared by every checkout
    <home>/kafka/server.properties         written at every start (ports, version header)
    <home>/kafka/log4j2.properties         Log4j 2 configuration: INFO to stdout
    <home>/kafka/kafka.log                 the broker's stdout and stderr (previous: .log.1)
    <home>/kafka/kafka.pid                 pid of the running broker
    <home>/kafka/data/                     log.dirs and the KRaft metadata log

Tests start a broker of their own with ``up(settings.model_copy(update={"home": tmp_path,
"broker": f"127.0.0.1:{free_port()}"}))`` and stop it with ``down``.

``up(..., secure=SecureListeners(...))`` also opens the listeners of a production broker on
loopback: SASL_SSL (PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for the given users: PLAIN's in
the listener's JAAS line, SCRAM's written into the metadata log when the storage is
formatted) and, optionally, SSL requiring a client certificate. Key and certificates are PEM
files (``ssl.keystore.type=PEM``), so no Java keystore is involved;
``tests/test_kafka_security.py`` makes them with ``openssl``. The PLAINTEXT listener stays
(the broker's own, and ``up``'s readiness check).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from streams.errors import RagstreamError
from streams.milvus_lite import pid_alive
from streams.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

POM = Path(__file__).with_name("kafka-pom.xml")
HOST = "127.0.0.1"
DEFAULT_PORT = 9092
#: A development broker shares a small machine with the stages it serves: the serial
#: collector (no concurrent GC threads) and the C1 compiler only (the C2 compiler's
#: threads burn cores compiling while the broker warms up, which every fresh broker of
#: a test or a bench run does) cut the broker's CPU for the same bench run from 2.7-3.1
#: to 1.5-1.7 CPU seconds, measured in turns on 2 cores; a dev broker needs no peak speed.
JVM_OPTS = [
    "-Xms256m",
    "-Xmx1g",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:CICompilerCount=1",
    "-Djava.awt.headless=true",
]
_MARKER = ".ragstream-complete"
_VERSION_HEADER = "# ragstream kafka_version="
_LOG4J2 = """\
# Written by ragstream (kafka_local.py); rewritten at every `ragstream kafka up`.
status = warn
shutdownHook = disable
appender.out.type = Console
appender.out.name = STDOUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""

#: Popen objects of brokers this process started, so that ``down`` can reap them (no zombie,
#: no "subprocess still running" warning when the object would be garbage-collected).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class BrokerInfo:
    """A running local broker."""

    pid: int
    bootstrap: str
    home: Path
    version: str
    log: Path


@dataclass(frozen=True)
class SecureListeners:
    """Listeners a production broker would have, beside the PLAINTEXT one.

    ``keystore``: PEM file with the broker's unencrypted PKCS#8 private key and its
    certificate (chain), valid for 127.0.0.1; ``truststore``: PEM CA(s) whose client
    certificates the SSL listener accepts; ``users``: user -> password for SASL (PLAIN and
    both SCRAMs). SCRAM users are created when the storage is formatted: a home formatted
    before keeps its users.
    """

    sasl_ssl_port: int
    keystore: Path
    truststore: Path
    users: Mapping[str, str] = field(default_factory=dict)
    ssl_port: int | None = None  # SSL listener requiring a client certificate

    MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

    def listeners(self) -> dict[str, int]:
        named = {"SASL_SSL": self.sasl_ssl_port}
        if self.ssl_port is not None:
            named["SSL"] = self.ssl_port
        return named

    def properties(self) -> list[str]:
        plain_users = " ".join(f'user_{u}="{pw}"' for u, pw in self.users.items())
        lines = [
            f"sasl.enabled.mechanisms={','.join(self.MECHANISMS)}",
            "listener.name.sasl_ssl.plain.sasl.jaas.config="
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={self.keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.truststore}",
            "listener.name.ssl.ssl.client.auth=required",
        ]
        for mech in self.MECHANISMS[1:]:
            lines.append(
                f"listener.name.sasl_ssl.{mech.lower()}.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            )
        return lines

    def scram_arguments(self) -> list[str]:
        """``kafka-storage format`` arguments creating each user for both SCRAMs."""
        out = []
        for user, password in self.users.items():
            for mech in self.MECHANISMS[1:]:
                out += ["--add-scram", f"{mech}=[name={user},password={password}]"]
        return out


# --- paths ----------------------------------------------------------------------------------


def kafka_dir(settings: Settings) -> Path:
    """``<home>/kafka``, absolute."""
    return (settings.home / "kafka").resolve()


def _pid_file(settings: Settings) -> Path:
    return kafka_dir(settings) / "kafka.pid"


def _log_file(settings: Settings) -> Path:
    return kafka_dir(settings) / "kafka.log"


def _config_file(settings: Settings) -> Path:
    return kafka_dir(settings) / "server.properties"


def _data_dir(settings: Settings) -> Path:
    return kafka_dir(settings) / "data"


def broker_port(settings: Settings) -> int:
    """The port of the first ``host:port`` in ``settings.broker`` (9092 when it has none)."""
    first = settings.broker.split(",")[0].strip()
    if first.count(":") == 1:
        _, _, port = first.rpartition(":")
    elif first.startswith("[") and "]:" in first:  # [::1]:9092
        port = first.rsplit("]:", 1)[1]
    else:
        return DEFAULT_PORT
    try:
        return int(port)
    except ValueError:
        raise RagstreamError(
            f"cannot read a port from RAGSTREAM_BROKER={settings.broker!r}"
        ) from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM's acceptor does
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _port_answers(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- jars -----------------------------------------------------------------------------------


def ensure_jars(settings: Settings) -> Path:
    """The ``libs`` directory of Apache Kafka ``settings.kafka_version``, fetched once.

    Maven copies ``kafka_2.13`` and its runtime dependencies into a temporary directory next
    to the target; a marker file is written last and the directory renamed into place, so an
    interrupted download is redone and concurrent callers never see half a classpath.
    """
    version = settings.kafka_version
    root = (settings.cache_dir / f"kafka-{version}").resolve()
    libs = root / "libs"
    if (libs / _MARKER).is_file():
        return libs
    java, mvn = shutil.which("java"), shutil.which("mvn")
    if java is None:
        raise RagstreamError("`java` not found on PATH: the local Kafka broker needs Java 17+")
    if mvn is None:
        raise RagstreamError(
            "`mvn` not found on PATH: Maven fetches the Kafka jars once "
            "(Debian/Ubuntu: apt-get install maven), or point RAGSTREAM_BROKER at a broker "
            "you run yourself (see docker-compose.kafka.yml)"
        )
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".libs-*"):  # temporary dirs of runs killed over an hour ago
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    if libs.exists():
        if (libs / _MARKER).is_file():  # a concurrent caller just finished
            return libs
        shutil.rmtree(libs, ignore_errors=True)  # no marker: not ours to trust, redo it
    tmp = Path(tempfile.mkdtemp(prefix=".libs-", dir=root))
    log.info("fetching Apache Kafka %s jars with Maven (once) into %s ...", version, libs)
    started = time.monotonic()
    cmd = [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={tmp}",
        f"-Dkafka.version={version}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False)
        jars = list(tmp.glob("kafka_2.13-*.jar"))
        if proc.returncode != 0 or not jars:
            tail = _tail_text((proc.stdout or "") + (proc.stderr or ""), 30)
            raise RagstreamError(
                f"Maven could not fetch Apache Kafka {version} (exit {proc.returncode}):\n{tail}"
            )
        (tmp / _MARKER).write_text(f"{version}\n")
        try:
            tmp.rename(libs)
        except OSError as exc:
            if not (libs / _MARKER).is_file():  # not a concurrent winner: something odd
                raise RagstreamError(f"cannot move the Kafka jars to {libs}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("Kafka %s jars ready in %.1f s", version, time.monotonic() - started)
    return libs


# --- process helpers ------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (zombies count as dead; our own dead children are reaped)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    with contextlib.suppress(ChildProcessError, OSError):  # an untracked child of ours
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return pid_alive(pid)


def _is_our_broker(pid: int, settings: Settings) -> bool:
    """Whether ``pid`` is a ``kafka.Kafka`` started on this home's config (pid reuse guard)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid)  # no /proc: trust the pid file
    return b"kafka.Kafka" in argv and os.fsencode(_config_file(settings)) in argv


def _read_pid(settings: Settings) -> int | None:
    try:
        return int(_pid_file(settings).read_text().strip())
    except (OSError, ValueError):
        return None


def _read_config(settings: Settings) -> tuple[int | None, int | None, str | None]:
    """(broker port, controller port, kafka version) from this home's server.properties."""
    port = cport = version = None
    try:
        lines = _config_file(settings).read_text().splitlines()
    except OSError:
        return None, None, None
    for line in lines:
        if line.startswith(_VERSION_HEADER):
            version = line[len(_VERSION_HEADER) :].strip()
        elif line.startswith("listeners="):
            for listener in line.partition("=")[2].split(","):
                name, _, addr = listener.partition("://")
                p = int(addr.rpartition(":")[2])
                if name == "PLAINTEXT":
                    port = p
                elif name == "CONTROLLER":
                    cport = p
    return port, cport, version


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(_ANSI.sub("", text).rstrip().splitlines()[-lines:])


def _log_tail(settings: Settings, lines: int = 40) -> str:
    try:
        with _log_file(settings).open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            return _tail_text(f.read().decode("utf-8", "replace"), lines)
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[None]:
    """One ``up``/``down`` at a time per home."""
    d = kafka_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    with (d / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _metadata_ok(settings: Settings, bootstrap: str, timeout_s: float) -> bool:
    """Whether a Kafka metadata request answers with at least one live broker."""
    from streams import kafka

    ms = max(1000, int(timeout_s * 1000))
    # the PLAINTEXT listener, whatever the settings say production clients use
    local = settings.model_copy(
        update={"broker": bootstrap, "kafka_security_protocol": "PLAINTEXT"}
    )
    admin = kafka.admin(local, request_timeout_ms=ms, retry_backoff_ms=100)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout_s)
        return bool(cluster.get("brokers"))
    except Exception as exc:  # not ready yet, whatever the client raises
        log.debug("metadata request to %s failed: %r", bootstrap, exc)
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _wait_ready(
    settings: Settings, pid: int, port: int, deadline: float, proc: subprocess.Popen[bytes] | None
) -> None:
    bootstrap = f"{HOST}:{port}"
    while True:
        if (proc is not None and proc.poll() is not None) or not _alive(pid):
            code = f" (exit {proc.returncode})" if proc is not None else ""
            _pid_file(settings).unlink(missing_ok=True)
            raise RagstreamError(
                f"the Kafka broker exited during startup{code}; "
                f"last lines of {_log_file(settings)}:\n{_log_tail(settings)}"
            )
        left = deadline - time.monotonic()
        if _port_answers(port, timeout=min(1.0, max(0.1, left))) and _run_sync(
            _metadata_ok(settings, bootstrap, timeout_s=min(5.0, max(1.0, left)))
        ):
            return
        if time.monotonic() >= deadline:
            raise RagstreamError(
                f"the Kafka broker (pid {pid}) did not answer on {bootstrap} in time; "
                f"it is left running (`ragstream kafka down` stops it); "
                f"last lines of {_log_file(settings)}:\n{_log_tail(settings)}"
            )
        time.sleep(0.25)


# --- configuration --------------------------------------------------------------------------


def _cluster_id() -> str:
    """A Kafka ``Uuid`` string: 16 random bytes, URL-safe base64 without padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # Kafka never hands out ids that look like options
            return cid


def _server_properties(
    settings: Settings, port: int, cport: int, secure: SecureListeners | None = None
) -> str:
    data = _data_dir(settings)
    extra = secure.listeners() if secure is not None else {}
    listeners = ",".join(
        [f"PLAINTEXT://{HOST}:{port}", f"CONTROLLER://{HOST}:{cport}"]
        + [f"{name}://{HOST}:{p}" for name, p in extra.items()]
    )
    protocols = ",".join(
        ["CONTROLLER:PLAINTEXT", "PLAINTEXT:PLAINTEXT"] + [f"{n}:{n}" for n in extra]
    )
    return "\n".join(
        [
            f"{_VERSION_HEADER}{settings.kafka_version}",
            "# Written by ragstream (kafka_local.py) at every `kafka up`: edits are lost.",
            "# One node, broker and KRaft controller in one process, loopback only.",
            "process.roles=broker,controller",
            "node.id=1",
            f"listeners={listeners}",
            f"advertised.listeners={listeners}",
            f"listener.security.protocol.map={protocols}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"controller.quorum.bootstrap.servers={HOST}:{cport}",
            f"log.dirs={data}",
            "num.partitions=1",
            "default.replication.factor=1",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            *(secure.properties() if secure is not None else []),
            "",
        ]
    )


def _java_cmd(java: str, libs: Path, log4j2: Path, main: str, *args: str) -> list[str]:
    return [
        java,
        *JVM_OPTS,
        f"-Dlog4j2.configurationFile={log4j2}",
        "-cp",
        f"{libs}/*",
        main,
        *args,
    ]


def _format_storage(
    settings: Settings, java: str, libs: Path, log4j2: Path, scram: list[str] | None = None
) -> None:
    """Format ``data/`` as a one-node dynamic KRaft quorum, unless it already is."""
    data = _data_dir(settings)
    if (data / "meta.properties").is_file():
        return
    cid = _cluster_id()
    log.info("formatting KRaft storage in %s (cluster id %s)", data, cid)
    cmd = _java_cmd(
        java,
        libs,
        log4j2,
        "kafka.tools.StorageTool",
        "format",
        "--standalone",
        "--cluster-id",
        cid,
        "--config",
        str(_config_file(settings)),
        *(scram or []),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = _tail_text(proc.stdout + proc.stderr, 30)
        raise RagstreamError(f"formatting Kafka storage in {data} failed:\n{tail}")


# --- public API -----------------------------------------------------------------------------


def status(settings: Settings) -> BrokerInfo | None:
    """The broker of this home if its process runs (it may still be starting), else None."""
    pid = _read_pid(settings)
    if pid is None or not _alive(pid) or not _is_our_broker(pid, settings):
        return None
    port, _, version = _read_config(settings)
    return BrokerInfo(
        pid=pid,
        bootstrap=f"{HOST}:{port or broker_port(settings)}",
        home=kafka_dir(settings),
        version=version or settings.kafka_version,
        log=_log_file(settings),
    )


def up(
    settings: Settings,
    port: int | None = None,
    wait_s: float = 60,
    secure: SecureListeners | None = None,
) -> BrokerInfo:
    """Start this home's broker (or find it running) and return once it serves metadata.

    ``secure`` opens the listeners of a production broker too (see :class:`SecureListeners`);
    a broker already running keeps the listeners it has.

    The port is ``port`` or the one in ``settings.broker``; the controller listens on a second
    loopback port, kept across restarts. Raises ``RagstreamError`` with the end of
    ``kafka.log`` when the broker exits or is not ready within ``wait_s`` seconds.
    """
    started = time.monotonic()
    want = port if port is not None else broker_port(settings)
    with _locked(settings):
        running = status(settings)
        if running is not None:
            have = int(running.bootstrap.rpartition(":")[2])
            if port is not None and have != port:
                raise RagstreamError(
                    f"the broker of {running.home} already runs on {running.bootstrap} "
                    f"(pid {running.pid}); `ragstream kafka down` first to move it to {port}"
                )
            _wait_ready(settings, running.pid, have, started + wait_s, _CHILDREN.get(running.pid))
            return running
        _pid_file(settings).unlink(missing_ok=True)

        libs = ensure_jars(settings)
        java = shutil.which("java")
        if java is None:
            raise RagstreamError("`java` not found on PATH: the local Kafka broker needs Java 17+")
        started = time.monotonic()  # the download is not startup time
        if not _port_bindable(want):
            raise RagstreamError(
                f"port {want} on {HOST} is taken by another process; "
                "pick another with `ragstream kafka up --port N` (and RAGSTREAM_BROKER)"
            )
        _, cport, _ = _read_config(settings)  # the quorum remembers the controller's endpoint
        if cport is None or cport == want or not _port_bindable(cport):
            cport = free_port()
            while cport == want:
                cport = free_port()

        d = kafka_dir(settings)
        _data_dir(settings).mkdir(parents=True, exist_ok=True)
        _config_file(settings).write_text(_server_properties(settings, want, cport, secure))
        log4j2 = d / "log4j2.properties"
        log4j2.write_text(_LOG4J2)
        scram = secure.scram_arguments() if secure is not None else None
        _format_storage(settings, java, libs, log4j2, scram)

        logf = _log_file(settings)
        if logf.exists():
            logf.replace(logf.with_name("kafka.log.1"))
        cmd = _java_cmd(java, libs, log4j2, "kafka.Kafka", str(_config_file(settings)))
        with logf.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=d,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        _pid_file(settings).write_text(f"{proc.pid}\n")
        log.info("Kafka %s starting (pid %d), log in %s", settings.kafka_version, proc.pid, logf)
        _wait_ready(settings, proc.pid, want, started + wait_s, proc)
        log.info("Kafka ready on %s:%d in %.1f s", HOST, want, time.monotonic() - started)
        return BrokerInfo(
            pid=proc.pid,
            bootstrap=f"{HOST}:{want}",
            home=d,
            version=settings.kafka_version,
            log=logf,
        )


def down(settings: Settings, timeout_s: float = 30) -> bool:
    """Stop this home's broker: SIGTERM, then SIGKILL after ``timeout_s``. True if one ran."""
    with _locked(settings):
        pid = _read_pid(settings)
        if pid is None or not _alive(pid) or not _is_our_broker(pid, settings):
            _pid_file(settings).unlink(missing_ok=True)
            return False
        log.info("stopping Kafka (pid %d)", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            log.warning("Kafka (pid %d) ignored SIGTERM for %.0f s: SIGKILL", pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        _CHILDREN.pop(pid, None)
        _pid_file(settings).unlink(missing_ok=True)
        return True
