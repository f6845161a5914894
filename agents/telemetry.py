"""What a stage process tells the outside: ``/metrics``, ``/livez``, ``/readyz``, and a run file.

Each stage process serves one small HTTP endpoint (a thread, so a scrape never waits on
the event loop it is judging):

- ``/metrics``: Prometheus text of :mod:`streams.metrics`;
- ``/livez``: 200 while the event loop turns (a heartbeat task beats every second); 503
  once it has not for ``probe_stall_s``: a loop stuck in a blocking call is a process to
  restart, whatever its threads still answer;
- ``/readyz``: 200 once the stage said it is ready (model loaded, Milvus reached...) and
  it is alive; 503 with the reason before.

The address goes into ``<home>/run/<stage>-<pid>.json`` so ``ragstream ps``/``status`` find
every local process without a port plan; in a container a fixed
``RAGSTREAM_METRICS_PORT`` and ``RAGSTREAM_METRICS_HOST=0.0.0.0`` give Prometheus and
Kubernetes a known address instead. Messages in and out are counted by a Faust sensor
(every event the app reads, every send the broker acknowledged), so stage code counts
only what only it knows (dead letters, batches, windows, freshness).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import logging
import threading
import time
from pathlib import Path
from typing import Any

import faust
from faust.types import TP
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams import metrics, runfiles
from streams.settings import Settings

log = logging.getLogger(__name__)

LAG_EVERY_S = 5.0


class Health:
    """The process's liveness (heartbeat age) and readiness (what the stage said)."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.beat = time.monotonic()
        self.not_ready: str | None = "starting"

    def live(self) -> tuple[bool, str]:
        age = time.monotonic() - self.beat
        if age > self.stall_s:
            return False, f"event loop stalled for {age:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        alive, why = self.live()
        if not alive:
            return False, why
        if self.not_ready is not None:
            return False, self.not_ready
        return True, "ok"


#: This process's health; stages call :func:`set_ready` once they can do their work.
HEALTH = Health(stall_s=60.0)


def set_ready(reason: str | None = None) -> None:
    """Ready (``None``) or not, with why: read by ``/readyz``."""
    HEALTH.not_ready = reason


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif path in ("/livez", "/healthz"):
            ok, why = HEALTH.live()
            self._send(200 if ok else 503, why.encode() + b"\n")
        elif path == "/readyz":
            ok, why = HEALTH.ready()
            self._send(200 if ok else 503, why.encode() + b"\n")
        else:
            self._send(404, b"not found: /metrics, /livez, /readyz\n")

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # a scrape every few seconds is not news


def serve(settings: Settings, name: str) -> tuple[http.server.ThreadingHTTPServer, Path] | None:
    """Start the endpoint (``metrics_port`` 0 = any free port, -1 = none) and write the
    run file; returns the server and the file, or ``None`` when turned off."""
    if settings.metrics_port < 0:
        return None
    address = (settings.metrics_host, settings.metrics_port)
    server = http.server.ThreadingHTTPServer(address, _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="telemetry", daemon=True).start()
    host, port = server.server_address[:2]
    rec = runfiles.write(settings, name, str(host), int(port))
    log.info("%s: metrics and probes on %s", name, rec.metrics_url)
    return server, rec.path


class Sensor(faust.Sensor):
    """Counts what the app reads and what the broker acknowledged, per topic."""

    def __init__(self, stage: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage

    def on_message_in(self, tp: TP, offset: int, message: Any) -> None:
        metrics.MESSAGES_IN.labels(self.stage, tp.topic).inc()

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        topic = getattr(metadata, "topic", None) or "unknown"
        metrics.MESSAGES_OUT.labels(self.stage, topic).inc()


def install(app: faust.App, settings: Settings, stage: str) -> None:
    """Give a stage's app its endpoint, sensor, heartbeat and lag sampler."""
    HEALTH.stall_s = settings.probe_stall_s
    serve(settings, stage)
    app.sensors.add(Sensor(stage))
    metrics.UP.labels(stage).set(1)

    @app.timer(1.0)
    async def heartbeat() -> None:
        HEALTH.beat = time.monotonic()

    @app.timer(LAG_EVERY_S)
    async def sample_lag() -> None:
        await record_lag(app, stage)


async def record_lag(app: faust.App, stage: str) -> None:
    """Per assigned partition: the partition's end minus this consumer's position."""
    consumer = app.consumer
    seen: set[tuple[str, str]] = set()
    for tp in consumer.assignment():
        try:
            position = await asyncio.wait_for(consumer.position(tp), 2.0)
            end = consumer.highwater(tp)
        except Exception:  # a partition being revoked: next sample
            continue
        if position is None or end is None:
            continue
        label = (tp.topic, str(tp.partition))
        seen.add(label)
        metrics.CONSUMER_LAG.labels(stage, *label).set(max(end - position, 0))
    # Partitions revoked since the last sample: no stale lag left behind.
    for labels in list(metrics.CONSUMER_LAG._metrics):  # prometheus_client's own index
        if labels[0] == stage and (labels[1], labels[2]) not in seen:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(*labels)
