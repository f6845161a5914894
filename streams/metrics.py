"""Every Prometheus metric ragstream exports, named once, so dashboards and code agree.

Each stage runs in a process of its own (one Faust app per process, see
``agents/supervisor.py``), and each process serves its own ``/metrics``
(``agents/telemetry.py``); the ``stage`` label says which stage a series comes from, so
Prometheus can sum fetchers and still tell them from the embedder. Series are created
on first use, so a fetch process shows no embed metrics.

Label values are bounded: error classes and reasons come from the exception tree, status
classes are ``2xx``..``5xx`` or ``error``; hosts are the one open-ended label, so
:func:`host_label` keeps the first :data:`MAX_HOSTS` hosts a process sees and counts the rest
as ``other`` (a crawl of the whole web must not grow the registry without bound).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime

from prometheus_client import Counter, Gauge, Histogram

#: Distinct ``host`` label values one process keeps before counting new hosts as ``other``.
MAX_HOSTS = 200

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FRESHNESS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0)

MESSAGES_IN = Counter(
    "ragstream_messages_in_total", "Messages a stage consumed.", ["stage", "topic"]
)
MESSAGES_OUT = Counter(
    "ragstream_messages_out_total",
    "Messages a stage produced that the broker acknowledged.",
    ["stage", "topic"],
)
DEAD_LETTERS = Counter(
    "ragstream_dead_letters_total",
    "Messages a stage dead-lettered, by error class.",
    ["stage", "reason"],
)
FETCH_SECONDS = Histogram(
    "ragstream_fetch_seconds",
    "Time of one HTTP request of the fetch stage (robots.txt included), by status class.",
    ["status_class"],
    buckets=_LATENCY,
)
FETCH_REQUESTS = Counter(
    "ragstream_fetch_requests_total", "HTTP requests the fetch stage made, per host.", ["host"]
)
ENCODE_BATCH_TEXTS = Histogram(
    "ragstream_encode_batch_texts",
    "Texts in one model batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
ENCODE_BATCH_TOKENS = Histogram(
    "ragstream_encode_batch_tokens",
    "Tokens in one model batch (padding excluded).",
    buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
)
ENCODE_SECONDS = Histogram("ragstream_encode_seconds", "Model time of one batch.", buckets=_LATENCY)
ENCODE_TEXTS = Counter("ragstream_encode_texts_total", "Texts the model encoded.")
ENCODE_TOKENS = Counter("ragstream_encode_tokens_total", "Tokens the model encoded.")
EMBED_BUSY = Counter(
    "ragstream_embed_busy_seconds_total",
    "Seconds the model spent encoding; its rate is the embedder's busy fraction.",
)
WINDOW_ROWS = Histogram(
    "ragstream_window_rows",
    "Messages in one written window.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
WINDOW_SECONDS = Histogram(
    "ragstream_window_write_seconds",
    "Time of one window's Milvus write (upserts and trims).",
    buckets=_LATENCY,
)
ROWS_WRITTEN = Counter("ragstream_rows_written_total", "Rows upserted into Milvus.")
MILVUS_ERRORS = Counter(
    "ragstream_milvus_errors_total",
    "Milvus calls that failed: unavailable (retried) or rejected (dead-lettered).",
    ["kind"],
)
CONSUMER_LAG = Gauge(
    "ragstream_consumer_lag",
    "Messages not yet read by this process, per assigned partition.",
    ["stage", "topic", "partition"],
)
FRESHNESS = Histogram(
    "ragstream_freshness_seconds",
    "From a URL request's publish time to the commit of the window holding the page's "
    "last chunk: when the whole page is searchable.",
    buckets=_FRESHNESS,
)
CHUNK_FRESHNESS = Histogram(
    "ragstream_chunk_freshness_seconds",
    "From a URL request's publish time to the commit of the window holding one chunk.",
    buckets=_FRESHNESS,
)
HTTP_REQUESTS = Counter(
    "ragstream_http_requests_total",
    "Requests the HTTP API answered, by route and status.",
    ["route", "status"],
)
UP = Gauge("ragstream_stage_up", "1 while the stage runs; its labels say what runs.", ["stage"])

_hosts: set[str] = set()
_hosts_lock = threading.Lock()


def host_label(host: str) -> str:
    """The host itself for the first :data:`MAX_HOSTS` hosts, ``other`` after: a bounded
    label set however many hosts a crawl meets."""
    host = host.lower()
    with _hosts_lock:
        if host in _hosts:
            return host
        if len(_hosts) < MAX_HOSTS:
            _hosts.add(host)
            return host
    return "other"


def status_class(status: int | None) -> str:
    """``2xx``..``5xx`` for an HTTP status, ``error`` when no response came."""
    if status is None or not 100 <= status <= 599:
        return "error"
    return f"{status // 100}xx"


def age_s(requested_at: str | None, now_s: float) -> float | None:
    """Seconds from an ISO-8601 ``requested_at`` to ``now_s`` (epoch); ``None`` when it is
    missing or not a time (an older producer, a hand-written message). Clamped at 0: the
    publisher's clock may run ahead of the writer's."""
    if not requested_at:
        return None
    try:
        then = datetime.fromisoformat(requested_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    if then.tzinfo is None:
        return None
    return max(now_s - then.timestamp(), 0.0)


def freshness_samples(
    chunks: Iterable[tuple[str | None, int | None, int]], now_s: float
) -> tuple[list[float], list[float]]:
    """Per chunk and per page, the seconds from publish to ``now_s`` of a written window's
    upserts, given ``(requested_at, chunk_index, chunk_count)``. A page counts once its
    last chunk (index ``chunk_count - 1``) is written: unchanged chunks are never re-sent,
    so a page whose last chunk did not change is not sampled, rather than sampled early."""
    per_chunk: list[float] = []
    per_page: list[float] = []
    for requested_at, index, count in chunks:
        age = age_s(requested_at, now_s)
        if age is None:
            continue
        per_chunk.append(age)
        if index is not None and index == count - 1:
            per_page.append(age)
    return per_chunk, per_page
